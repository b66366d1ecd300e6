//! The upstreams the gateway forwards to: an echo server that records what it received, and an https one on a
//! private CA.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::BOUND;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub version: http::Version,
}

/// A running echo upstream and everything it has received.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    count: watch::Sender<usize>,
}

impl Upstream {
    /// An upstream that some other server runs at `addr` (a scripted one, or none at all for a config that is only
    /// loaded): for the config, and for counters that stay at zero.
    pub fn at(addr: SocketAddr) -> Upstream {
        Upstream { addr, seen: Default::default(), count: watch::Sender::new(0) }
    }

    /// Counts the requests the upstream has received.
    pub fn hits(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until the upstream has received at least `n` requests in all, within [`BOUND`].
    pub async fn wait_hits(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(BOUND, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the upstream received {} requests, not {n}, within {BOUND:?}", self.hits()))
            .unwrap();
    }

    /// Returns the last request the upstream received.
    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Lowercase hex of `d`.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `data`, in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The page policy the upstream's `/docs` pages send.
pub const UPSTREAM_CSP: &str = "default-src 'self'; script-src 'self' https://cdn.jsdelivr.net";

/// Starts the echo upstream on 127.0.0.1:0. Paths with special meaning:
/// - `/slow?ms=N`: waits N ms before answering.
/// - `/download?bytes=N`: streams N bytes (a repeating pattern) in 64 KiB chunks.
/// - `/upload`: reads the whole body streaming, answers `{"len":N,"sha256":"…","trailers":{…}}`.
/// - `/ws`: WebSocket echo (HTTP/1.1 upgrade).
/// - `/with-server-header`: the echo JSON, plus `Server`, `X-Powered-By`, `X-AspNet-Version`, its own
///   `X-Frame-Options: SAMEORIGIN`, `X-Request-Id: upstream-id` and `Access-Control-Allow-Origin: *` (for the
///   secure-header and CORS tests: what is stripped, what is kept, what is replaced).
/// - a path ending in `/docs`: an HTML page with its own `Content-Security-Policy` ([`UPSTREAM_CSP`]), as FastAPI's
///   docs pages need.
/// - anything else: JSON `{"method","path","headers":{…}}`.
///
/// Every request is recorded in `seen` before it is answered.
pub async fn spawn_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Upstream::at(addr);
    let state = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| upstream_handle(state.clone(), req));
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new());
                let _ = b.serve_connection(TokioIo::new(tcp), svc).with_upgrades().await;
            });
        }
    });
    up
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}=")).and_then(|v| v.parse().ok()))
}

async fn upstream_handle(state: Upstream, mut req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let seen = Seen {
        method: req.method().to_string(),
        path_and_query: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: req.headers().clone(),
        version: req.version(),
    };
    state.seen.lock().unwrap().push(seen);
    state.count.send_modify(|n| *n += 1);
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms").unwrap_or(1000))).await;
            Ok(Response::new(full("slow done")))
        }
        "/download" => {
            let total = query_u64(&req, "bytes").unwrap_or(0);
            let chunk: Bytes = (0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = (total - sent).min(chunk.len() as u64) as usize;
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk.slice(..n))), sent + n as u64))
                }
            });
            let mut rsp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            rsp.headers_mut().insert("content-length", total.into());
            Ok(rsp)
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            let mut len = 0u64;
            let mut trailers = serde_json::Map::new();
            while let Some(frame) = body.frame().await {
                match frame.map(Frame::into_data) {
                    Ok(Ok(d)) => {
                        len += d.len() as u64;
                        ctx.update(&d);
                    }
                    Ok(Err(f)) => {
                        for (k, v) in f.into_trailers().unwrap_or_default().iter() {
                            trailers.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into());
                        }
                    }
                    Err(_) => break,
                }
            }
            let sha256 = hex(ctx.finish().as_ref());
            Ok(Response::new(full(serde_json::json!({"len": len, "sha256": sha256, "trailers": trailers}).to_string())))
        }
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                let mut r = Response::new(full("need a websocket key"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        tokio_tungstenite::tungstenite::protocol::Role::Server,
                        None,
                    )
                    .await;
                    let (mut tx, mut rx) = ws.split();
                    while let Some(Ok(msg)) = rx.next().await {
                        if msg.is_close() {
                            break;
                        }
                        if (msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut rsp = Response::new(full(Bytes::new()));
            *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            rsp.headers_mut().insert("connection", "upgrade".parse().unwrap());
            rsp.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            rsp.headers_mut().insert("sec-websocket-accept", accept.parse().unwrap());
            Ok(rsp)
        }
        "/with-server-header" => {
            let mut rsp = Response::new(full("{\"with\":\"server headers\"}"));
            let h = rsp.headers_mut();
            h.insert("content-type", "application/json".parse().unwrap());
            h.insert("server", "Apache/2.4.1 (Unix)".parse().unwrap());
            h.insert("x-powered-by", "PHP/5.6.40".parse().unwrap());
            h.insert("x-aspnet-version", "4.0.30319".parse().unwrap());
            h.insert("x-frame-options", "SAMEORIGIN".parse().unwrap());
            h.insert("x-request-id", "upstream-id".parse().unwrap());
            h.insert("access-control-allow-origin", "*".parse().unwrap());
            Ok(rsp)
        }
        p if p.ends_with("/docs") => {
            let mut rsp =
                Response::new(full("<!doctype html><title>API docs</title><script src=\"https://cdn.jsdelivr.net/x.js\"></script>"));
            rsp.headers_mut().insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            rsp.headers_mut().insert("content-security-policy", UPSTREAM_CSP.parse().unwrap());
            Ok(rsp)
        }
        _ => {
            let mut headers = serde_json::Map::new();
            for (k, v) in req.headers() {
                headers.insert(k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into());
            }
            let method = req.method().to_string();
            let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let json = serde_json::json!({"method": method, "path": pq, "headers": headers, "body_sha256": sha256_hex(&body), "body_len": body.len()});
            let mut rsp = Response::new(full(json.to_string()));
            rsp.headers_mut().insert("content-type", "application/json".parse().unwrap());
            Ok(rsp)
        }
    }
}

/// A TLS server config whose leaf certificate (for 127.0.0.1) is issued by a fresh private CA, and that CA's
/// certificate (PEM), for servers the gateway must trust only through a `ca_file`.
pub fn private_ca_server_config() -> (rustls::ServerConfig, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()))
        .unwrap();
    (server, ca_cert.pem())
}

/// An https upstream on a private CA: answers every request with "over tls" and counts the requests it got.
pub async fn tls_upstream() -> (SocketAddr, String, Arc<AtomicU64>) {
    let (server, ca_pem) = private_ca_server_config();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, hits) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(move |_req: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("over tls")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (addr, ca_pem, hits)
}

/// An upstream that holds every answer until the test releases it: a request that stays in flight for exactly as
/// long as a test needs (a drain kept going, a connection kept busy), with no timing guess.
pub struct HeldUpstream {
    pub addr: SocketAddr,
    arrived: watch::Sender<usize>,
    release: watch::Sender<bool>,
}

impl HeldUpstream {
    /// Starts it on 127.0.0.1:0. Every request is answered 200 "released" once [`HeldUpstream::release`] is called.
    pub async fn start() -> HeldUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived, release) = (watch::Sender::new(0usize), watch::Sender::new(false));
        let (count, released) = (arrived.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (count, released) = (count.clone(), released.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        count.send_modify(|n| *n += 1);
                        let mut released = released.subscribe();
                        async move {
                            let _ = released.wait_for(|r| *r).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"released"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        HeldUpstream { addr, arrived, release }
    }

    /// Waits until `n` requests in all have arrived (and are being held), within [`BOUND`].
    pub async fn wait_arrived(&self, n: usize) {
        let mut rx = self.arrived.subscribe();
        tokio::time::timeout(BOUND, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the held upstream received {} requests, not {n}, within {BOUND:?}", *self.arrived.borrow()))
            .unwrap();
    }

    /// Answers every held request, and every later one at once.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// The upstream for a gateway config.
    pub fn upstream(&self) -> Upstream {
        Upstream::at(self.addr)
    }
}

/// One target of a pool: answers every request with its name (body and `x-backend`), counts requests and accepted
/// connections, and can be stopped (listener and every open connection closed at once, as a killed process) and
/// started again on the same address. Serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
/// - `/healthz`: 200, not counted in `hits`.
/// - `/slow`: answers after 400 ms.
/// - anything else: `status()` (200 unless set), after `delay()`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    status: Arc<std::sync::atomic::AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1 port 0.
    pub async fn start(name: &str) -> Backend {
        Backend::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a backend on `addr` (any loopback address; port 0 picks one).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let b = Backend {
            name: name.to_string(),
            addr: listener.local_addr().unwrap(),
            hits: Default::default(),
            connections: Default::default(),
            status: Arc::new(std::sync::atomic::AtomicU16::new(200)),
            delay_ms: Default::default(),
            task: Mutex::new(None),
        };
        b.serve(listener);
        b
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Closes the listener and every connection: new connections are refused, open ones reset.
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + BOUND;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: TcpListener) {
        let (name, hits, connections, status, delay) =
            (self.name.clone(), self.hits.clone(), self.connections.clone(), self.status.clone(), self.delay_ms.clone());
        let task = tokio::spawn(async move {
            // The connections live in this set: aborting the task drops them all, as a process exit would.
            let mut open = tokio::task::JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    Some(_) = open.join_next(), if !open.is_empty() => continue,
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (name, hits, status, delay) = (name.clone(), hits.clone(), status.clone(), delay.clone());
                open.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (name, hits, status, delay) = (name.clone(), hits.clone(), status.clone(), delay.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let mut code = 200;
                            if path != "/healthz" {
                                hits.fetch_add(1, Ordering::SeqCst);
                                let wait = if path == "/slow" { 400 } else { delay.load(Ordering::SeqCst) };
                                if wait > 0 {
                                    tokio::time::sleep(Duration::from_millis(wait)).await;
                                }
                                code = status.load(Ordering::SeqCst);
                            }
                            let mut rsp = Response::new(full(name.clone()));
                            *rsp.status_mut() = StatusCode::from_u16(code).unwrap();
                            rsp.headers_mut().insert("x-backend", name.parse().unwrap());
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    b.http2().max_concurrent_streams(250);
                    let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}
