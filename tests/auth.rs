//! Bearer-token authentication and per-route policy, end to end: a real gateway on loopback, a real echo upstream,
//! tokens minted here with real keys, and a JWKS / OIDC server written here.
//!
//! Every refusal also asserts that the upstream was not reached. Every test body runs under a time bound, and
//! waits on readiness signals (`/readyz`, the JWKS server's fetch counter) rather than on sleeps.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

const INVALID_TOKEN_BODY: &str = r#"{"error":"invalid_token"}"#;
const INVALID_TOKEN_CHALLENGE: &str = r#"Bearer realm="portcullis", error="invalid_token""#;

// ------------------------------------------------------------------------------------------------------------
// Tokens.

/// A valid token for `iss` with subject `sub` and extra claims, no kid.
fn tok(key: &TestKey, iss: &str, sub: &str, extra: Value) -> String {
    mint_token(key, None, &claims(iss, sub, extra))
}

/// The same key material used with another algorithm of its family.
fn with_alg(key: &TestKey, alg: Algorithm) -> TestKey {
    TestKey { alg, encoding: key.encoding.clone(), public_pem: key.public_pem.clone(), private_pem: key.private_pem.clone() }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    hex(&b)
}

// ------------------------------------------------------------------------------------------------------------
// Answers.

/// Asserts `a` is the one uniform invalid-token answer.
fn assert_invalid_token(a: &Answer, what: &str) {
    assert_eq!(a.status, 401, "{what}: {}", a.text());
    assert_eq!(a.text(), INVALID_TOKEN_BODY, "{what}");
    assert_eq!(a.headers["www-authenticate"], INVALID_TOKEN_CHALLENGE, "{what}");
}

/// Sends `token` to `url` and asserts a 401 `invalid_token` that never reached the upstream.
async fn refused(c: &TestClient, up: &Upstream, url: &str, token: &str, what: &str) -> Answer {
    let before = up.hits();
    let a = get(c, url, Some(token)).await;
    assert_invalid_token(&a, what);
    assert_eq!(up.hits(), before, "{what}: the upstream was reached");
    a
}

/// Sends `token` to `url` and asserts a 503 with `Retry-After` (its issuer has no keys yet) that never reached the
/// upstream.
async fn unavailable(c: &TestClient, up: &Upstream, url: &str, token: &str, what: &str) -> Answer {
    let before = up.hits();
    let a = get(c, url, Some(token)).await;
    assert_eq!(a.status, 503, "{what}: {}", a.text());
    assert!(a.headers.contains_key("retry-after"), "{what}");
    assert_eq!(up.hits(), before, "{what}: the upstream was reached");
    a
}

/// Sends `token` to `url` and asserts the upstream answered 200 (and was reached exactly once).
async fn accepted(c: &TestClient, up: &Upstream, url: &str, token: &str, what: &str) -> Answer {
    let before = up.hits();
    let a = get(c, url, Some(token)).await;
    assert_eq!(a.status, 200, "{what}: {}", a.text());
    assert_eq!(up.hits(), before + 1, "{what}: the upstream was not reached");
    a
}

/// Sends `token` to `url` and asserts a 403 that never reached the upstream.
async fn forbidden(c: &TestClient, up: &Upstream, url: &str, token: &str, what: &str) -> Answer {
    let before = up.hits();
    let a = get(c, url, Some(token)).await;
    assert_eq!(a.status, 403, "{what}: {}", a.text());
    assert_eq!(up.hits(), before, "{what}: the upstream was reached");
    a
}

/// Asserts the admin `/readyz` answers 200 now.
async fn assert_ready(c: &TestClient, gw: &TestGateway, what: &str) {
    let a = get(c, &gw.admin_url("/readyz"), None).await;
    assert_eq!(a.status, 200, "{what}: {}", a.text());
}

/// Sends one request over a raw TCP socket (no client-side path normalisation) and returns status and text.
async fn raw_get(addr: SocketAddr, target: &str, extra_headers: &str) -> (u16, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: gateway.test\r\n{extra_headers}Connection: close\r\n\r\n");
    let (rsp, _closed) = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
    let status = rsp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{target:?}: no status line in {rsp:?}"));
    (status, rsp)
}

// ------------------------------------------------------------------------------------------------------------
// A loopback identity provider: JWKS at /jwks.json and OIDC discovery at /.well-known/openid-configuration,
// both swappable at run time, with fetch counters to wait on.

struct IdpState {
    jwks_body: Mutex<String>,
    jwks_status: AtomicU16,
    /// How long the JWKS answer takes (a slow identity provider), in milliseconds.
    jwks_delay_ms: AtomicU64,
    cache_control: Mutex<Option<String>>,
    /// The discovery document; `None` serves the default (issuer and jwks_uri on this server).
    discovery: Mutex<Option<Value>>,
    jwks_fetches: watch::Sender<usize>,
    discovery_fetches: watch::Sender<usize>,
    other_fetches: watch::Sender<usize>,
}

struct Idp {
    addr: SocketAddr,
    state: Arc<IdpState>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl Idp {
    async fn start(keys: Value) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(IdpState {
            jwks_body: Mutex::new(keys.to_string()),
            jwks_status: AtomicU16::new(200),
            jwks_delay_ms: AtomicU64::new(0),
            cache_control: Mutex::new(None),
            discovery: Mutex::new(None),
            jwks_fetches: watch::Sender::new(0),
            discovery_fetches: watch::Sender::new(0),
            other_fetches: watch::Sender::new(0),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| idp_handle(st.clone(), addr, req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        Idp { addr, state, accept: Some(accept) }
    }

    /// The issuer URL of this provider (what discovery-based issuers are configured with).
    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn jwks_url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn set_jwks(&self, keys: Value) {
        *self.state.jwks_body.lock().unwrap() = keys.to_string();
    }

    fn set_jwks_raw(&self, body: &str) {
        *self.state.jwks_body.lock().unwrap() = body.to_string();
    }

    fn set_delay(&self, delay: Duration) {
        self.state.jwks_delay_ms.store(u64::try_from(delay.as_millis()).unwrap(), Ordering::SeqCst);
    }

    fn set_status(&self, status: u16) {
        self.state.jwks_status.store(status, Ordering::SeqCst);
    }

    fn set_cache_control(&self, cc: Option<&str>) {
        *self.state.cache_control.lock().unwrap() = cc.map(str::to_string);
    }

    fn set_discovery(&self, doc: Value) {
        *self.state.discovery.lock().unwrap() = Some(doc);
    }

    fn jwks_fetches(&self) -> usize {
        *self.state.jwks_fetches.borrow()
    }

    fn discovery_fetches(&self) -> usize {
        *self.state.discovery_fetches.borrow()
    }

    fn other_fetches(&self) -> usize {
        *self.state.other_fetches.borrow()
    }

    /// Waits until the JWKS has been requested at least `n` times in all.
    async fn wait_jwks_fetches(&self, n: usize, within: Duration) {
        let mut rx = self.state.jwks_fetches.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("JWKS fetched {} times, not {n}, within {within:?}", self.jwks_fetches()))
            .unwrap();
    }

    async fn wait_discovery_fetches(&self, n: usize, within: Duration) {
        let mut rx = self.state.discovery_fetches.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("discovery fetched {} times, not {n}, within {within:?}", self.discovery_fetches()))
            .unwrap();
    }

    /// Stops listening: new connections are refused. (Every answer carries `Connection: close`, so no pooled
    /// connection outlives this.)
    async fn stop(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some(t) = &self.accept {
            t.abort();
        }
    }
}

async fn idp_handle(st: Arc<IdpState>, addr: SocketAddr, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut cache_control = None;
    let (status, body) = match req.uri().path() {
        "/jwks.json" => {
            tokio::time::sleep(Duration::from_millis(st.jwks_delay_ms.load(Ordering::SeqCst))).await;
            st.jwks_fetches.send_modify(|n| *n += 1);
            cache_control = st.cache_control.lock().unwrap().clone();
            (st.jwks_status.load(Ordering::SeqCst), st.jwks_body.lock().unwrap().clone())
        }
        "/.well-known/openid-configuration" => {
            st.discovery_fetches.send_modify(|n| *n += 1);
            let doc = st.discovery.lock().unwrap().clone().unwrap_or_else(|| {
                json!({
                    "issuer": format!("http://{addr}"),
                    "jwks_uri": format!("http://{addr}/jwks.json"),
                })
            });
            (200, doc.to_string())
        }
        _ => {
            st.other_fetches.send_modify(|n| *n += 1);
            (404, "{}".to_string())
        }
    };
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    let h = rsp.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("connection", "close".parse().unwrap());
    if let Some(cc) = cache_control {
        h.insert("cache-control", cc.parse().unwrap());
    }
    if (300..400).contains(&status) {
        // A redirect elsewhere on this server: following it would show up in `other_fetches`.
        h.insert("location", format!("http://{addr}/moved/jwks.json").parse().unwrap());
    }
    Ok(rsp)
}

/// The issuer of the tokens whose keys come from a JWKS.
const IDP_ISS: &str = "https://idp.test";

/// A gateway whose only issuer reads its keys (RS256 or ES256) from `idp`'s JWKS, with one `required` catch-all
/// route. `extra`: more settings of the issuer.
fn jwks_gateway_config(up: &Upstream, idp: &Idp, iss: &str, extra: &str) -> String {
    jwks_gateway_config_with(up, idp, iss, &["RS256", "ES256"], extra)
}

/// [`jwks_gateway_config`] with other `algorithms`.
fn jwks_gateway_config_with(up: &Upstream, idp: &Idp, iss: &str, algorithms: &[&str], extra: &str) -> String {
    let keys = format!("jwks_url = \"{}\"\njwks_timeout = \"2s\"\n{extra}", idp.jwks_url());
    ConfigBuilder::new(up).issuer("idp", iss, algorithms, &keys).route("all", "/*", "").build()
}

// ------------------------------------------------------------------------------------------------------------
// Static keys: every algorithm family reaches the upstream, which sees the verified identity.

const HMAC_SECRET: &[u8] = b"a-test-hmac-secret-of-plenty-bytes-0123456789abcdef";

/// An HMAC issuer's key source: [`HMAC_SECRET`], written to `hs.secret` beside the config.
const HS_SECRET_FILE: &str = r#"secret_file = "hs.secret""#;

#[tokio::test]
async fn every_algorithm_from_static_keys_reaches_upstream() {
    bounded(async {
        let up = spawn_upstream().await;
        let rsa = test_key(Algorithm::RS256);
        let es256 = test_key(Algorithm::ES256);
        let es384 = test_key(Algorithm::ES384);
        let ed = test_key(Algorithm::EdDSA);
        let mut secret_file = HMAC_SECRET.to_vec();
        secret_file.push(b'\n'); // as an editor leaves it; not part of the secret
        let cfg = ConfigBuilder::new(&up)
            .issuer("hmac", "https://hmac.test", &["HS256", "HS384", "HS512"], r#"secret_file = "hmac.secret""#)
            .issuer("rsa", "https://rsa.test", &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"], r#"public_keys = ["rsa.pem"]"#)
            .issuer("es256", "https://es256.test", &["ES256"], r#"public_keys = [{ path = "es256.pem", kid = "es-2026" }]"#)
            .issuer("es384", "https://es384.test", &["ES384"], r#"public_keys = ["es384.pem"]"#)
            .issuer("ed", "https://ed.test", &["EdDSA"], r#"public_keys = ["ed.pem"]"#)
            .route("me", "/users/me", r#"auth = "required""#)
            .build();
        let gw = spawn_gateway_with_files(
            &cfg,
            &[
                ("hmac.secret", &secret_file),
                ("rsa.pem", rsa.public_pem.as_bytes()),
                ("es256.pem", es256.public_pem.as_bytes()),
                ("es384.pem", es384.public_pem.as_bytes()),
                ("ed.pem", ed.public_pem.as_bytes()),
            ],
        )
        .await;
        let c = client(&gw);
        let url = gw.https_url("/users/me");

        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let cases: Vec<(TestKey, &str, Option<&str>)> = vec![
            (with_alg(&hs, Algorithm::HS256), "https://hmac.test", None),
            (with_alg(&hs, Algorithm::HS384), "https://hmac.test", None),
            (with_alg(&hs, Algorithm::HS512), "https://hmac.test", None),
            (with_alg(&rsa, Algorithm::RS256), "https://rsa.test", None),
            (with_alg(&rsa, Algorithm::RS384), "https://rsa.test", None),
            (with_alg(&rsa, Algorithm::RS512), "https://rsa.test", None),
            (with_alg(&rsa, Algorithm::PS256), "https://rsa.test", None),
            (with_alg(&rsa, Algorithm::PS384), "https://rsa.test", None),
            (with_alg(&rsa, Algorithm::PS512), "https://rsa.test", None),
            (with_alg(&es256, Algorithm::ES256), "https://es256.test", Some("es-2026")),
            (with_alg(&es256, Algorithm::ES256), "https://es256.test", None),
            (with_alg(&es384, Algorithm::ES384), "https://es384.test", None),
            (with_alg(&ed, Algorithm::EdDSA), "https://ed.test", None),
        ];
        for (key, iss, kid) in &cases {
            let what = format!("{:?} from {iss} (kid {kid:?})", key.alg);
            let sub = format!("user-{:?}", key.alg).to_lowercase();
            let token =
                mint_token(key, *kid, &claims(iss, &sub, json!({"roles": ["reader", "writer"], "scope": "read:items write:items"})));
            let a = accepted(&c, &up, &url, &token, &what).await;
            assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some(sub.as_str()), "{what}");
            assert_eq!(a.upstream_header("x-auth-roles").as_deref(), Some("reader,writer"), "{what}");
            assert_eq!(a.upstream_header("x-auth-scopes").as_deref(), Some("read:items,write:items"), "{what}");
            assert_eq!(a.upstream_header("x-auth-issuer").as_deref(), Some(*iss), "{what}");
            let seen = up.last().unwrap();
            assert_eq!(seen.path_and_query, "/users/me");
            assert_eq!(seen.headers["authorization"], format!("Bearer {token}"), "{what}: forward_authorization defaults to true");
        }

        // The same over HTTP/2.
        let h2 = h2_client(&gw);
        let t = tok(&es384, "https://es384.test", "h2-user", json!({}));
        let before = up.hits();
        let a = get(&h2, &url, Some(&t)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.version, http::Version::HTTP_2);
        assert_eq!(up.hits(), before + 1);
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("h2-user"));
        let before = up.hits();
        let a = get(&h2, &url, None).await;
        assert_eq!(a.status, 401);
        assert_eq!(up.hits(), before);

        // A token without a roles claim: the identity header for it is not sent at all.
        let a = accepted(&c, &up, &url, &tok(&hs, "https://hmac.test", "plain", json!({})), "no roles").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("plain"));
        assert_eq!(a.upstream_header("x-auth-roles"), None);
        assert_eq!(a.upstream_header("x-auth-scopes"), None);

        // The kid form selects that key only: a different ES256 key claiming the configured kid is refused.
        let other = test_key(Algorithm::ES256);
        let t = mint_token(&other, Some("es-2026"), &claims("https://es256.test", "x", json!({})));
        refused(&c, &up, &url, &t, "foreign key under a configured kid").await;
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Refusals: 401 `invalid_token`, one uniform answer, never forwarded.

struct RefusalSetup {
    up: Upstream,
    gw: TestGateway,
    hs: TestKey,
    rsa: TestKey,
    es: TestKey,
    b: TestKey,
}

const HS_ISS: &str = "https://hs.test";
const RS_ISS: &str = "https://rs.test";
const ES_ISS: &str = "https://es.test";
const MIXED_ISS: &str = "https://mixed.test";
const B_ISS: &str = "https://b.test";

async fn refusal_setup() -> RefusalSetup {
    let up = spawn_upstream().await;
    let rsa = test_key(Algorithm::RS256);
    let es = test_key(Algorithm::ES256);
    let b = test_key(Algorithm::ES256);
    let cfg = ConfigBuilder::new(&up)
        .issuer("hs", HS_ISS, &["HS256"], HS_SECRET_FILE)
        .issuer("rs", RS_ISS, &["RS256"], r#"public_keys = ["rs.pem"]"#)
        .issuer("es", ES_ISS, &["ES256"], r#"public_keys = ["es.pem"]"#)
        // Both an HMAC secret and an RSA key: the classic setting for algorithm confusion.
        .issuer("mixed", MIXED_ISS, &["HS256", "RS256"], &format!("{HS_SECRET_FILE}\npublic_keys = [\"rs.pem\"]"))
        .issuer("b", B_ISS, &["ES256"], r#"public_keys = ["b.pem"]"#)
        .route("only-b", "/only-b/*", r#"issuers = ["b"]"#)
        .route("all", "/*", "")
        .build();
    let gw = spawn_gateway_with_files(
        &cfg,
        &[
            ("hs.secret", HMAC_SECRET),
            ("rs.pem", rsa.public_pem.as_bytes()),
            ("es.pem", es.public_pem.as_bytes()),
            ("b.pem", b.public_pem.as_bytes()),
        ],
    )
    .await;
    RefusalSetup { up, gw, hs: hmac_key(Algorithm::HS256, HMAC_SECRET), rsa, es, b }
}

#[tokio::test]
async fn missing_and_malformed_credentials() {
    bounded(async {
        let s = refusal_setup().await;
        let c = client(&s.gw);
        let url = s.gw.https_url("/items");
        let good = tok(&s.hs, HS_ISS, "alice", json!({}));
        accepted(&c, &s.up, &url, &good, "control: a valid token").await;

        // No token at all: 401 with a bare challenge, no `error` attribute (RFC 6750 §3.1).
        for headers in [vec![], vec![("authorization", "Basic YWxpY2U6c2VjcmV0")]] {
            let before = s.up.hits();
            let a = get_with(&c, &url, &headers).await;
            assert_eq!(a.status, 401, "{headers:?}: {}", a.text());
            assert_eq!(a.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
            assert!(!a.text().contains("invalid_token"), "{}", a.text());
            assert_eq!(s.up.hits(), before);
        }

        // A token in the query string is not a credential (no route opts in), and is not forwarded either.
        for q in ["access_token", "token", "id_token"] {
            let before = s.up.hits();
            let a = get(&c, &s.gw.https_url(&format!("/items?{q}={good}")), None).await;
            assert_eq!(a.status, 401, "{q}: {}", a.text());
            assert_eq!(a.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
            assert_eq!(s.up.hits(), before);
        }

        // `Bearer` with nothing after it.
        for value in ["Bearer", "Bearer ", "bearer    "] {
            let before = s.up.hits();
            let a = get_with(&c, &url, &[("authorization", value)]).await;
            assert_invalid_token(&a, &format!("{value:?}"));
            assert_eq!(s.up.hits(), before, "{value:?}");
        }

        // The scheme is case-insensitive.
        let before = s.up.hits();
        let mixed_case = format!("bEaReR {good}");
        let a = get_with(&c, &url, &[("authorization", mixed_case.as_str())]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(s.up.hits(), before + 1);

        // Two Authorization headers (even two good ones), or two credentials in one: a request carries at most one
        // credential, so this is 400 `invalid_request` (RFC 6750 §3.1), not a token check; never forwarded.
        let two_values = format!("Bearer {good} {good}");
        let bearer = format!("Bearer {good}");
        for headers in [
            vec![("authorization", bearer.as_str()), ("authorization", bearer.as_str())],
            vec![("authorization", bearer.as_str()), ("authorization", "Basic YWxpY2U6c2VjcmV0")],
            vec![("authorization", two_values.as_str())],
        ] {
            let before = s.up.hits();
            let a = get_with(&c, &url, &headers).await;
            assert_eq!(a.status, 400, "{}", a.text());
            assert_eq!(a.text(), r#"{"error":"invalid_request"}"#);
            assert_eq!(a.headers["www-authenticate"], r#"Bearer realm="portcullis", error="invalid_request""#);
            assert_eq!(s.up.hits(), before, "two credentials reached the upstream");
        }

        // Garbage in every segment shape.
        let junk = [
            "abc".to_string(),
            "a.b".to_string(),
            "a.b.c".to_string(),
            "..".to_string(),
            format!("{}.{}.", b64(b"{\"alg\":\"HS256\""), b64(b"{}")),
            format!("{}.!!!.sig", b64(br#"{"alg":"HS256","typ":"JWT"}"#)),
            format!("{}.{}.sig", b64(b"[1,2]"), b64(b"{}")),
        ];
        for t in &junk {
            refused(&c, &s.up, &url, t, &format!("junk {t:?}")).await;
        }
        s.gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_edit_of_a_genuine_token_is_refused_without_reaching_upstream() {
    // Seeded edits of genuine HS256, RS256 and ES256 tokens: a character replaced, inserted or removed, a
    // segment repeated, dropped or moved, a letter's case changed. Whatever the edit, the token is no longer the
    // one signed, so it is refused (401, or 400 where it no longer reads as one credential) and the upstream never
    // sees the request. Bounded: PORTCULLIS_FUZZ_CASES edits per key (default 80), from PORTCULLIS_FUZZ_SEED.
    bounded(async {
        let s = refusal_setup().await;
        let c = client(&s.gw);
        let url = s.gw.https_url("/items");
        let (count, seed) = fuzz_settings(80, 0x9E37_79B9_7F4A_7C15);
        let mut rng = Rng::new(seed);
        let mut next = |n: usize| rng.below(n);
        const CHARS: &[u8] = b"AQgwz09-_.=+/ %";
        for (key, iss) in [(&s.hs, HS_ISS), (&s.rsa, RS_ISS), (&s.es, ES_ISS)] {
            let genuine = tok(key, iss, "alice", json!({"roles": ["user"]}));
            accepted(&c, &s.up, &url, &genuine, "control").await;
            for round in 0..count {
                let mut t = genuine.clone().into_bytes();
                let at = next(t.len());
                match next(6) {
                    0 => t[at] = CHARS[next(CHARS.len())],
                    1 => t.insert(at, CHARS[next(CHARS.len())]),
                    2 => drop(t.remove(at)),
                    3 => t[at] = if t[at].is_ascii_lowercase() { t[at].to_ascii_uppercase() } else { t[at].to_ascii_lowercase() },
                    _ => {
                        let mut parts: Vec<&[u8]> = genuine.as_bytes().split(|&b| b == b'.').collect();
                        let (i, j) = (next(parts.len()), next(parts.len()));
                        match next(3) {
                            0 => parts.insert(i, parts[j]),
                            1 => drop(parts.remove(i)),
                            _ => parts.swap(i, j),
                        }
                        t = parts.join(&b'.');
                    }
                }
                let Ok(edited) = String::from_utf8(t) else { continue };
                if edited == genuine || edited.trim() == genuine {
                    continue;
                }
                let before = s.up.hits();
                let a = get(&c, &url, Some(&edited)).await;
                let what = format!("{iss} round {round} (seed {seed}): {edited}");
                assert!(matches!(a.status.as_u16(), 400 | 401), "{what}: {} {}", a.status, a.text());
                assert_eq!(s.up.hits(), before, "{what}: the upstream was reached");
            }
        }
        s.gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused_without_reaching_upstream() {
    bounded(async {
        let s = refusal_setup().await;
        let c = client(&s.gw);
        let url = s.gw.https_url("/items");
        let now = now();
        let hs_claims = claims(HS_ISS, "alice", json!({"roles": ["user"]}));
        let hs_payload = hs_claims.to_string();

        // Controls: each issuer's genuine token passes, so the refusals below are about the token alone.
        accepted(&c, &s.up, &url, &tok(&s.hs, HS_ISS, "alice", json!({})), "hs control").await;
        accepted(&c, &s.up, &url, &tok(&s.rsa, RS_ISS, "alice", json!({})), "rs control").await;
        accepted(&c, &s.up, &url, &tok(&s.es, ES_ISS, "alice", json!({})), "es control").await;
        accepted(&c, &s.up, &url, &tok(&s.hs, MIXED_ISS, "alice", json!({})), "mixed hs control").await;
        accepted(&c, &s.up, &url, &tok(&s.rsa, MIXED_ISS, "alice", json!({})), "mixed rs control").await;
        for typ in ["at+jwt", "application/at+JWT", "JWT", "jwt"] {
            let t = jws(&s.hs, &json!({"alg": "HS256", "typ": typ}).to_string(), &hs_payload);
            accepted(&c, &s.up, &url, &t, &format!("typ {typ}")).await;
        }
        let t = jws(&s.hs, r#"{"alg":"HS256"}"#, &hs_payload);
        accepted(&c, &s.up, &url, &t, "no typ").await;
        // Keycloak's access tokens say so in the payload.
        let keycloak_access = claims(HS_ISS, "alice", json!({"typ": "Bearer"})).to_string();
        accepted(&c, &s.up, &url, &jws(&s.hs, r#"{"alg":"HS256","typ":"JWT"}"#, &keycloak_access), "payload typ Bearer").await;

        let mut cases: Vec<(String, String)> = Vec::new();
        let mut case = |what: &str, token: String| cases.push((what.to_string(), token));

        // alg none, any casing, with and without a signature.
        let real_sig = tok(&s.hs, HS_ISS, "alice", json!({})).rsplit('.').next().unwrap().to_string();
        for alg in ["none", "None", "NONE", "nOnE"] {
            let h = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
            let p = b64(hs_payload.as_bytes());
            case(&format!("alg {alg} unsigned"), format!("{h}.{p}."));
            case(&format!("alg {alg} two segments"), format!("{h}.{p}"));
            case(&format!("alg {alg} with a signature"), format!("{h}.{p}.{real_sig}"));
        }
        // Other algorithm names we do not implement or spell differently.
        for alg in ["hs256", "HS256 ", "RSA-OAEP", "ES256K", "Ed25519", ""] {
            let t = jws(&s.hs, &json!({"alg": alg}).to_string(), &hs_payload);
            case(&format!("alg {alg:?}"), t);
        }
        case("alg missing", jws(&s.hs, r#"{"typ":"JWT"}"#, &hs_payload));

        // Algorithm confusion: HS256 keyed with the RSA public key's PEM, against an RS256-only issuer and
        // against an issuer that allows both HS256 and RS256.
        for pem in [s.rsa.public_pem.clone(), s.rsa.public_pem.trim_end().to_string()] {
            let confused = hmac_key(Algorithm::HS256, pem.as_bytes());
            case("HS256 keyed with the RS256 public PEM (RS256 issuer)", tok(&confused, RS_ISS, "admin", json!({})));
            case("HS256 keyed with the RS256 public PEM (mixed issuer)", tok(&confused, MIXED_ISS, "admin", json!({})));
        }
        // And the reverse: an RS256 token against an HMAC-only issuer.
        case("RS256 against an HS256-only issuer", tok(&s.rsa, HS_ISS, "alice", json!({})));
        // ES256 "psychic signature": r = s = 0.
        let es_payload = claims(ES_ISS, "admin", json!({})).to_string();
        let es_h = b64(br#"{"alg":"ES256","typ":"JWT"}"#);
        case("ES256 all-zero signature", format!("{es_h}.{}.{}", b64(es_payload.as_bytes()), b64(&[0u8; 64])));
        case("ES256 empty signature", format!("{es_h}.{}.", b64(es_payload.as_bytes())));
        case("ES256 DER zero signature", format!("{es_h}.{}.{}", b64(es_payload.as_bytes()), b64(&[0x30, 6, 2, 1, 0, 2, 1, 0])));

        // Time.
        case("expired", tok(&s.hs, HS_ISS, "alice", json!({"exp": now - 3600, "iat": now - 4000, "nbf": now - 4000})));
        case("nbf in the future", tok(&s.hs, HS_ISS, "alice", json!({"nbf": now + 3600})));
        case("iat in the future", tok(&s.hs, HS_ISS, "alice", json!({"iat": now + 3600, "nbf": now})));
        case("lifetime beyond max_lifetime", tok(&s.hs, HS_ISS, "alice", json!({"exp": now + 400 * 24 * 3600})));
        case("no exp", jws(&s.hs, r#"{"alg":"HS256"}"#, &json!({"iss": HS_ISS, "sub": "a", "aud": "api"}).to_string()));
        // Claims of the wrong JSON type are refused, not coerced.
        case(
            "string exp",
            jws(&s.hs, r#"{"alg":"HS256"}"#, &format!(r#"{{"iss":"{HS_ISS}","sub":"a","aud":"api","exp":"{}"}}"#, now + 600)),
        );
        case("string nbf", tok(&s.hs, HS_ISS, "alice", json!({"nbf": now.to_string()})));
        case("bool exp", tok(&s.hs, HS_ISS, "alice", json!({"exp": true})));
        case("numeric sub", tok(&s.hs, HS_ISS, "alice", json!({"sub": 42})));
        case("empty sub", tok(&s.hs, HS_ISS, "alice", json!({"sub": ""})));
        case("no sub", jws(&s.hs, r#"{"alg":"HS256"}"#, &json!({"iss": HS_ISS, "aud": "api", "exp": now + 600}).to_string()));

        // Issuer and audience.
        case("unknown iss", tok(&s.hs, "https://evil.test", "alice", json!({})));
        case("iss differing in case", tok(&s.hs, "https://HS.test", "alice", json!({})));
        case("iss with a trailing slash", tok(&s.hs, "https://hs.test/", "alice", json!({})));
        case("no iss", jws(&s.hs, r#"{"alg":"HS256"}"#, &json!({"sub": "a", "aud": "api", "exp": now + 600}).to_string()));
        case("array iss", tok(&s.hs, HS_ISS, "alice", json!({"iss": [HS_ISS]})));
        case("wrong aud", tok(&s.hs, HS_ISS, "alice", json!({"aud": "other"})));
        case("wrong aud array", tok(&s.hs, HS_ISS, "alice", json!({"aud": ["other", "x"]})));
        case("no aud", jws(&s.hs, r#"{"alg":"HS256"}"#, &json!({"iss": HS_ISS, "sub": "a", "exp": now + 600}).to_string()));

        // Keys and signatures.
        let attacker = test_key(Algorithm::RS256);
        case("unknown kid, attacker's key", mint_token(&attacker, Some("nope"), &claims(RS_ISS, "admin", json!({}))));
        case("no kid, attacker's key", tok(&attacker, RS_ISS, "admin", json!({})));
        case("non-string kid", jws(&s.hs, r#"{"alg":"HS256","kid":7}"#, &hs_payload));
        let genuine = tok(&s.hs, HS_ISS, "alice", json!({"roles": ["user"]}));
        let parts: Vec<&str> = genuine.split('.').collect();
        let forged = claims(HS_ISS, "admin", json!({"roles": ["admin"]})).to_string();
        case("tampered payload", format!("{}.{}.{}", parts[0], b64(forged.as_bytes()), parts[2]));
        case(
            "signature of another token",
            format!("{}.{}.{}", parts[0], parts[1], tok(&s.hs, HS_ISS, "bob", json!({})).rsplit('.').next().unwrap()),
        );
        case("truncated signature", format!("{}.{}.{}", parts[0], parts[1], &parts[2][..parts[2].len() - 2]));
        case("padded base64 signature", format!("{}.{}.{}=", parts[0], parts[1], parts[2]));

        // Shapes we never accept.
        let jwe_h = b64(br#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
        case("JWE (five segments)", format!("{jwe_h}.{}.{}.{}.{}", b64(b"key"), b64(b"iv-iv-iv-iv"), b64(b"ciphertext"), b64(b"tag")));
        case("JWE, dir", format!("{}..{}.{}.{}", b64(br#"{"alg":"dir","enc":"A128GCM"}"#), b64(b"iv"), b64(b"ct"), b64(b"tag")));
        case("four segments", format!("{genuine}.x"));
        case("crit header", jws(&s.hs, r#"{"alg":"HS256","typ":"JWT","crit":["exp"],"exp":1}"#, &hs_payload));
        case("empty crit", jws(&s.hs, r#"{"alg":"HS256","crit":[]}"#, &hs_payload));
        case("b64 false", jws(&s.hs, r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#, &hs_payload));
        case("b64 false without crit", jws(&s.hs, r#"{"alg":"HS256","b64":false}"#, &hs_payload));
        case("b64 string", jws(&s.hs, r#"{"alg":"HS256","b64":"false"}"#, &hs_payload));
        case("b64 true", jws(&s.hs, r#"{"alg":"HS256","b64":true}"#, &hs_payload));
        for cty in ["JWT", "jwt", "application/jwt"] {
            case(&format!("cty {cty}"), jws(&s.hs, &json!({"alg": "HS256", "cty": cty}).to_string(), &hs_payload));
        }
        for typ in ["id_token+jwt", "application/id_token+jwt", "refresh+jwt", "JOSE", "logout+jwt"] {
            case(&format!("typ {typ}"), jws(&s.hs, &json!({"alg": "HS256", "typ": typ}).to_string(), &hs_payload));
        }
        case("non-string typ", jws(&s.hs, r#"{"alg":"HS256","typ":1}"#, &hs_payload));
        // Keycloak's ID, refresh and logout tokens: header `typ: JWT` like its access tokens, told apart only here.
        for typ in [json!("ID"), json!("Refresh"), json!("Logout"), json!(1)] {
            let payload = claims(HS_ISS, "alice", json!({"typ": typ})).to_string();
            case(&format!("payload typ {typ}"), jws(&s.hs, r#"{"alg":"HS256","typ":"JWT"}"#, &payload));
        }

        // One strict parse: a repeated claim name is refused (not last-one-wins), at any depth, and in the header.
        let dup = format!(r#"{{"iss":"{HS_ISS}","sub":"a","sub":"admin","aud":"api","exp":{}}}"#, now + 600);
        case("duplicated sub", jws(&s.hs, r#"{"alg":"HS256","typ":"JWT"}"#, &dup));
        let dup_nested = format!(
            r#"{{"iss":"{HS_ISS}","sub":"a","aud":"api","exp":{},"realm_access":{{"roles":["user"],"roles":["admin"]}}}}"#,
            now + 600
        );
        case("duplicated nested roles", jws(&s.hs, r#"{"alg":"HS256"}"#, &dup_nested));
        let dup_exp = format!(r#"{{"iss":"{HS_ISS}","sub":"a","aud":"api","exp":{},"exp":{}}}"#, now - 10, now + 600);
        case("duplicated exp", jws(&s.hs, r#"{"alg":"HS256"}"#, &dup_exp));
        case("duplicated header alg", jws(&s.hs, r#"{"alg":"HS256","alg":"none"}"#, &hs_payload));
        case("payload not an object", jws(&s.hs, r#"{"alg":"HS256"}"#, r#"["iss"]"#));

        // Over the size cap (8 KiB), even with a good signature.
        let big = tok(&s.hs, HS_ISS, "alice", json!({"pad": "x".repeat(9000)}));
        assert!(big.len() > 8 * 1024);
        case("over the size cap", big);

        // A token from issuer A on a route limited to issuer B is not a credential for that route.
        for (what, t) in &cases {
            refused(&c, &s.up, &url, t, what).await;
        }
        let only_b = s.gw.https_url("/only-b/x");
        for (what, t) in [
            ("issuer hs on a b-only route", tok(&s.hs, HS_ISS, "alice", json!({"roles": ["admin"]}))),
            ("issuer es on a b-only route", tok(&s.es, ES_ISS, "alice", json!({}))),
        ] {
            refused(&c, &s.up, &only_b, &t, what).await;
        }
        accepted(&c, &s.up, &only_b, &tok(&s.b, B_ISS, "alice", json!({})), "issuer b on its route").await;
        s.gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn size_cap_is_exactly_8_kib() {
    bounded(async {
        let s = refusal_setup().await;
        let c = client(&s.gw);
        let url = s.gw.https_url("/items");
        // The largest token that still fits, and the smallest that does not.
        let mut pad = 5000;
        let mut last_fit = None;
        let over = loop {
            let t = tok(&s.hs, HS_ISS, "alice", json!({"pad": "x".repeat(pad)}));
            if t.len() > 8192 {
                break t;
            }
            last_fit = Some(t);
            pad += 1;
        };
        let fit = last_fit.unwrap();
        assert!(fit.len() <= 8192 && fit.len() > 8180, "{}", fit.len());
        accepted(&c, &s.up, &url, &fit, "a token just under the cap").await;
        refused(&c, &s.up, &url, &over, "a token just over the cap").await;
        s.gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_kid_and_bad_signature_answer_identically() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        let good = mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({})));
        accepted(&c, &up, &url, &good, "control").await;

        let attacker = test_key(Algorithm::RS256);
        let unknown = mint_token(&attacker, Some("k-unknown"), &claims(IDP_ISS, "alice", json!({})));
        let bad_sig = mint_token(&attacker, Some("k1"), &claims(IDP_ISS, "alice", json!({})));
        let a = refused(&c, &up, &url, &unknown, "unknown kid").await;
        let b = refused(&c, &up, &url, &bad_sig, "bad signature").await;
        assert_eq!(a.status, b.status);
        assert_eq!(a.body, b.body);
        assert_eq!(stable_headers(&a), stable_headers(&b));
        // No library text, no echo of the token.
        for x in [&a, &b] {
            assert!(!x.text().contains("kid") && !x.text().contains("signature"));
        }
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn jose_key_headers_are_never_used_or_fetched() {
    bounded(async {
        let up = spawn_upstream().await;
        let legit = test_key(Algorithm::RS256);
        let rs_static = test_key(Algorithm::RS256);
        let attacker = test_key(Algorithm::RS256);
        let attacker_es = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let attacker_es_key = TestKey {
            alg: Algorithm::ES256,
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(attacker_es.serialize_pem().as_bytes()).unwrap(),
            public_pem: attacker_es.public_key_pem(),
            private_pem: attacker_es.serialize_pem(),
        };
        let attacker_cert = rcgen::CertificateParams::new(vec!["idp.test".to_string()]).unwrap().self_signed(&attacker_es).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(attacker_cert.der());

        let idp = Idp::start(jwks(&[(&legit, "k1")])).await;
        // The attacker's own key server: it must never be asked for anything.
        let evil = Idp::start(jwks(&[(&attacker, "evil"), (&attacker_es_key, "evil-es")])).await;
        let cfg = ConfigBuilder::new(&up)
            .issuer("idp", IDP_ISS, &["RS256", "ES256"], &format!("jwks_url = \"{}\"\njwks_refetch_cooldown = \"1h\"", idp.jwks_url()))
            .issuer("rs", RS_ISS, &["RS256", "ES256"], r#"public_keys = ["rs.pem"]"#)
            .route("all", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("rs.pem", rs_static.public_pem.as_bytes())]).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        accepted(&c, &up, &url, &mint_token(&legit, Some("k1"), &claims(IDP_ISS, "a", json!({}))), "control").await;
        accepted(&c, &up, &url, &tok(&rs_static, RS_ISS, "a", json!({})), "static control").await;

        let evil_jwks = evil.jwks_url();
        let evil_cert = format!("{}/cert.pem", evil.issuer());
        let attacker_jwk = jwk(&attacker, "evil");
        let attacker_jwk_k1 = jwk(&attacker, "k1");
        for iss in [IDP_ISS, RS_ISS] {
            let payload = claims(iss, "admin", json!({"roles": ["admin"]})).to_string();
            let rs_cases = [
                ("jku to the attacker's JWKS", json!({"alg": "RS256", "typ": "JWT", "kid": "evil", "jku": evil_jwks})),
                ("x5u to the attacker", json!({"alg": "RS256", "typ": "JWT", "kid": "evil", "x5u": evil_cert})),
                ("jwk header with the attacker's key", json!({"alg": "RS256", "typ": "JWT", "kid": "evil", "jwk": attacker_jwk})),
                ("jwk header, no kid", json!({"alg": "RS256", "typ": "JWT", "jwk": attacker_jwk})),
                ("jwk header claiming the real kid", json!({"alg": "RS256", "typ": "JWT", "kid": "k1", "jwk": attacker_jwk_k1})),
                ("jku claiming the real kid", json!({"alg": "RS256", "typ": "JWT", "kid": "k1", "jku": evil_jwks})),
            ];
            for (what, header) in rs_cases {
                let t = jws(&attacker, &header.to_string(), &payload);
                refused(&c, &up, &url, &t, &format!("{what} ({iss})")).await;
            }
            let header = json!({"alg": "ES256", "typ": "JWT", "x5c": [x5c]});
            let t = jws(&attacker_es_key, &header.to_string(), &payload);
            refused(&c, &up, &url, &t, &format!("x5c with the attacker's certificate ({iss})")).await;
        }
        assert_eq!(evil.jwks_fetches(), 0, "the gateway fetched a key named by a token header");
        assert_eq!(evil.other_fetches(), 0, "the gateway fetched a URL named by a token header");
        assert_eq!(evil.discovery_fetches(), 0);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Roles, in the nested Keycloak shape and the namespaced Auth0 shape.

#[tokio::test]
async fn roles_in_nested_and_namespaced_claims() {
    bounded(async {
        let up = spawn_upstream().await;
        let kc = test_key(Algorithm::RS256);
        let a0 = test_key(Algorithm::ES256);
        const KC: &str = "https://sso.example.com/realms/acme";
        const A0: &str = "https://acme.auth0.test/";
        let cfg = ConfigBuilder::new(&up)
            .issuer("keycloak", KC, &["RS256"], "public_keys = [\"kc.pem\"]\nroles_claim = \"realm_access.roles\"")
            .issuer("auth0", A0, &["ES256"], "public_keys = [\"a0.pem\"]\nroles_claim = \"https://example.com/roles\"")
            .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
            .route("ops", "/ops/*", r#"roles_all = ["admin", "ops"]"#)
            .route("rest", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("kc.pem", kc.public_pem.as_bytes()), ("a0.pem", a0.public_pem.as_bytes())]).await;
        let c = client(&gw);
        let admin = gw.https_url("/admin/users");
        let ops = gw.https_url("/ops/restart");

        let kc_tok = |roles: Value| tok(&kc, KC, "kc-user", json!({"realm_access": {"roles": roles}}));
        let a0_tok = |roles: Value| tok(&a0, A0, "a0-user", json!({"https://example.com/roles": roles}));

        let a = forbidden(&c, &up, &admin, &kc_tok(json!(["user"])), "keycloak user on /admin").await;
        assert_eq!(a.text(), r#"{"error":"forbidden"}"#);
        let a = accepted(&c, &up, &admin, &kc_tok(json!(["user", "admin"])), "keycloak admin on /admin").await;
        assert_eq!(a.upstream_header("x-auth-roles").as_deref(), Some("user,admin"));
        forbidden(&c, &up, &admin, &a0_tok(json!(["user"])), "auth0 user on /admin").await;
        let a = accepted(&c, &up, &admin, &a0_tok(json!(["admin"])), "auth0 admin on /admin").await;
        assert_eq!(a.upstream_header("x-auth-roles").as_deref(), Some("admin"));

        // The role must be in the issuer's roles claim: elsewhere in the token it counts for nothing.
        forbidden(&c, &up, &admin, &tok(&kc, KC, "x", json!({"roles": ["admin"]})), "top-level roles for keycloak").await;
        forbidden(&c, &up, &admin, &tok(&kc, KC, "x", json!({"resource_access": {"api": {"roles": ["admin"]}}})), "client roles").await;
        forbidden(&c, &up, &admin, &tok(&a0, A0, "x", json!({"roles": ["admin"]})), "plain roles for auth0").await;
        forbidden(&c, &up, &admin, &tok(&a0, A0, "x", json!({})), "no roles claim at all").await;
        forbidden(&c, &up, &admin, &kc_tok(json!(["Admin"])), "roles compare exactly").await;
        forbidden(&c, &up, &admin, &kc_tok(json!("administrator")), "a string that merely contains it").await;
        forbidden(&c, &up, &admin, &kc_tok(json!([["admin"]])), "a nested array").await;

        // roles_all needs every role.
        forbidden(&c, &up, &ops, &kc_tok(json!(["admin"])), "one of two roles").await;
        accepted(&c, &up, &ops, &kc_tok(json!(["ops", "admin"])), "both roles").await;
        accepted(&c, &up, &ops, &a0_tok(json!(["admin", "ops", "x"])), "both roles (auth0)").await;

        // No token on a roles route is 401, and any valid token works on the plain route.
        let before = up.hits();
        let a = get(&c, &admin, None).await;
        assert_eq!(a.status, 401);
        assert_eq!(up.hits(), before);
        accepted(&c, &up, &gw.https_url("/other"), &kc_tok(json!([])), "plain route").await;
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Scopes: a space-separated `scope` string and an `scp` array.

#[tokio::test]
async fn scopes_as_string_and_array() {
    bounded(async {
        let up = spawn_upstream().await;
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let entra = test_key(Algorithm::RS256);
        const ENTRA: &str = "https://login.example.com/tenant/v2.0";
        let cfg = ConfigBuilder::new(&up)
            .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
            .issuer("entra", ENTRA, &["RS256"], "public_keys = [\"entra.pem\"]\nscopes_claim = \"scp\"")
            .route("items-write", "/items", "methods = [\"POST\", \"PUT\", \"DELETE\"]\nscopes_all = [\"read:items\", \"write:items\"]")
            .route("items-read", "/items", "methods = [\"GET\"]\nscopes_any = [\"read:items\", \"admin:items\"]")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("hs.secret", HMAC_SECRET), ("entra.pem", entra.public_pem.as_bytes())]).await;
        let c = client(&gw);
        let url = gw.https_url("/items");

        let post = |token: String| {
            let c = c.clone();
            let url = url.clone();
            async move {
                let auth = format!("Bearer {token}");
                request(&c, Method::POST, &url, &[("authorization", auth.as_str())], b"").await
            }
        };
        let expect_403 = |a: &Answer, what: &str| {
            assert_eq!(a.status, 403, "{what}: {}", a.text());
            assert_eq!(a.text(), r#"{"error":"insufficient_scope"}"#, "{what}");
            assert_eq!(
                a.headers["www-authenticate"], r#"Bearer realm="portcullis", error="insufficient_scope", scope="read:items write:items""#,
                "{what}"
            );
        };

        let cases_ok = [
            ("scope string with both", tok(&hs, HS_ISS, "a", json!({"scope": "read:items write:items"}))),
            ("scope string, extra spaces and scopes", tok(&hs, HS_ISS, "a", json!({"scope": " openid  write:items read:items "}))),
            ("scp array with both", tok(&entra, ENTRA, "a", json!({"scp": ["write:items", "read:items"]}))),
        ];
        for (what, t) in cases_ok {
            let before = up.hits();
            let a = post(t).await;
            assert_eq!(a.status, 200, "{what}: {}", a.text());
            assert_eq!(up.hits(), before + 1, "{what}");
            assert_eq!(up.last().unwrap().method, "POST");
        }
        let a = post(tok(&entra, ENTRA, "a", json!({"scp": ["write:items", "read:items"]}))).await;
        assert_eq!(a.upstream_header("x-auth-scopes").as_deref(), Some("write:items,read:items"));

        let cases_403 = [
            ("scope string missing one", tok(&hs, HS_ISS, "a", json!({"scope": "read:items"}))),
            ("scope string with a lookalike", tok(&hs, HS_ISS, "a", json!({"scope": "read:items write:items:x"}))),
            ("scope string comma-joined", tok(&hs, HS_ISS, "a", json!({"scope": "read:items,write:items"}))),
            ("scp array missing one", tok(&entra, ENTRA, "a", json!({"scp": ["write:items"]}))),
            ("scopes in the wrong claim for the issuer", tok(&entra, ENTRA, "a", json!({"scope": "read:items write:items"}))),
            ("no scope claim", tok(&hs, HS_ISS, "a", json!({}))),
        ];
        for (what, t) in cases_403 {
            let before = up.hits();
            let a = post(t).await;
            expect_403(&a, what);
            assert_eq!(up.hits(), before, "{what}");
        }

        // scopes_any: one is enough; none is 403 naming the alternatives.
        accepted(&c, &up, &url, &tok(&entra, ENTRA, "a", json!({"scp": ["admin:items"]})), "scopes_any, one of two").await;
        accepted(&c, &up, &url, &tok(&hs, HS_ISS, "a", json!({"scope": "read:items"})), "scopes_any, the other").await;
        let a = forbidden(&c, &up, &url, &tok(&hs, HS_ISS, "a", json!({"scope": "write:items"})), "scopes_any, none").await;
        assert!(a.headers["www-authenticate"].to_str().unwrap().contains(r#"error="insufficient_scope""#));
        assert!(a.headers["www-authenticate"].to_str().unwrap().contains(r#"scope="read:items admin:items""#));
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Attribute rule: a claim must equal a path parameter, unless a bypass role is held.

#[tokio::test]
async fn claims_rule_with_path_parameter_and_bypass_roles() {
    bounded(async {
        let up = spawn_upstream().await;
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let cfg = ConfigBuilder::new(&up)
            .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
            .route("own-profile", "/users/{id}", "claims = { sub = \"{id}\" }\nbypass_roles = [\"admin\"]")
            .route("tenant", "/tenants/acme/*", r#"claims = { "org.id" = "acme" }"#)
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("hs.secret", HMAC_SECRET)]).await;
        let c = client(&gw);
        let alice_url = gw.https_url("/users/alice");

        let a = accepted(&c, &up, &alice_url, &tok(&hs, HS_ISS, "alice", json!({})), "alice on /users/alice").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("alice"));
        assert_eq!(up.last().unwrap().path_and_query, "/users/alice");
        let a = forbidden(&c, &up, &alice_url, &tok(&hs, HS_ISS, "bob", json!({})), "bob on /users/alice").await;
        assert_eq!(a.text(), r#"{"error":"forbidden"}"#);
        let a = accepted(&c, &up, &alice_url, &tok(&hs, HS_ISS, "bob", json!({"roles": ["admin"]})), "admin bob on /users/alice").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("bob"));
        forbidden(&c, &up, &alice_url, &tok(&hs, HS_ISS, "bob", json!({"roles": ["user"]})), "a non-bypass role").await;
        forbidden(&c, &up, &alice_url, &tok(&hs, HS_ISS, "Alice", json!({})), "claims compare exactly").await;
        forbidden(&c, &up, &alice_url, &tok(&hs, HS_ISS, "alice ", json!({})), "no trimming").await;
        forbidden(&c, &up, &gw.https_url("/users/alice2"), &tok(&hs, HS_ISS, "alice", json!({})), "a longer id").await;

        // The parameter is compared after normalisation and percent-decoding.
        accepted(&c, &up, &gw.https_url("/users/%61lice"), &tok(&hs, HS_ISS, "alice", json!({})), "encoded unreserved").await;
        accepted(&c, &up, &gw.https_url("/users/al%20ice"), &tok(&hs, HS_ISS, "al ice", json!({})), "encoded space").await;
        forbidden(&c, &up, &gw.https_url("/users/al%20ice"), &tok(&hs, HS_ISS, "al%20ice", json!({})), "raw escape in the claim").await;
        // An encoded slash can not smuggle a longer path past the rule.
        let before = up.hits();
        let a = get(&c, &gw.https_url("/users/alice%2Fadmin"), Some(&tok(&hs, HS_ISS, "alice/admin", json!({})))).await;
        assert_eq!(a.status, 400);
        assert_eq!(up.hits(), before);
        // Invalid UTF-8 is refused, not decoded lossily (%FF and %FE would both become U+FFFD and match one claim).
        for path in ["/users/%FF", "/users/%FE"] {
            let a = get(&c, &gw.https_url(path), Some(&tok(&hs, HS_ISS, "\u{FFFD}", json!({})))).await;
            assert_eq!(a.status, 400, "{path}: {}", a.text());
        }
        assert_eq!(up.hits(), before);

        // A literal rule on a nested claim.
        let t_url = gw.https_url("/tenants/acme/orders");
        accepted(&c, &up, &t_url, &tok(&hs, HS_ISS, "a", json!({"org": {"id": "acme"}})), "tenant acme").await;
        forbidden(&c, &up, &t_url, &tok(&hs, HS_ISS, "a", json!({"org": {"id": "globex"}})), "tenant globex").await;
        forbidden(&c, &up, &t_url, &tok(&hs, HS_ISS, "a", json!({"org": {"id": ["acme"]}})), "tenant as array").await;
        forbidden(&c, &up, &t_url, &tok(&hs, HS_ISS, "a", json!({})), "no tenant").await;
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Path bypass attempts, over a raw socket so no client normalises the path first.

fn bypass_config(up: &Upstream, routing: &str) -> String {
    ConfigBuilder::new(up)
        .section(routing)
        .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
        .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
        .route("public", "/*", r#"auth = "public""#)
        .build()
}

#[tokio::test]
async fn path_bypass_attempts_never_reach_the_protected_upstream() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway_with_files(&bypass_config(&up, ""), &[("hs.secret", HMAC_SECRET)]).await;
        let addr = gw.http.unwrap();
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let user = format!("Authorization: Bearer {}\r\n", tok(&hs, HS_ISS, "u", json!({"roles": ["user"]})));
        let admin = format!("Authorization: Bearer {}\r\n", tok(&hs, HS_ISS, "root", json!({"roles": ["admin"]})));

        // Control: the public catch-all is reachable.
        let (status, _) = raw_get(addr, "/public/x", "").await;
        assert_eq!(status, 200);
        assert_eq!(up.hits(), 1);

        // Every spelling of the admin route is the admin route.
        let admin_spellings = [
            "/admin/x",
            "//admin/x",
            "///admin//x",
            "/./admin/x",
            "/public/../admin/x",
            "/public/x/../../admin/x",
            "/../admin/x",
            "/%2e%2e/admin/x",
            "/public/%2e%2e/admin/x",
            "/public/%2E%2E/admin/x",
            "/%2e/admin/x",
            "/%61dmin/x",
            "/%61%64%6d%69%6e/x",
            "/adm%69n/x",
            "/admin/./x",
            "/admin",
            "/admin/",
            "/admin/.",
            "http://gateway.test/admin/x",
            "http://gateway.test//admin/x",
        ];
        for path in admin_spellings {
            let before = up.hits();
            let (status, rsp) = raw_get(addr, path, "").await;
            assert_eq!(status, 401, "{path}: {rsp}");
            let (status, rsp) = raw_get(addr, path, &user).await;
            assert_eq!(status, 403, "{path} with a user token: {rsp}");
            assert_eq!(up.hits(), before, "{path} reached the upstream without the admin role");
            // With the role it passes, and the upstream sees the one normalised path the policy saw.
            let (status, rsp) = raw_get(addr, path, &admin).await;
            assert_eq!(status, 200, "{path} with an admin token: {rsp}");
            assert_eq!(up.hits(), before + 1);
            let seen = up.last().unwrap().path_and_query;
            assert!(seen == "/admin/x" || seen == "/admin" || seen == "/admin/", "{path} forwarded as {seen}");
        }

        // Ambiguous bytes are refused outright, with or without a token.
        let refused_400 = [
            "/admin%2fx",
            "/admin%2Fx",
            "/public/..%2fadmin/x",
            "/public/%2e%2e%2fadmin/x",
            "/admin%5cx",
            "/public/..%5cadmin/x",
            "/admin%00/x",
            "/admin%0d%0a/x",
            "/adm%zzin/x",
            // Path parameters: Tomcat, Jetty and Spring drop ";…" from a segment before routing, so "..;" is "..".
            "/public/..;/admin/x",
            "/admin;x/x",
            "/public;/../admin/x",
        ];
        for path in refused_400 {
            let before = up.hits();
            for hdr in ["", user.as_str(), admin.as_str()] {
                let (status, rsp) = raw_get(addr, path, hdr).await;
                assert_eq!(status, 400, "{path}: {rsp}");
            }
            assert_eq!(up.hits(), before, "{path} reached the upstream");
        }
        // A raw backslash is not even a valid request target; whatever refuses it, nothing is forwarded.
        let before = up.hits();
        let (status, rsp) = raw_get(addr, "/public\\..\\admin/x", "").await;
        assert!(status == 400, "{rsp}");
        assert_eq!(up.hits(), before);

        // Case-sensitive by default (RFC 3986): "/ADMIN/x" is a different path, routed to the public catch-all,
        // and forwarded as written, so an upstream that folds case must use case_insensitive (next test).
        let (status, _) = raw_get(addr, "/ADMIN/x", "").await;
        assert_eq!(status, 200);
        assert_eq!(up.last().unwrap().path_and_query, "/ADMIN/x");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn case_insensitive_routing_protects_every_casing() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway_with_files(&bypass_config(&up, "[routing]\ncase_insensitive = true\n"), &[("hs.secret", HMAC_SECRET)]).await;
        let addr = gw.http.unwrap();
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let user = format!("Authorization: Bearer {}\r\n", tok(&hs, HS_ISS, "u", json!({"roles": ["user"]})));
        let admin = format!("Authorization: Bearer {}\r\n", tok(&hs, HS_ISS, "root", json!({"roles": ["admin"]})));
        for path in ["/ADMIN/x", "/Admin/x", "/aDmIn", "//ADMIN/x", "/%41DMIN/x", "/public/../ADMIN/x", "/admin/x"] {
            let before = up.hits();
            let (status, rsp) = raw_get(addr, path, "").await;
            assert_eq!(status, 401, "{path}: {rsp}");
            let (status, rsp) = raw_get(addr, path, &user).await;
            assert_eq!(status, 403, "{path}: {rsp}");
            assert_eq!(up.hits(), before, "{path} reached the upstream without the admin role");
            let (status, rsp) = raw_get(addr, path, &admin).await;
            assert_eq!(status, 200, "{path}: {rsp}");
            assert_eq!(up.hits(), before + 1);
        }
        let (status, _) = raw_get(addr, "/public/x", "").await;
        assert_eq!(status, 200);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// A client can never forge its identity to the upstream.

/// Every identity header a token can fill, each from its claim.
const IDENTITY_HEADERS: &str = r#"[identity.headers]
"X-Auth-Subject" = "sub"
"X-Auth-Roles" = "roles"
"X-Auth-Scopes" = "scope"
"X-Auth-Issuer" = "iss"
"X-Auth-Tenant" = "tid"
"#;

fn identity_config(up: &Upstream) -> String {
    ConfigBuilder::new(up)
        .section(IDENTITY_HEADERS)
        .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
        .route("public", "/public/*", r#"auth = "public""#)
        .route("optional", "/maybe/*", r#"auth = "optional""#)
        .route("optional-admin", "/maybe-admin/*", "auth = \"optional\"\nroles_any = [\"admin\"]")
        .route("protected", "/*", "")
        .build()
}

/// Trailer fields a client may try to pass off as the gateway's, and one (`X-Checksum`) an upstream may take from
/// trailers. All are declared in the request's `Trailer` field, so only the gateway's filter stands between them
/// and the upstream.
const FORGED_TRAILERS: [(&str, &str); 9] = [
    ("x-auth-subject", "admin"),
    ("x_auth_roles", "admin"),
    ("x-auth-scopes", "write:everything"),
    ("x-forwarded-for", "10.0.0.1"),
    ("forwarded", "for=10.0.0.1"),
    ("x-request-id", "forged"),
    ("authorization", "Bearer forged"),
    ("cookie", "session=forged"),
    ("x-checksum", "sha256=abc"),
];

type TrailedBody = http_body_util::StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A streamed upload of `payload` that ends in [`FORGED_TRAILERS`], declared in `Trailer`.
fn upload_with_forged_trailers(url: &str, token: Option<&str>) -> Request<TrailedBody> {
    let mut trailers = http::HeaderMap::new();
    for (k, v) in FORGED_TRAILERS {
        trailers.insert(http::HeaderName::from_static(k), http::HeaderValue::from_static(v));
    }
    let declared = FORGED_TRAILERS.map(|(k, _)| k).join(", ");
    let mut b = Request::post(url).header("trailer", declared).header("te", "trailers");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"payload"))), Ok(Frame::trailers(trailers))];
    b.body(http_body_util::StreamBody::new(futures_util::stream::iter(frames))).unwrap()
}

/// The upstream's `/upload` answer: body length and the trailer fields it received.
async fn upload_answer(rsp: Response<Incoming>) -> Value {
    use http_body_util::BodyExt;
    assert_eq!(rsp.status(), 200);
    serde_json::from_slice(&rsp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn identity_and_gateway_fields_sent_as_trailers_never_reach_the_upstream() {
    bounded(async {
        let up = spawn_upstream().await;
        let config = ConfigBuilder::new(&up)
            .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
            .route("uploads", "/up/*", r#"strip_prefix = "/up""#)
            .build();
        let gw = spawn_gateway_with_files(&config, &[("hs.secret", HMAC_SECRET)]).await;
        let token = tok(&hmac_key(Algorithm::HS256, HMAC_SECRET), HS_ISS, "alice", json!({}));
        let only_checksum = json!({"x-checksum": "sha256=abc"});

        // HTTP/1.1, chunked.
        let tcp = tokio::net::TcpStream::connect(gw.http.unwrap()).await.unwrap();
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let rsp = h1.send_request(upload_with_forged_trailers(&gw.http_url("/up/upload"), Some(&token))).await.unwrap();
        let answer = upload_answer(rsp).await;
        assert_eq!(answer["len"], 7);
        assert_eq!(answer["trailers"], only_checksum, "HTTP/1.1: forged trailers reached the upstream");

        // HTTP/2 over TLS: the header carries the token's subject, and no trailer contradicts it.
        let tls = gateway_tls(&gw, &[b"h2"]).await;
        let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let rsp = h2.send_request(upload_with_forged_trailers(&gw.https_url("/up/upload"), Some(&token))).await.unwrap();
        let answer = upload_answer(rsp).await;
        assert_eq!(answer["trailers"], only_checksum, "HTTP/2: forged trailers reached the upstream");
        let seen = up.last().unwrap();
        assert_eq!(seen.headers.get_all("x-auth-subject").iter().collect::<Vec<_>>(), ["alice"]);
        assert_eq!(up.hits(), 2);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway_with_files(&identity_config(&up), &[("hs.secret", HMAC_SECRET)]).await;
        let c = client(&gw);
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let forged: [(&str, &str); 8] = [
            ("X-Auth-Subject", "admin"),
            ("X.Auth.Subject", "admin"),
            ("x_auth_roles", "admin"),
            ("x-auth-subject", "root"),
            ("X-AUTH-ROLES", "admin"),
            ("X-Auth-Scopes", "write:everything"),
            ("X-Auth-Issuer", "https://evil.test"),
            ("X-Auth-Tenant", "acme"),
        ];
        let identity = ["x-auth-subject", "x-auth-roles", "x-auth-scopes", "x-auth-issuer", "x-auth-tenant"];

        // Public and optional (anonymous) routes: every forged header is gone.
        for url in [gw.https_url("/public/x"), gw.https_url("/maybe/x"), gw.http_url("/public/x")] {
            let a = get_with(&c, &url, &forged).await;
            assert_eq!(a.status, 200, "{url}: {}", a.text());
            let seen = up.last().unwrap();
            for h in identity {
                assert!(!seen.headers.contains_key(h), "{url}: forged {h} reached the upstream");
            }
            // Nor any other spelling of them (X.Auth.Subject, x_auth_roles).
            let respelled: Vec<_> = seen.headers.keys().filter(|k| k.as_str().replace(['.', '_'], "-").starts_with("x-auth-")).collect();
            assert!(respelled.is_empty(), "{url}: {respelled:?} reached the upstream");
        }

        // Optional route with rules: no token is a 401 challenge, an invalid token a 401 invalid_token; neither
        // reaches the upstream.
        let hits = up.hits();
        let a = get_with(&c, &gw.https_url("/maybe-admin/x"), &forged).await;
        assert_eq!(a.status, 401, "{}", a.text());
        assert_eq!(a.headers.get("www-authenticate").unwrap(), "Bearer realm=\"portcullis\"");
        let bad = format!("Bearer {}", tok(&hmac_key(Algorithm::HS256, b"another-secret-another-secret-xx"), HS_ISS, "eve", json!({})));
        let a = get_with(&c, &gw.https_url("/maybe/x"), &[("authorization", bad.as_str())]).await;
        assert_eq!(a.status, 401, "{}", a.text());
        assert!(a.headers.get("www-authenticate").unwrap().to_str().unwrap().contains("invalid_token"));
        assert_eq!(up.hits(), hits, "a refused request reached the upstream");

        // Protected route: the upstream sees the token's subject, once; headers for absent claims are not sent.
        let t = tok(&hs, HS_ISS, "alice", json!({}));
        let bearer = format!("Bearer {t}");
        let mut headers = forged.to_vec();
        headers.push(("authorization", bearer.as_str()));
        for url in [gw.https_url("/protected"), gw.https_url("/maybe/x")] {
            let a = get_with(&c, &url, &headers).await;
            assert_eq!(a.status, 200, "{}", a.text());
            let seen = up.last().unwrap();
            let subjects: Vec<_> = seen.headers.get_all("x-auth-subject").iter().collect();
            assert_eq!(subjects, ["alice"], "{url}");
            assert_eq!(seen.headers.get_all("x-auth-issuer").iter().collect::<Vec<_>>(), [HS_ISS]);
            for h in ["x-auth-roles", "x-auth-scopes", "x-auth-tenant"] {
                assert!(!seen.headers.contains_key(h), "{url}: forged {h} reached the upstream");
            }
        }

        // With the claims present, the upstream sees the token's values, not the client's.
        let t = tok(&hs, HS_ISS, "bob", json!({"roles": ["user"], "scope": "read", "tid": "globex"}));
        let bearer = format!("Bearer {t}");
        let mut headers = forged.to_vec();
        headers.push(("authorization", bearer.as_str()));
        let a = get_with(&c, &gw.https_url("/protected"), &headers).await;
        assert_eq!(a.status, 200);
        let seen = up.last().unwrap();
        let one = |h: &str| seen.headers.get_all(h).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(one("x-auth-subject"), ["bob"]);
        assert_eq!(one("x-auth-roles"), ["user"]);
        assert_eq!(one("x-auth-scopes"), ["read"]);
        assert_eq!(one("x-auth-tenant"), ["globex"]);

        // A claim the upstream is to receive that no header can carry as the policy saw it is refused, not
        // dropped: an upstream reading a missing X-Auth-Tenant as "no tenant" would see another identity.
        // Unsafe bytes (CR LF: header injection), outer spaces (dropped by every HTTP parser, so "acme " would
        // arrive as "acme"), list items with outer spaces or empty (" admin" reads as "admin" once the list is
        // split and trimmed), and an object.
        for (what, extra) in [
            ("CR LF in a claim", json!({"tid": "acme\r\nX-Injected: 1"})),
            ("a tab in a claim", json!({"tid": "acme\tx"})),
            ("a claim with a trailing space", json!({"tid": "acme "})),
            ("a list item with a leading space", json!({"roles": ["user", " admin"]})),
            ("an empty list item", json!({"roles": ["user", ""]})),
            ("an object claim", json!({"tid": {"id": "acme"}})),
        ] {
            let t = tok(&hs, HS_ISS, "dave", extra);
            let bearer = format!("Bearer {t}");
            let before = up.hits();
            let mut headers = forged.to_vec();
            headers.push(("authorization", bearer.as_str()));
            let a = get_with(&c, &gw.https_url("/protected"), &headers).await;
            assert_eq!(a.status, 401, "{what}: {}", a.text());
            assert!(a.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"), "{what}");
            assert_eq!(up.hits(), before, "{what}: the upstream was reached");
        }
        let m = metrics(&c, &gw).await;
        assert_eq!(
            metric(&m, "portcullis_auth_failures_total", &[("reason", "claim_unforwardable"), ("route", "protected")]),
            Some(6.0),
            "{m}"
        );
        // A claim the token does not carry is simply not sent.
        let t = tok(&hs, HS_ISS, "erin", json!({}));
        let a = get_with(&c, &gw.https_url("/protected"), &[("authorization", format!("Bearer {t}").as_str())]).await;
        assert_eq!(a.status, 200);
        assert!(!up.last().unwrap().headers.contains_key("x-auth-tenant"));

        // A refused request with forged headers forwards nothing at all.
        let before = up.hits();
        let a = get_with(&c, &gw.https_url("/protected"), &forged).await;
        assert_eq!(a.status, 401);
        assert_eq!(up.hits(), before);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn underscore_spellings_of_identity_headers_are_stripped_too() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway_with_files(&identity_config(&up), &[("hs.secret", HMAC_SECRET)]).await;
        let addr = gw.http.unwrap();
        let (status, rsp) = raw_get(addr, "/public/x", "X_Auth_Subject: admin\r\nX-Auth_Roles: admin\r\n").await;
        assert_eq!(status, 200, "{rsp}");
        let seen = up.last().unwrap();
        for (name, _) in seen.headers.iter() {
            let folded = name.as_str().replace('_', "-");
            assert!(!folded.starts_with("x-auth-"), "{name} reached the upstream; an upstream that folds '_' to '-' reads it as identity");
        }
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// JWKS: fetched at start, rotation without restart, throttled refetch, failures keep the last good keys.

#[tokio::test]
async fn static_keys_beside_a_jwks_verify_tokens_whose_kid_names_no_key() {
    bounded(async {
        let up = spawn_upstream().await;
        let published = test_key(Algorithm::RS256);
        let local = test_key(Algorithm::ES256);
        let attacker = test_key(Algorithm::ES256);
        let idp = Idp::start(jwks(&[(&published, "idp-1")])).await;
        let cfg = jwks_gateway_config(
            &up,
            &idp,
            IDP_ISS,
            "public_keys = [{ path = \"local.pem\", kid = \"local-1\" }]\njwks_refetch_cooldown = \"1s\"",
        );
        let gw = spawn_gateway_with_files(&cfg, &[("local.pem", local.public_pem.as_bytes())]).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        let t = |k: &TestKey, kid: Option<&str>| mint_token(k, kid, &claims(IDP_ISS, "alice", json!({})));
        accepted(&c, &up, &url, &t(&published, Some("idp-1")), "JWKS key by kid").await;
        accepted(&c, &up, &url, &t(&local, Some("local-1")), "static key by kid").await;
        accepted(&c, &up, &url, &t(&local, Some("thumbprint-kid")), "a kid naming no key: the fitting static key").await;
        accepted(&c, &up, &url, &t(&local, None), "no kid: the fitting static key").await;
        refused(&c, &up, &url, &t(&attacker, Some("thumbprint-kid")), "attacker's key, unknown kid").await;
        refused(&c, &up, &url, &t(&attacker, Some("local-1")), "attacker's key claiming the static kid").await;
        refused(&c, &up, &url, &t(&attacker, None), "attacker's key, no kid").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn jwks_fetched_at_start_and_rotated_without_restart() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let k2 = test_key(Algorithm::ES256);
        let k3 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refresh = \"10m\"\njwks_refetch_cooldown = \"1s\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        assert_eq!(idp.jwks_fetches(), 1, "fetched once at start");
        let url = gw.https_url("/x");
        let t1 = mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({})));
        let a = accepted(&c, &up, &url, &t1, "k1 after start").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("alice"));
        // A token without a kid uses the one key that fits its algorithm.
        accepted(&c, &up, &url, &tok(&k1, IDP_ISS, "alice", json!({})), "no kid, one fitting key").await;
        assert_eq!(idp.jwks_fetches(), 1, "known kids never refetch");

        // Rotation: k1 retired, k2 published. The unknown kid triggers one refetch and verifies at once.
        idp.set_jwks(jwks(&[(&k2, "k2")]));
        let t2 = mint_token(&k2, Some("k2"), &claims(IDP_ISS, "bob", json!({})));
        let a = accepted(&c, &up, &url, &t2, "k2 after rotation").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("bob"));
        assert_eq!(idp.jwks_fetches(), 2, "one refetch for the new kid");
        accepted(&c, &up, &url, &t2, "k2 again (cached or known)").await;
        // k1 is gone from the JWKS; a fresh k1 token (not in the verified-token cache) no longer verifies.
        let t1b = mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice2", json!({})));
        refused(&c, &up, &url, &t1b, "retired k1").await;
        // And a k1 token verified (and cached) before k1 was withdrawn stops working too: a key the IdP pulls,
        // say a leaked one, must not live on in the verified-token cache until its tokens expire.
        refused(&c, &up, &url, &t1, "a cached token whose key was withdrawn").await;

        // Second rotation: within the cool-down an unknown kid does not refetch; once it has passed, one does.
        idp.set_jwks(jwks(&[(&k2, "k2"), (&k3, "k3")]));
        let t3 = mint_token(&k3, Some("k3"), &claims(IDP_ISS, "carol", json!({})));
        let fetches_before = idp.jwks_fetches();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let before = up.hits();
            let a = get(&c, &url, Some(&t3)).await;
            if a.status == 200 {
                assert_eq!(up.hits(), before + 1);
                break;
            }
            assert_invalid_token(&a, "k3 within the cool-down");
            assert_eq!(up.hits(), before);
            assert!(tokio::time::Instant::now() < deadline, "k3 never accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(idp.jwks_fetches(), fetches_before + 1, "exactly one refetch once the cool-down passed");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_new_key_source_fetches_its_keys_before_the_swap() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let k2 = test_key(Algorithm::RS256);
        let idp1 = Idp::start(jwks(&[(&k1, "k1")])).await;
        let broken = Idp::start(jwks(&[(&k2, "k2")])).await;
        broken.set_status(500);
        let idp2 = Idp::start(jwks(&[(&k2, "k2")])).await;
        let gw = spawn_gateway(&jwks_gateway_config(&up, &idp1, IDP_ISS, "")).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        let running = gw.gw.as_ref().unwrap();
        accepted(&c, &up, &url, &mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({}))), "k1 before any reload").await;

        // A new key source that gives no keys: the reload is refused, and the running config keeps verifying.
        std::fs::write(gw.dir.path().join("gateway.toml"), jwks_gateway_config(&up, &broken, IDP_ISS, "")).unwrap();
        let e = running.reload().await.expect_err("a key source that gives no keys must not be swapped in").to_string();
        assert!(e.contains("had keys"), "{e}");
        assert_ready(&c, &gw, "after the refused reload").await;
        accepted(&c, &up, &url, &mint_token(&k1, Some("k1"), &claims(IDP_ISS, "bob", json!({}))), "k1 after the refused reload").await;

        // A working new source: its keys are in place the moment the reload returns.
        std::fs::write(gw.dir.path().join("gateway.toml"), jwks_gateway_config(&up, &idp2, IDP_ISS, "")).unwrap();
        running.reload().await.expect("a working key source reloads");
        accepted(&c, &up, &url, &mint_token(&k2, Some("k2"), &claims(IDP_ISS, "carol", json!({}))), "k2 right after the reload").await;
        refused(&c, &up, &url, &mint_token(&k1, Some("k1"), &claims(IDP_ISS, "dave", json!({}))), "k1 once its source is gone").await;

        // Changing only `algorithms` keeps the keys held meanwhile.
        idp2.set_status(500);
        let more_algs = jwks_gateway_config_with(&up, &idp2, IDP_ISS, &["RS256", "ES256", "PS256"], "");
        std::fs::write(gw.dir.path().join("gateway.toml"), more_algs).unwrap();
        running.reload().await.expect("an algorithms change with the same key source reloads");
        accepted(&c, &up, &url, &mint_token(&k2, Some("k2"), &claims(IDP_ISS, "erin", json!({}))), "k2 after an algorithms change").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_right_behind_a_rotations_first_wait_for_its_refetch() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let k2 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        let gw = spawn_gateway(&jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refetch_cooldown = \"1h\"")).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        // The IdP rotates to k2 and answers slowly: the first k2 token starts the one refetch; the others, sent
        // with it, wait for that refetch instead of being refused within the cool-down.
        idp.set_delay(Duration::from_millis(500));
        idp.set_jwks(jwks(&[(&k1, "k1"), (&k2, "k2")]));
        let fetches = idp.jwks_fetches();
        let sends = (0..10).map(|i| {
            let (c, url) = (c.clone(), url.clone());
            let token = mint_token(&k2, Some("k2"), &claims(IDP_ISS, &format!("user{i}"), json!({})));
            tokio::spawn(async move { get(&c, &url, Some(&token)).await.status.as_u16() })
        });
        let statuses: Vec<u16> = futures_util::future::join_all(sends).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(statuses, vec![200; 10]);
        assert_eq!(up.hits(), 10);
        assert_eq!(idp.jwks_fetches(), fetches + 1, "one refetch for all of them");
        // The refetch is counted like a refresh: the gauge shows the keys now held.
        let metrics = get(&c, &gw.admin_url("/metrics"), None).await.text();
        assert!(metrics.contains("portcullis_jwks_keys{issuer=\"idp\"} 2"), "{metrics}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_storm_refetches_at_most_once() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        // A long cool-down makes "at most one refetch in the window" exact rather than timing-dependent.
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refetch_cooldown = \"1h\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        assert_eq!(idp.jwks_fetches(), 1);
        let url = gw.https_url("/x");

        // 100 tokens, each with a random kid, signed with the real key (so only the kid is wrong), all at once.
        let tokens: Vec<String> = (0..100).map(|_| mint_token(&k1, Some(&random_hex(8)), &claims(IDP_ISS, "mallory", json!({})))).collect();
        let answers = futures_util::future::join_all(tokens.iter().map(|t| get(&c, &url, Some(t)))).await;
        for a in &answers {
            assert_invalid_token(a, "random kid");
        }
        assert_eq!(up.hits(), 0);
        assert_eq!(idp.jwks_fetches(), 2, "100 unknown kids caused more than one refetch");

        // And again, one by one: still no more fetches in the window.
        for t in tokens.iter().take(20) {
            refused(&c, &up, &url, t, "random kid, sequential").await;
        }
        assert_eq!(idp.jwks_fetches(), 2);
        accepted(&c, &up, &url, &mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({}))), "k1 still works").await;
        gw.stop().await;
    })
    .await;
}

/// A way for the JWKS server to fail, and how to make it do so.
type JwksFailure = (&'static str, Box<dyn Fn(&Idp)>);

#[tokio::test]
async fn failed_jwks_refresh_keeps_the_last_good_keys() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp_key = test_key(Algorithm::ES256);
        let mut idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refresh = \"1s\"\njwks_refetch_cooldown = \"1s\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        let fresh = |sub: &str| mint_token(&k1, Some("k1"), &claims(IDP_ISS, sub, json!({})));
        accepted(&c, &up, &url, &fresh("a0"), "k1 at start").await;

        // The JWKS server fails in every way it can at refresh time; k1 keeps working throughout. Waiting for
        // two more fetches means at least one failed refresh has been fully handled by the gateway.
        let failures: [JwksFailure; 6] = [
            ("500", Box::new(|i: &Idp| i.set_status(500))),
            ("a redirect", Box::new(|i: &Idp| i.set_status(302))),
            (
                "empty key set",
                Box::new(|i: &Idp| {
                    i.set_status(200);
                    i.set_jwks(json!({"keys": []}));
                }),
            ),
            ("not JSON", Box::new(|i: &Idp| i.set_jwks_raw("<html>oops</html>"))),
            ("over the size cap", Box::new(|i: &Idp| i.set_jwks_raw(&format!("{}{{\"keys\":[]}}", " ".repeat(2 << 20))))),
            (
                "only unusable keys",
                Box::new(move |i: &Idp| {
                    let mut enc = jwk(&idp_key, "enc-key");
                    enc["use"] = "enc".into();
                    i.set_jwks(json!({"keys": [enc, {"kty": "oct", "kid": "oct", "k": b64(HMAC_SECRET)}]}));
                }),
            ),
        ];
        for (i, (what, fail)) in failures.iter().enumerate() {
            fail(&idp);
            let n = idp.jwks_fetches();
            idp.wait_jwks_fetches(n + 2, Duration::from_secs(20)).await;
            accepted(&c, &up, &url, &fresh(&format!("during-{i}")), &format!("k1 while the JWKS is {what}")).await;
            assert_ready(&c, &gw, what).await;
        }
        assert_eq!(idp.other_fetches(), 0, "a redirect was followed");

        // The server is gone altogether: an unknown kid's refetch fails (connection refused) and k1 still works.
        idp.stop().await;
        let other = mint_token(&k1, Some("k-new"), &claims(IDP_ISS, "x", json!({})));
        refused(&c, &up, &url, &other, "unknown kid while the JWKS server is down").await;
        accepted(&c, &up, &url, &fresh("after-stop"), "k1 while the JWKS server is down").await;
        assert_ready(&c, &gw, "JWKS server down").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn short_refresh_interval_with_cache_control_keeps_refreshing() {
    bounded(async {
        // jwks_refresh below the 5 s floor for max-age, and the server sends Cache-Control: the refresh task
        // and the unknown-kid refetch must both survive it.
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let k2 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        idp.set_cache_control(Some("public, max-age=300"));
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refresh = \"1s\"\njwks_refetch_cooldown = \"1h\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        // The background refresh keeps running on the 1 s interval (the shorter of interval and max-age).
        idp.wait_jwks_fetches(3, Duration::from_secs(15)).await;
        // Rotation picked up by the unknown-kid refetch path too, which answers (no dropped connection).
        idp.set_jwks(jwks(&[(&k1, "k1"), (&k2, "k2")]));
        let t2 = mint_token(&k2, Some("k2"), &claims(IDP_ISS, "bob", json!({})));
        accepted(&c, &up, &url, &t2, "k2 after rotation").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn cache_control_max_age_shortens_the_refresh_interval() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        idp.set_cache_control(Some("max-age=1"));
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refresh = \"10m\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        // max-age wins over the 10 minute interval (floored at 5 s so a tiny max-age cannot hammer the IdP).
        let started = tokio::time::Instant::now();
        idp.wait_jwks_fetches(2, Duration::from_secs(20)).await;
        assert!(started.elapsed() < Duration::from_secs(15));
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// OIDC discovery.

#[tokio::test]
async fn oidc_discovery_finds_the_jwks() {
    bounded(async {
        let up = spawn_upstream().await;
        let es = test_key(Algorithm::ES256);
        let ed = test_key(Algorithm::EdDSA);
        let idp = Idp::start(jwks(&[(&es, "es-1"), (&ed, "ed-1")])).await;
        let iss = idp.issuer();
        let cfg = ConfigBuilder::new(&up)
            .issuer("oidc", &iss, &["ES256", "EdDSA"], "discovery = true\njwks_timeout = \"2s\"")
            .route("all", "/*", "")
            .build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        assert_eq!(idp.discovery_fetches(), 1);
        assert_eq!(idp.jwks_fetches(), 1);
        let url = gw.https_url("/x");
        let a = accepted(&c, &up, &url, &mint_token(&es, Some("es-1"), &claims(&iss, "alice", json!({}))), "ES256 via discovery").await;
        assert_eq!(a.upstream_header("x-auth-issuer").as_deref(), Some(iss.as_str()));
        accepted(&c, &up, &url, &mint_token(&ed, Some("ed-1"), &claims(&iss, "bob", json!({}))), "EdDSA via discovery").await;
        accepted(&c, &up, &url, &tok(&es, &iss, "carol", json!({})), "ES256 without kid (one ES256 key)").await;
        let other = test_key(Algorithm::ES256);
        refused(&c, &up, &url, &mint_token(&other, Some("es-1"), &claims(&iss, "x", json!({}))), "foreign key").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn discovery_document_for_another_issuer_is_not_trusted() {
    bounded(async {
        let up = spawn_upstream().await;
        let es = test_key(Algorithm::ES256);
        let idp = Idp::start(jwks(&[(&es, "es-1")])).await;
        let iss = idp.issuer();
        // The document names another issuer (and a JWKS): it must not be followed.
        idp.set_discovery(json!({"issuer": "https://evil.test", "jwks_uri": idp.jwks_url()}));
        let cfg = ConfigBuilder::new(&up).issuer("oidc", &iss, &["ES256"], "discovery = true").route("all", "/*", "").build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        idp.wait_discovery_fetches(2, Duration::from_secs(15)).await;
        let a = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(idp.jwks_fetches(), 0, "jwks_uri of a mismatched discovery document was fetched");
        unavailable(&c, &up, &gw.https_url("/x"), &mint_token(&es, Some("es-1"), &claims(&iss, "a", json!({}))), "no keys").await;
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// readyz waits for every JWKS issuer to have keys.

#[tokio::test]
async fn readyz_is_503_until_jwks_keys_arrive() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        idp.set_status(500);
        let cfg = ConfigBuilder::new(&up)
            .issuer("local", HS_ISS, &["HS256"], HS_SECRET_FILE)
            .issuer("idp", IDP_ISS, &["RS256"], &format!("jwks_url = \"{}\"\njwks_refetch_cooldown = \"1s\"", idp.jwks_url()))
            .route("all", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("hs.secret", HMAC_SECRET)]).await;
        let c = client(&gw);
        // Two fetches: the first has failed and been handled.
        idp.wait_jwks_fetches(2, Duration::from_secs(15)).await;
        let a = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(a.text(), r#"{"error":"issuer_keys_missing"}"#);
        let a = get(&c, &gw.admin_url("/healthz"), None).await;
        assert_eq!(a.status, 200, "alive while not ready");
        let url = gw.https_url("/x");
        // A valid token of an issuer whose keys never arrived: the client did nothing wrong, so 503 with
        // Retry-After, not 401 (and never an allow).
        let t = mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({})));
        let before = up.hits();
        let a = get(&c, &url, Some(&t)).await;
        assert_eq!(a.status, 503, "JWKS issuer without keys: {}", a.text());
        assert_eq!(a.headers["retry-after"], "5");
        assert!(!a.headers.contains_key("www-authenticate"));
        assert_eq!(up.hits(), before, "the upstream was reached");
        let m = metrics(&c, &gw).await;
        assert_eq!(metric(&m, "portcullis_auth_failures_total", &[("reason", "keys_unavailable"), ("route", "all")]), Some(1.0), "{m}");
        // A forged token of that issuer is no better off: still 503, never a 200.
        let forged = mint_token(&test_key(Algorithm::RS256), Some("k1"), &claims(IDP_ISS, "mallory", json!({})));
        assert_eq!(get(&c, &url, Some(&forged)).await.status, 503);

        idp.set_status(200);
        wait_ready(&c, &gw, Duration::from_secs(30)).await;
        let t = mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice2", json!({})));
        accepted(&c, &up, &url, &t, "after keys arrived").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_leaves_an_issuer_unchanged_does_not_refetch_its_keys() {
    bounded(async {
        let up = spawn_upstream().await;
        let k1 = test_key(Algorithm::RS256);
        let idp = Idp::start(jwks(&[(&k1, "k1")])).await;
        let cfg = jwks_gateway_config(&up, &idp, IDP_ISS, "jwks_refresh = \"1h\"");
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let fetched = idp.jwks_fetches();
        let running = gw.gw.as_ref().unwrap();
        // Another route, the same issuer: every replica reloading at once must not hit the IdP.
        let more = format!("{cfg}\n[[routes]]\nname = \"other\"\npath = \"/other\"\nupstream = \"api\"\nauth = \"public\"\n");
        std::fs::write(gw.dir.path().join("gateway.toml"), &more).unwrap();
        for _ in 0..3 {
            running.reload().await.expect("reloads");
        }
        accepted(&c, &up, &gw.https_url("/x"), &mint_token(&k1, Some("k1"), &claims(IDP_ISS, "alice", json!({}))), "after the reloads")
            .await;
        // A refetch would be the new refresh tasks' first act: give them a second to show one.
        let mut fetches = idp.state.jwks_fetches.subscribe();
        let refetched = tokio::time::timeout(Duration::from_secs(1), fetches.wait_for(|n| *n > fetched)).await;
        assert!(refetched.is_err(), "a reload refetched an unchanged issuer's keys ({} fetches)", idp.jwks_fetches());
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Refusals before a body or an upgrade, the verified-token cache, and which keys are fit to verify with.

#[tokio::test]
async fn refused_requests_send_no_100_continue_and_no_101() {
    bounded(async {
        let s = refusal_setup().await;
        let addr = s.gw.http.unwrap();
        let bad = tok(&test_key(Algorithm::ES256), ES_ISS, "x", json!({}));
        for auth in [String::new(), format!("Authorization: Bearer {bad}\r\n")] {
            let req = format!(
                "POST /upload HTTP/1.1\r\nHost: gateway.test\r\n{auth}Content-Type: text/plain\r\nContent-Length: 11\r\n\
                 Expect: 100-continue\r\n\r\n"
            );
            let (rsp, closed) = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
            assert!(rsp.starts_with("HTTP/1.1 401"), "{rsp}");
            assert!(!rsp.contains("100 Continue"), "{rsp}");
            assert!(closed, "the unread body must not be taken as the next request");
            assert_eq!(s.up.hits(), 0);
        }

        // A WebSocket upgrade is authenticated before the 101.
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::{Error as WsError, Message};
        let ws_url = format!("ws://127.0.0.1:{}/ws", addr.port());
        for auth in [None, Some(format!("Bearer {bad}"))] {
            let mut req = ws_url.as_str().into_client_request().unwrap();
            if let Some(a) = &auth {
                req.headers_mut().insert("authorization", a.parse().unwrap());
            }
            match tokio_tungstenite::connect_async(req).await {
                Err(WsError::Http(rsp)) => assert_eq!(rsp.status(), 401),
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("upgraded without a valid token ({auth:?})"),
            }
            assert_eq!(s.up.hits(), 0);
        }
        let good = tok(&s.hs, HS_ISS, "alice", json!({}));
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {good}").parse().unwrap());
        let (mut ws, rsp) = tokio_tungstenite::connect_async(req).await.expect("upgrade with a valid token");
        assert_eq!(rsp.status(), 101);
        assert_eq!(s.up.hits(), 1);
        use futures_util::{SinkExt, StreamExt};
        ws.send(Message::text("ping")).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), "ping");
        let _ = ws.close(None).await;
        s.gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn verified_token_cache_widens_nothing_and_never_outlives_exp() {
    bounded(async {
        let up = spawn_upstream().await;
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let cfg = ConfigBuilder::new(&up)
            .issuer("local", HS_ISS, &["HS256"], &format!("{HS_SECRET_FILE}\nleeway = \"0s\""))
            .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
            .route("scoped", "/scoped", r#"scopes_all = ["write"]"#)
            .route("rest", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("hs.secret", HMAC_SECRET)]).await;
        let c = client(&gw);
        // Verified (and cached) on a permissive route, the same token is still judged per route.
        let user = tok(&hs, HS_ISS, "u", json!({"roles": ["user"], "scope": "read"}));
        accepted(&c, &up, &gw.https_url("/x"), &user, "permissive route").await;
        accepted(&c, &up, &gw.https_url("/x"), &user, "permissive route, cached").await;
        forbidden(&c, &up, &gw.https_url("/admin/x"), &user, "admin route after caching").await;
        forbidden(&c, &up, &gw.https_url("/scoped"), &user, "scoped route after caching").await;

        // A cached token stops working at its exp (leeway 0 here), not later.
        let exp = now() + 2;
        let short = tok(&hs, HS_ISS, "brief", json!({"exp": exp}));
        accepted(&c, &up, &gw.https_url("/x"), &short, "before exp").await;
        accepted(&c, &up, &gw.https_url("/x"), &short, "before exp, cached").await;
        // Waiting on the clock itself: there is no other signal for "exp has passed".
        while now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refused(&c, &up, &gw.https_url("/x"), &short, "after exp").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn jwks_keys_are_bound_to_their_declared_algorithm_and_use() {
    bounded(async {
        let up = spawn_upstream().await;
        let rsa = test_key(Algorithm::RS256);
        let mislabelled_ec = test_key(Algorithm::ES256);
        let enc = test_key(Algorithm::ES256);
        let good = test_key(Algorithm::ES256);
        let mut rsa_jwk = jwk(&rsa, "r");
        rsa_jwk["alg"] = "RS384".into();
        let mut ec_jwk = jwk(&mislabelled_ec, "e");
        ec_jwk["alg"] = "ES384".into();
        let mut enc_jwk = jwk(&enc, "enc");
        enc_jwk["use"] = "enc".into();
        let oct = json!({"kty": "oct", "kid": "oct", "k": b64(HMAC_SECRET), "alg": "HS256"});
        // RFC 7517: a `use` other than "sig", or `key_ops` without "verify", is not a key to verify with.
        let (odd_use, encrypt_only, verify_only) = (test_key(Algorithm::ES256), test_key(Algorithm::ES256), test_key(Algorithm::RS256));
        let mut odd_use_jwk = jwk(&odd_use, "odd-use");
        odd_use_jwk["use"] = "foo".into();
        let mut encrypt_only_jwk = jwk(&encrypt_only, "encrypt-only");
        encrypt_only_jwk["key_ops"] = json!(["encrypt"]);
        let mut verify_only_jwk = jwk(&verify_only, "verify-only");
        verify_only_jwk["key_ops"] = json!(["verify"]);
        // Two keys under one kid: the first published is kept.
        let (dup_first, dup_second) = (test_key(Algorithm::RS256), test_key(Algorithm::RS256));
        let keys = json!([rsa_jwk, ec_jwk, enc_jwk, oct, jwk(&good, "g"), odd_use_jwk, encrypt_only_jwk, verify_only_jwk]);
        let mut keys = keys.as_array().unwrap().clone();
        keys.extend([jwk(&dup_first, "dup"), jwk(&dup_second, "dup")]);
        let idp = Idp::start(json!({ "keys": keys })).await;
        let cfg = ConfigBuilder::new(&up)
            .issuer(
                "idp",
                IDP_ISS,
                &["RS256", "RS384", "ES256"],
                &format!("jwks_url = \"{}\"\njwks_refetch_cooldown = \"1h\"", idp.jwks_url()),
            )
            .route("all", "/*", "")
            .build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let url = gw.https_url("/x");
        let t = |key: &TestKey, alg: Algorithm, kid: Option<&str>| {
            mint_token(&with_alg(key, alg), kid, &claims(IDP_ISS, "a", json!({"n": random_hex(4)})))
        };
        accepted(&c, &up, &url, &t(&rsa, Algorithm::RS384, Some("r")), "RSA key with its declared alg").await;
        refused(&c, &up, &url, &t(&rsa, Algorithm::RS256, Some("r")), "RSA key with another alg than declared").await;
        accepted(&c, &up, &url, &t(&good, Algorithm::ES256, Some("g")), "EC key").await;
        accepted(&c, &up, &url, &t(&good, Algorithm::ES256, None), "no kid: the one ES256 key").await;
        refused(&c, &up, &url, &t(&mislabelled_ec, Algorithm::ES256, Some("e")), "EC key whose alg disagrees").await;
        refused(&c, &up, &url, &t(&mislabelled_ec, Algorithm::ES256, None), "no kid, skipped key").await;
        refused(&c, &up, &url, &t(&enc, Algorithm::ES256, Some("enc")), "encryption key").await;
        refused(&c, &up, &url, &t(&odd_use, Algorithm::ES256, Some("odd-use")), "a key whose use is not sig").await;
        refused(&c, &up, &url, &t(&encrypt_only, Algorithm::ES256, Some("encrypt-only")), "key_ops without verify").await;
        accepted(&c, &up, &url, &t(&verify_only, Algorithm::RS256, Some("verify-only")), "key_ops with verify").await;
        accepted(&c, &up, &url, &t(&dup_first, Algorithm::RS256, Some("dup")), "the first key under a repeated kid").await;
        refused(&c, &up, &url, &t(&dup_second, Algorithm::RS256, Some("dup")), "the second key under a repeated kid").await;
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        refused(&c, &up, &url, &t(&hs, Algorithm::HS256, Some("oct")), "oct key from a JWKS").await;
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn weak_or_unfit_keys_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let es = test_key(Algorithm::ES256);
    std::fs::write(dir.path().join("short.secret"), [b'k'; 31]).unwrap();
    std::fs::write(dir.path().join("ok.secret"), [b'k'; 32]).unwrap();
    std::fs::write(dir.path().join("es.pem"), es.public_pem.as_bytes()).unwrap();
    std::fs::write(dir.path().join("junk.pem"), b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
    let load = |issuer: &str| {
        let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n\n[[issuers]]\nid = \"i\"\nissuer = \"https://i.test\"\n{issuer}\n");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).unwrap();
        Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    let e = load("algorithms = [\"HS256\"]\nsecret_file = \"short.secret\"").unwrap_err();
    assert!(e.contains("at least 32"), "{e}");
    load("algorithms = [\"HS256\"]\nsecret_file = \"ok.secret\"").unwrap();
    let e = load("algorithms = [\"RS256\"]\npublic_keys = [\"es.pem\"]").unwrap_err();
    assert!(e.contains("fits none"), "{e}");
    assert!(load("algorithms = [\"ES256\"]\npublic_keys = [\"junk.pem\"]").is_err());
    // An RSA key under 2048 bits: a PKCS#1 public key with a 1024-bit modulus (the public half is all a verifier
    // holds, so any odd 1024-bit number with e = 65537 stands for one).
    let mut der = vec![0x30, 0x81, 0x89, 0x02, 0x81, 0x81, 0x00, 0xc5];
    der.extend((1..128u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1));
    der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
    std::fs::write(dir.path().join("rsa1024.pem"), pem("RSA PUBLIC KEY", &der)).unwrap();
    let e = load("algorithms = [\"RS256\"]\npublic_keys = [\"rsa1024.pem\"]").unwrap_err();
    assert!(e.contains("1024 bits is too small"), "{e}");
    for alg in ["none", "None", "hs256"] {
        assert!(load(&format!("algorithms = [\"{alg}\"]\nsecret_file = \"ok.secret\"")).is_err(), "{alg}");
    }
}

#[tokio::test]
async fn jwks_settings_that_would_hammer_the_idp_or_never_fetch_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("garbage-ca.pem"), b"not a certificate\n").unwrap();
    let load = |extra: &str| {
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n\n[[issuers]]\nid = \"i\"\nissuer = \"https://i.test\"\naudiences = [\"api\"]\n\
             algorithms = [\"RS256\"]\njwks_url = \"https://i.test/jwks\"\n{extra}\n"
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).unwrap();
        Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    load("").unwrap();
    load("jwks_refresh = \"1s\"\njwks_refetch_cooldown = \"1s\"\njwks_timeout = \"100ms\"").unwrap();
    for (extra, name) in [
        ("jwks_refetch_cooldown = \"0s\"", "jwks_refetch_cooldown"),
        ("jwks_refresh = \"10ms\"", "jwks_refresh"),
        ("jwks_timeout = \"0s\"", "jwks_timeout"),
    ] {
        let e = load(extra).unwrap_err();
        assert!(e.contains(&format!("{name} must be at least")), "{extra}: {e}");
    }
    let e = load("ca_file = \"garbage-ca.pem\"").unwrap_err();
    assert!(e.contains("garbage-ca.pem"), "a CA file with no certificate must not load: {e}");
}

// ------------------------------------------------------------------------------------------------------------
// JWKS over HTTPS from an identity provider on a private CA: trusted only through the issuer's `ca_file`.

/// A JWKS server over TLS with a leaf certificate for 127.0.0.1 issued by a fresh private CA. Returns its
/// address, the CA certificate (PEM) and a counter of TLS handshakes the server saw fail.
async fn tls_jwks_server(keys: Value) -> (SocketAddr, String, watch::Receiver<usize>) {
    let (server, ca_pem) = private_ca_server_config();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (failed_tx, failed_rx) = watch::channel(0usize);
    let body = keys.to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body, failed_tx) = (acceptor.clone(), body.clone(), failed_tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    failed_tx.send_modify(|n| *n += 1);
                    return;
                };
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (addr, ca_pem, failed_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_is_trusted_through_ca_file_and_refused_without_it() {
    bounded(async {
        let up = spawn_upstream().await;
        let key = test_key(Algorithm::RS256);
        let (addr, ca_pem, mut failed) = tls_jwks_server(jwks(&[(&key, "k1")])).await;
        let config = |ca_line: &str| {
            ConfigBuilder::new(&up)
                .issuer("idp", IDP_ISS, &["RS256"], &format!("jwks_url = \"https://{addr}/jwks.json\"\njwks_timeout = \"2s\"\n{ca_line}"))
                .route("all", "/*", "")
                .build()
        };
        let token = mint_token(&key, Some("k1"), &claims(IDP_ISS, "alice", json!({})));

        // With the private CA in ca_file: keys arrive, the gateway is ready, the token is accepted.
        let gw = spawn_gateway_with_files(&config("ca_file = \"idp-ca.pem\""), &[("idp-ca.pem", ca_pem.as_bytes())]).await;
        let c = client(&gw);
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let a = accepted(&c, &up, &gw.https_url("/x"), &token, "JWKS over HTTPS via ca_file").await;
        assert_eq!(a.upstream_header("x-auth-subject").as_deref(), Some("alice"));
        gw.stop().await;

        // Without it the provider's certificate is not trusted: no keys, not ready, and the token is refused.
        let gw = spawn_gateway(&config("")).await;
        let c = client(&gw);
        tokio::time::timeout(Duration::from_secs(15), failed.wait_for(|n| *n >= 1)).await.expect("a refused handshake").unwrap();
        assert_eq!(get(&c, &gw.admin_url("/readyz"), None).await.status, 503);
        unavailable(&c, &up, &gw.https_url("/x"), &token, "JWKS server not trusted").await;
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// The route the policy decided on is the one the upstream's framework reads.

#[tokio::test]
async fn spellings_a_framework_reads_as_a_guarded_route_meet_its_rules() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = ConfigBuilder::new(&up)
            .issuer("hs", HS_ISS, &["HS256"], &format!("{HS_SECRET_FILE}\nroles_claim = \"roles\""))
            .route("purge", "/v1/items:purge", r#"roles_any = ["admin"]"#)
            .route("profile", "/users/{id}", r#"claims = { sub = "{id}" }"#)
            .route("reports", "/reports/*", "methods = [\"GET\"]\nroles_any = [\"reporter\"]")
            .route("wipe", "/items", "methods = [\"DELETE\"]\nroles_any = [\"admin\"]")
            .route("cafe", "/café/*", r#"roles_any = ["admin"]"#)
            .route("rest", "/*", "")
            .build();
        let gw = spawn_gateway_with_files(&cfg, &[("hs.secret", HMAC_SECRET)]).await;
        let c = client(&gw);
        let hs = hmac_key(Algorithm::HS256, HMAC_SECRET);
        let bob = tok(&hs, HS_ISS, "bob", json!({"roles": ["user"]}));
        // A non-ASCII route, encoded or as raw UTF-8 (which hyper lets through): its rules, not the catch-all's.
        forbidden(&c, &up, &gw.https_url("/caf%C3%A9/menu"), &bob, "encoded").await;
        forbidden(&c, &up, &gw.https_url("/caf%c3%a9/menu"), &bob, "encoded, lowercase hex").await;
        let raw_utf8 = [
            b"GET /caf\xC3\xA9/menu HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\nAuthorization: Bearer ".as_slice(),
            bob.as_bytes(),
            b"\r\n\r\n",
        ]
        .concat();
        let hits = up.hits();
        let (rsp, _) = raw_exchange(gw.http.expect("plain listener"), &raw_utf8, Duration::from_secs(10)).await;
        assert!(rsp.starts_with("HTTP/1.1 403"), "raw UTF-8 took another route: {rsp}");
        assert_eq!(up.hits(), hits, "raw UTF-8 reached the upstream");
        let url = |p: &str| gw.https_url(p);

        // An escaped delimiter, a trailing slash: the guarded route, not the catch-all.
        for p in ["/v1/items%3Apurge", "/v1/items%3apurge", "/v1/items:purge/"] {
            forbidden(&c, &up, &url(p), &bob, p).await;
        }
        forbidden(&c, &up, &url("/users/alice/"), &bob, "a trailing slash").await;
        accepted(&c, &up, &url("/users/bob/"), &bob, "one's own profile, with a slash").await;
        // A method a route refused is not the catch-all's to take.
        let before = up.hits();
        let req = Request::delete(url("/reports/q3")).header("authorization", format!("Bearer {bob}"));
        let a = send(&c, req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(a.status, 405, "{}", a.text());
        assert_eq!(a.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET"));
        assert_eq!(up.hits(), before, "DELETE on a GET-only route reached the upstream");
        accepted(&c, &up, &url("/elsewhere"), &bob, "the catch-all still serves its own paths").await;

        // A lowercase method is not routed as another one (raw: clients upper-case nothing).
        let addr = gw.http.expect("plain listener");
        for m in ["delete", "Delete", "trace"] {
            let req = format!("{m} /items HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer {bob}\r\nConnection: close\r\n\r\n");
            let (rsp, _) = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
            assert!(rsp.starts_with("HTTP/1.1 400"), "{m}: {rsp}");
        }
        assert_eq!(up.hits(), before + 1, "a lowercase method reached the upstream");
        gw.stop().await;
    })
    .await;
}
