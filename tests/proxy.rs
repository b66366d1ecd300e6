//! The core proxy, end to end: `check`, forwarding and its headers, HTTP/2, streaming with bounded memory, routing
//! refusals, upstream failures, limits, slowloris, WebSocket, graceful shutdown, TLS, and request smuggling.
//! Everything runs on real sockets on 127.0.0.1 with OS-chosen ports.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Every test that touches the network holds this shared; the memory test holds it exclusively, because it
/// measures the whole test process's resident memory and must not count what other tests allocate meanwhile.
static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn req(method: &str, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// The status code of a raw HTTP/1.1 response, if it has one.
fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// ------------------------------------------------------------------------------------------------------------
// `portcullis check`

fn run_check(config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run portcullis check");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The 1-based line and column of the first occurrence of `marker` in `text`.
fn position_of(text: &str, marker: &str) -> (usize, usize) {
    let offset = text.find(marker).unwrap_or_else(|| panic!("{marker:?} not in the config"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
    (line, column)
}

/// Copies the regular files of `from` (if it exists) into a new folder `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    std::fs::create_dir_all(to).unwrap();
    for e in entries {
        let e = e.unwrap();
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if kind.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn check_accepts_the_shipped_config_on_a_fresh_clone() {
    // A fresh clone: the shipped config and the committed files it names (examples/), but none of the keys
    // that are generated on first start (certs/ holds only its README).
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = dir.path().join("gateway.toml");
    std::fs::copy(root.join("gateway.toml"), &config).unwrap();
    copy_dir(&root.join("examples"), &dir.path().join("examples"));
    if root.join("certs/README.md").exists() {
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        std::fs::copy(root.join("certs/README.md"), dir.path().join("certs/README.md")).unwrap();
    }
    let (code, stdout, stderr) = run_check(&config);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("configuration is valid"), "stdout:\n{stdout}");
    // Nothing exists yet: check says what start will generate, and writes nothing itself.
    assert!(stdout.contains("gateway.crt") && stdout.contains("will be generated"), "the missing TLS pair is not announced:\n{stdout}");
    assert!(
        stdout.contains("issuer-ed25519.pem") && stdout.matches("will be generated").count() >= 2,
        "the missing issuer key is not announced:\n{stdout}"
    );
    for key in ["certs/gateway.crt", "certs/gateway.key", "certs/issuer-ed25519.pem"] {
        assert!(!dir.path().join(key).exists(), "check must not write {key}");
    }
    // The summary names the listeners, the upstreams and the routes the file declares.
    let file: toml::Value = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let mut needles: Vec<String> = Vec::new();
    if let Some(listen) = file["listen"].as_table() {
        needles.extend(listen.values().filter_map(|v| v.as_str()).map(str::to_string));
    }
    if let Some(upstreams) = file.get("upstreams").and_then(|u| u.as_table()) {
        for (name, u) in upstreams {
            needles.push(name.clone());
            needles.extend(u["url"].as_str().map(|u| u.trim_end_matches('/').to_string()));
        }
    }
    if let Some(routes) = file.get("routes").and_then(|r| r.as_array()) {
        needles.extend(routes.iter().filter_map(|r| r["name"].as_str()).map(str::to_string));
    }
    assert!(needles.len() >= 4, "{needles:?}");
    for needle in needles {
        assert!(stdout.contains(&needle), "summary lacks {needle:?}:\n{stdout}");
    }
}

#[test]
fn check_reports_each_error_with_line_and_column() {
    const HEAD: &str = "[listen]\nhttp = \"127.0.0.1:0\"\n\n";
    const UPSTREAM: &str = "[upstreams.api]\nurl = \"http://127.0.0.1:1\"\n\n";
    const ROUTE: &str = "[[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"public\"\n";
    // (what, config text, marker where the error must point, words the message must contain)
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "unknown key",
            format!("{HEAD}[limits]\nmax_body_bytes = \"1MiB\"\nbogus_key = 1\n\n{UPSTREAM}{ROUTE}"),
            "bogus_key",
            "unknown field `bogus_key`",
        ),
        (
            "route naming a missing upstream",
            format!("{HEAD}{UPSTREAM}[[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"nope\"\nauth = \"public\"\n"),
            "\"nope\"",
            "\"nope\" is not defined",
        ),
        (
            "bad duration",
            format!("{HEAD}[upstreams.api]\nurl = \"http://127.0.0.1:1\"\ntimeout = \"5 parsecs\"\n\n{ROUTE}"),
            "\"5 parsecs\"",
            "invalid duration",
        ),
        (
            "unreadable certificate",
            format!("[listen]\nhttps = \"127.0.0.1:0\"\n\n[tls]\ncert = \"missing.crt\"\nkey = \"missing.key\"\nself_signed = false\n\n{UPSTREAM}{ROUTE}"),
            "\"missing.crt\"",
            "cannot read TLS certificate",
        ),
    ];
    for (what, text, marker, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, &text).unwrap();
        let (code, stdout, stderr) = run_check(&config);
        assert_eq!(code, 1, "{what}: expected exit 1\nstdout:\n{stdout}\nstderr:\n{stderr}");
        let (line, column) = position_of(&text, marker);
        let located = format!("gateway.toml:{line}:{column}: ");
        let hit =
            stderr.lines().find(|l| l.contains(&located)).unwrap_or_else(|| panic!("{what}: no message at {located:?}\nstderr:\n{stderr}"));
        assert!(hit.contains(message), "{what}: message {hit:?} lacks {message:?}");
        assert!(!stdout.contains("configuration is valid"), "{what}: {stdout}");
    }
}

// ------------------------------------------------------------------------------------------------------------
// Forwarding and its headers, over HTTP/1.1 and HTTP/2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_forwarding_sets_forwarding_headers_and_strips_hop_by_hop() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let c = client(&gw);
    let request = req("GET", &gw.https_url("/hello?x=1"))
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA==")
        .header("te", "gzip")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "client-chosen-id")
        .header("x-keep", "kept")
        .body(empty())
        .unwrap();
    let a = timeout(BOUND, send(&c, request)).await.expect("answered in time");
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.version, http::Version::HTTP_11);
    assert_eq!(a.json()["path"], "/hello?x=1", "the echo body comes back");
    assert_eq!(up.hits(), 1);
    let seen = up.last().unwrap();
    let h = &seen.headers;
    // Forwarding headers: the socket peer (the client's own X-Forwarded-For is replaced), https, a request id.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-proto"], "https");
    assert!(h.contains_key("x-forwarded-host"));
    let rid = h.get("x-request-id").expect("upstream saw X-Request-Id").clone();
    assert_ne!(rid, "client-chosen-id", "an untrusted client's request id is replaced");
    assert!(!rid.is_empty());
    assert_eq!(a.headers.get("x-request-id"), Some(&rid), "the request id is echoed");
    // Hop-by-hop headers, including the one `Connection` named, never reach the upstream.
    for name in ["x-secret", "keep-alive", "proxy-authorization", "te", "proxy-connection"] {
        assert!(!h.contains_key(name), "upstream saw hop-by-hop {name}: {h:?}");
    }
    if let Some(conn) = h.get("connection") {
        assert!(!conn.to_str().unwrap().contains("x-secret"), "upstream saw Connection: {conn:?}");
    }
    assert_eq!(h["x-keep"], "kept", "end-to-end headers pass");
    gw.stop().await;
}

/// What a client may try to tell the upstream about where a request came from, where it goes or what it is.
const CLIENT_CLAIMS: [(&str, &str); 17] = [
    ("x.forwarded.for", "6.6.6.6"),
    ("x.original.url", "/admin/secret"),
    ("content.length", "5"),
    ("x-forwarded-prefix", "/admin"),
    ("x-forwarded-port", "8443"),
    ("x-forwarded-ssl", "on"),
    ("x_forwarded_for", "6.6.6.6"),
    ("x-forwarded_host", "evil.test"),
    ("x-real-ip", "6.6.6.6"),
    ("x_real_ip", "6.6.6.6"),
    ("true-client-ip", "6.6.6.6"),
    ("x-original-url", "/admin/secret"),
    ("x-rewrite-url", "/admin/secret"),
    ("x-http-method-override", "DELETE"),
    ("x_http_method_override", "DELETE"),
    ("content_length", "5"),
    ("transfer_encoding", "chunked"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_and_routing_override_fields_from_clients_never_reach_the_upstream() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    for trusted in [false, true] {
        let extra = if trusted { "[rate_limit]\ntrusted_proxies = [\"127.0.0.1\"]\n" } else { "" };
        let gw = spawn_gateway(&public_config(&up, extra)).await;
        let mut request = req("GET", &gw.http_url("/x")).header("x-forwarded-for", "10.1.1.1");
        for (k, v) in CLIENT_CLAIMS {
            request = request.header(k, v);
        }
        let a = timeout(BOUND, send(&client(&gw), request.body(empty()).unwrap())).await.expect("answered in time");
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let h = up.last().unwrap().headers;
        // A trusted proxy's own X-Forwarded-* go on (For extended with it); from anyone else they are replaced.
        let (xff, kept_prefix) = if trusted { ("10.1.1.1, 127.0.0.1", Some("/admin")) } else { ("127.0.0.1", None) };
        assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), [xff], "trusted: {trusted}");
        assert_eq!(h.get("x-forwarded-prefix").map(|v| v.to_str().unwrap()), kept_prefix, "trusted: {trusted}");
        // Underscore spellings, routing and method overrides: from nobody.
        let set_by_a_trusted_proxy = ["x-forwarded-prefix", "x-forwarded-port", "x-forwarded-ssl", "x-real-ip", "true-client-ip"];
        for (k, _) in CLIENT_CLAIMS {
            if !(trusted && set_by_a_trusted_proxy.contains(&k)) {
                assert!(!h.contains_key(k), "trusted: {trusted}: the upstream saw {k}: {h:?}");
            }
        }
        gw.stop().await;
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_reaches_http1_upstream() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let c = h2_client(&gw);
    // HTTP/2 forbids connection-specific headers on the wire, so only those that are legal there are sent.
    let request = req("POST", &gw.https_url("/h2/echo?q=2"))
        .header("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-keep", "kept")
        .body(Full::new(Bytes::from_static(b"hello over h2")))
        .unwrap();
    let a = timeout(BOUND, send(&c, request)).await.expect("answered in time");
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.version, http::Version::HTTP_2, "the client spoke HTTP/2 (ALPN h2)");
    let body = a.json();
    assert_eq!(body["path"], "/h2/echo?q=2");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body_len"], 13);
    assert_eq!(body["body_sha256"], sha256_hex(b"hello over h2"));
    let seen = up.last().unwrap();
    assert_eq!(seen.version, http::Version::HTTP_11, "the upstream is spoken to in HTTP/1.1");
    let h = &seen.headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert!(!h.contains_key("proxy-authorization"));
    assert_eq!(h["x-keep"], "kept");
    assert!(h.contains_key("host"), "an HTTP/1.1 request needs Host");
    let rid = h.get("x-request-id").expect("upstream saw X-Request-Id");
    assert_eq!(a.headers.get("x-request-id"), Some(rid));
    assert_eq!(up.hits(), 1);

    // A bodiless GET takes the lean HTTP/1.1 client: its answer's fields reach the HTTP/2 client too, each once.
    let request = req("GET", &gw.https_url("/with-server-header")).body(Full::new(Bytes::new())).unwrap();
    let a = timeout(BOUND, send(&c, request)).await.expect("answered in time");
    assert_eq!((a.status, a.version), (StatusCode::OK, http::Version::HTTP_2));
    assert_eq!(&a.body[..], b"{\"with\":\"server headers\"}");
    let all = |name: &str| a.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(all("content-type"), ["application/json"]);
    assert_eq!(all("x-frame-options"), ["SAMEORIGIN"], "the upstream's own, not also the gateway's");
    assert_eq!(all("x-content-type-options"), ["nosniff"]);
    assert!(all("server").is_empty() && all("x-powered-by").is_empty());
    let id = all("x-request-id");
    assert!(id.len() == 1 && id[0] != "upstream-id", "{id:?}");
    assert_eq!(up.last().unwrap().headers["x-request-id"], id[0]);
    assert_eq!(up.hits(), 2);
    // HEAD: no body, but the length a GET would have, carried from the lean answer into the HTTP/2 head.
    let request = req("HEAD", &gw.https_url("/with-server-header")).body(Full::new(Bytes::new())).unwrap();
    let a = timeout(BOUND, send(&c, request)).await.expect("answered in time");
    assert_eq!((a.status, a.body.len()), (StatusCode::OK, 0));
    assert_eq!(a.headers.get_all("content-length").iter().collect::<Vec<_>>(), ["25"]);
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Streaming 100 MiB each way with bounded memory

const MIB: u64 = 1 << 20;
const BIG: u64 = 100 * MIB;
const CHUNK: usize = 64 * 1024;

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Samples resident memory on its own thread until dropped, keeping the peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss()));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        PeakRss { stop, peak, thread: Some(thread) }
    }

    fn peak(&self) -> u64 {
        self.peak.fetch_max(rss(), Ordering::Relaxed).max(rss())
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Upload chunk `i`: a fixed pattern stamped with its index, so a lost, repeated or reordered chunk shows.
fn upload_chunk(base: &Bytes, i: u64) -> Bytes {
    let mut v = base.to_vec();
    v[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_stream_both_ways_with_bounded_memory() {
    let _exclusive = PROCESS.write().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_body_bytes = \"200MiB\"\n")).await;
    let chunks = BIG / CHUNK as u64;
    let base: Bytes = (0..CHUNK).map(|j| (j.wrapping_mul(31) % 253) as u8).collect::<Vec<u8>>().into();
    // The expected digests, computed chunk by chunk (the test never holds 100 MiB either).
    let mut up_ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for i in 0..chunks {
        up_ctx.update(&upload_chunk(&base, i));
    }
    let upload_sha = hex(up_ctx.finish().as_ref());
    let pattern: Vec<u8> = (0..CHUNK as u32).map(|i| (i % 251) as u8).collect();
    let mut down_ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for _ in 0..chunks {
        down_ctx.update(&pattern);
    }
    let download_sha = hex(down_ctx.finish().as_ref());

    let mut send = h1_connection::<TestBody>(gw.http.unwrap()).await;
    let before = rss();
    let sampler = PeakRss::start();

    // Upload: a generator body with no declared length (chunked), so it is streamed end to end.
    let stream = futures_util::stream::unfold(0u64, move |i| {
        let base = base.clone();
        async move { (i < chunks).then(|| (Ok::<_, std::io::Error>(Frame::data(upload_chunk(&base, i))), i + 1)) }
    });
    let request = Request::post("/upload").header("host", "127.0.0.1").body(BodyExt::boxed(StreamBody::new(stream))).unwrap();
    let rsp = timeout(Duration::from_secs(180), async {
        let rsp = send.send_request(request).await.expect("upload answered");
        let status = rsp.status();
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    })
    .await
    .expect("upload finished in time");
    assert_eq!(rsp.0, StatusCode::OK, "{:?}", rsp.1);
    let answer: serde_json::Value = serde_json::from_slice(&rsp.1).unwrap();
    assert_eq!(answer["len"], BIG, "upstream received every byte");
    assert_eq!(answer["sha256"], upload_sha, "upload arrived intact");
    let after_upload = sampler.peak();

    // Download: read and hash frame by frame.
    let request = Request::get(format!("/download?bytes={BIG}"))
        .header("host", "127.0.0.1")
        .body(BodyExt::boxed(http_body_util::Empty::new().map_err(|never| match never {})))
        .unwrap();
    let (len, sha, declared) = timeout(Duration::from_secs(180), async {
        send.ready().await.expect("connection reusable");
        let rsp = send.send_request(request).await.expect("download answered");
        assert_eq!(rsp.status(), StatusCode::OK);
        let declared = rsp.headers().get("content-length").map(|v| v.to_str().unwrap().to_string());
        let mut body = rsp.into_body();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download frame");
            if let Some(d) = frame.data_ref() {
                len += d.len() as u64;
                ctx.update(d);
            }
        }
        (len, hex(ctx.finish().as_ref()), declared)
    })
    .await
    .expect("download finished in time");
    assert_eq!(len, BIG);
    assert_eq!(sha, download_sha, "download arrived intact");
    assert_eq!(declared.as_deref(), Some(BIG.to_string().as_str()));

    let peak = sampler.peak();
    drop(sampler);
    let growth = peak.saturating_sub(before);
    eprintln!(
        "rss before {} MiB, peak after upload {} MiB, peak overall {} MiB, growth {} MiB",
        before / MIB,
        after_upload / MIB,
        peak / MIB,
        growth / MIB
    );
    assert!(growth < 60 * MIB, "memory grew by {} MiB while moving 2 x 100 MiB: bodies are being buffered", growth / MIB);
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_of_no_declared_length_reaches_the_upstream_with_its_body() {
    // Search APIs take a body on GET. Sent chunked (HTTP/1.1) or as DATA frames without a length (HTTP/2), the
    // body loses its framing at the gateway (hop-by-hop) and must be framed anew, not dropped.
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let raw = "GET /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (rsp, _) = raw_exchange(gw.http.unwrap(), raw.as_bytes(), BOUND).await;
    let (head, body) = rsp.split_once("\r\n\r\n").expect("an answer");
    assert_eq!(status_of(head), Some(200), "{rsp}");
    let seen: serde_json::Value = serde_json::from_str(body).expect("the echo");
    assert_eq!((seen["method"].as_str(), seen["body_len"].as_u64()), (Some("GET"), Some(5)), "HTTP/1.1: {seen}");

    let frames = futures_util::stream::iter([Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"{\"q\":1}")))]);
    let req = Request::get(gw.https_url("/search")).body(BodyExt::boxed(StreamBody::new(frames))).unwrap();
    let tls = tls_config(&gw.cert_path(), &[]);
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http2().build();
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build(conn);
    let rsp = timeout(BOUND, h2.request(req)).await.expect("in time").expect("answered");
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    let seen: serde_json::Value = serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!((seen["method"].as_str(), seen["body_len"].as_u64()), (Some("GET"), Some(7)), "HTTP/2: {seen}");
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Routing refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_is_404_and_wrong_method_is_405_without_reaching_upstream() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let cfg = ConfigBuilder::new(&up)
        .route("get-only", "/get-only", "methods = [\"GET\"]\nauth = \"public\"")
        .route("public", "/public/*", AUTH_PUBLIC)
        .build();
    let gw = spawn_gateway(&cfg).await;
    let c = client(&gw);
    for path in ["/nothing-here", "/publicity", "/get-only/deeper", "/"] {
        let a = timeout(BOUND, get(&c, &gw.https_url(path), None)).await.unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.text());
        assert_eq!(a.text(), r#"{"error":"not_found"}"#);
    }
    assert_eq!(up.hits(), 0, "an unrouted request reached the upstream");

    let request = req("POST", &gw.https_url("/get-only")).body(Full::new(Bytes::from_static(b"data"))).unwrap();
    let a = timeout(BOUND, send(&c, request)).await.unwrap();
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.text());
    assert_eq!(a.headers["allow"], "GET", "405 names the allowed methods");
    assert_eq!(a.text(), r#"{"error":"method_not_allowed"}"#);
    assert_eq!(up.hits(), 0, "a refused method reached the upstream");

    // A route without `methods` takes any method but CONNECT (hyper's client would send it on as
    // "CONNECT host:port", the path lost) and TRACE (it echoes credentials): 501, nothing forwarded.
    for method in ["CONNECT", "TRACE"] {
        let (rsp, _) = raw_lenient(
            gw.http.unwrap(),
            format!("{method} /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(status_of(&rsp), Some(501), "{method}: {rsp}");
        assert!(rsp.ends_with(r#"{"error":"not_implemented"}"#), "{rsp}");
    }
    assert_eq!(up.hits(), 0, "CONNECT or TRACE reached the upstream");

    // The routes themselves work.
    let a = timeout(BOUND, get(&c, &gw.https_url("/get-only"), None)).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    let a = timeout(BOUND, get(&c, &gw.http_url("/public/x"), None)).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Upstream failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_is_504_without_detail() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    // An upstream that is down: its port is held, and refuses every connection.
    let (_held, dead) = refusing_addr();
    let cfg = ConfigBuilder::new(&up)
        .upstream("dead", &format!("http://{dead}"), "connect_timeout = \"1s\"\ntimeout = \"5s\"")
        .upstream("slow", &up.url(), "connect_timeout = \"1s\"\ntimeout = \"500ms\"")
        .route_to("dead", "dead", "/dead/*", AUTH_PUBLIC)
        .route_to("slow", "slow", "/slow", AUTH_PUBLIC)
        .build();
    let gw = spawn_gateway(&cfg).await;
    let c = client(&gw);

    let t = Instant::now();
    let a = timeout(BOUND, get(&c, &gw.https_url("/dead/x"), None)).await.unwrap();
    let took = t.elapsed();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert_eq!(a.text(), r#"{"error":"bad_gateway"}"#, "no internal detail");
    assert!(took < Duration::from_millis(1500), "502 took {took:?}, beyond the 1s connect timeout");
    assert!(a.headers.contains_key("x-request-id"));

    let t = Instant::now();
    let a = timeout(BOUND, get(&c, &gw.https_url("/slow?ms=3000"), None)).await.unwrap();
    let took = t.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.text());
    assert_eq!(a.text(), r#"{"error":"gateway_timeout"}"#, "no internal detail");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(2500), "504 after {took:?}; the timeout is 500ms");
    assert_eq!(up.hits(), 1, "the slow upstream was asked once, not retried");
    gw.stop().await;
}

/// Writes a chunked upload on a raw socket: `pieces` chunks of 1 KiB, `pause` apart, then (unless `stall`) the
/// last chunk; returns the answer's head and body, and how long after the start it came.
async fn paced_upload(addr: SocketAddr, pieces: usize, pause: Duration, stall: bool) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "u".repeat(1024));
    for _ in 0..pieces {
        // Pacing is the traffic under test (an upload slower than the timeout), not synchronisation.
        tokio::time::sleep(pause).await;
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    if !stall {
        // A gateway that already answered (and closed) fails this write: its answer is what is asserted.
        let _ = s.write_all(b"0\r\n\r\n").await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the answer's body is whole (the gateway may keep the connection open after it).
    loop {
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string));
            if length.and_then(|l| l.trim().parse::<usize>().ok()).is_some_and(|l| body.len() >= l) {
                return (text, started.elapsed());
            }
        }
        match timeout(BOUND, s.read(&mut buf)).await.expect("answered in time") {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&out).to_string(), started.elapsed()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_timeout_passes_and_a_stalled_one_is_408() {
    // `timeout` bounds the wait for the answer once the body is sent, and until then each pause of the body: a
    // long upload that keeps coming is not the upstream's delay, and a client that stops sending is the
    // client's fault (408, not a 504 counted against the upstream).
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "").replace("timeout = \"5s\"", "timeout = \"1s\"")).await;
    let http = gw.http.unwrap();

    // Six pieces 400 ms apart: 2.4 s in all, more than twice the timeout, each pause well under it.
    let (answer, took) = paced_upload(http, 6, Duration::from_millis(400), false).await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert!(answer.contains(r#""len":6144"#), "the whole upload arrived: {answer}");
    assert!(took >= Duration::from_millis(2000), "{took:?}");

    // One piece, then nothing while the connection stays open.
    let (answer, took) = paced_upload(http, 1, Duration::from_millis(10), true).await;
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(answer.ends_with(r#"{"error":"request_timeout"}"#), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "408 after {took:?}; the timeout is 1s");

    let metrics = get(&client(&gw), &gw.admin_url("/metrics"), None).await.text();
    assert!(!metrics.contains("portcullis_upstream_errors_total{"), "counted against the upstream: {metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_on_a_private_ca_is_trusted_through_its_ca_file_only() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let (addr, ca_pem, hits) = tls_upstream().await;
    let config = |ca_line: &str| {
        ConfigBuilder::new(&up)
            .upstream("secure", &format!("https://{addr}"), ca_line)
            .route_to("secure", "secure", "/*", AUTH_PUBLIC)
            .build()
    };
    let gw = spawn_gateway_with_files(&config("ca_file = \"upstream-ca.pem\""), &[("upstream-ca.pem", ca_pem.as_bytes())]).await;
    let a = get(&client(&gw), &gw.http_url("/x"), None).await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "over tls"));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    gw.stop().await;

    // Without the CA the upstream's certificate cannot be verified: 502, and no request reached it.
    let gw = spawn_gateway(&config("")).await;
    let a = get(&client(&gw), &gw.http_url("/x"), None).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(!a.text().contains("certificate"), "internal detail leaked: {}", a.text());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "an unverified upstream was sent a request");
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Body and header limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body_is_413_and_oversize_headers_431_before_the_upstream() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_body_bytes = \"1KiB\"\nmax_header_bytes = \"32KiB\"\n")).await;
    let http = gw.http.unwrap();

    // A declared body over the limit: refused on the head alone, before a byte is forwarded.
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n";
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(&[b'a'; 512]);
    let (rsp, closed) = raw_lenient(http, &bytes, Duration::from_secs(5)).await;
    assert_eq!(status_of(&rsp), Some(413), "{rsp}");
    assert!(rsp.ends_with(r#"{"error":"payload_too_large"}"#), "{rsp}");
    assert!(closed, "the unread body must not be taken as the next request");

    // The same over HTTPS with a real client and a real body.
    let c = client(&gw);
    let request = req("POST", &gw.https_url("/upload")).body(Full::new(Bytes::from(vec![b'b'; 4096]))).unwrap();
    let a = timeout(BOUND, send(&c, request)).await.unwrap();
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(up.hits(), 0, "an oversize body reached the upstream");

    // A head of 40 KiB against a 32 KiB limit.
    let mut big = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend_from_slice(&vec![b'h'; 40 * 1024]);
    big.extend_from_slice(b"\r\n\r\n");
    let (rsp, _closed) = raw_lenient(http, &big, Duration::from_secs(5)).await;
    assert_eq!(status_of(&rsp), Some(431), "{rsp:.200}");
    assert_eq!(up.hits(), 0, "an oversize head reached the upstream");

    // Just under the limit is served.
    let mut ok = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec();
    ok.extend_from_slice(&vec![b'h'; 24 * 1024]);
    ok.extend_from_slice(b"\r\n\r\n");
    let (rsp, _) = raw_lenient(http, &ok, Duration::from_secs(5)).await;
    assert_eq!(status_of(&rsp), Some(200), "{rsp:.200}");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// A gateway with a 1 MiB body limit, a token-protected `/private/*` and everything else public.
async fn refusing_gateway(up: &Upstream) -> TestGateway {
    let config = ConfigBuilder::new(up)
        .section("[limits]\nmax_body_bytes = \"1MiB\"")
        .route("private", "/private/*", r#"auth = "required""#)
        .route("all", "/*", AUTH_PUBLIC)
        // A table of its own, not `.issuer()`: this issuer names no `audiences`.
        .section("[[issuers]]\nid = \"t\"\nissuer = \"t\"\nalgorithms = [\"HS256\"]\nsecret_file = \"hs.secret\"")
        .build();
    spawn_gateway_with_files(&config, &[("hs.secret", &[7u8; 32])]).await
}

/// Declares an upload of `len` bytes, reads the refusal, then sends the body anyway, as a client that writes its whole
/// upload before it looks at the answer does. Returns the answer, how the upload went, and whether the gateway
/// then ended the stream (after the client's own close at the latest).
async fn refused_upload<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
    len: usize,
) -> (String, std::io::Result<()>, bool) {
    s.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes()).await.unwrap();
    s.write_all(&[b'u'; 4096]).await.unwrap();
    s.flush().await.unwrap();
    let answer = read_response(s).await;
    let mut sent = Ok(());
    for _ in 0..(len - 4096) / 65536 {
        if let Err(e) = s.write_all(&[b'u'; 65536]).await.and(s.flush().await) {
            sent = Err(e);
            break;
        }
    }
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let ended = matches!(timeout(BOUND, s.read_to_end(&mut rest)).await, Ok(Ok(0)));
    (answer, sent, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_read_out_so_the_client_gets_its_answer_not_a_reset() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = refusing_gateway(&up).await;

    // 413 on the declared length, and 401 on a missing token, both before the body: the gateway shuts its side,
    // reads out the rest, and closes only after the client, so the client's writes never meet a reset.
    for (path, len, status) in [("/upload", 4 << 20, "413"), ("/private/x", 768 << 10, "401")] {
        let mut s = TcpStream::connect(gw.http.unwrap()).await.unwrap();
        let (answer, sent, ended) = refused_upload(&mut s, path, len).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        assert!(sent.is_ok(), "{path}: the upload met {sent:?} after the {status}: the gateway closed with input unread");
        assert!(ended, "{path}: the gateway never closed after the client did");
    }

    // The same through TLS: the staged close happens under TLS (close_notify, then the rest is read out).
    let connector = tls_connector(tls_config(&gw.cert_path(), &[b"http/1.1"]));
    let mut s = tls_connect(gw.https.unwrap(), &connector).await.unwrap();
    let (answer, sent, ended) = refused_upload(&mut s, "/upload", 4 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(sent.is_ok(), "over TLS the upload met {sent:?} after the 413");
    assert!(ended);
    assert_eq!(up.hits(), 0, "a refused upload reached the upstream");
    gw.stop().await;
}

/// Sends `len` bytes on an HTTP/2 stream as flow control allows (so the server must read them for this to end).
async fn send_through_flow_control(stream: &mut h2::SendStream<Bytes>, mut left: usize) -> Result<(), String> {
    while left > 0 {
        stream.reserve_capacity(left);
        let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
        let n = granted.ok_or("the stream closed")?.map_err(|e| e.to_string())?.min(left);
        stream.send_data(Bytes::from(vec![b'h'; n]), n == left).map_err(|e| e.to_string())?;
        left -= n;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http2_upload_is_read_out_not_reset() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = refusing_gateway(&up).await;
    let tls = tls_connect(gw.https.unwrap(), &tls_connector(tls_config(&gw.cert_path(), &[b"h2"]))).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(connection);

    // A 200 KiB upload without a token: the 401 comes at once; the body, more than the stream's first window,
    // can still be sent whole (the gateway reads it out) and the stream is never reset.
    let len = 200 * 1024;
    let request = Request::post(gw.https_url("/private/x")).header("content-length", len).body(()).unwrap();
    let (answer, mut body) = h2.send_request(request, false).expect("request sent");
    let answer = timeout(BOUND, answer).await.expect("answered in time").expect("an answer, not a reset");
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    timeout(BOUND, send_through_flow_control(&mut body, len)).await.expect("upload in time").expect("the refused upload went through");
    // The connection serves a next stream: any reset of the first was sent (and seen) before this answer.
    let (next, _) = h2.send_request(Request::get(gw.https_url("/public")).body(()).unwrap(), true).unwrap();
    assert_eq!(timeout(BOUND, next).await.unwrap().unwrap().status(), StatusCode::OK);
    let reset = futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| body.poll_reset(cx)));
    assert!(reset.is_none(), "the refused stream was reset: {reset:?}");
    assert_eq!(up.hits(), 1, "only the public request reached the upstream");
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Slowloris

/// Sends `request` and reads the answer at `rate` bytes every `tick` (after `wait` without reading at all),
/// until the gateway ends the stream or `expected` bytes arrived; returns the bytes read.
async fn read_at_pace(addr: SocketAddr, request: &str, wait: Duration, rate: usize, tick: Duration, expected: usize) -> usize {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    // Not reading is the traffic under test (a client that stops reading), not synchronisation.
    tokio::time::sleep(wait).await;
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + BOUND;
    while total < expected && Instant::now() < deadline {
        let mut this_tick = 0;
        while this_tick < rate && total < expected {
            let want = buf.len().min(rate - this_tick);
            match timeout(BOUND, s.read(&mut buf[..want])).await.expect("the stream moves or ends in time") {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    total += n;
                    this_tick += n;
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_idle_timeout_and_a_slow_reader_is_not() {
    // A client that takes none of its answer for `idle_timeout` loses the connection (nginx's send_timeout),
    // so it cannot hold a connection and an upstream one for ever; one that reads slowly but steadily is served.
    // Both the gateway's own HTTP/1 code (a bodiless GET) and hyper's (a request with a body).
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nidle_timeout = \"1s\"\n")).await;
    let http = gw.http.unwrap();
    const BIG: usize = 256 << 20;
    const SMALL: usize = 8 << 20;
    for (what, head) in [
        ("GET", "GET /download?bytes={n} HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("POST", "POST /download?bytes={n} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"),
    ] {
        let request = |n: usize| head.replace("{n}", &n.to_string());
        let got = read_at_pace(http, &request(BIG), Duration::from_secs(4), usize::MAX, Duration::ZERO, BIG).await;
        assert!(got < BIG, "{what}: a client that stopped reading for 4 s still got the whole answer ({got} bytes)");

        let got = read_at_pace(http, &request(SMALL), Duration::ZERO, 512 << 10, Duration::from_millis(150), SMALL + 1).await;
        assert!(got > SMALL, "{what}: a slow, steady reader was cut after {got} bytes");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_header_read_timeout_while_others_are_served() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nheader_read_timeout = \"1s\"\n")).await;
    let http = gw.http.unwrap();
    let started = Instant::now();

    // One client sends part of a head and stalls.
    let stall = tokio::spawn(async move {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let mut read = Vec::new();
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break (started.elapsed(), read),
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    });
    // Another dribbles a header line every 200ms, which must not extend the deadline.
    let dribble = tokio::spawn(async move {
        let s = TcpStream::connect(http).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            if w.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n").await.is_err() {
                return;
            }
            for i in 0..100 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if w.write_all(format!("X-D{i}: y\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 1024];
        let mut read = Vec::new();
        let out = loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break (started.elapsed(), read),
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        };
        writer.abort();
        out
    });

    // Meanwhile a normal client is served, while the slow ones are still held.
    let c = client(&gw);
    let a = timeout(BOUND, get(&c, &gw.http_url("/normal"), None)).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert!(!stall.is_finished(), "the slow client was cut before the timeout (or the normal one waited for it)");

    for (what, task) in [("stalled", stall), ("dribbling", dribble)] {
        let (after, read) =
            timeout(Duration::from_secs(5), task).await.unwrap_or_else(|_| panic!("{what} client still connected after 5s")).unwrap();
        assert!(
            after >= Duration::from_millis(900) && after <= Duration::from_secs(3),
            "{what} client cut after {after:?}; header_read_timeout is 1s"
        );
        let read = String::from_utf8_lossy(&read);
        assert!(status_of(&read).is_none_or(|s| s == 408), "{what}: unexpected answer {read:?}");
    }
    // The normal client's pooled keep-alive connection, idle past header_read_timeout, still serves it.
    let a = timeout(BOUND, get(&c, &gw.http_url("/after"), None)).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.hits(), 2, "only the normal requests reached the upstream");
    gw.stop().await;
}

/// Reads one `Content-Length` response off a raw connection (the echo upstream always sends one).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = timeout(BOUND, s.read(&mut buf)).await.expect("no response").expect("read response");
        assert!(n > 0, "connection closed before a whole response: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("content-length");
            if out.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// Waits for the server to close `s`, returning when it did (measured from `since`).
async fn closed_after(s: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match timeout(BOUND, s.read(&mut buf)).await.expect("server never closed the connection") {
            Ok(0) | Err(_) => return since.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_idles_for_idle_timeout_not_header_read_timeout() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"3s\"\n")).await;
    let http = gw.http.unwrap();
    let request = b"GET /ka HTTP/1.1\r\nHost: x\r\n\r\n";

    // A connection that never sends a head is cut at header_read_timeout, not held for idle_timeout.
    let mut silent = TcpStream::connect(http).await.unwrap();
    let after = closed_after(&mut silent, Instant::now()).await;
    assert!(after >= Duration::from_millis(900) && after < Duration::from_millis(2500), "silent connection cut after {after:?}");

    // A keep-alive connection idle for longer than header_read_timeout still serves its next request...
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(request).await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), Some(200));
    // (The idle time is what is under test, so it is slept.)
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(request).await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), Some(200), "idle keep-alive connection closed early");
    // ...and is closed once idle for idle_timeout.
    let after = closed_after(&mut s, Instant::now()).await;
    assert!(after >= Duration::from_millis(2800) && after < Duration::from_secs(5), "idle connection closed after {after:?}");

    // After a request, the next head must still arrive within header_read_timeout of its first byte.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(request).await.unwrap();
    assert_eq!(status_of(&read_response(&mut s).await), Some(200));
    s.write_all(b"GET /ka HTTP/1.1\r\n").await.unwrap();
    let after = closed_after(&mut s, Instant::now()).await;
    assert!(after >= Duration::from_millis(900) && after < Duration::from_millis(2500), "partial second head cut after {after:?}");
    assert_eq!(up.hits(), 3, "partial heads never reached the upstream");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_an_http1_upstream_as_one_field() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let tls = tls_connect(gw.https.unwrap(), &tls_connector(tls_config(&gw.cert_path(), &[b"h2"]))).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(connection);
    let req = Request::get(gw.https_url("/c")).header("cookie", "a=1").header("cookie", "b=2").body(()).unwrap();
    let (answer, _) = h2.send_request(req, true).unwrap();
    assert_eq!(timeout(BOUND, answer).await.unwrap().unwrap().status(), StatusCode::OK);
    // RFC 9113 §8.2.3: one field, joined with "; " (HTTP/1 servers often read only one Cookie line).
    let seen = up.last().unwrap();
    assert_eq!(seen.headers.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_though_it_answers_pings() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nidle_timeout = \"1s\"\n")).await;
    let tls = tls_connect(gw.https.unwrap(), &tls_connector(tls_config(&gw.cert_path(), &[b"h2"]))).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    // The h2 client answers the gateway's pings by itself, as every HTTP/2 stack does.
    let connection = tokio::spawn(connection);

    // A request that takes longer than idle_timeout is not idle time: it completes.
    let slow = Request::get(gw.https_url("/slow?ms=2500")).body(()).unwrap();
    let (answer, _) = h2.send_request(slow, true).unwrap();
    assert_eq!(timeout(BOUND, answer).await.unwrap().expect("answered, not cut").status(), StatusCode::OK);

    // Then nothing (the client keeps its handle: dropping it would end the connection from this side): the gateway says goodbye within twice idle_timeout (it checks once per idle_timeout).
    let since = Instant::now();
    let ended = timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was still open after {:?}", since.elapsed());
    assert!(since.elapsed() >= Duration::from_millis(900), "closed after {:?}", since.elapsed());
    drop(h2);
    gw.stop().await;
}

/// A plain connection to `addr` from the local address `from` (any 127.x.y.z is this machine).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends one GET on `s` and returns the answer's status, or None if the gateway closed instead.
async fn one_get(s: &mut TcpStream) -> Option<u16> {
    s.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n").await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = timeout(BOUND, s.read(&mut buf)).await.ok()?.ok()?;
    status_of(&String::from_utf8_lossy(&buf[..n]))
}

/// Connects from 127.0.0.1 until a request is served: the gateway frees a closed connection's place once it has
/// seen the close, which has no signal of its own.
async fn served_again_within(http: SocketAddr, within: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let mut again = connect_from("127.0.0.1", http).await;
        if one_get(&mut again).await == Some(200) {
            return;
        }
        assert!(started.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_max_connections_per_client() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_connections_per_client = 3\n")).await;
    let http = gw.http.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", http).await;
        assert_eq!(one_get(&mut s).await, Some(200));
        held.push(s);
    }
    // A fourth from the same client is closed at accept; another client is served meanwhile.
    let mut fourth = connect_from("127.0.0.1", http).await;
    assert_eq!(one_get(&mut fourth).await, None, "a fourth connection from one client was served");
    let mut other = connect_from("127.0.0.2", http).await;
    assert_eq!(one_get(&mut other).await, Some(200), "another client was refused");
    assert_eq!(up.hits(), 4);
    // Once one of the three closes, its place is the client's again (the gateway notices the close first).
    drop(held.pop());
    served_again_within(http, Duration::from_secs(5), "the place of a closed connection was never freed").await;
    let text = admin_metrics(&gw).await;
    let refused =
        text.lines().find_map(|l| l.strip_prefix("portcullis_connections_refused_total ")).map(|v| v.trim().parse::<f64>().unwrap());
    assert!(refused.is_some_and(|n| n >= 1.0), "refusals not counted: {refused:?}");
    drop(held);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_keeps_its_connection_place_while_it_lives() {
    use tokio_tungstenite::tungstenite::Message;
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "[limits]\nmax_connections_per_client = 2\n")).await;
    let http = gw.http.unwrap();
    // Two WebSockets: once upgraded, hyper is done with their connections, but the byte pipes are not.
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let tcp = connect_from("127.0.0.1", http).await;
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://127.0.0.1:{}/ws", http.port()), tcp).await.expect("upgrade");
        ws.send(Message::text("ping")).await.unwrap();
        assert!(matches!(timeout(BOUND, ws.next()).await.unwrap(), Some(Ok(Message::Text(_)))));
        sockets.push(ws);
    }
    let mut third = connect_from("127.0.0.1", http).await;
    assert_eq!(one_get(&mut third).await, None, "a client with two live WebSockets got a third connection");
    // Closing one gives its place back.
    let mut ws = sockets.pop().unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = timeout(BOUND, ws.next()).await.unwrap() {}
    drop(ws);
    served_again_within(http, Duration::from_secs(5), "a closed WebSocket's place was never freed").await;
    drop(sockets);
    gw.stop().await;
}

/// The admin listener's metrics text, over a plain connection.
async fn admin_metrics(gw: &TestGateway) -> String {
    let (text, _) = raw_lenient(gw.admin.unwrap(), b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", BOUND).await;
    text
}

// ------------------------------------------------------------------------------------------------------------
// WebSocket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    use tokio_tungstenite::tungstenite::Message;
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let http = gw.http.unwrap();
    timeout(BOUND, async {
        let tcp = TcpStream::connect(http).await.unwrap();
        let (mut ws, rsp) = tokio_tungstenite::client_async(format!("ws://127.0.0.1:{}/ws", http.port()), tcp)
            .await
            .expect("websocket handshake through the gateway");
        assert_eq!(rsp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert!(rsp.headers().contains_key("x-request-id"));
        for text in ["one", "two", "three: a longer message with some more bytes in it"] {
            ws.send(Message::text(text)).await.unwrap();
            match ws.next().await {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
                other => panic!("expected the echo of {text:?}, got {other:?}"),
            }
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0u8, 1, 2, 255]),
            other => panic!("expected the binary echo, got {other:?}"),
        }
        ws.close(None).await.unwrap();
        // After our close the stream ends: a close frame back, or the connection closing.
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) | Some(Err(_)) => {}
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
        }
    })
    .await
    .expect("websocket exchange finished in time");
    let seen = up.last().unwrap();
    assert_eq!(seen.path_and_query, "/ws");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// Over TLS that chose HTTP/1.1 the upgrade is served by hyper's HTTP/1-only server (HTTP/2 may not start
/// there): the handshake and the echo work the same.
#[tokio::test]
async fn websocket_echo_over_tls_http1() {
    use tokio_tungstenite::tungstenite::Message;
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    timeout(BOUND, async {
        let tls = gateway_tls(&gw, &[b"http/1.1"]).await;
        let (mut ws, rsp) = tokio_tungstenite::client_async("wss://localhost/ws", tls).await.expect("websocket handshake over TLS");
        assert_eq!(rsp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("over tls")).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "over tls"),
            other => panic!("expected the echo, got {other:?}"),
        }
        ws.close(None).await.unwrap();
    })
    .await
    .expect("websocket exchange finished in time");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_and_refuses_new() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let mut gw = spawn_gateway(&public_config(&up, "")).await;
    let (http, https) = (gw.http.unwrap(), gw.https.unwrap());
    let c = client(&gw);
    let url = gw.https_url("/slow?ms=1500");
    let in_flight = tokio::spawn(async move { get(&c, &url, None).await });
    // The request is in flight once the upstream has it.
    up.wait_hits(1).await;

    let running = gw.gw.take().expect("running gateway");
    let t = Instant::now();
    running.begin_shutdown();
    timeout(Duration::from_secs(1), async {
        until_refused(http).await;
        until_refused(https).await;
    })
    .await
    .expect("listeners still accept 1s after shutdown began");
    assert!(!in_flight.is_finished(), "the in-flight request ended before its upstream answered");

    let a = timeout(BOUND, in_flight).await.unwrap().unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "slow done");
    timeout(Duration::from_secs(10), running.wait()).await.expect("drain finished once the in-flight request did");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(TcpStream::connect(http).await.is_err());
    assert_eq!(up.hits(), 1);
}

// ------------------------------------------------------------------------------------------------------------
// TLS

/// A TLS ClientHello without the supported_versions extension, so `version` is the only version offered. It
/// offers ECDHE-ECDSA/RSA AES-GCM (TLS 1.2) and CBC (TLS 1.0/1.1) suites, P-256/X25519 and ECDSA/RSA signatures.
fn client_hello(version: u16) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    ext(&mut exts, 0x0000, &sni); // server_name
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // supported_groups: x25519, secp256r1
    ext(&mut exts, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
    ext(&mut exts, 0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]); // signature_algorithms
    let suites: [u16; 8] = [0xc02b, 0xc02f, 0xc02c, 0xc030, 0xc009, 0xc013, 0x002f, 0x0035];
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend((0..32u8).map(|i| i.wrapping_mul(7))); // random
    body.push(0); // session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01]; // client_hello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// Sends `hello` and returns the first record's header and first body bytes (up to 7 bytes), or what came.
async fn first_record(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    while out.len() < 7 {
        match timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer to the ClientHello in 5s"),
        }
    }
    out
}

fn tls_connector(cfg: rustls::ClientConfig) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    timeout(Duration::from_secs(5), connector.connect(name, tcp)).await.map_err(|_| std::io::Error::other("handshake timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_tls11_and_negotiates_alpn() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let https = gw.https.unwrap();

    // The hand-made hello is sound: offered as TLS 1.2 it gets a ServerHello.
    let r = first_record(https, &client_hello(0x0303)).await;
    assert!(r.len() >= 6 && r[0] == 0x16 && r[5] == 0x02, "TLS 1.2 hello not answered with a ServerHello: {r:02x?}");
    // Offered as TLS 1.1 (and as 1.0) it gets a protocol_version alert, never a ServerHello.
    for version in [0x0302u16, 0x0301] {
        let r = first_record(https, &client_hello(version)).await;
        assert!(!r.is_empty() && r[0] == 0x15, "{version:#06x} hello was not refused with an alert: {r:02x?}");
        if r.len() >= 7 {
            assert_eq!(r[6], 70, "alert is protocol_version: {r:02x?}");
        }
    }

    // ALPN: the server offers h2 first, and http/1.1 (http/1.0 last, for HTTP/1.0 clients that name it).
    let cert = gw.cert_path();
    let cases: [(&[&[u8]], &[u8]); 6] = [
        (&[b"h2", b"http/1.1"], b"h2"),
        (&[b"http/1.1", b"h2"], b"h2"),
        (&[b"http/1.1"], b"http/1.1"),
        (&[b"h2"], b"h2"),
        (&[b"http/1.0", b"http/1.1"], b"http/1.1"),
        (&[b"http/1.0"], b"http/1.0"),
    ];
    for (offer, want) in cases {
        let tls = tls_connect(https, &tls_connector(tls_config(&cert, offer))).await.expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(want), "offered {offer:?}");
    }
    // An HTTP/1.0 client that named http/1.0 is served.
    let mut tls = tls_connect(https, &tls_connector(tls_config(&cert, &[b"http/1.0"]))).await.unwrap();
    tls.write_all(b"GET /via-http10 HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    timeout(BOUND, tls.read_to_end(&mut answer)).await.expect("answered and closed").ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200 ") || answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let hits_after_http10 = up.hits();
    // A TLS 1.2-only client is served by the default (min 1.2) listener.
    let tls12 = tls12_only(&cert);
    let tls = tls_connect(https, &tls_connector(tls12)).await.expect("TLS 1.2 is allowed by default");
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(up.hits(), hits_after_http10);
    assert_eq!(hits_after_http10, 1, "only the HTTP/1.0 request was forwarded");
    gw.stop().await;

    // min_version = "1.3" refuses it.
    let cfg = public_config(&up, "").replace("self_signed = true", "self_signed = true\nmin_version = \"1.3\"");
    assert!(cfg.contains("min_version = \"1.3\""));
    let gw = spawn_gateway(&cfg).await;
    let https = gw.https.unwrap();
    let tls12 = tls12_only(&gw.cert_path());
    assert!(tls_connect(https, &tls_connector(tls12)).await.is_err(), "a TLS 1.2 client got through min_version = 1.3");
    let tls = tls_connect(https, &tls_connector(tls_config(&gw.cert_path(), &[]))).await.expect("TLS 1.3 client");
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(up.hits(), hits_after_http10, "no handshake in this test sends a request");
    gw.stop().await;
}

fn tls12_only(cert: &Path) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pem_roots(cert))
        .with_no_client_auth()
}

/// Makes one HTTP/1.1 request on a TLS connection and reads the answer to the end (which also takes in the
/// session tickets). Returns the connection's (handshake kind, early data accepted) and the answer.
async fn tls_request(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> (Option<rustls::HandshakeKind>, bool, String) {
    let mut tls = tls_connect(addr, connector).await.expect("handshake");
    tls.write_all(b"GET /zero-rtt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no end of answer in 5s"),
        }
    }
    let conn = tls.get_ref().1;
    (conn.handshake_kind(), conn.is_early_data_accepted(), String::from_utf8_lossy(&out).into_owned())
}

/// A bare TLS 1.3 server that does allow 0-RTT: the control showing the client below would get early data
/// accepted where a server allows it.
async fn early_data_server(cert_pem: &str, key_pem: &str) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.max_early_data_size = 16384;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn early_data_client(cert: &Path) -> tokio_rustls::TlsConnector {
    let mut cfg = tls_config(cert, &[]);
    cfg.enable_early_data = true;
    tls_connector(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_early_data_is_not_accepted_on_resumption() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let https = gw.https.unwrap();

    // Control: the same client against a server that allows 0-RTT resumes with early data accepted.
    let cert_pem = std::fs::read_to_string(gw.cert_path()).unwrap();
    let key_pem = std::fs::read_to_string(gw.dir.path().join("gateway.key")).unwrap();
    let control = early_data_server(&cert_pem, &key_pem).await;
    let connector = early_data_client(&gw.cert_path());
    let (kind, _, rsp) = timeout(BOUND, tls_request(control, &connector)).await.unwrap();
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let (kind, early, _) = timeout(BOUND, tls_request(control, &connector)).await.unwrap();
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    assert!(early, "control: a 0-RTT server should accept this client's early data");

    // The gateway: the second connection resumes, but early data is never accepted.
    let connector = early_data_client(&gw.cert_path());
    let (kind, early, rsp) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    assert!(!early);
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let (kind, early, rsp) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "the session was resumed");
    assert!(!early, "the gateway accepted TLS 1.3 early data");
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_by_ticket_unless_tickets_are_off() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    for tickets in [true, false] {
        let cfg = public_config(&up, "").replace("self_signed = true", &format!("self_signed = true\nsession_tickets = {tickets}"));
        let gw = spawn_gateway(&cfg).await;
        let https = gw.https.unwrap();
        // TLS 1.3 resumes only with a ticket.
        let connector = tls_connector(tls_config(&gw.cert_path(), &[]));
        let (kind, _, rsp) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        let (kind, _, rsp) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
        let expected = if tickets { rustls::HandshakeKind::Resumed } else { rustls::HandshakeKind::Full };
        assert_eq!(kind, Some(expected), "TLS 1.3 with session_tickets = {tickets}");
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        // TLS 1.2 resumes either way: by ticket, or by session ID from the server's cache.
        let connector = tls_connector(tls12_only(&gw.cert_path()));
        let (kind, _, _) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        let (kind, _, rsp) = timeout(BOUND, tls_request(https, &connector)).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "TLS 1.2 with session_tickets = {tickets}");
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        gw.stop().await;
    }
    assert_eq!(up.hits(), 8);
}

// ------------------------------------------------------------------------------------------------------------
// Request smuggling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_get_400_and_close_without_reaching_upstream() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let http = gw.http.unwrap();
    let cases: [(&str, &str); 3] = [
        ("two different Content-Lengths", "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        (
            "Transfer-Encoding not ending in chunked",
            "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("space before the colon", "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello"),
    ];
    for (what, raw) in cases {
        let before = up.hits();
        let (rsp, closed) = raw_exchange(http, raw.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&rsp), Some(400), "{what}: {rsp}");
        assert!(closed, "{what}: connection left open");
        assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "{what}: more than one answer: {rsp}");
        assert_eq!(up.hits(), before, "{what}: reached the upstream");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_400_and_closes_and_is_no_upstream_error() {
    // The head is well framed, so the request is already on its way when the body breaks: the upstream request
    // is aborted, and the client, whose fault it is, gets 400 (not 502) on a connection that then closes.
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let c = client(&gw);
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    for (what, rest) in [
        ("chunk-size overflow", "1ffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ("not a chunk size", "zz\r\nx\r\n0\r\n\r\n"),
        ("chunk data without its CRLF", "3\r\nabcXY0\r\n\r\n"),
    ] {
        let (rsp, closed) = raw_lenient(gw.http.unwrap(), format!("{head}{rest}").as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&rsp), Some(400), "{what}: {rsp}");
        assert!(rsp.ends_with(r#"{"error":"bad_request"}"#), "{what}: {rsp}");
        assert!(closed, "{what}: connection left open");
        assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "{what}: more than one answer: {rsp}");
    }
    let metrics = get(&c, &gw.admin_url("/metrics"), None).await.text();
    assert!(!metrics.contains("portcullis_upstream_errors_total{"), "counted as the upstream's failure: {metrics}");
    assert!(metrics.contains(r#"portcullis_requests_total{method="POST",route="all",status="400"} 3"#), "{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_never_smuggles_a_second_request() {
    let _shared = PROCESS.read().await;
    let up = spawn_upstream().await;
    let gw = spawn_gateway(&public_config(&up, "")).await;
    let http = gw.http.unwrap();
    let smuggled = "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let cl = smuggled.len();
    let cases = [
        format!("POST /cl-first HTTP/1.1\r\nHost: x\r\nContent-Length: {cl}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}"),
        format!("POST /te-first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: {cl}\r\n\r\n{smuggled}"),
        // A short Content-Length that would end the body inside the chunk framing.
        format!("POST /short-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}"),
    ];
    for raw in &cases {
        let before = up.hits();
        let (rsp, closed) = raw_exchange(http, raw.as_bytes(), Duration::from_secs(5)).await;
        let after = up.hits();
        assert!(after <= before + 1, "one message became {} upstream requests: {rsp}", after - before);
        let seen = up.seen.lock().unwrap().clone();
        assert!(seen.iter().all(|s| !s.path_and_query.contains("admin")), "the smuggled request reached the upstream: {seen:?}");
        if after == before + 1 {
            let last = seen.last().unwrap();
            assert!(
                !(last.headers.contains_key("content-length") && last.headers.contains_key("transfer-encoding")),
                "forwarded with both framings: {:?}",
                last.headers
            );
        }
        // Either refused (400) or answered once; the connection never carries on to a second request.
        let status = status_of(&rsp);
        assert!(matches!(status, Some(200) | Some(400)), "{rsp}");
        assert_eq!(rsp.matches("HTTP/1.1 ").count(), 1, "more than one answer: {rsp}");
        assert!(closed, "connection left open after CL+TE: {rsp}");
    }
    gw.stop().await;
}
