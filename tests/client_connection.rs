//! The client side of HTTP/1.1 connections (`h1_server`): pipelining, `Connection: close`, HEAD, a connection
//! that moves to hyper mid-life (a body, a malformed head), a client that leaves while its request is served,
//! and idle connections during a shutdown. Raw sockets, so every byte on the wire is the one under test.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

/// One raw client connection, reading answers one at a time (pipelined ones stay buffered).
struct Raw<S = TcpStream> {
    s: S,
    buf: Vec<u8>,
}

/// One answer: the head as text (status line and fields) and the decoded body.
struct Answer {
    head: String,
    body: Vec<u8>,
    /// The trailer section of a chunked answer, as text.
    trailers: String,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn field(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The `path` the echo upstream reports having received.
    fn echoed_path(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("echo JSON");
        v["path"].as_str().unwrap_or_default().to_string()
    }
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw { s: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false once the gateway has closed.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match timeout(BOUND, self.s.read(&mut chunk)).await.expect("gateway answers within the bound") {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one answer (framed by Content-Length or chunked; none for `head_request`).
    async fn answer(&mut self, head_request: bool) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await, "closed before a whole head: {:?}", String::from_utf8_lossy(&self.buf));
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let mut a = Answer { head, body: Vec::new(), trailers: String::new() };
        if head_request || a.status() == 204 || a.status() == 304 {
            return a;
        }
        if let Some(len) = a.field("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "closed inside a body");
            }
            a.body = self.buf.drain(..len).collect();
            return a;
        }
        assert_eq!(a.field("transfer-encoding").as_deref(), Some("chunked"), "an answer without framing: {}", a.head);
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill().await, "closed inside a chunk size");
            };
            let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
            self.buf.drain(..line_end + 2);
            if size == 0 {
                let end = loop {
                    if self.buf.starts_with(b"\r\n") {
                        break 2;
                    }
                    if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    assert!(self.fill().await, "closed inside the trailer section");
                };
                a.trailers = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
                return a;
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill().await, "closed inside a chunk");
            }
            a.body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// True when the gateway closes the connection within `within` without sending anything more.
    async fn closes_within(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 64];
        matches!(timeout(within, self.s.read(&mut chunk)).await, Ok(Ok(0) | Err(_)))
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n").await;
    for want in ["/a", "/b?q=1", "/c"] {
        let a = c.answer(false).await;
        assert_eq!(a.status(), 200, "{}", a.head);
        assert_eq!(a.echoed_path(), want);
        assert!(a.field("date").is_some() && a.field("x-request-id").is_some(), "{}", a.head);
    }
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn connection_close_head_and_gateway_answers_keep_the_connection_in_step() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    // HEAD: the upstream's length is kept, no body follows, and the next answer is read in step.
    c.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(true).await;
    assert_eq!(a.status(), 200);
    assert!(a.field("content-length").is_some(), "{}", a.head);
    // A gateway-made answer: an encoded slash is refused before routing.
    c.send(b"GET /a%2fb HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 400, "{}", a.head);
    assert_eq!(a.field("content-length").map(|l| l.parse::<usize>().unwrap()), Some(a.body.len()));
    c.send(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.echoed_path(), "/last");
    assert_eq!(a.field("connection").as_deref(), Some("close"));
    assert!(c.closes_within(Duration::from_secs(2)).await, "the gateway closes after Connection: close");
    assert_eq!(up.hits(), 2, "HEAD and the last GET reached the upstream; the refused path did not");
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_moves_to_hyper_for_a_body_and_keeps_serving() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.echoed_path(), "/first");
    // The body arrives pipelined behind its head and before the next request.
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 200, "{}", a.head);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["len"], 5);
    assert_eq!(c.answer(false).await.echoed_path(), "/after");
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn a_malformed_head_after_a_plain_request_gets_hyper_400_and_a_close() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    ] {
        let mut c = Raw::connect(gw.http.unwrap()).await;
        c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(c.answer(false).await.status(), 200);
        c.send(bad).await;
        let a = c.answer(false).await;
        assert_eq!(a.status(), 400, "{:?}: {}", String::from_utf8_lossy(bad), a.head);
        assert!(c.closes_within(Duration::from_secs(2)).await);
    }
    assert_eq!(up.hits(), 3, "only the plain requests reached the upstream");
    gw.stop().await;
}

#[tokio::test]
async fn an_oversize_head_is_431_from_a_fresh_or_a_used_connection() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_header_bytes = \"8KiB\"\n")).await;
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * 1024));
    for warm in [false, true] {
        let mut c = Raw::connect(gw.http.unwrap()).await;
        if warm {
            c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(c.answer(false).await.status(), 200);
        }
        c.send(big.as_bytes()).await;
        assert_eq!(c.answer(false).await.status(), 431);
    }
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// An upstream that answers each request with `begin` (possibly nothing) and then never another byte, counting
/// the requests it received and the connections the gateway closed on it.
async fn stalling_upstream(begin: &'static [u8]) -> (SocketAddr, watch::Sender<usize>, watch::Sender<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (received, closed) = (watch::Sender::new(0), watch::Sender::new(0));
    let (r, c) = (received.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (r, c) = (r.clone(), c.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            c.send_modify(|n| *n += 1);
                            return;
                        }
                        Ok(_) => {
                            r.send_modify(|n| *n += 1);
                            if tcp.write_all(begin).await.is_err() {
                                c.send_modify(|n| *n += 1);
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, received, closed)
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request_upstream() {
    let (addr, received, closed) = stalling_upstream(b"").await;
    let up = Upstream::at(addr);
    // The upstream timeout (5s) would end the request anyway; the cancellation must come well before it.
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n").await;
    until_counted(&received, "the request reached the upstream").await;
    leave_and_see_the_upstream_closed(c, &closed).await;
    gw.stop().await;
}

#[tokio::test]
async fn idle_connections_close_at_once_when_a_drain_begins() {
    let up = spawn_upstream().await;
    let mut gw = spawn_gateway(&public_config(&up, "")).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = Raw::connect(gw.http.unwrap()).await;
        c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(c.answer(false).await.status(), 200);
        idle.push(c);
    }
    let running = gw.gw.take().unwrap();
    let t = Instant::now();
    running.begin_shutdown();
    for c in &mut idle {
        assert!(c.closes_within(Duration::from_secs(2)).await, "an idle keep-alive connection stayed open in the drain");
    }
    timeout(Duration::from_secs(5), running.wait()).await.expect("the drain ends once idle connections are closed");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn pipelined_requests_over_tls_http1() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&gw.cert_path(), &[b"http/1.1"])));
    let tcp = TcpStream::connect(gw.https.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = timeout(BOUND, connector.connect(name, tcp)).await.unwrap().unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c = Raw { s: tls, buf: Vec::new() };
    c.send(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\nGET /two HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    for want in ["/one", "/two"] {
        let a = c.answer(false).await;
        assert_eq!(a.echoed_path(), want);
        assert!(a.field("strict-transport-security").is_some(), "{}", a.head);
    }
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

/// An upstream that answers every request with `parts`, `pause` apart, keeping the connection.
async fn scripted_upstream(parts: &'static [&'static [u8]], pause: Duration) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        for (k, part) in parts.iter().enumerate() {
                            if k > 0 {
                                tokio::time::sleep(pause).await;
                            }
                            if tcp.write_all(part).await.is_err() {
                                return;
                            }
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Upstream::at(addr)
}

/// A chunked body with a trailer field.
async fn trailer_upstream() -> Upstream {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
                            5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n";
    scripted_upstream(&[ANSWER], Duration::ZERO).await
}

#[tokio::test]
async fn a_connection_idles_for_idle_timeout_after_an_answer_that_streamed_for_longer() {
    // The idle wait starts once the answer is written, not when it began.
    const PARTS: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n", b"1\r\nb\r\n", b"0\r\n\r\n"];
    let up = scripted_upstream(PARTS, Duration::from_millis(700)).await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nidle_timeout = \"1s\"\n")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    let started = Instant::now();
    c.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.body, b"ab");
    assert!(started.elapsed() > Duration::from_secs(1), "the answer streamed for longer than idle_timeout");
    // Idle for a fifth of idle_timeout, then the next request on the same connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.body, b"ab", "the connection was closed before idle_timeout");
    gw.stop().await;
}

#[tokio::test]
async fn chunked_answers_keep_their_trailers_for_clients_that_accept_them() {
    let up = trailer_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.body, b"hello world");
    assert_eq!(a.field("transfer-encoding").as_deref(), Some("chunked"));
    assert!(a.trailers.to_ascii_lowercase().contains("x-checksum: abc123"), "trailers: {:?}", a.trailers);
    // Without `TE: trailers` the body is the same and no trailer field is sent.
    c.send(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.body, b"hello world");
    assert_eq!(a.trailers, "\r\n", "an empty trailer section");
    gw.stop().await;
}

#[tokio::test]
async fn answer_trailers_lose_the_fields_a_client_acts_on_in_the_head() {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum, Set-Cookie, Strict-Transport-Security\r\n\r\n\
                            5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nSet-Cookie: session=upstream\r\nStrict-Transport-Security: max-age=0\r\n\r\n";
    let up = scripted_upstream(&[ANSWER], Duration::ZERO).await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let (mut h2, connection) = h2::client::handshake(gateway_tls(&gw, &[b"h2"]).await).await.expect("h2 handshake");
    tokio::spawn(connection);
    // A bodiless GET takes the lean client; a POST with a body hyper's: the same rule on both.
    for (method, body) in [("GET", None), ("POST", Some(&b"data"[..]))] {
        let req = http::Request::builder().method(method).uri(gw.https_url("/t")).body(()).unwrap();
        let (answer, mut send) = h2.send_request(req, body.is_none()).unwrap();
        if let Some(b) = body {
            send.send_data(bytes::Bytes::from_static(b), true).unwrap();
        }
        let mut body = timeout(BOUND, answer).await.unwrap().unwrap().into_body();
        while let Some(chunk) = timeout(BOUND, body.data()).await.unwrap() {
            chunk.unwrap();
        }
        let trailers = timeout(BOUND, body.trailers()).await.unwrap().unwrap().expect("trailers");
        assert_eq!(trailers.get("x-checksum").map(|v| v.to_str().unwrap()), Some("abc123"), "{method}");
        assert_eq!(trailers.len(), 1, "{method}: head-only fields passed as trailers: {trailers:?}");
    }
    gw.stop().await;
}

/// Waits until `n` reaches at least 1, within the bound.
async fn until_counted(n: &watch::Sender<usize>, what: &str) {
    timeout(BOUND, n.subscribe().wait_for(|n| *n >= 1)).await.unwrap_or_else(|_| panic!("{what}")).unwrap();
}

/// The client closes its connection: the gateway must close the upstream connection of its request well before the
/// upstream timeout (5 s) would.
async fn leave_and_see_the_upstream_closed(c: Raw, closed: &watch::Sender<usize>) {
    let left = Instant::now();
    drop(c);
    until_counted(closed, "the upstream connection was closed").await;
    assert!(left.elapsed() < Duration::from_secs(2), "ended after {:?}, not by the client leaving", left.elapsed());
}

#[tokio::test]
async fn a_client_that_leaves_during_a_stalled_answer_ends_it_upstream() {
    let (addr, received, closed) = stalling_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst bytes").await;
    let up = Upstream::at(addr);
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").await;
    until_counted(&received, "the request reached the upstream").await;
    // The head and the first bytes arrive; the rest never will.
    while !c.buf.windows(11).any(|w| w == b"first bytes") {
        assert!(c.fill().await, "the head and first bytes were forwarded");
    }
    leave_and_see_the_upstream_closed(c, &closed).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_half_close_after_pipelined_requests_still_answers_those_served_before_it_is_read() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    c.s.shutdown().await.unwrap();
    // While the second head waits in the buffer the client is not read, so its close cannot cancel the first.
    assert_eq!(c.answer(false).await.body, b"slow done");
    // The last one is served with nothing buffered: the close is seen and taken as the client leaving (hyper's
    // rule with half-close off, and nginx's), so it ends without an answer.
    assert!(c.closes_within(Duration::from_secs(2)).await);
    gw.stop().await;
}

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431_even_when_it_arrives_whole() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_header_bytes = \"8KiB\"\n")).await;
    // Complete within three reads, never partial and over the limit at once.
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(8 * 1024 + 512));
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(head.as_bytes()).await;
    assert_eq!(c.answer(false).await.status(), 431);
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_request_handed_to_hyper_during_a_drain_is_still_answered() {
    let up = spawn_upstream().await;
    let mut gw = spawn_gateway(&public_config(&up, "")).await;
    let mut c = Raw::connect(gw.http.unwrap()).await;
    c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.echoed_path(), "/first");
    // The next head begins before the drain and is completed after it: a body, so hyper takes the connection.
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Le").await;
    // Nothing signals that the gateway has read those bytes (an idle connection that has not is closed by the
    // drain, as hyper and nginx do): give it the time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let running = gw.gw.take().unwrap();
    running.begin_shutdown();
    c.send(b"ngth: 2\r\n\r\nhi").await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 200, "{}", a.head);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["len"], 2);
    assert!(c.closes_within(Duration::from_secs(2)).await, "closed after the one request");
    timeout(Duration::from_secs(5), running.wait()).await.expect("the drain ends after it");
}

#[tokio::test]
async fn http2_with_prior_knowledge_on_the_plain_listener_is_handed_to_hyper() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    // The HTTP/2 preface is no HTTP/1.1 head: the connection goes to hyper, which finds HTTP/2 in it.
    let h2c: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    for path in ["/one", "/two"] {
        let req = http::Request::get(gw.http_url(path)).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
        let rsp = timeout(BOUND, h2c.request(req)).await.expect("answered in time").unwrap();
        assert_eq!(rsp.version(), http::Version::HTTP_2);
        assert_eq!(rsp.status(), 200);
    }
    assert_eq!(up.hits(), 2);
    assert_eq!(up.last().unwrap().path_and_query, "/two");
    gw.stop().await;
}

/// The HTTP/2 connection preface (RFC 9113 §3.4) and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// What the gateway sends until it closes, or 2 s pass without a byte.
async fn reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        if n == 0 || out.len() > 1 << 16 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// True if an HTTP/2 SETTINGS frame (a server's first frame: type 4 on stream 0) is in `bytes`. An HTTP/1
/// answer with a JSON body has no NUL bytes.
fn has_h2_settings(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| w == [4, 0, 0, 0, 0, 0])
}

#[tokio::test]
async fn http2_starts_only_as_a_plain_connections_first_bytes_or_by_alpn() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    // After an HTTP/1.1 request, the preface is no request of any version (RFC 9113 §3.3: first bytes only).
    let mut tcp = TcpStream::connect(gw.http.unwrap()).await.unwrap();
    let mut bytes = b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec();
    bytes.extend_from_slice(H2_PREFACE);
    tcp.write_all(&bytes).await.unwrap();
    let got = reply(&mut tcp).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    assert!(!has_h2_settings(&got), "HTTP/2 began after an HTTP/1.1 request: {}", String::from_utf8_lossy(&got));
    // On TLS, ALPN chose HTTP/1.1: a preface as the first bytes does not switch either (§3.2).
    let mut tls = gateway_tls(&gw, &[b"http/1.1"]).await;
    tls.write_all(H2_PREFACE).await.unwrap();
    let got = reply(&mut tls).await;
    assert!(!has_h2_settings(&got), "HTTP/2 began where ALPN chose HTTP/1.1: {got:?}");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_request_names_one_host_of_host_syntax_and_an_absolute_target_wins() {
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let addr = gw.http.unwrap();
    // RFC 9112 §3.2: no Host on HTTP/1.1, two of them, or one an upstream could read another origin or a path
    // from, is a 400; nothing is forwarded.
    for head in [
        "GET /x HTTP/1.1\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: evil.test/admin?x=@y\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: user@evil.test\r\n\r\n",
        "GET http://user@evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    ] {
        let mut c = Raw::connect(addr).await;
        c.send(head.as_bytes()).await;
        let a = c.answer(false).await;
        assert_eq!(a.status(), 400, "{head:?}: {}", a.head);
    }
    assert_eq!(up.hits(), 0, "a request with a bad Host reached the upstream");

    // HTTP/1.0 needs none; an IPv6 literal with a port is a host.
    for head in ["GET /ten HTTP/1.0\r\n\r\n", "GET /six HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"] {
        let mut c = Raw::connect(addr).await;
        c.send(head.as_bytes()).await;
        assert_eq!(c.answer(false).await.status(), 200, "{head:?}");
    }
    assert_eq!(up.last().unwrap().headers["host"], "[::1]:8080");

    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2), for the upstream as for the log.
    let mut c = Raw::connect(addr).await;
    c.send(b"GET http://good.test/abs HTTP/1.1\r\nHost: evil.test\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status(), 200, "{}", a.head);
    assert_eq!(a.echoed_path(), "/abs");
    let seen = up.last().unwrap().headers;
    assert_eq!(seen["host"], "good.test");
    assert_eq!(seen["x-forwarded-host"], "good.test");

    // HTTP/2: a `host` naming another origin than :authority is malformed (RFC 9113 §8.3.1).
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(conn);
    let hits = up.hits();
    for (host, status) in [("evil.test", 400), ("127.0.0.1", 200)] {
        let authority = format!("127.0.0.1:{}", addr.port());
        let host = if status == 200 { authority.clone() } else { host.to_string() };
        let req = http::Request::get(format!("http://{authority}/h2")).header("host", host).body(()).unwrap();
        let (answer, _) = h2.send_request(req, true).unwrap();
        assert_eq!(timeout(BOUND, answer).await.unwrap().unwrap().status(), status);
    }
    assert_eq!(up.hits(), hits + 1);
    gw.stop().await;
}
