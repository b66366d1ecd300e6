//! The lean HTTP/1.1 exchange with plain-http upstreams (bodiless requests): connection reuse, the retry of an
//! idempotent request whose pooled connection was closed under it, and what the gateway does with upstream
//! answers that are malformed, doubly framed, truncated, chunked or bodiless. The upstream here is a scripted raw
//! socket, so each answer is exactly the bytes under test. The last test mutates answers at random (seeded,
//! bounded) and holds the gateway to what hyper's client reads from the same bytes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// What the scripted upstream does with one request.
enum Act {
    /// Writes these bytes; closes the connection afterwards when `close` (without saying so).
    Answer(Vec<u8>, bool),
    /// Reads the request and closes without a byte of answer (an upstream closing an idle connection just as
    /// the request arrives).
    Drop,
    /// Writes these bytes one at a time, each in its own segment.
    Dribble(Vec<u8>),
    /// Never answers, and keeps the connection open.
    Silent,
    /// Writes the first bytes, then the second after a pause (a body sent late, or not asked for).
    Late(Vec<u8>, Duration, Vec<u8>),
    /// Writes these bytes, then waits for the next request only this long before closing (an answer framed to
    /// run until the close then ends).
    Linger(Vec<u8>, Duration),
    /// Writes each piece after a pause.
    Paced(Vec<Vec<u8>>, Duration),
}

struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Request lines received, in order.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn as_upstream(&self) -> Upstream {
        Upstream::at(self.addr)
    }
}

/// Starts a raw upstream: `script(request line, index of the request on its connection)` decides each answer.
async fn scripted(script: impl Fn(&str, usize) -> Act + Send + Sync + 'static) -> Scripted {
    let script = Arc::new(script);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = Scripted {
        addr: listener.local_addr().unwrap(),
        connections: Arc::new(AtomicUsize::new(0)),
        requests: Arc::new(Mutex::new(Vec::new())),
    };
    let (connections, requests) = (s.connections.clone(), s.requests.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let (requests, script) = (requests.clone(), script.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut linger = None;
                for index in 0.. {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let read = match linger {
                            Some(wait) => match timeout(wait, tcp.read(&mut chunk)).await {
                                Ok(read) => read,
                                Err(_) => return,
                            },
                            None => tcp.read(&mut chunk).await,
                        };
                        match read {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    linger = None;
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
                    requests.lock().unwrap().push(line.clone());
                    match script(&line, index) {
                        Act::Drop => return,
                        Act::Silent => {
                            let _ = tcp.read(&mut chunk).await;
                            return;
                        }
                        Act::Dribble(bytes) => {
                            let _ = tcp.set_nodelay(true);
                            for b in bytes {
                                if tcp.write_all(&[b]).await.is_err() {
                                    return;
                                }
                                tokio::task::yield_now().await;
                            }
                        }
                        Act::Answer(bytes, close) => {
                            if tcp.write_all(&bytes).await.is_err() || close {
                                return;
                            }
                        }
                        Act::Paced(pieces, pause) => {
                            for piece in pieces {
                                tokio::time::sleep(pause).await;
                                if tcp.write_all(&piece).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Act::Linger(bytes, wait) => {
                            if tcp.write_all(&bytes).await.is_err() {
                                return;
                            }
                            linger = Some(wait);
                        }
                        Act::Late(first, pause, second) => {
                            if tcp.write_all(&first).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(pause).await;
                            if tcp.write_all(&second).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    s
}

fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}", body.len()).into_bytes()
}

/// An upstream that answers `path` with `answer` (closing afterwards when `close`) and anything else with "ok",
/// a gateway in front of it, and a client.
async fn special_answer(path: &'static str, answer: &'static [u8], close: bool) -> (Scripted, TestGateway, TestClient) {
    let up =
        scripted(move |line, _| if line.contains(path) { Act::Answer(answer.to_vec(), close) } else { Act::Answer(ok("ok"), false) }).await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    (up, gw, c)
}

fn config(up: &Scripted) -> String {
    public_config(&up.as_upstream(), "")
}

/// Sends a request and returns the status, headers and the body (or the error that cut it).
async fn exchange(c: &TestClient, method: &str, url: &str) -> (StatusCode, http::HeaderMap, Result<Bytes, String>) {
    try_exchange(c, method, url).await.expect("request is answered")
}

/// Like `exchange`, but a connection cut before the head arrived is an `Err`.
async fn try_exchange(c: &TestClient, method: &str, url: &str) -> Result<(StatusCode, http::HeaderMap, Result<Bytes, String>), String> {
    let req = Request::builder().method(method).uri(url).body(Full::new(Bytes::new())).unwrap();
    let rsp = timeout(BOUND, c.request(req)).await.expect("answered in time").map_err(|e| e.to_string())?;
    Ok(collected(rsp, "the gateway's").await)
}

/// An answer's status, fields and whole body (or the error that cut it), the body read within the bound.
async fn collected(rsp: http::Response<Incoming>, whose: &str) -> (StatusCode, http::HeaderMap, Result<Bytes, String>) {
    let (parts, body) = rsp.into_parts();
    let body = timeout(BOUND, body.collect()).await.unwrap_or_else(|_| panic!("{whose} body in time"));
    (parts.status, parts.headers, body.map(|b| b.to_bytes()).map_err(|e| e.to_string()))
}

// The gateway runs on this test's single-threaded runtime, so every request uses the same pool shard and the
// connection counts below are exact.

#[tokio::test]
async fn one_upstream_connection_serves_sequential_requests() {
    let up = scripted(|_, _| Act::Answer(ok("ok"), false)).await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    for i in 0..10 {
        let (status, _, body) = exchange(&c, "GET", &gw.http_url(&format!("/n/{i}"))).await;
        assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    }
    assert_eq!(up.requests().len(), 10);
    assert_eq!(up.connections(), 1, "the keep-alive connection to the upstream is reused");
    gw.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_request_is_retried_only_when_idempotent() {
    // Every connection answers its first request and silently drops its second.
    let up = scripted(|_, index| if index == 0 { Act::Answer(ok("first"), false) } else { Act::Drop }).await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    assert_eq!(exchange(&c, "GET", &gw.http_url("/a")).await.0, StatusCode::OK);
    // The pooled connection takes this GET and closes: the gateway retries it once on a new connection.
    let (status, _, body) = exchange(&c, "GET", &gw.http_url("/b")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("first")));
    assert_eq!(up.requests(), ["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /b HTTP/1.1"]);
    assert_eq!(up.connections(), 2);
    // A POST may have had an effect before the close: it is not repeated, the client gets a 502.
    let (status, _, body) = exchange(&c, "POST", &gw.http_url("/c")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body.unwrap(), Bytes::from(r#"{"error":"bad_gateway"}"#));
    assert_eq!(up.requests().iter().filter(|r| r.starts_with("POST /c")).count(), 1, "the POST reached the upstream once");
    gw.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_that_stops_answering_is_504_at_the_timeout() {
    // Each connection answers its first request and never its second.
    let up = scripted(|_, index| if index == 0 { Act::Answer(ok("first"), false) } else { Act::Silent }).await;
    let gw = spawn_gateway(&config(&up).replace("timeout = \"5s\"", "timeout = \"1s\"")).await;
    let c = client(&gw);
    assert_eq!(exchange(&c, "GET", &gw.http_url("/a")).await.0, StatusCode::OK);
    // The deadline of the first exchange has not passed when the second begins; the second's own one counts.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let asked = std::time::Instant::now();
    let (status, _, body) = exchange(&c, "GET", &gw.http_url("/b")).await;
    let took = asked.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body.unwrap(), Bytes::from(r#"{"error":"gateway_timeout"}"#));
    assert!(took >= std::time::Duration::from_millis(950) && took < std::time::Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(up.connections(), 1, "the silent connection was the pooled one");
    gw.stop().await;
}

#[tokio::test]
async fn malformed_upstream_answers_are_502_without_detail() {
    let up = scripted(|line, _| {
        let bytes = if line.contains("/garbage") {
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()
        } else if line.contains("/two-lengths") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()
        } else if line.contains("/huge-head") {
            format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(70 * 1024)).into_bytes()
        } else if line.contains("/upgrade") {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_vec()
        } else if line.contains("/status-799") {
            // No class of RFC 9110: not for a client to read, nor for a metrics series of its own.
            b"HTTP/1.1 799 Odd\r\nContent-Length: 0\r\n\r\n".to_vec()
        } else {
            ok("ok")
        };
        Act::Answer(bytes, false)
    })
    .await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    for path in ["/garbage", "/two-lengths", "/huge-head", "/upgrade", "/status-799"] {
        let (status, _, body) = exchange(&c, "GET", &gw.http_url(path)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(body.unwrap(), Bytes::from(r#"{"error":"bad_gateway"}"#), "{path}");
    }
    // None of those connections is reused: the next request opens its own and is served.
    let before = up.connections();
    assert_eq!(exchange(&c, "GET", &gw.http_url("/fine")).await.0, StatusCode::OK);
    assert_eq!(up.connections(), before + 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_doubly_framed_answer_is_decoded_by_transfer_encoding_and_not_passed_on() {
    let both = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (up, gw, c) = special_answer("/both", both, false).await;
    let (status, headers, body) = exchange(&c, "GET", &gw.http_url("/both")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("abc")));
    assert_ne!(headers.get("content-length").map(|v| v.to_str().unwrap()), Some("5"), "the upstream's Content-Length is dropped");
    // The connection that carried it is not trusted again.
    assert_eq!(exchange(&c, "GET", &gw.http_url("/next")).await.0, StatusCode::OK);
    assert_eq!(up.connections(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn head_chunked_and_bodiless_answers_keep_the_connection_in_step() {
    let up = scripted(|line, _| {
        let bytes = if line.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n".to_vec()
        } else if line.contains("/chunked") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n".to_vec()
        } else if line.contains("/none") {
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
        } else if line.contains("/dribble") {
            return Act::Dribble(b"HTTP/1.1 200 OK\r\nX-Slow: yes\r\nContent-Length: 7\r\n\r\ndribble".to_vec());
        } else if line.contains("/hint") {
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter".to_vec()
        } else {
            ok("ok")
        };
        Act::Answer(bytes, false)
    })
    .await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    let (status, headers, body) = exchange(&c, "HEAD", &gw.http_url("/h")).await;
    assert_eq!((status, body.unwrap().len()), (StatusCode::OK, 0));
    assert_eq!(headers["content-length"], "9", "a HEAD answer keeps the length of what a GET would get");
    let (status, _, body) = exchange(&c, "GET", &gw.http_url("/chunked")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("hello world")));
    assert_eq!(exchange(&c, "GET", &gw.http_url("/none")).await.0, StatusCode::NO_CONTENT);
    let (status, _, body) = exchange(&c, "GET", &gw.http_url("/hint")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("after")));
    let (status, headers, body) = exchange(&c, "GET", &gw.http_url("/dribble")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("dribble")), "a head and body sent a byte at a time");
    assert_eq!(headers["x-slow"], "yes");
    let (status, _, body) = exchange(&c, "GET", &gw.http_url("/last")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    // Every one of these ended cleanly, so one connection carried them all but the HEAD answer's: it declared
    // a body it must not send, and is not trusted to keep to that (see the next test).
    assert_eq!(up.connections(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_late_body_after_a_head_answer_never_becomes_the_next_requests_answer() {
    // A server that gets HEAD wrong: the head, then (late, in its own segment) a body, here shaped as a whole
    // answer. On a reused connection the next request would read it as its own.
    let up = scripted(|line, _| {
        if line.starts_with("HEAD") {
            let late = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL".to_vec();
            Act::Late(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n".to_vec(), Duration::from_millis(50), late)
        } else {
            Act::Answer(ok("ok"), false)
        }
    })
    .await;
    let gw = spawn_gateway(&config(&up)).await;
    let c = client(&gw);
    for _ in 0..3 {
        assert_eq!(exchange(&c, "HEAD", &gw.http_url("/sloppy")).await.0, StatusCode::OK);
        let (status, _, body) = exchange(&c, "GET", &gw.http_url("/next")).await;
        assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")), "the next request got the late body");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_truncated_upstream_body_is_never_delivered_as_complete() {
    let (up, gw, c) = special_answer("/short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true).await;
    // Whether the head got out before the cut or not, the client must see a broken exchange, never a short body.
    match try_exchange(&c, "GET", &gw.http_url("/short")).await {
        Err(_) => {}
        Ok((status, _, body)) => assert!(body.is_err(), "{status}: a short body was delivered as complete: {body:?}"),
    }
    assert_eq!(up.requests().len(), 1);
    // The gateway itself is fine.
    assert_eq!(exchange(&client(&gw), "GET", &gw.http_url("/after")).await.0, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_fields_of_an_answer_stay_with_the_upstream_and_the_gateway_sets_its_own() {
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\
                   Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Request-Id: from-upstream\r\n\
                   Server: secret/1.0\r\nX-Content-Type-Options: upstream\r\nX-End: kept\r\n\r\nok";
    let (up, gw, c) = special_answer("/hop", answer, false).await;
    let (status, headers, body) = exchange(&c, "GET", &gw.http_url("/hop")).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    for name in ["connection", "x-hop", "keep-alive", "proxy-authenticate", "upgrade", "server"] {
        assert!(!headers.contains_key(name), "{name} reached the client: {headers:?}");
    }
    let ids: Vec<_> = headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "one request id: {ids:?}");
    assert!(ids[0].len() == 32 && ids[0] != "from-upstream", "the gateway's own request id: {ids:?}");
    let xcto: Vec<_> = headers.get_all("x-content-type-options").iter().collect();
    assert_eq!(xcto, ["upstream"], "the upstream's own secure header is kept, once");
    assert_eq!(headers["x-frame-options"], "DENY", "a missing secure header is added");
    assert_eq!(headers["x-end"], "kept");
    // The answer asked for nothing that stops reuse.
    assert_eq!(exchange(&c, "GET", &gw.http_url("/next")).await.0, StatusCode::OK);
    assert_eq!(up.connections(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_answers_own_fields_reach_an_http1_client_as_checked_lines_each_once() {
    // Every field the lean client leaves in the upstream's head, and every one it must not pass on, in odd cases.
    let answer = b"HTTP/1.1 200 OK\r\nDATE: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 5, 5\r\nKEEP-ALIVE: timeout=5\r\n\
                   Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nTE: trailers\r\nX-REQUEST-ID: from-upstream\r\nSERVER: up\r\n\
                   X-Powered-By: php\r\nContent-Type:   text/plain  \r\nX-Frame-Options: SAMEORIGIN\r\nX-Odd: a\tb\r\n\
                   Content-Length: 5\r\n\r\nhello";
    let (up, gw, _c) = special_answer("/raw", answer, false).await;
    let request = b"GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (text, closed) = raw_exchange(gw.http.expect("http listener"), request, BOUND).await;
    assert!(closed, "the gateway closes after the answer it was asked to close after");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    assert_eq!(body, "hello");
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
    let fields: Vec<(String, &str)> =
        lines.map(|l| l.split_once(": ").map(|(n, v)| (n.to_ascii_lowercase(), v)).expect("a field line")).collect();
    let values = |name: &str| fields.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).collect::<Vec<_>>();
    assert_eq!(values("date"), ["Sun, 06 Nov 1994 08:49:37 GMT"], "the upstream's Date, and no second one");
    assert_eq!(values("content-length"), ["5"], "one length, as the one value it means");
    assert_eq!(values("content-type"), ["text/plain"]);
    assert_eq!(values("x-frame-options"), ["SAMEORIGIN"], "the upstream's own secure header, once");
    assert_eq!(values("x-content-type-options"), ["nosniff"]);
    assert_eq!(values("x-odd"), ["a\tb"]);
    assert_eq!(values("connection"), ["close"]);
    let ids = values("x-request-id");
    assert!(ids.len() == 1 && ids[0].len() == 32, "the gateway's own request id only: {ids:?}");
    for gone in ["keep-alive", "upgrade", "proxy-authenticate", "te", "server", "x-powered-by", "transfer-encoding"] {
        assert!(values(gone).is_empty(), "{gone} reached the client: {head}");
    }
    assert_eq!(up.requests().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn bodiless_answers_on_a_cors_route_keep_their_framing_and_take_the_policys_fields() {
    // HEAD and 304 answers carry no body whatever their length fields say; on a CORS route their fields move into
    // the map (where the policy replaces the upstream's own Access-Control-*), and the framing must survive that.
    let up = scripted(|line, _| {
        let bytes = if line.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nAccess-Control-Allow-Origin: *\r\nETag: \"h\"\r\n\r\n".to_vec()
        } else if line.contains("/cached") {
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: max-age=60\r\n\r\n".to_vec()
        } else {
            ok("ok")
        };
        Act::Answer(bytes, false)
    })
    .await;
    let cors = "\n[cors]\nallow_origins = [\"https://app.example.com\"]\nallow_methods = [\"GET\", \"HEAD\"]\n";
    let gw = spawn_gateway(&format!("{}{cors}", config(&up))).await;
    let ask = |method: &str, path: &str, last: bool| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    // Pipelined on one connection: a body read where there is none would swallow the next answer.
    let requests = ask("HEAD", "/h", false) + &ask("GET", "/cached", false) + &ask("GET", "/after", true);
    let (text, closed) = raw_exchange(gw.http.expect("http listener"), requests.as_bytes(), BOUND).await;
    assert!(closed, "{text}");
    let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "three answers, each framed right: {text}");
    for (i, (status, length)) in [("200", Some("9")), ("304", None), ("200", Some("2"))].into_iter().enumerate() {
        let a = answers[i].to_ascii_lowercase();
        assert!(a.starts_with(status), "answer {i}: {a}");
        let (head, body) = a.split_once("\r\n\r\n").expect("a whole head");
        let values = |name: &str| head.lines().filter_map(|l| l.strip_prefix(name)).map(str::trim).collect::<Vec<_>>();
        assert_eq!(values("access-control-allow-origin:"), ["https://app.example.com"], "answer {i}: the policy's, once");
        assert_eq!(values("content-length:"), length.into_iter().collect::<Vec<_>>(), "answer {i}");
        assert_eq!(body, if i == 2 { "ok" } else { "" }, "answer {i}: no body on HEAD and 304");
    }
    assert!(answers[0].to_ascii_lowercase().contains("etag: \"h\""), "{}", answers[0]);
    assert!(answers[1].to_ascii_lowercase().contains("etag: \"v1\""), "{}", answers[1]);
    // The HEAD answer declared a body, so its connection was not reused; the 304 one was (it declared none).
    assert_eq!(up.connections(), 2, "the upstream connections stayed in step too");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Mutated answers, compared with what hyper's client (a strict, independent reader) makes of the same bytes.

/// Well-formed answers of every framing, the seeds of the mutations.
const ANSWERS: [&[u8]; 9] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close",
];

/// What a mutation inserts or overwrites with besides framing syntax: whole framing fields and answers.
const PIECES: [&[u8]; 10] = [
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Connection: close\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
    b"\r\n\r\n",
    b" chunked",
];

/// Fields the gateway sets or replaces itself; every other field of its answer must be one the upstream sent.
const GATEWAY_FIELDS: [&str; 13] = [
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-request-id",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "content-security-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
    "strict-transport-security",
];

/// What hyper's client, on a connection of its own, makes of the upstream's answer to `path`.
async fn hyper_client_reads(upstream: SocketAddr, path: &str) -> Result<(StatusCode, http::HeaderMap, Result<Bytes, String>), String> {
    let tcp = tokio::net::TcpStream::connect(upstream).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder().uri(path).header("host", "up").body(Full::new(Bytes::new())).unwrap();
    let rsp = timeout(BOUND, send.send_request(req)).await.expect("hyper answered in time").map_err(|e| e.to_string())?;
    Ok(collected(rsp, "hyper's").await)
}

#[tokio::test]
async fn mutated_answers_pass_only_as_hyper_reads_them_and_never_reach_the_next_request() {
    // Bounded: PORTCULLIS_FUZZ_CASES answers (default 240), from PORTCULLIS_FUZZ_SEED.
    let (count, seed) = fuzz_settings(240, 0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng::new(seed);
    let cases: Arc<Vec<Vec<u8>>> = Arc::new((0..count).map(|i| mutate(&mut rng, ANSWERS[i % ANSWERS.len()], &PIECES, 3, 12)).collect());
    let script_cases = cases.clone();
    let up = scripted(move |line, _| {
        let number = |prefix: &str| line.split_once(prefix).and_then(|(_, rest)| rest.split(' ').next()?.parse::<usize>().ok());
        match (number("/case/"), number("/next/")) {
            (Some(k), _) => Act::Linger(script_cases[k].clone(), Duration::from_millis(100)),
            (_, Some(k)) => Act::Answer(ok(&format!("next-{k}")), false),
            _ => Act::Answer(ok("ok"), false),
        }
    })
    .await;
    let gw = spawn_gateway(&config(&up)).await;
    // Even cases reach the gateway over HTTP/1.1, odd ones over HTTP/2, where the answer's fields go through a
    // header map and its framing is the stream's.
    let (h1, h2) = (client(&gw), h2_client(&gw));
    let (mut passed, mut refused) = (0, 0);
    for (k, answer) in cases.iter().enumerate() {
        let shown = String::from_utf8_lossy(answer);
        let path = format!("/case/{k}");
        let direct = hyper_client_reads(up.addr, &path).await;
        let (c, url) = if k % 2 == 0 { (&h1, gw.http_url(&path)) } else { (&h2, gw.https_url(&path)) };
        let answer = match try_exchange(c, "GET", &url).await {
            Ok(answer) => Some(answer),
            // An HTTP/2 stream reset as its body breaks can take its unsent head with it (the frames queued on the
            // stream are dropped): allowed only for an answer that is broken.
            Err(_) if k % 2 == 1 && !matches!(&direct, Ok((_, _, Ok(_)))) => None,
            Err(e) => panic!("case {k} (seed {seed}): the gateway gave no answer head ({e}) to {shown:?}, which hyper read as {direct:?}"),
        };
        if let Some((status, headers, body)) = answer {
            if status == StatusCode::BAD_GATEWAY {
                refused += 1;
                assert_eq!(body.as_deref().ok(), Some(&br#"{"error":"bad_gateway"}"#[..]), "case {k}: {shown:?}");
            } else {
                passed += 1;
                // Passed on: hyper read the same status, every field passed on is one the upstream sent, and a body
                // delivered whole is the body hyper read whole (a cut one is allowed to be cut).
                let Ok((hyper_status, hyper_headers, hyper_body)) = &direct else {
                    panic!("case {k} (seed {seed}): passed on as {status}, but hyper refused it ({direct:?}): {shown:?}")
                };
                assert_eq!(status, *hyper_status, "case {k} (seed {seed}): {shown:?}");
                for (name, value) in headers.iter().filter(|(n, _)| !GATEWAY_FIELDS.contains(&n.as_str())) {
                    assert!(
                        hyper_headers.get_all(name).iter().any(|v| v == value),
                        "case {k} (seed {seed}): {name}: {value:?} passed on, but hyper read {hyper_headers:?} in {shown:?}"
                    );
                }
                if let Ok(body) = &body {
                    assert_eq!(hyper_body.as_ref().ok(), Some(body), "case {k} (seed {seed}): a body hyper did not read whole: {shown:?}");
                }
            }
        } else {
            refused += 1;
        }
        // Whatever the answer left on its connection, the next request gets its own answer.
        let next = exchange(&h1, "GET", &gw.http_url(&format!("/next/{k}"))).await;
        assert_eq!(
            (next.0, next.2.ok()),
            (StatusCode::OK, Some(Bytes::from(format!("next-{k}")))),
            "case {k} (seed {seed}): the next request's answer after {shown:?}"
        );
    }
    // The cases exercise both outcomes (a generator that only made garbage, or nothing, would test little).
    assert!(passed > count / 10 && refused > count / 10, "passed {passed}, refused {refused} of {count}");
    gw.stop().await;
}

/// What the upstream does with request `/id/N` in the concurrent fault test: `N % 8` picks it.
fn faulty(n: usize) -> Act {
    let own = format!("id-{n}");
    match n % 8 {
        0 | 1 => Act::Answer(ok(&own), false),
        2 => Act::Answer(
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{own}\r\n0\r\n\r\n", own.len()).into_bytes(),
            false,
        ),
        // Answers, then closes without saying so: the gateway finds out when it next takes the connection.
        3 => Act::Answer(ok(&own), true),
        // A stray whole answer behind its own, in the same write: it must never become another request's.
        4 => Act::Answer([ok(&own), ok("id-stray")].concat(), false),
        // Closes without a byte of answer: retried once (a GET) when the connection was a pooled one, else 502.
        5 => Act::Drop,
        // A body cut short: the client sees a broken exchange, never a short body as whole.
        6 => Act::Answer(format!("HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{own}").into_bytes(), true),
        _ => Act::Late(Vec::new(), Duration::from_millis(20), ok(&own)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_upstream_faults_every_client_gets_its_own_answer_or_an_error() {
    // Bounded: 16 clients x 30 requests, each answered (or failed) within BOUND.
    let up = scripted(|line, _| match line.split_once("/id/").and_then(|(_, r)| r.split(' ').next()?.parse().ok()) {
        Some(n) => faulty(n),
        None => Act::Answer(ok("ok"), false),
    })
    .await;
    // Bursts of new upstream connections (the HTTP/2 clients' requests arrive 30 at once) can overflow the
    // scripted upstream's accept queue, and a dropped SYN is sent again after 1 s: the connect timeout allows it.
    let gw = Arc::new(spawn_gateway(&config(&up).replace("connect_timeout = \"1s\"", "connect_timeout = \"5s\"")).await);
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..16usize {
        let gw = gw.clone();
        clients.spawn(async move {
            // Odd clients speak HTTP/2: their requests share one connection, concurrently.
            let h2 = c % 2 == 1;
            let client = if h2 { h2_client(&gw) } else { client(&gw) };
            let one = |i: usize| {
                let (client, gw) = (&client, &gw);
                async move {
                    let n = c * 1000 + i * 7 + c;
                    let path = format!("/id/{n}");
                    (n, h2, try_exchange(client, "GET", &if h2 { gw.https_url(&path) } else { gw.http_url(&path) }).await)
                }
            };
            if h2 {
                futures_util::future::join_all((0..30).map(one)).await
            } else {
                let mut outcomes = Vec::new();
                for i in 0..30 {
                    outcomes.push(one(i).await);
                }
                outcomes
            }
        });
    }
    let (mut own, mut failed) = (0, 0);
    while let Some(outcomes) = clients.join_next().await {
        for (n, h2, answer) in outcomes.expect("a client task") {
            match answer {
                Ok((StatusCode::OK, _, Ok(body))) => {
                    assert_eq!(body, Bytes::from(format!("id-{n}")), "request {n} got another's answer");
                    assert_ne!(n % 8, 6, "request {n}: a short body was delivered whole");
                    own += 1;
                }
                // Cut: the head came, the body broke.
                Ok((StatusCode::OK, _, Err(_))) => {
                    assert_eq!(n % 8, 6, "request {n}: a body broke that the upstream sent whole");
                    failed += 1;
                }
                Ok((status, _, body)) => {
                    assert!(matches!(n % 8, 5 | 6), "request {n}: {status} {body:?}, but its answer was sound");
                    assert_eq!(status, StatusCode::BAD_GATEWAY, "request {n}");
                    failed += 1;
                }
                // A stream reset as its body breaks may drop its unsent head (see the mutation test above).
                Err(_) if h2 && n % 8 == 6 => failed += 1,
                Err(e) => panic!("request {n}: no answer at all: {e}"),
            }
        }
    }
    assert!(own >= 16 * 30 * 5 / 8, "own answers {own}, failed {failed}");
    let gw = Arc::into_inner(gw).expect("the clients are done");
    gw.stop().await;
}

#[tokio::test]
async fn a_body_that_stalls_past_the_timeout_is_cut_and_a_slow_steady_one_is_not() {
    // `timeout` bounds the wait for the head, then each wait for more of the body: an upstream that stops
    // mid-body must not hold the client (and its connection) forever, and one that keeps sending, however long
    // the whole takes, must not be cut. Both clients: the lean one (GET) and hyper's (a request with a body).
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc".to_vec();
    let up = scripted(move |line, _| {
        if line.contains("/stalls") {
            Act::Late(head.clone(), Duration::from_secs(60), b"defghi".to_vec())
        } else {
            // Three pieces 600 ms apart: 1.8 s in all, each wait under the 1 s timeout.
            let pieces = [&head[..], b"def", b"ghi"].map(<[u8]>::to_vec).to_vec();
            Act::Paced(pieces, Duration::from_millis(600))
        }
    })
    .await;
    let gw = spawn_gateway(&config(&up).replace("timeout = \"5s\"", "timeout = \"1s\"")).await;
    let c = client(&gw);
    for method in ["GET", "POST"] {
        let send = |path: &str| {
            let body = if method == "POST" { Bytes::from_static(b"x") } else { Bytes::new() };
            let req = Request::builder().method(method).uri(gw.http_url(path)).body(Full::new(body)).unwrap();
            c.request(req)
        };
        let started = std::time::Instant::now();
        let rsp = timeout(BOUND, send("/stalls")).await.expect("head in time").expect("a head");
        assert_eq!(rsp.status(), StatusCode::OK);
        let body = timeout(BOUND, rsp.into_body().collect()).await.expect("the stalled body ends in time");
        assert!(body.is_err(), "{method}: a stalled body was delivered whole: {body:?}");
        assert!(started.elapsed() >= Duration::from_millis(900), "{method}: cut before the timeout: {:?}", started.elapsed());

        let rsp = timeout(BOUND, send("/steady")).await.expect("head in time").expect("a head");
        let body = timeout(BOUND, rsp.into_body().collect()).await.expect("in time").map(|b| b.to_bytes());
        assert_eq!(body.ok(), Some(Bytes::from("abcdefghi")), "{method}: a slow, steady body was cut");
    }
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_stream_the_client_stops_taking_releases_its_upstream_connection_after_idle_timeout() {
    // Through flow control an HTTP/2 client can stop taking one stream while its connection stays busy and
    // writable. The upstream connection behind that stream must not be held for ever: after idle_timeout the
    // gateway drops the answer, and the upstream sees its connection close.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<usize>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).await.unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        // An answer far larger than any flow-control window, written until the gateway lets go.
        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n").await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while tcp.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
        }
        let _ = closed_tx.send(sent);
    });
    let up = Upstream::at(addr);
    let cfg = public_config(&up, "[limits]\nidle_timeout = \"1s\"\n");
    let gw = spawn_gateway(&cfg).await;
    let h2 = h2_client(&gw);
    let req = Request::get(gw.https_url("/big")).body(Full::new(Bytes::new())).unwrap();
    let rsp = timeout(BOUND, h2.request(req)).await.expect("head in time").expect("a head");
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    // The body is held and never read: its stream's window stays shut.
    let held = rsp.into_body();
    let sent = timeout(BOUND, closed_rx).await.expect("the upstream connection was released in time").expect("the upstream saw its close");
    assert!(sent < 1 << 30, "the upstream kept sending: {sent} bytes");
    // The client's connection itself is fine: another stream on it is served.
    let other = Request::get(gw.https_url("/other")).body(Full::new(Bytes::new())).unwrap();
    let answer = timeout(BOUND, h2.request(other)).await.expect("in time");
    assert!(answer.is_ok(), "{answer:?}");
    // (The stalled stream itself lasts until the client lets go of it, or a drain's end.)
    drop((held, h2));
    gw.stop().await;
}
