//! Shared test helpers: a real echo upstream, a real gateway on 127.0.0.1 port 0, real clients, real keys.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use portcullis::{Config, RunningGateway};

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
    pub count: Arc<AtomicUsize>,
}

impl Upstream {
    /// Counts the requests the upstream has received.
    pub fn hits(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Returns the last request the upstream received.
    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Starts the echo upstream on 127.0.0.1:0. Paths with special meaning:
/// - `/slow?ms=N`: waits N ms before answering.
/// - `/download?bytes=N`: streams N bytes (a repeating pattern) in 64 KiB chunks.
/// - `/upload`: reads the whole body streaming, answers `{"len":N,"sha256":"…","trailers":{…}}`.
/// - `/ws`: WebSocket echo (HTTP/1.1 upgrade).
/// - `/with-server-header`: the echo JSON, plus `Server`, `X-Powered-By`, `X-AspNet-Version`, its own
///   `X-Frame-Options: SAMEORIGIN`, `X-Request-Id: upstream-id` and `Access-Control-Allow-Origin: *` (for the
///   secure-header and CORS tests: what is stripped, what is kept, what is replaced).
/// - anything else: JSON `{"method","path","headers":{…}}`.
///
/// Every request is recorded in `seen` before it is answered.
pub async fn spawn_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Upstream { addr, seen: Arc::new(Mutex::new(Vec::new())), count: Arc::new(AtomicUsize::new(0)) };
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
    state.count.fetch_add(1, Ordering::SeqCst);
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
            let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
            Ok(Response::new(full(serde_json::json!({"len": len, "sha256": hex, "trailers": trailers}).to_string())))
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

/// A gateway started from a config text in its own temporary folder (certs are generated there).
pub struct TestGateway {
    pub gw: Option<RunningGateway>,
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.https.expect("https listener").port(), path)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http.expect("http listener").port(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin.expect("admin listener").port(), path)
    }

    /// The generated self-signed certificate (PEM), to trust in clients.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("gateway.crt")
    }

    pub async fn stop(mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop().await;
        }
    }
}

/// The `[listen]` + `[tls]` header used by most tests: https, http and admin on port 0, self-signed certs.
pub fn base_config(upstream: &Upstream) -> String {
    format!(
        r#"
[listen]
https = "127.0.0.1:0"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tls]
cert = "gateway.crt"
key = "gateway.key"
self_signed = true

[upstreams.api]
url = "{}"
connect_timeout = "1s"
timeout = "5s"
"#,
        upstream.url()
    )
}

/// Writes `config` to `gateway.toml` in a new temp folder, plus any extra files, and starts the gateway.
pub async fn spawn_gateway_with_files(config: &str, files: &[(&str, &[u8])]) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("config did not validate:\n{e}\n---\n{config}"));
    let gw = portcullis::start(cfg).await.expect("gateway starts");
    TestGateway { https: gw.https, http: gw.http, admin: gw.admin, gw: Some(gw), dir }
}

pub async fn spawn_gateway(config: &str) -> TestGateway {
    spawn_gateway_with_files(config, &[]).await
}

/// A TLS connection to the gateway's https listener, trusting its certificate and offering `alpn`.
pub async fn gateway_tls(gw: &TestGateway, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&gw.cert_path(), alpn)));
    let tcp = tokio::net::TcpStream::connect(gw.https.expect("https listener")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.expect("handshake in time").expect("handshake")
}

/// An HTTP client for the gateway: https trusting `cert` (ALPN h2 + http/1.1), or plain http.
pub type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn tls_config(cert: &Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// (hyper-rustls sets ALPN itself from the enabled versions.)
/// A client that speaks HTTP/1.1 over TLS (or plain http) to the gateway.
pub fn client(gw: &TestGateway) -> TestClient {
    let tls = tls_config(&gw.cert_path(), &[]);
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(conn)
}

/// A client that speaks only HTTP/2 over TLS (ALPN h2).
pub fn h2_client(gw: &TestGateway) -> TestClient {
    let tls = tls_config(&gw.cert_path(), &[]);
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http2().build();
    Client::builder(TokioExecutor::new()).http2_only(true).build(conn)
}

/// A finished response with its body collected.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The headers the echo upstream saw (from its JSON answer).
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// Sends a request and collects the answer.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let rsp = client.request(req).await.expect("request is answered");
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body, version: parts.version }
}

/// GET `url` with optional bearer token.
pub async fn get(client: &TestClient, url: &str, token: Option<&str>) -> Answer {
    let mut b = Request::get(url);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(client, b.body(Full::new(Bytes::new())).unwrap()).await
}

// ------------------------------------------------------------------------------------------------------------
// Keys and tokens, generated here with real crypto.

/// A key pair for signing test tokens, with its public half as PEM.
pub struct TestKey {
    pub alg: jsonwebtoken::Algorithm,
    pub encoding: jsonwebtoken::EncodingKey,
    pub public_pem: String,
    pub private_pem: String,
}

pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Generates a key for `alg`: RS*/PS* (RSA 2048), ES256 (P-256), ES384 (P-384), EdDSA (Ed25519).
pub fn test_key(alg: jsonwebtoken::Algorithm) -> TestKey {
    use aws_lc_rs::encoding::AsDer;
    use jsonwebtoken::Algorithm::*;
    let (private_pem, public_pem) = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der = kp.as_der().unwrap();
            let spki: aws_lc_rs::encoding::PublicKeyX509Der = aws_lc_rs::signature::KeyPair::public_key(&kp).as_der().unwrap();
            (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", spki.as_ref()))
        }
        ES256 | ES384 | EdDSA => {
            let a = match alg {
                ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                _ => &rcgen::PKCS_ED25519,
            };
            let kp = rcgen::KeyPair::generate_for(a).unwrap();
            (kp.serialize_pem(), kp.public_key_pem())
        }
        HS256 | HS384 | HS512 => panic!("use hmac_key for HMAC"),
    };
    let encoding = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
        ES256 | ES384 => jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
    };
    TestKey { alg, encoding, public_pem, private_pem }
}

/// An HMAC key from a secret.
pub fn hmac_key(alg: jsonwebtoken::Algorithm, secret: &[u8]) -> TestKey {
    TestKey { alg, encoding: jsonwebtoken::EncodingKey::from_secret(secret), public_pem: String::new(), private_pem: String::new() }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Standard claims for `iss`/`sub`, valid for 10 minutes, with the given extra claims merged in.
pub fn claims(iss: &str, sub: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"iss": iss, "sub": sub, "aud": "api", "iat": now(), "nbf": now(), "exp": now() + 600});
    if let (Some(m), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Signs `claims` with `key` (header `typ: JWT`, optional `kid`).
pub fn mint_token(key: &TestKey, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(key.alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// Builds a token from raw header and payload JSON, signed with `key` (for hostile shapes the encoder refuses).
pub fn raw_token(key: &TestKey, header: &serde_json::Value, payload_json: &str) -> String {
    use base64::Engine;
    let e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let msg = format!("{}.{}", e(header.to_string().as_bytes()), e(payload_json.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key.encoding, key.alg).unwrap();
    format!("{msg}.{sig}")
}

// ------------------------------------------------------------------------------------------------------------
// Raw sockets, for what a well-behaved client library cannot send.

/// Sends raw bytes over plain TCP to `addr` and reads until the peer closes or `wait` passes.
/// Returns what was read and whether the peer closed the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
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
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()))
        .unwrap();
    (server, ca_cert.pem())
}

/// An https upstream on a private CA: answers every request with "over tls" and counts the requests it got.
pub async fn tls_upstream() -> (std::net::SocketAddr, String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let (server, ca_pem) = private_ca_server_config();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, hits) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("over tls"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
            });
        }
    });
    (addr, ca_pem, hits)
}

// ------------------------------------------------------------------------------------------------------------
// Seeded mutations, for the tests that hold the gateway to what an independent reader makes of random input.

/// xorshift64*: deterministic, so a failing case is replayed from the seed it prints.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number below `n` (0 for an `n` of 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// How many cases and from which seed: `PORTCULLIS_FUZZ_CASES` and `PORTCULLIS_FUZZ_SEED`, else the defaults.
pub fn fuzz_settings(cases: usize, seed: u64) -> (usize, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    (env("PORTCULLIS_FUZZ_CASES").map_or(cases, |c| c as usize), env("PORTCULLIS_FUZZ_SEED").unwrap_or(seed))
}

/// HTTP/1 framing syntax, and bytes no field may hold: what every mutation may write.
const SYNTAX: [&[u8]; 15] = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b",", b";", b"0", b"9", b"f", b"+", b"\0", b"\x7f", b"\xc3\xa9"];

/// `seed` with 1 to `most` random edits: a piece of framing syntax or of `extra` written over it or into it, a
/// byte replaced by one, a few bytes dropped or repeated, or the tail cut (never below `keep` bytes).
pub fn mutate(rng: &mut Rng, seed: &[u8], extra: &[&[u8]], most: usize, keep: usize) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(most) {
        let at = rng.below(bytes.len() + 1);
        let k = rng.below(SYNTAX.len() + extra.len());
        let piece = if k < SYNTAX.len() { SYNTAX[k] } else { extra[k - SYNTAX.len()] };
        match rng.below(6) {
            0 => bytes.splice(at..(at + piece.len()).min(bytes.len()), piece.iter().copied()).for_each(drop),
            1 => bytes.splice(at..at, piece.iter().copied()).for_each(drop),
            2 => bytes.splice(at..(at + 1).min(bytes.len()), piece.iter().copied()).for_each(drop),
            3 => bytes.drain(at..(at + 1 + rng.below(4)).min(bytes.len())).for_each(drop),
            4 => {
                let end = (at + 1 + rng.below(12)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy).for_each(drop);
            }
            _ => bytes.truncate(at.max(keep)),
        }
    }
    bytes
}
