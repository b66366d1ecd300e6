//! The built-in OAuth2 token endpoint, end to end: a real gateway on loopback with a real Ed25519 signing key it
//! generates itself, the shipped demo users, a real echo upstream, and real password hashes (argon2id from
//! `portcullis hash-password`, bcrypt from Python's bcrypt and from the bcrypt crate here).
//!
//! The token endpoint is served by the gateway itself: every test also checks that the upstream never saw a
//! token request. Every test body runs under a time bound and waits on readiness signals, not sleeps.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

/// Tests in this binary run in parallel; the two that measure latency take this exclusively so that the
/// others' password hashing does not share the two cores with them. Everyone else takes it shared.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs a test body under [`LONG_TEST_BOUND`], beside the other tests of this binary that do not measure time.
async fn bounded_shared(f: impl Future<Output = ()>) {
    let _shared = TIMING.read().await;
    bounded_by(LONG_TEST_BOUND, f).await;
}

/// Like [`bounded_shared`], alone: no other test of this binary runs meanwhile.
async fn bounded_alone(f: impl Future<Output = ()>) {
    let _exclusive = TIMING.write().await;
    bounded_by(LONG_TEST_BOUND, f).await;
}

/// The shipped demo users (john.doe / securepassword argon2id, admin.user / adminpass bcrypt).
fn demo_users() -> String {
    std::fs::read_to_string(manifest("examples/demo-users.toml")).unwrap()
}

/// The shipped demo client (reports-service / reports-secret, argon2id).
fn demo_clients() -> String {
    std::fs::read_to_string(manifest("examples/demo-clients.toml")).unwrap()
}

/// Only john.doe, argon2id: every verification (and the dummy one for unknown names) costs the same.
fn argon_only_users() -> String {
    let all = demo_users();
    let start = all.find("[users.\"john.doe\"]").unwrap();
    let end = all.find("[users.\"admin.user\"]").unwrap();
    all[start..end].to_string()
}

/// Issuer `local` (Ed25519 key generated in the gateway's folder), the token endpoint (with `endpoint_extra`
/// lines) and the tutorial's routes: any valid token reads /users/me, admins /admin/*, writers POST /items.
fn token_config(up: &Upstream, endpoint_extra: &str) -> String {
    let endpoint = format!(
        r#"[token_endpoint]
path = "/token"
issuer = "local"
users_file = "users.toml"
clients_file = "clients.toml"
access_token_ttl = "30m"
{endpoint_extra}"#
    );
    ConfigBuilder::new(up)
        .issuer("local", "https://gateway.local", &["EdDSA"], "private_key = \"issuer-ed25519.pem\"\ngenerate_key = true")
        .section(&endpoint)
        .route("me", "/users/me", "")
        .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
        .route("items-write", "/items", "methods = [\"POST\", \"PUT\", \"DELETE\"]\nscopes_all = [\"write:items\"]")
        .route("public", "/api/*", AUTH_PUBLIC)
        .build()
}

async fn token_gateway(up: &Upstream, users: &str, endpoint_extra: &str) -> TestGateway {
    token_gateway_with(up, users, endpoint_extra, "").await
}

/// [`token_gateway`] with more tables (`[limits]`, `[rate_limit]`) after the routes.
async fn token_gateway_with(up: &Upstream, users: &str, endpoint_extra: &str, more: &str) -> TestGateway {
    let cfg = format!("{}\n{more}", token_config(up, endpoint_extra));
    spawn_gateway_with_files(&cfg, &[("users.toml", users.as_bytes()), ("clients.toml", demo_clients().as_bytes())]).await
}

/// Every client a trusted proxy's `X-Forwarded-For` names is its own client.
const BEHIND_A_PROXY: &str = "[rate_limit]\ntrusted_proxies = [\"127.0.0.1\"]\n";

// ------------------------------------------------------------------------------------------------------------
// Requests.

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

/// POSTs `body` to `url` as a form (unless `headers` sets another content type).
async fn post(c: &TestClient, url: &str, body: impl Into<Bytes>, headers: &[(&str, &str)]) -> Answer {
    let mut b = Request::post(url);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        b = b.header("content-type", "application/x-www-form-urlencoded");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(c, b.body(Full::new(body.into())).unwrap()).await
}

async fn password_login(c: &TestClient, url: &str, user: &str, password: &str) -> Answer {
    post(c, url, form(&[("grant_type", "password"), ("username", user), ("password", password)]), &[]).await
}

/// Logs in and returns the access token, asserting the §5.1 success answer.
async fn login(c: &TestClient, gw: &TestGateway, user: &str, password: &str) -> String {
    let a = password_login(c, &gw.https_url("/token"), user, password).await;
    assert_eq!(a.status, 200, "login as {user}: {}", a.text());
    a.json()["access_token"].as_str().expect("access_token").to_string()
}

fn bearer(url: &str, token: &str, method: http::Method) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(url).header("authorization", format!("Bearer {token}")).body(Full::new(Bytes::new())).unwrap()
}

/// Decodes the JOSE header and the claims of a compact JWS (no verification: the gateways verify).
fn decode(token: &str) -> (Value, Value) {
    let dec = |s: &str| -> Value {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    let mut parts = token.split('.');
    let (h, p) = (parts.next().unwrap(), parts.next().unwrap());
    assert!(parts.next().is_some() && parts.next().is_none(), "not a compact JWS: {token}");
    (dec(h), dec(p))
}

/// Asserts an RFC 6749 §5.2 error answer: status, JSON `error` code, never cached.
fn assert_oauth_error(a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.text());
    assert_eq!(a.headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/json"), "{what}");
    assert_eq!(a.json()["error"], code, "{what}: {}", a.text());
    assert_eq!(a.headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"), "{what}");
    assert_eq!(a.headers.get("pragma").map(|v| v.to_str().unwrap()), Some("no-cache"), "{what}");
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `portcullis hash-password` with `password` on stdin and returns the hash it prints.
async fn hash_password_cli(password: &str) -> String {
    let password = password.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("hash-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("portcullis runs");
        child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "hash-password failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .await
    .unwrap()
}

// ------------------------------------------------------------------------------------------------------------
// The tutorial flow.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_flow_over_https() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);

        let john = login(&c, &gw, "john.doe", "securepassword").await;
        assert_eq!(up.hits(), 0, "the token endpoint is the gateway's own");
        let a = send(&c, bearer(&gw.https_url("/users/me"), &john, http::Method::GET)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.hits(), 1);
        assert_eq!(up.last().unwrap().headers["x-auth-subject"], "john.doe");
        assert_eq!(up.last().unwrap().headers["x-auth-roles"], "user");

        let a = send(&c, bearer(&gw.https_url("/admin/users"), &john, http::Method::GET)).await;
        assert_eq!(a.status, 403, "{}", a.text());
        assert_eq!(up.hits(), 1, "a refused request reached the upstream");

        let admin = login(&c, &gw, "admin.user", "adminpass").await;
        let a = send(&c, bearer(&gw.https_url("/admin/users"), &admin, http::Method::GET)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.hits(), 2);
        assert_eq!(up.last().unwrap().headers["x-auth-subject"], "admin.user");

        let a = send(&c, bearer(&gw.https_url("/items"), &john, http::Method::POST)).await;
        assert_eq!(a.status, 403, "john.doe has no write:items: {}", a.text());
        assert!(a.headers["www-authenticate"].to_str().unwrap().contains("insufficient_scope"));
        assert_eq!(up.hits(), 2, "a refused request reached the upstream");
        let a = send(&c, bearer(&gw.https_url("/items"), &admin, http::Method::POST)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.hits(), 3);
        assert_eq!(up.last().unwrap().method, "POST");

        // The password grant is served on the TLS listener only (allow_plaintext is not set).
        let a = password_login(&c, &gw.http_url("/token"), "john.doe", "securepassword").await;
        assert_eq!(a.status, 404, "plaintext /token: {}", a.text());
        assert_eq!(up.hits(), 3);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Hashes made elsewhere verify.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_bcrypt_fixture_and_hash_password_output_verify() {
    bounded_shared(async {
        let cli_hash = hash_password_cli("correct horse battery staple").await;
        assert!(cli_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "not argon2id at the OWASP parameters: {cli_hash}");
        let fixture = std::fs::read_to_string(manifest("tests/fixtures/bcrypt-users.toml")).unwrap();
        assert!(fixture.contains("$2b$12$"), "the fixture is a Python bcrypt $2b$12$ hash");
        let users = format!("{fixture}\n[users.\"cli\"]\npassword_hash = \"{cli_hash}\"\nroles = [\"user\"]\nscopes = [\"read:items\"]\n");
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &users, "").await;
        let c = client(&gw);

        let legacy = login(&c, &gw, "legacy", "secret").await;
        assert_eq!(decode(&legacy).1["sub"], "legacy");
        let a = send(&c, bearer(&gw.https_url("/users/me"), &legacy, http::Method::GET)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let a = password_login(&c, &gw.https_url("/token"), "legacy", "Secret").await;
        assert_oauth_error(&a, 400, "invalid_grant", "wrong bcrypt password");

        let cli = login(&c, &gw, "cli", "correct horse battery staple").await;
        assert_eq!(decode(&cli).1["sub"], "cli");
        let a = password_login(&c, &gw.https_url("/token"), "cli", "correct horse battery stapler").await;
        assert_oauth_error(&a, 400, "invalid_grant", "wrong argon2id password");
        assert_eq!(up.hits(), 1);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// RFC 6749 §5.1 / §5.2 answers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rfc6749_error_has_its_status_body_and_headers() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        // The demo users plus a disabled account with john.doe's (correct) password.
        let disabled = argon_only_users().replace("[users.\"john.doe\"]", "[users.\"jane.gone\"]\ndisabled = true");
        let users = format!("{}\n{disabled}", demo_users());
        let gw = token_gateway(&up, &users, "rate_limit = { rate = \"5/min\", burst = 50 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");

        let a = post(&c, &url, form(&[("grant_type", "password"), ("username", "jane.gone"), ("password", "securepassword")]), &[]).await;
        assert_oauth_error(&a, 400, "invalid_grant", "disabled user with the right password");

        let a = post(&c, &url, "grant_type=password&grant_type=password&username=john.doe&password=securepassword", &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "repeated grant_type");
        let a = post(&c, &url, form(&[("grant_type", "password"), ("password", "securepassword")]), &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "missing username");
        let a = post(&c, &url, form(&[("grant_type", "password"), ("username", "john.doe")]), &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "missing password");
        let a = post(&c, &url, form(&[("username", "john.doe"), ("password", "securepassword")]), &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "missing grant_type");
        let json = r#"{"grant_type":"password","username":"john.doe","password":"securepassword"}"#;
        let a = post(&c, &url, json, &[("content-type", "application/json")]).await;
        assert_oauth_error(&a, 400, "invalid_request", "JSON body instead of a form");
        let a = post(&c, &url, form(&[("grant_type", "authorization_code"), ("code", "x")]), &[]).await;
        assert_oauth_error(&a, 400, "unsupported_grant_type", "authorization_code");
        let a = post(&c, &url, form(&[("grant_type", "password"), ("username", "john.doe"), ("password", "nope")]), &[]).await;
        assert_oauth_error(&a, 400, "invalid_grant", "wrong password");
        let a = post(
            &c,
            &url,
            form(&[("grant_type", "password"), ("username", "john.doe"), ("password", "securepassword"), ("scope", "write:items")]),
            &[],
        )
        .await;
        assert_oauth_error(&a, 400, "invalid_scope", "a scope the user may not have");

        let basic =
            |id: &str, secret: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")));
        let cc = form(&[("grant_type", "client_credentials")]);
        for (what, auth) in [
            ("wrong client secret", Some(basic("reports-service", "wrong"))),
            ("unknown client", Some(basic("nobody", "reports-secret"))),
            ("no client authentication", None),
        ] {
            let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
            let a = post(&c, &url, cc.clone(), &headers).await;
            assert_oauth_error(&a, 401, "invalid_client", what);
            let challenge = a.headers.get("www-authenticate").unwrap_or_else(|| panic!("{what}: no WWW-Authenticate")).to_str().unwrap();
            assert!(challenge.starts_with("Basic"), "{what}: {challenge}");
        }
        assert_eq!(up.hits(), 0, "the upstream saw a token request");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_is_405_with_allow_post() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);
        let a = get(&c, &gw.https_url("/token"), None).await;
        assert_eq!(a.status, 405, "{}", a.text());
        assert_eq!(a.json()["error"], "method_not_allowed");
        assert_eq!(a.headers.get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
        assert_eq!(a.headers.get("allow").map(|v| v.to_str().unwrap()), Some("POST"), "RFC 9110 §15.5.6: a 405 names the allowed methods");
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_is_never_cached_and_the_token_carries_exactly_the_rfc9068_claims() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);
        let before = common::now();
        let a = password_login(&c, &gw.https_url("/token"), "admin.user", "adminpass").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.headers["cache-control"], "no-store");
        assert_eq!(a.headers["pragma"], "no-cache");
        assert_eq!(a.headers["content-type"], "application/json");
        let body = a.json();
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 1800);
        assert_eq!(body["scope"], "read:items write:items");
        let token = body["access_token"].as_str().unwrap();

        let (header, claims) = decode(token);
        assert_eq!(header["typ"], "at+jwt", "RFC 9068 §2.1");
        assert_eq!(header["alg"], "EdDSA");
        assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()), "asymmetric keys are published with a kid: {header}");
        let mut names: Vec<&str> = claims.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["aud", "exp", "iat", "iss", "jti", "nbf", "roles", "scope", "sub"], "nothing else about the user: {claims}");
        assert_eq!(claims["iss"], "https://gateway.local");
        assert_eq!(claims["sub"], "admin.user");
        assert_eq!(claims["aud"], "api");
        assert_eq!(claims["roles"], serde_json::json!(["admin", "user"]));
        assert_eq!(claims["scope"], "read:items write:items");
        let iat = claims["iat"].as_u64().unwrap();
        assert!(iat >= before && iat <= common::now() + 1);
        assert_eq!(claims["nbf"].as_u64().unwrap(), iat);
        assert_eq!(claims["exp"].as_u64().unwrap(), iat + 1800);

        // Granted = requested ∩ allowed; jti unique per token.
        let a = post(
            &c,
            &gw.https_url("/token"),
            form(&[("grant_type", "password"), ("username", "admin.user"), ("password", "adminpass"), ("scope", "write:items delete:all")]),
            &[],
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["scope"], "write:items");
        let (_, second) = decode(a.json()["access_token"].as_str().unwrap());
        assert_eq!(second["scope"], "write:items");
        assert_ne!(second["jti"], claims["jti"], "jti must be unique");
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcrypt_never_matches_a_password_past_72_bytes() {
    bounded_shared(async {
        let x = format!("{}X", "a".repeat(72));
        let y = format!("{}Y", "a".repeat(72));
        let hash = bcrypt::hash(x.as_bytes(), 4).unwrap();
        // The hazard being guarded against: bcrypt itself only reads 72 bytes.
        assert!(bcrypt::verify(y.as_bytes(), &hash).unwrap(), "premise: plain bcrypt truncates");
        let users = format!("[users.\"long\"]\npassword_hash = \"{hash}\"\nroles = [\"user\"]\n");
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &users, "rate_limit = { rate = \"5/min\", burst = 50 }").await;
        let c = client(&gw);
        let a = password_login(&c, &gw.https_url("/token"), "long", &y).await;
        assert_oauth_error(&a, 400, "invalid_grant", "a 73-byte password sharing the hash's first 72 bytes");
        // Rejected rather than silently truncated: even the exact long password is refused against bcrypt.
        let a = password_login(&c, &gw.https_url("/token"), "long", &x).await;
        assert_oauth_error(&a, 400, "invalid_grant", "a password over bcrypt's 72 bytes");
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_password_is_refused_before_any_hashing() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        // Plaintext allowed so the raw socket below needs no TLS; the cap is the same on both listeners.
        let gw = token_gateway(&up, &demo_users(), "allow_plaintext = true").await;
        let addr = gw.http.unwrap();
        let huge = "p".repeat(1 << 20);
        let body = Bytes::from(form(&[("grant_type", "password"), ("username", "john.doe"), ("password", &huge)]));
        let chunks: Vec<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();

        // With Content-Length: refused from the head alone.
        let head = format!(
            "POST /token HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let started = Instant::now();
        let (status, text) = early_answer(addr, head, chunks.clone()).await;
        let took = started.elapsed();
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(r#"{"error":"invalid_request"}"#), "{text}");
        assert!(took < Duration::from_millis(500), "a 1 MiB password took {took:?} to refuse");

        // Chunked, so nothing tells the size up front: the cap still stops reading at 4 KiB.
        let head = "POST /token HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
        let mut framed: Vec<Bytes> = chunks.iter().map(|c| Bytes::from([format!("{:x}\r\n", c.len()).into_bytes(), c.to_vec(), b"\r\n".to_vec()].concat())).collect();
        framed.push(Bytes::from_static(b"0\r\n\r\n"));
        let started = Instant::now();
        let (status, text) = early_answer(addr, head, framed).await;
        let took = started.elapsed();
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(r#"{"error":"invalid_request"}"#), "{text}");
        assert!(took < Duration::from_millis(500), "a chunked 1 MiB password took {took:?} to refuse");

        // And the endpoint still works for a normal login afterwards.
        let c = client(&gw);
        let _ = login(&c, &gw, "john.doe", "securepassword").await;
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

/// Sends a request head and body over plain TCP, carrying on past write errors (the gateway may answer and
/// close before the body is all sent, which HTTP allows), and reads the answer until the gateway closes.
/// Returns the status and the whole answer text.
async fn early_answer(addr: std::net::SocketAddr, head: String, body: Vec<Bytes>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for c in body {
            if wr.write_all(&c).await.is_err() {
                return;
            }
        }
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the gateway neither answered nor closed");
    writer.abort();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

// ------------------------------------------------------------------------------------------------------------
// No user enumeration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_and_wrong_password_are_indistinguishable() {
    bounded_alone(async {
        let up = spawn_upstream().await;
        // Two hash classes (argon2id, bcrypt), so a failure also pays for the class it did not use; a burst high
        // enough that the brute-force limit never answers first. A disabled account with john.doe's hash: its
        // right password must cost what a wrong one does (or timing would confirm it).
        let disabled = argon_only_users().replace("[users.\"john.doe\"]", "[users.\"jane.gone\"]\ndisabled = true");
        let users = format!("{}\n{disabled}", demo_users());
        let gw = token_gateway(&up, &users, "rate_limit = { rate = \"1000/s\", burst = 1000 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        // Warm the connection and the hashing path.
        let _ = password_login(&c, &url, "john.doe", "warm-up").await;

        // Unknown name, wrong password, disabled account with its right password.
        let mut series: [Vec<Duration>; 3] = Default::default();
        let mut first: Option<Answer> = None;
        for i in 0..20 {
            // Interleaved, rotating which goes first, so drift in machine load hits every series alike.
            let mut answers = Vec::new();
            for k in 0..3 {
                let which = (i + k) % 3;
                let (user, password) = match which {
                    0 => (format!("nobody-{i}"), "securepassword".to_string()),
                    1 => ("john.doe".to_string(), format!("wrong-{i}")),
                    _ => ("jane.gone".to_string(), "securepassword".to_string()),
                };
                let t = Instant::now();
                answers.push(password_login(&c, &url, &user, &password).await);
                series[which].push(t.elapsed());
            }
            for a in &answers[1..] {
                assert_eq!(a.status, answers[0].status);
                assert_eq!(a.body, answers[0].body, "bodies differ");
                assert_eq!(stable_headers(a), stable_headers(&answers[0]), "headers differ");
            }
            if first.is_none() {
                first = answers.pop();
            }
        }
        assert_oauth_error(&first.unwrap(), 400, "invalid_grant", "a failed login");
        let [mu, mw, md] = series.each_mut().map(|s| median(s));
        eprintln!("median latency: unknown user {mu:?}, wrong password {mw:?}, disabled account {md:?}");
        for (what, m) in [("wrong password", mw), ("disabled account, right password", md)] {
            let diff = mu.abs_diff(m).as_secs_f64() / mu.max(m).as_secs_f64();
            assert!(diff < 0.20, "median latencies differ by {:.1}%: unknown user {mu:?}, {what} {m:?}", diff * 100.0);
        }
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Brute force.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_burst_failures_even_the_right_password_is_429() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "rate_limit = { rate = \"1/min\", burst = 3 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        for i in 0..3 {
            let a = password_login(&c, &url, "john.doe", &format!("guess-{i}")).await;
            assert_oauth_error(&a, 400, "invalid_grant", &format!("failed attempt {i}"));
        }
        let a = password_login(&c, &url, "john.doe", "securepassword").await;
        assert_eq!(a.status, 429, "the right password past the limit: {}", a.text());
        assert_eq!(a.json()["error"], "rate_limited");
        assert_eq!(a.headers["cache-control"], "no-store");
        assert!(a.json().get("access_token").is_none());
        // Another username from the same address is unaffected.
        let admin = login(&c, &gw, "admin.user", "adminpass").await;
        assert!(!admin.is_empty());
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brute_force_429_says_when_to_retry() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "rate_limit = { rate = \"1/min\", burst = 2 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        for i in 0..2 {
            let a = password_login(&c, &url, "john.doe", &format!("guess-{i}")).await;
            assert_eq!(a.status, 400);
        }
        let a = password_login(&c, &url, "john.doe", "securepassword").await;
        assert_eq!(a.status, 429, "{}", a.text());
        let retry = a.headers.get("retry-after").expect("429 from the token endpoint has Retry-After");
        let secs: u64 = retry.to_str().unwrap().parse().expect("Retry-After in whole seconds");
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_sent_at_once_count_before_their_hashes_end() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "rate_limit = { rate = \"1/min\", burst = 5 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        // A batch sent at once: each attempt counts from its start, so no more than the burst is ever checked,
        // however many arrive before the first check ends (and one client only queues a few at a time).
        let batch = (0..12).map(|i| {
            let (c, url) = (c.clone(), url.clone());
            async move { password_login(&c, &url, "john.doe", &format!("guess-{i}")).await.status }
        });
        let mut statuses = futures_util::future::join_all(batch).await;
        // Then one at a time until the limit answers.
        for i in 0..6 {
            let a = password_login(&c, &url, "john.doe", &format!("more-{i}")).await;
            statuses.push(a.status);
            if a.status == 429 {
                break;
            }
        }
        let checked = statuses.iter().filter(|s| **s == 400).count();
        assert_eq!(checked, 5, "guesses checked: {statuses:?}");
        assert!(statuses.iter().all(|s| *s == 400 || *s == 429), "{statuses:?}");
        let a = password_login(&c, &url, "john.doe", "securepassword").await;
        assert_eq!(a.status, 429, "the right password after the burst: {}", a.text());
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_rotating_inside_one_ipv6_prefix_share_one_limit() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let extra = "rate_limit = { rate = \"1/min\", burst = 2 }";
        let gw = token_gateway_with(&up, &demo_users(), extra, BEHIND_A_PROXY).await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        let guess = |from: &'static str| {
            let (c, url) = (c.clone(), url.clone());
            let body = form(&[("grant_type", "password"), ("username", "john.doe"), ("password", "guess")]);
            async move { post(&c, &url, body, &[("x-forwarded-for", from)]).await.status }
        };
        assert_eq!(guess("2001:db8:1:2::1").await, 400);
        assert_eq!(guess("2001:db8:1:2::2").await, 400);
        assert_eq!(guess("2001:db8:1:2:ffff::3").await, 429, "a new address inside the same /64 is the same client");
        assert_eq!(guess("2001:db8:1:3::1").await, 400, "another /64 is another client");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_that_never_finishes_arriving_is_cut_at_header_read_timeout() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway_with(&up, &demo_users(), "allow_plaintext = true", "[limits]\nheader_read_timeout = \"1s\"\n").await;
        // Declares 1000 bytes, sends 11, then holds the connection (a max_connections place) open.
        let head =
            "POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant_type=";
        let started = Instant::now();
        let (answer, _) = raw_exchange(gw.http.unwrap(), head.as_bytes(), Duration::from_secs(8)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "no answer to a stalled form within 8 s: {answer:?}");
        assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
        assert!(answer.contains("invalid_request"), "{answer}");
        gw.stop().await;
    })
    .await;
}

#[test]
fn a_name_that_is_both_a_user_and_a_client_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let users = demo_users().replace("[users.\"john.doe\"]", "[users.\"reports-service\"]");
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    std::fs::write(dir.path().join("clients.toml"), demo_clients()).unwrap();
    let cfg = token_config(&Upstream::at("127.0.0.1:9".parse().unwrap()), "");
    std::fs::write(dir.path().join("gateway.toml"), cfg).unwrap();
    let e = Config::load(&dir.path().join("gateway.toml")).map(|_| ()).expect_err("a shared sub must not load").to_string();
    assert!(e.contains("\"reports-service\" is both a user and a client"), "{e}");
}

// ------------------------------------------------------------------------------------------------------------
// The client_credentials grant.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_basic_auth_issues_the_clients_token() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("reports-service:reports-secret"));
        let a = post(&c, &url, form(&[("grant_type", "client_credentials")]), &[("authorization", &basic)]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.headers["cache-control"], "no-store");
        assert_eq!(a.json()["scope"], "read:items");
        let token = a.json()["access_token"].as_str().unwrap().to_string();
        let (header, claims) = decode(&token);
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(claims["sub"], "reports-service");
        assert_eq!(claims["roles"], serde_json::json!(["reporter"]));
        assert_eq!(claims["scope"], "read:items");

        // The token works on the gateway, as the client's identity.
        let a = send(&c, bearer(&gw.https_url("/users/me"), &token, http::Method::GET)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.last().unwrap().headers["x-auth-subject"], "reports-service");
        assert_eq!(up.last().unwrap().headers["x-auth-roles"], "reporter");

        // client_id / client_secret in the body work too; both methods at once do not.
        let body = form(&[("grant_type", "client_credentials"), ("client_id", "reports-service"), ("client_secret", "reports-secret")]);
        let a = post(&c, &url, body.clone(), &[]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let a = post(&c, &url, body, &[("authorization", &basic)]).await;
        assert_oauth_error(&a, 400, "invalid_request", "two client authentication methods");
        assert_eq!(up.hits(), 1);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_grant_with_client_credentials_checks_them_first() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "rate_limit = { rate = \"5/min\", burst = 50 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        let login = form(&[("grant_type", "password"), ("username", "admin.user"), ("password", "adminpass")]);
        let basic = |cred: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(cred));
        // RFC 6749 §4.3.2: included client authentication is checked, even though the user's password is right.
        for (what, auth) in [
            ("wrong client secret", basic("reports-service:wrong")),
            ("unknown client", basic("nosuch:bad")),
            ("Basic that is not base64", "Basic !!!".to_string()),
            // §2.3.1: each part is form-urlencoded, so an `&` is part of the secret, not the end of it.
            ("secret with a raw & after the right one", basic("reports-service:reports-secret&junk")),
        ] {
            let a = post(&c, &url, login.clone(), &[("authorization", &auth)]).await;
            assert_oauth_error(&a, 401, "invalid_client", what);
            assert!(a.json().get("access_token").is_none(), "{what}");
        }
        let with_body = |id: &str, secret: &str| {
            form(&[
                ("grant_type", "password"),
                ("username", "admin.user"),
                ("password", "adminpass"),
                ("client_id", id),
                ("client_secret", secret),
            ])
        };
        let a = post(&c, &url, with_body("nosuch", "bad"), &[]).await;
        assert_oauth_error(&a, 401, "invalid_client", "unknown client in the body");

        // The right client: the token names it (RFC 9068 client_id), the user stays the subject.
        for auth in [basic("reports-service:reports-secret"), basic("reports%2Dservice:reports%2Dsecret")] {
            let a = post(&c, &url, login.clone(), &[("authorization", &auth)]).await;
            assert_eq!(a.status, 200, "{auth}: {}", a.text());
            let (_, claims) = decode(a.json()["access_token"].as_str().unwrap());
            assert_eq!(claims["sub"], "admin.user");
            assert_eq!(claims["client_id"], "reports-service");
        }
        let a = post(&c, &url, with_body("reports-service", "reports-secret"), &[]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        // And the client credentials grant names its client too.
        let a =
            post(&c, &url, form(&[("grant_type", "client_credentials")]), &[("authorization", &basic("reports-service:reports-secret"))])
                .await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(decode(a.json()["access_token"].as_str().unwrap()).1["client_id"], "reports-service");
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_and_empty_parameters_follow_rfc6749() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "rate_limit = { rate = \"5/min\", burst = 50 }").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        let with_scope =
            |scope: &str| form(&[("grant_type", "password"), ("username", "admin.user"), ("password", "adminpass"), ("scope", scope)]);
        // §3.3: scope tokens are separated by spaces only; a tab or another space character is not a separator.
        for scope in ["read:items\twrite:items", "read:items\u{3000}write:items", "read:items \"x\""] {
            let a = post(&c, &url, with_scope(scope), &[]).await;
            assert_oauth_error(&a, 400, "invalid_scope", scope);
        }
        let a = post(&c, &url, with_scope("write:items  write:items"), &[]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["scope"], "write:items", "a repeated scope counts once");
        assert_eq!(decode(a.json()["access_token"].as_str().unwrap()).1["scope"], "write:items");

        // §3.1: a parameter without a value counts as omitted.
        let a = post(&c, &url, "grant_type=&username=admin.user&password=adminpass", &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "empty grant_type");
        let a = post(&c, &url, "grant_type=password&username=&password=adminpass", &[]).await;
        assert_oauth_error(&a, 400, "invalid_request", "empty username");
        let a = post(&c, &url, "grant_type=password&username=admin.user&password=adminpass&scope=", &[]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["scope"], "read:items write:items", "an empty scope is no scope: all the user's own");

        // The published documents are read-only.
        for method in [http::Method::POST, http::Method::DELETE] {
            let req = Request::builder()
                .method(method.clone())
                .uri(gw.https_url("/.well-known/jwks.json"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let a = send(&c, req).await;
            assert_eq!(a.status, 405, "{method}: {}", a.text());
            assert_eq!(a.headers.get("allow").map(|v| v.to_str().unwrap()), Some("GET, HEAD"));
        }
        assert_eq!(get(&c, &gw.https_url("/.well-known/jwks.json"), None).await.status, 200);
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

#[test]
fn a_token_lifetime_the_issuer_would_refuse_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("users.toml"), demo_users()).unwrap();
    std::fs::write(dir.path().join("clients.toml"), demo_clients()).unwrap();
    let cfg =
        token_config(&Upstream::at("127.0.0.1:9".parse().unwrap()), "").replace("access_token_ttl = \"30m\"", "access_token_ttl = \"60d\"");
    std::fs::write(dir.path().join("gateway.toml"), cfg).unwrap();
    let e = Config::load(&dir.path().join("gateway.toml")).map(|_| ()).expect_err("a 60-day token must not load").to_string();
    assert!(e.contains("access_token_ttl (5184000s) is longer than issuer"), "{e}");
}

// ------------------------------------------------------------------------------------------------------------
// Another gateway verifies the tokens through discovery and the published JWKS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_verifies_ed25519_tokens_through_discovery() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        // The first gateway names itself in its config (its issuer URL) before it has bound a port: the name is a
        // relay's address, held from now on, and the relay forwards to wherever the gateway then listens.
        let relay = Relay::start().await;
        let issuer_url = format!("http://{}", relay.addr);
        let first_cfg = format!(
            r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[upstreams.api]
url = "{up}"

[[issuers]]
id = "local"
issuer = "{issuer_url}"
audiences = ["api"]
algorithms = ["EdDSA"]
private_key = "issuer-ed25519.pem"
generate_key = true

[token_endpoint]
issuer = "local"
users_file = "users.toml"
allow_plaintext = true

[[routes]]
name = "me"
path = "/users/me"
upstream = "api"
"#,
            up = up.url()
        );
        let first = spawn_gateway_with_files(&first_cfg, &[("users.toml", demo_users().as_bytes())]).await;
        relay.forward_to(first.http.unwrap());
        let key_pem = std::fs::read_to_string(first.dir.path().join("issuer-ed25519.pem")).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"), "the Ed25519 key was generated");
        let c1 = plain_client();

        // What the first gateway publishes.
        let doc = get(&c1, &first.http_url("/.well-known/openid-configuration"), None).await;
        assert_eq!(doc.status, 200, "{}", doc.text());
        assert_eq!(doc.json()["issuer"], issuer_url.as_str());
        assert_eq!(doc.json()["jwks_uri"], format!("{issuer_url}/.well-known/jwks.json"));
        assert_eq!(doc.json()["token_endpoint"], format!("{issuer_url}/token"));
        let jwks = get(&c1, &first.http_url("/.well-known/jwks.json"), None).await;
        assert_eq!(jwks.status, 200);
        let keys = jwks.json()["keys"].as_array().unwrap().clone();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["kty"], "OKP");
        assert_eq!(keys[0]["crv"], "Ed25519");
        assert!(keys[0].get("d").is_none(), "the private half must never be published");
        let kid = keys[0]["kid"].as_str().expect("kid").to_string();

        let second_cfg =
            ConfigBuilder::new(&up).issuer("first", &issuer_url, &["EdDSA"], "discovery = true").route("me", "/users/me", "").build();
        let second = spawn_gateway(&second_cfg).await;
        let c2 = client(&second);
        wait_ready(&c2, &second, Duration::from_secs(20)).await;

        let a = password_login(&c1, &first.http_url("/token"), "john.doe", "securepassword").await;
        assert_eq!(a.status, 200, "{}", a.text());
        let token = a.json()["access_token"].as_str().unwrap().to_string();
        assert_eq!(decode(&token).0["kid"], kid.as_str());
        assert_eq!(decode(&token).0["alg"], "EdDSA");

        let a = send(&c2, bearer(&second.https_url("/users/me"), &token, http::Method::GET)).await;
        assert_eq!(a.status, 200, "the second gateway refused the first's token: {}", a.text());
        assert_eq!(up.hits(), 1);
        assert_eq!(up.last().unwrap().headers["x-auth-subject"], "john.doe");
        assert_eq!(up.last().unwrap().headers["x-auth-issuer"], issuer_url.as_str());

        // A token changed in transit is refused by the second gateway without reaching the upstream.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut claims = decode(&token).1;
        claims["roles"] = serde_json::json!(["admin"]);
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        let forged = parts.join(".");
        let a = send(&c2, bearer(&second.https_url("/users/me"), &forged, http::Method::GET)).await;
        assert_eq!(a.status, 401, "{}", a.text());
        assert_eq!(up.hits(), 1);
        second.stop().await;
        first.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// A login burst does not stall proxying.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_burst_does_not_stall_proxied_requests() {
    bounded_alone(async {
        let up = spawn_upstream().await;
        // 200 clients behind a trusted proxy (each its own address): one client may only queue a few hashes.
        let gw = token_gateway_with(&up, &argon_only_users(), "allow_plaintext = true", BEHIND_A_PROXY).await;
        let logins = client(&gw);
        let proxied = client(&gw);
        let ping = gw.http_url("/api/ping");
        for _ in 0..20 {
            assert_eq!(get(&proxied, &ping, None).await.status, 200);
        }

        let token_url = gw.http_url("/token");
        let started = Instant::now();
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..200 {
            let (c, url) = (logins.clone(), token_url.clone());
            let body = form(&[("grant_type", "password"), ("username", "john.doe"), ("password", "securepassword")]);
            let from = format!("10.0.{}.{}", i / 100, i % 100);
            burst.spawn(async move { post(&c, &url, body, &[("x-forwarded-for", &from)]).await.status });
        }
        let mut latencies = Vec::new();
        let mut statuses = Vec::new();
        while !burst.is_empty() {
            let t = Instant::now();
            let a = get(&proxied, &ping, None).await;
            latencies.push(t.elapsed());
            assert_eq!(a.status, 200);
            while let Some(done) = burst.try_join_next() {
                statuses.push(done.unwrap());
            }
        }
        let burst_took = started.elapsed();
        assert_eq!(statuses.len(), 200);
        assert!(statuses.iter().all(|s| *s == 200), "logins failed: {statuses:?}");
        latencies.sort();
        let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
        eprintln!(
            "200 logins took {burst_took:?}; {} proxied requests meanwhile: p50 {:?}, p99 {p99:?}, max {:?}",
            latencies.len(),
            latencies[latencies.len() / 2],
            latencies.last().unwrap()
        );
        assert!(latencies.len() >= 20, "too few proxied samples ({}) during the burst to judge", latencies.len());
        assert!(p99 <= Duration::from_millis(50), "p99 of proxied requests during a login burst is {p99:?}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_users_file_keeps_the_old_users_and_a_fixed_one_is_picked_up() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &argon_only_users(), "").await;
        let c = client(&gw);
        let url = gw.https_url("/token");
        let login = |user: &'static str| {
            let (c, url) = (&c, &url);
            async move {
                post(c, url, form(&[("grant_type", "password"), ("username", user), ("password", "securepassword")]), &[]).await.status
            }
        };
        assert_eq!(login("john.doe").await, 200);
        let users = gw.dir.path().join("users.toml");
        let write = |text: &str| write_atomic(&users, text.as_bytes());

        // Broken: the reload is refused, counted, and the old users keep logging in.
        write("[users.\"john.doe\"\npassword_hash = ");
        wait_metric(&c, &gw, "portcullis_config_reloads_total", &[("result", "error")], 1.0, Duration::from_secs(5)).await;
        assert_eq!(login("john.doe").await, 200, "the old users must keep working");
        assert_eq!(login("new.user").await, 400);

        // Fixed, with a new user: picked up without a restart.
        write(&format!("{}\n{}", argon_only_users(), argon_only_users().replace("john.doe", "new.user")));
        // (Waiting on the reload, not on logins: failed logins would soon be rate limited, across the reload too.)
        wait_metric(&c, &gw, "portcullis_config_reloads_total", &[("result", "ok")], 2.0, Duration::from_secs(5)).await;
        assert_eq!(login("new.user").await, 200);
        assert_eq!(login("john.doe").await, 200);
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// The `portcullis token` CLI mints with the issuer's own key what the running gateway accepts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cli_mints_tokens_the_gateway_accepts_and_judges() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);
        let config = gw.dir.path().join("gateway.toml");
        let mint = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .arg("token")
                .arg("--config")
                .arg(&config)
                .args(args)
                .output()
                .expect("the CLI runs")
        };
        let out = mint(&["--issuer", "local", "--sub", "ops.bot", "--roles", "admin", "--scopes", "write:items", "--ttl", "5m"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let a = send(&c, bearer(&gw.https_url("/admin/users"), &admin, http::Method::GET)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(up.last().unwrap().headers["x-auth-subject"], "ops.bot");
        let a = send(&c, bearer(&gw.https_url("/items"), &admin, http::Method::POST)).await;
        assert_eq!(a.status, 200, "the scope was minted in: {}", a.text());
        let (_, claims) = decode(&admin);
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 300, "--ttl 5m");

        // A CLI token is judged like any other: no admin role, no admin route.
        let out = mint(&["--issuer", "local", "--sub", "someone", "--roles", "user"]);
        let user = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let hits = up.hits();
        let a = send(&c, bearer(&gw.https_url("/admin/users"), &user, http::Method::GET)).await;
        assert_eq!(a.status, 403, "{}", a.text());
        assert_eq!(up.hits(), hits, "a refused request reached the upstream");

        // An issuer the config does not have: exit 1 and nothing on stdout.
        let out = mint(&["--issuer", "nope", "--sub", "x"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Metrics.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_and_well_known_are_counted_under_their_own_routes() {
    bounded_shared(async {
        let up = spawn_upstream().await;
        let gw = token_gateway(&up, &demo_users(), "").await;
        let c = client(&gw);
        login(&c, &gw, "john.doe", "securepassword").await;
        let a = password_login(&c, &gw.https_url("/token"), "john.doe", "wrong").await;
        assert_eq!(a.status, 400, "{}", a.text());
        assert_eq!(get(&c, &gw.https_url("/.well-known/jwks.json"), None).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/no-such-route"), None).await.status, 404);

        let text = metrics(&c, &gw).await;
        let count = |route: &str, status: &str| {
            metric(&text, "portcullis_requests_total", &[("method", "POST"), ("route", route), ("status", status)]).unwrap_or(0.0)
        };
        assert_eq!(count("token", "200"), 1.0, "{text}");
        assert_eq!(count("token", "400"), 1.0, "{text}");
        assert_eq!(
            metric(&text, "portcullis_requests_total", &[("method", "GET"), ("route", "well-known"), ("status", "200")]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            metric(&text, "portcullis_requests_total", &[("method", "GET"), ("route", "-"), ("status", "404")]),
            Some(1.0),
            "{text}"
        );
        assert_eq!(metric(&text, "portcullis_request_duration_seconds_count", &[("route", "token")]), Some(2.0), "{text}");
        assert_eq!(
            metric(&text, "portcullis_request_duration_seconds_count", &[("route", "-")]),
            Some(1.0),
            "login latency is not mixed with 404 noise: {text}"
        );
        // The process beside the gateway's own figures.
        for name in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"] {
            assert!(metric(&text, name, &[]).is_some_and(|v| v > 0.0), "{name} missing: {text}");
        }
        // Whole seconds of CPU: a young process may show 0.
        assert!(metric(&text, "process_cpu_seconds_total", &[]).is_some(), "{text}");
        gw.stop().await;
    })
    .await;
}
