//! Mutated client requests (seeded, bounded), sent on raw sockets: whatever the gateway forwards must be requests
//! that hyper's own server, reading the same bytes, also reads, in the same order, with the same bodies. A
//! request smuggled past the gateway's framing would show up as one the reference never read.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::timeout;

/// A request as a server read it: method, target (path and query) and whole body (a body cut short reads as
/// `None`).
type Read = (String, String, Option<Bytes>);

/// Records what one request was read as, answering 200.
async fn record(seen: Arc<Mutex<Vec<Read>>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().to_string();
    let target = format!("{}{}", req.uri().path(), req.uri().query().map(|q| format!("?{q}")).unwrap_or_default());
    let body = req.into_body().collect().await.ok().map(|b| b.to_bytes());
    seen.lock().unwrap().push((method, target, body));
    Ok(Response::new(Full::new(Bytes::from_static(b"seen"))))
}

/// Serves `io` with hyper's HTTP/1.1 server, recording every request it reads. With `half_close` it goes on
/// reading what a client sent before it half-closed (all of it, for the reference reading).
async fn hyper_serves<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: I, seen: Arc<Mutex<Vec<Read>>>, half_close: bool) {
    let svc = service_fn(move |req| record(seen.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new().half_close(half_close).serve_connection(TokioIo::new(io), svc).await;
}

/// What hyper's server reads from `bytes` sent by a client that then half-closes, with each path as the gateway
/// routes and forwards it (normalised; a path it refuses can never match a forwarded one).
async fn hyper_server_reads(bytes: &[u8]) -> Vec<Read> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let served = tokio::spawn(hyper_serves(server, seen.clone(), true));
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = timeout(BOUND, client.read_to_end(&mut sink)).await;
    let _ = timeout(BOUND, served).await;
    let seen = seen.lock().unwrap().clone();
    let routed = |target: String| {
        let (path, query) = target.split_once('?').map_or((target.as_str(), None), |(p, q)| (p, Some(q)));
        match portcullis::router::normalize_path(path) {
            Ok(p) => format!("{p}{}", query.map(|q| format!("?{q}")).unwrap_or_default()),
            Err(e) => format!("(refused: {e})"),
        }
    };
    seen.into_iter().map(|(method, target, body)| (method, routed(target), body)).collect()
}

/// Sends `bytes` to the gateway, half-closes, and returns what came back (the gateway must close in time).
async fn gateway_answers(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before everything is written (a refused head): that is its right.
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match timeout(BOUND, s.read(&mut buf)).await.expect("the gateway ends a half-closed connection in time") {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Well-formed requests of every framing, the seeds of the mutations; each ends with a plain GET, which a
/// smuggled or mis-framed body would swallow or split.
const REQUESTS: [&[u8]; 7] = [
    b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"PUT /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabcGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"DELETE /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
];

/// What a mutation inserts or overwrites with besides framing syntax: whole framing fields, and a request to
/// smuggle.
const PIECES: [&[u8]; 13] = [
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Connection: close\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    b" chunked",
    b"/../",
    b"%2e",
    b"%2F",
    b"%41",
];

/// True when `forwarded` is `reference` with some requests left out (the gateway may refuse what hyper reads,
/// never read what hyper does not). A request whose body the gateway abandoned (the upstream read it cut short:
/// the client's body broke, or the client closed and the gateway gave up on it) matches on method and target.
fn is_subsequence(forwarded: &[Read], reference: &[Read]) -> bool {
    let mut rest = reference.iter();
    forwarded.iter().all(|f| rest.any(|r| r == f || f.2.is_none() && (&f.0, &f.1) == (&r.0, &r.1)))
}

/// An upstream (hyper's server) that records what it read, and counts its open connections.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Read>>>,
    open: watch::Sender<usize>,
}

async fn recorder() -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = Recorder { addr: listener.local_addr().unwrap(), seen: Arc::default(), open: watch::Sender::new(0) };
    let (seen, open) = (r.seen.clone(), r.open.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            open.send_modify(|n| *n += 1);
            let (seen, open) = (seen.clone(), open.clone());
            tokio::spawn(async move {
                hyper_serves(tcp, seen, false).await;
                open.send_modify(|n| *n -= 1);
            });
        }
    });
    r
}

#[tokio::test]
async fn whatever_is_forwarded_hyper_reads_the_same_from_the_same_bytes() {
    // Bounded: PORTCULLIS_FUZZ_CASES request streams (default 200), from PORTCULLIS_FUZZ_SEED. Each case has a
    // gateway and an upstream of its own, so what the upstream read is that case's alone.
    let (count, seed) = fuzz_settings(200, 0x2545_F491_4F6C_DD1D);
    let mut rng = Rng::new(seed);
    let (mut some_forwarded, mut some_refused) = (0, 0);
    for k in 0..count {
        let bytes = mutate(&mut rng, REQUESTS[k % REQUESTS.len()], &PIECES, 2, 16);
        let shown = String::from_utf8_lossy(&bytes);
        let reference = hyper_server_reads(&bytes).await;
        let up = recorder().await;
        let config = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n\n[upstreams.api]\nurl = \"http://{}\"\n\n\
             [[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\n",
            up.addr
        );
        let gw = spawn_gateway(&config).await;
        let answer = gateway_answers(gw.http.expect("http listener"), &bytes).await;
        // Stopped, the gateway has ended or abandoned every upstream request; once the upstream's connections
        // are gone too, it has recorded all it read.
        gw.stop().await;
        timeout(BOUND, up.open.subscribe().wait_for(|n| *n == 0)).await.expect("the upstream's connections close").unwrap();
        let through = up.seen.lock().unwrap().clone();
        assert!(
            is_subsequence(&through, &reference),
            "case {k} (seed {seed}): the gateway forwarded {through:?}, hyper read {reference:?} from {shown:?}"
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 ") || text.starts_with("HTTP/1.0 "), "case {k}: not an answer: {text:?}");
        some_forwarded += usize::from(!through.is_empty());
        some_refused += usize::from(through.len() < reference.len());
    }
    // The cases exercise both outcomes (mutations that only made garbage, or nothing, would test little).
    assert!(
        some_forwarded > count / 5 && some_refused > count / 20,
        "forwarded in {some_forwarded}, refused some in {some_refused} of {count}"
    );
}
