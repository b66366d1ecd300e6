//! Clients for the gateway, and the answers they collect.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::TestGateway;

/// A TLS connection to the gateway's https listener, trusting its certificate and offering `alpn`.
pub async fn gateway_tls(gw: &TestGateway, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&gw.cert_path(), alpn)));
    let tcp = tokio::net::TcpStream::connect(gw.https.expect("https listener")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.expect("handshake in time").expect("handshake")
}

/// An HTTP client for the gateway: https trusting `cert` (ALPN h2 + http/1.1), or plain http.
pub type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A TLS client config that trusts the certificates in `cert` (PEM) and offers `alpn`.
pub fn tls_config(cert: &Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
    tls_config_trusting(pem_roots(cert), alpn)
}

/// The certificates in `cert` (PEM), as the roots a client trusts.
pub fn pem_roots(cert: &Path) -> rustls::RootCertStore {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// A TLS client config (the default protocol versions) that trusts `roots` and offers `alpn`.
pub fn tls_config_trusting(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// A client that speaks HTTP/1.1 over TLS (or plain http) to the gateway. (hyper-rustls sets ALPN itself from the
/// enabled versions.)
pub fn client(gw: &TestGateway) -> TestClient {
    let tls = tls_config(&gw.cert_path(), &[]);
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(conn)
}

/// A client for plain-http gateways and admin listeners (no TLS listener, so no certificate to trust).
pub fn plain_client() -> TestClient {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
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

/// An empty request body.
pub fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// GET `url` with optional bearer token.
pub async fn get(client: &TestClient, url: &str, token: Option<&str>) -> Answer {
    request_as(client, Method::GET, url, token).await
}

/// Sends `method url`, without a body, with optional bearer token.
pub async fn request_as(client: &TestClient, method: Method, url: &str, token: Option<&str>) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(client, b.body(empty()).unwrap()).await
}

/// Sends `method url` with the given headers (each appended, so names may repeat) and body.
pub async fn request(client: &TestClient, method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()).await
}

/// GET `url` with the given headers (each appended, so names may repeat).
pub async fn get_with(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    request(client, Method::GET, url, headers, b"").await
}

/// The value of an answer's field `name`, if it has one.
pub fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).map(|v| v.to_str().unwrap())
}

/// The response headers that must not differ between two refusals (everything but the per-request ones).
pub fn stable_headers(a: &Answer) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = a
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "x-request-id" | "date"))
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    v.sort();
    v
}

/// One plain HTTP/1.1 connection to `addr`, driven by its own task: for bodies that are streamed rather than held,
/// or a connection that must outlive a listener.
pub async fn h1_connection<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    send
}
