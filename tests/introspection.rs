//! Opaque tokens checked by RFC 7662 introspection, against a real introspection endpoint on loopback that checks
//! the gateway's client credentials and counts its calls.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

const ISS: &str = "https://idp.test";
const CLIENT: &str = "gw-client";
const SECRET: &str = "gw-secret/with:odd&chars";

/// The endpoint: answers by token, after `delay`, only to the right client credentials (401 otherwise).
struct Endpoint {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

async fn endpoint(delay: Duration) -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let calls = counted.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let calls = calls.clone();
                    async move { Ok::<_, Infallible>(answer(req, &calls, delay).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Endpoint { addr, calls }
}

async fn answer(req: http::Request<Incoming>, calls: &AtomicUsize, delay: Duration) -> http::Response<Full<Bytes>> {
    calls.fetch_add(1, Ordering::SeqCst);
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let want = format!("Basic {}", b64_std(format!("{}:{}", enc(CLIENT), enc(SECRET)).as_bytes()));
    let authorized = req.headers().get("authorization").is_some_and(|v| v.as_bytes() == want.as_bytes());
    let form_ok =
        req.method() == http::Method::POST && req.headers().get("content-type").is_some_and(|v| v == "application/x-www-form-urlencoded");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let token = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned()).unwrap_or_default();
    tokio::time::sleep(delay).await;
    if !authorized || !form_ok {
        let mut r = http::Response::new(Full::new(Bytes::from_static(b"{\"error\":\"invalid_client\"}")));
        *r.status_mut() = http::StatusCode::UNAUTHORIZED;
        return r;
    }
    let v = match token.as_str() {
        "opaque-alice" | "opaque-crowd" => json!({
            "active": true, "sub": "alice", "scope": "read write", "roles": ["reader"], "iss": ISS, "aud": ["api"],
            "exp": now() + 600, "client_id": "app"
        }),
        "opaque-writer" => json!({"active": true, "sub": "bob", "roles": ["writer"], "iss": ISS, "aud": "api", "exp": now() + 600}),
        "opaque-expired" => json!({"active": true, "sub": "carol", "roles": ["reader"], "iss": ISS, "aud": "api", "exp": now() - 10}),
        "opaque-other-aud" => json!({"active": true, "sub": "dave", "roles": ["reader"], "iss": ISS, "aud": "billing", "exp": now() + 600}),
        _ => json!({"active": false}),
    };
    let mut r = http::Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

fn b64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn config(up: &Upstream, introspection: SocketAddr, secret_env: &str) -> String {
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[upstreams.api]
url = "{up}"

[[issuers]]
id = "idp"
kind = "introspection"
issuer = "{ISS}"
audiences = ["api"]
introspection_url = "http://{introspection}/introspect"
client_id = "{CLIENT}"
client_secret_env = "{secret_env}"
cache_for = "5m"
negative_cache_for = "1m"
introspection_timeout = "1s"

[[routes]]
name = "api"
path = "/api/*"
upstream = "api"
roles_any = ["reader"]
scopes_any = ["read"]
"#,
        up = up.url()
    )
}

#[tokio::test]
async fn opaque_tokens_are_introspected_cached_and_refused_when_inactive() {
    bounded(async {
        std::env::set_var("PORTCULLIS_TEST_INTROSPECTION_SECRET", SECRET);
        let up = spawn_upstream().await;
        let idp = endpoint(Duration::ZERO).await;
        let gw = spawn_gateway(&config(&up, idp.addr, "PORTCULLIS_TEST_INTROSPECTION_SECRET")).await;
        let c = plain_client();
        let url = gw.http_url("/api/x");

        // Active: allowed, the identity from the answer, then served from the cache.
        let a = get(&c, &url, Some("opaque-alice")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.last().unwrap().headers.get("x-auth-subject").unwrap(), "alice");
        assert_eq!(get(&c, &url, Some("opaque-alice")).await.status, 200);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1, "the second request was a cache hit");

        // A missing role, per the answer's roles claim: 403.
        assert_eq!(get(&c, &url, Some("opaque-writer")).await.status, 403);

        // Inactive: 401 invalid_token, and remembered for negative_cache_for.
        let hits = up.hits();
        let calls = idp.calls.load(Ordering::SeqCst);
        let a = get(&c, &url, Some("opaque-revoked")).await;
        assert_eq!(a.status, 401);
        assert!(header(&a, "www-authenticate").unwrap().contains("invalid_token"));
        assert_eq!(get(&c, &url, Some("opaque-revoked")).await.status, 401);
        assert_eq!(idp.calls.load(Ordering::SeqCst), calls + 1, "the second refusal came from the negative cache");

        // Active but expired, or for another audience: 401.
        assert_eq!(get(&c, &url, Some("opaque-expired")).await.status, 401);
        assert_eq!(get(&c, &url, Some("opaque-other-aud")).await.status, 401);
        assert_eq!(up.hits(), hits, "no refused request reached the upstream");

        let m = metrics(&c, &gw).await;
        assert_eq!(metric(&m, "portcullis_auth_failures_total", &[("route", "api"), ("reason", "inactive")]), Some(2.0));
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_with_one_uncached_token_make_one_call() {
    bounded(async {
        std::env::set_var("PORTCULLIS_TEST_INTROSPECTION_SECRET_2", SECRET);
        let up = spawn_upstream().await;
        let idp = endpoint(Duration::from_millis(200)).await;
        let gw = spawn_gateway(&config(&up, idp.addr, "PORTCULLIS_TEST_INTROSPECTION_SECRET_2")).await;
        let c = plain_client();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (c, url) = (c.clone(), gw.http_url("/api/x"));
            set.spawn(async move { get(&c, &url, Some("opaque-crowd")).await.status });
        }
        while let Some(s) = set.join_next().await {
            assert_eq!(s.unwrap(), 200);
        }
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1, "one introspection call for 100 concurrent requests");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_or_refusing_endpoint_is_a_503_never_an_allow() {
    bounded(async {
        std::env::set_var("PORTCULLIS_TEST_INTROSPECTION_SECRET_3", SECRET);
        std::env::set_var("PORTCULLIS_TEST_INTROSPECTION_WRONG", "not-the-secret");
        let up = spawn_upstream().await;
        let c = plain_client();

        // Down: nothing listens there.
        let (_hold, dead) = refusing_addr();
        let gw = spawn_gateway(&config(&up, dead, "PORTCULLIS_TEST_INTROSPECTION_SECRET_3")).await;
        let a = get(&c, &gw.http_url("/api/x"), Some("opaque-alice")).await;
        assert_eq!(a.status, 503);
        assert!(header(&a, "retry-after").is_some());
        gw.stop().await;

        // Up, but the gateway's client credentials are wrong: the endpoint says 401, the client gets 503.
        let idp = endpoint(Duration::ZERO).await;
        let gw = spawn_gateway(&config(&up, idp.addr, "PORTCULLIS_TEST_INTROSPECTION_WRONG")).await;
        assert_eq!(get(&c, &gw.http_url("/api/x"), Some("opaque-alice")).await.status, 503);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1, "the endpoint was asked, with credentials it refused");
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn introspection_issuers_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        r#"
[listen]
http = "127.0.0.1:0"

[upstreams.api]
url = "http://127.0.0.1:9"

[[issuers]]
id = "a"
kind = "introspection"
issuer = "https://a.test"
algorithms = ["RS256"]
introspection_url = "http://example.com/introspect"
client_secret_env = "PORTCULLIS_TEST_SURELY_UNSET"

[[issuers]]
id = "b"
issuer = "https://b.test"
algorithms = ["EdDSA"]
public_keys = ["missing.pem"]
cache_for = "1m"

[[routes]]
name = "r"
path = "/*"
upstream = "api"
"#,
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    for want in [
        "`algorithms` does not apply to an introspection issuer",
        "must be an https:// URL (http:// only to loopback)",
        "needs `client_id`",
        "PORTCULLIS_TEST_SURELY_UNSET (client_secret_env) is not set",
        "`cache_for` is for kind = \"introspection\" issuers",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
