//! Operations, end to end: Prometheus metrics (checked by `promtool`), health and readiness, hot reload of policy
//! and certificates under load, the admin listener's isolation, and policy tests (`explain`, `check --tests`)
//! compared with real requests against the shipped gateway.toml.
//!
//! Reload effects are awaited by polling with a deadline (the file watcher polls every 250 ms and applies a
//! change once it has been stable for one more poll); everything else waits on readiness signals. Every test
//! body runs under a time bound, and every refusal asserts the upstream was not reached.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a change on disk may take to decide requests: within one second.
const RELOAD_WITHIN: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------------------------------------------------
// Metrics after a mix of outcomes, and promtool.

/// Runs `promtool check metrics` on `text`. Without promtool the check is skipped, unless PORTCULLIS_REQUIRE_ALL=1.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Some(promtool) = require_tool(&["promtool"], "prometheus") else { return };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome_and_pass_promtool() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        // An upstream that is down: its port is held, and refuses every connection.
        let (_held, dead) = refusing_addr();
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .upstream("dead", &format!("http://{dead}"), r#"connect_timeout = "1s""#)
            .section(&iss.config())
            .route("me", "/users/me", "")
            .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
            .route("limited", "/limited", "auth = \"public\"\nrate_limit = { key = \"route\", rate = \"1/min\", burst = 1 }")
            .route_to("dead", "dead", "/dead/*", AUTH_PUBLIC)
            .build();
        let gw = iss.gateway(&cfg).await;
        let c = client(&gw);
        let user = iss.token("bob", &["user"]);
        let expired = mint_token(
            &iss.key,
            None,
            &claims(TestIssuer::ISS, "bob", json!({"roles": ["user"], "iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600})),
        );

        assert_eq!(get(&c, &gw.https_url("/users/me"), Some(&user)).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/users/me"), Some(&expired)).await.status, 401);
        assert_eq!(get(&c, &gw.https_url("/admin/x"), Some(&user)).await.status, 403);
        assert_eq!(get(&c, &gw.https_url("/nowhere"), None).await.status, 404);
        assert_eq!(get(&c, &gw.https_url("/limited"), None).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/limited"), None).await.status, 429);
        assert_eq!(get(&c, &gw.https_url("/dead/x"), None).await.status, 502);
        // Made-up methods are client text: they are counted, but under one "OTHER" label, never a series each.
        for made_up in ["FOO1", "FOO2", "FOO3"] {
            assert_eq!(request_as(&c, Method::from_bytes(made_up.as_bytes()).unwrap(), &gw.https_url("/nowhere"), None).await.status, 404);
        }
        assert_eq!(up.hits(), 2, "only the two allowed requests reach the upstream");
        // A failed TLS handshake: plaintext HTTP to the TLS port.
        let (_, closed) = raw_exchange(gw.https.unwrap(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5)).await;
        assert!(closed, "the TLS listener kept a plaintext connection open");
        wait_metric(&c, &gw, "portcullis_tls_handshake_failures_total", &[], 1.0, Duration::from_secs(5)).await;

        let text = metrics(&c, &gw).await;
        let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
        let req = |route: &str, status: &str| m("portcullis_requests_total", &[("route", route), ("method", "GET"), ("status", status)]);
        assert_eq!(req("me", "200"), Some(1.0), "{text}");
        assert_eq!(req("me", "401"), Some(1.0));
        assert_eq!(req("admin", "403"), Some(1.0));
        assert_eq!(req("-", "404"), Some(1.0), "unrouted requests are labelled \"-\", never by raw path");
        assert_eq!(req("limited", "200"), Some(1.0));
        assert_eq!(req("limited", "429"), Some(1.0));
        assert_eq!(req("dead", "502"), Some(1.0));
        assert!(!text.contains("/nowhere") && !text.contains("/dead/x") && !text.contains("/users/me"), "a raw path leaked into a label");
        let other = m("portcullis_requests_total", &[("route", "-"), ("method", "OTHER"), ("status", "404")]);
        assert_eq!(other, Some(3.0), "{text}");
        assert!(!text.contains("FOO1"), "a made-up method became a label");
        assert_eq!(m("portcullis_auth_failures_total", &[("route", "me"), ("reason", "expired")]), Some(1.0));
        assert_eq!(m("portcullis_authz_denied_total", &[("route", "admin"), ("rule", "roles")]), Some(1.0));
        assert_eq!(m("portcullis_rate_limited_total", &[("route", "limited"), ("key", "route")]), Some(1.0));
        assert_eq!(m("portcullis_upstream_errors_total", &[("upstream", "dead"), ("kind", "connect")]), Some(1.0));
        assert_eq!(m("portcullis_request_duration_seconds_count", &[("route", "me")]), Some(2.0));
        assert_eq!(m("portcullis_request_duration_seconds_bucket", &[("route", "me"), ("le", "+Inf")]), Some(2.0));
        assert_eq!(m("portcullis_upstream_duration_seconds_count", &[("upstream", "api")]), Some(2.0));
        assert_eq!(m("portcullis_upstream_duration_seconds_count", &[("upstream", "dead")]), Some(1.0));
        assert_eq!(m("portcullis_jwt_cache_misses_total", &[]), Some(1.0), "the user's token is verified once");
        assert_eq!(m("portcullis_jwt_cache_hits_total", &[]), Some(1.0), "and then found in the cache");
        assert_eq!(m("portcullis_config_reloads_total", &[("result", "ok")]), Some(1.0));
        assert!(m("portcullis_config_last_reload_success_timestamp_seconds", &[]).unwrap() >= (now() - 600) as f64);
        assert_eq!(m("portcullis_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
        assert!(m("portcullis_connections_active", &[("listener", "https")]).is_some(), "{text}");
        assert_eq!(m("portcullis_tls_handshake_failures_total", &[]), Some(1.0));
        promtool_check(&text);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Hot reload of policy.

/// A valid config whose `/reports` route admits `role`.
fn reports_policy(up: &Upstream, iss: &TestIssuer, role: &str) -> String {
    ConfigBuilder::new(up)
        .section(&iss.config())
        .route("reports", "/reports", &format!("roles_any = [\"{role}\"]"))
        .route("me", "/users/me", "")
        .build()
}

/// Polls `/reports` until it answers `want`, within [`RELOAD_WITHIN`] of `since`. Returns how long it took.
async fn wait_policy(c: &TestClient, gw: &TestGateway, token: &str, want: u16, since: Instant) -> Duration {
    loop {
        let a = get(c, &gw.https_url("/reports"), Some(token)).await;
        if a.status == want {
            return since.elapsed();
        }
        assert!(matches!(a.status.as_u16(), 200 | 403), "unexpected answer while waiting for the policy: {} {}", a.status, a.text());
        assert!(since.elapsed() < RELOAD_WITHIN, "the new policy did not decide within {RELOAD_WITHIN:?} (still {})", a.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct LoadStats {
    sent: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// Sends requests in a loop until `stop`: `/users/me` must always be 200, `/reports` 200 or 403.
async fn load_loop(c: TestClient, gw_url: String, token: String, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    let mut n = 0u64;
    // Bounded in count as well as by the flag.
    while !stop.load(Ordering::Relaxed) && n < 200_000 {
        n += 1;
        let (path, allowed): (&str, &[u16]) = if n % 2 == 0 { ("/users/me", &[200]) } else { ("/reports", &[200, 403]) };
        let req = Request::get(format!("{gw_url}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            let rsp = c.request(req).await.map_err(|e| format!("connection error: {e:?}"))?;
            let status = rsp.status().as_u16();
            rsp.into_body().collect().await.map_err(|e| format!("body error: {e:?}"))?;
            Ok::<u16, String>(status)
        })
        .await;
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let problem = match outcome {
            Err(_) => Some(format!("{path}: no answer within 5 s")),
            Ok(Err(e)) => Some(format!("{path}: {e}")),
            Ok(Ok(s)) if !allowed.contains(&s) => Some(format!("{path}: status {s}")),
            Ok(Ok(_)) => None,
        };
        if let Some(p) = problem {
            stats.failures.lock().unwrap().push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_switches_policy_without_a_single_error() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let allow = reports_policy(&up, &iss, "user");
        let deny = reports_policy(&up, &iss, "admin");
        let gw = iss.gateway(&allow).await;
        let path = gw.dir.path().join("gateway.toml");
        let token = iss.token("bob", &["user"]);
        let probe = client(&gw);
        assert_eq!(get(&probe, &gw.https_url("/reports"), Some(&token)).await.status, 200);

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let mut loops = Vec::new();
        for _ in 0..2 {
            loops.push(tokio::spawn(load_loop(client(&gw), gw.https_url(""), token.clone(), stop.clone(), stats.clone())));
        }
        let mut slowest = Duration::ZERO;
        for i in 1..=20 {
            let (text, want) = if i % 2 == 1 { (&deny, 403) } else { (&allow, 200) };
            write_atomic(&path, text.as_bytes());
            let took = wait_policy(&probe, &gw, &token, want, Instant::now()).await;
            slowest = slowest.max(took);
        }
        stop.store(true, Ordering::Relaxed);
        for l in loops {
            tokio::time::timeout(Duration::from_secs(10), l).await.expect("load loop stops").unwrap();
        }
        let sent = stats.sent.load(Ordering::Relaxed);
        let failures = stats.failures.lock().unwrap().clone();
        eprintln!("20 reloads under load: {sent} requests, {} failures, slowest policy switch {slowest:?}", failures.len());
        assert!(
            failures.is_empty(),
            "{} of {sent} requests failed during reloads: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        assert!(sent >= 100, "the load loop sent only {sent} requests");

        let text = metrics(&probe, &gw).await;
        assert_eq!(metric(&text, "portcullis_config_reloads_total", &[("result", "ok")]), Some(21.0), "1 start + 20 reloads");
        assert_eq!(metric(&text, "portcullis_config_reloads_total", &[("result", "error")]), None);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_on_disk_keeps_the_old_policy_until_fixed() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let allow = reports_policy(&up, &iss, "user");
        let gw = iss.gateway(&allow).await;
        let path = gw.dir.path().join("gateway.toml");
        let c = client(&gw);
        let token = iss.token("bob", &["user"]);
        assert_eq!(get(&c, &gw.https_url("/reports"), Some(&token)).await.status, 200);

        // The deny policy with a typo in it: an unknown key in the reports route.
        let broken = reports_policy(&up, &iss, "admin").replace("roles_any = [\"admin\"]", "roles_any = [\"admin\"]\nrole_any = [\"x\"]");
        let bad_line = broken.lines().position(|l| l.starts_with("role_any")).unwrap() + 1;
        // What the reload logs: the error located at file:line:column.
        let scratch = tempfile::tempdir().unwrap();
        std::fs::write(scratch.path().join("issuer.pub.pem"), &iss.key.public_pem).unwrap();
        std::fs::write(scratch.path().join("gateway.toml"), &broken).unwrap();
        let err = Config::load(&scratch.path().join("gateway.toml")).expect_err("the broken config must not validate").to_string();
        assert!(err.contains(&format!("gateway.toml:{bad_line}:")), "error not located at line {bad_line}: {err}");

        write_atomic(&path, broken.as_bytes());
        wait_metric(&c, &gw, "portcullis_config_reloads_total", &[("result", "error")], 1.0, Duration::from_secs(5)).await;
        for _ in 0..5 {
            let a = get(&c, &gw.https_url("/reports"), Some(&token)).await;
            assert_eq!(a.status, 200, "the old policy must keep serving: {}", a.text());
        }
        let text = metrics(&c, &gw).await;
        assert_eq!(metric(&text, "portcullis_config_reloads_total", &[("result", "ok")]), Some(1.0));

        // Fixing the file reloads it.
        let fixed = reports_policy(&up, &iss, "admin");
        write_atomic(&path, fixed.as_bytes());
        wait_policy(&c, &gw, &token, 403, Instant::now()).await;
        let text = metrics(&c, &gw).await;
        assert_eq!(metric(&text, "portcullis_config_reloads_total", &[("result", "ok")]), Some(2.0));
        assert_eq!(metric(&text, "portcullis_config_reloads_total", &[("result", "error")]), Some(1.0));
        let hits = up.hits();
        let a = get(&c, &gw.https_url("/reports"), Some(&token)).await;
        assert_eq!(a.status, 403);
        assert_eq!(up.hits(), hits, "a refused request reached the upstream");
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Certificate swap.

fn tls_client_config(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    Arc::new(tls_config_trusting(store, &[b"http/1.1"]))
}

/// Opens a new TLS connection and returns it with the certificate the server presented.
async fn handshake(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, CertificateDer<'static>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let cert = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone().into_owned();
    (tls, cert)
}

fn first_cert(pem: &[u8]) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem).next().unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_served_to_new_handshakes() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let cfg = ConfigBuilder::new(&up).route("api", "/api/*", AUTH_PUBLIC).build();
        let gw = spawn_gateway(&cfg).await;
        let addr = gw.https.unwrap();
        let old = first_cert(&std::fs::read(gw.cert_path()).unwrap());

        let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let new = fresh.cert.der().clone();
        assert_ne!(old, new);
        let both = tls_client_config(&[old.clone(), new.clone()]);

        let (mut held, presented) = handshake(addr, &both).await;
        assert_eq!(presented, old);

        write_atomic(&gw.dir.path().join("gateway.key"), fresh.signing_key.serialize_pem().as_bytes());
        write_atomic(&gw.dir.path().join("gateway.crt"), fresh.cert.pem().as_bytes());
        let since = Instant::now();
        loop {
            let (_, presented) = handshake(addr, &both).await;
            if presented == new {
                break;
            }
            assert_eq!(presented, old, "neither certificate was presented");
            assert!(since.elapsed() < Duration::from_secs(5), "new handshakes still get the old certificate after 5 s");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        eprintln!("new certificate served {:?} after the swap", since.elapsed());

        // A client that trusts only the new certificate now gets through, without a restart.
        let only_new = tls_client_config(std::slice::from_ref(&new));
        let (mut tls, _) = handshake(addr, &only_new).await;
        let (status, _) = http1_over(&mut tls, "/api/new").await;
        assert_eq!(status, 200);

        // The connection opened before the swap is untouched.
        let (status, _) = http1_over(&mut held, "/api/held").await;
        assert_eq!(status, 200, "the connection from before the swap was disturbed");
        assert_eq!(up.hits(), 2);
        // The swap was a reload like any other (counted once it has finished).
        wait_metric(&client(&gw), &gw, "portcullis_config_reloads_total", &[("result", "ok")], 2.0, Duration::from_secs(5)).await;
        gw.stop().await;
    })
    .await;
}

/// Sends one HTTP/1.1 GET (Connection: close) over an open stream and reads the whole answer.
async fn http1_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

// ------------------------------------------------------------------------------------------------------------
// Health and readiness.

/// A loopback JWKS server whose answer can be switched from 503 to a key set.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<Option<String>>>,
    fetches: tokio::sync::watch::Sender<usize>,
}

impl JwksServer {
    async fn start() -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let fetches = tokio::sync::watch::Sender::new(0usize);
        let (b, f) = (body.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (b, f) = (b.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let current = b.lock().unwrap().clone();
                        f.send_modify(|n| *n += 1);
                        async move {
                            let rsp = match current {
                                Some(jwks) => {
                                    Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(jwks)))
                                }
                                None => Response::builder().status(503).body(Full::new(Bytes::from_static(b"not yet"))),
                            };
                            Ok::<_, Infallible>(rsp.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        JwksServer { addr, body, fetches }
    }

    async fn wait_fetches(&self, n: usize, within: Duration) {
        let mut rx = self.fetches.subscribe();
        tokio::time::timeout(within, rx.wait_for(|f| *f >= n)).await.expect("JWKS fetched in time").unwrap();
    }
}

async fn admin_get(conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, path: &str) -> (u16, String) {
    conn.ready().await.expect("admin connection open");
    let req = Request::get(path).header("host", "admin").body(Full::new(Bytes::new())).unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(5), conn.send_request(req)).await.expect("in time").expect("answered");
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_issuer_keys_while_healthz_stays_200() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let idp = JwksServer::start().await;
        let key = test_key(Algorithm::EdDSA);
        let cfg = ConfigBuilder::new(&up)
            .issuer("idp", "https://idp.test", &["EdDSA"], &format!("jwks_url = \"http://{}/jwks.json\"\njwks_timeout = \"1s\"", idp.addr))
            .route("me", "/users/me", "")
            .build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);

        // Keys missing: two failed fetches seen by the JWKS server, and readyz says why.
        idp.wait_fetches(2, Duration::from_secs(10)).await;
        let a = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!(a.status, 503, "{}", a.text());
        assert_eq!(a.json()["error"], "issuer_keys_missing");
        assert_eq!(header(&a, "cache-control"), Some("no-store"));
        let a = get(&c, &gw.admin_url("/healthz"), None).await;
        assert_eq!(a.status, 200);

        // Keys arrive: ready.
        *idp.body.lock().unwrap() = Some(json!({"keys": [jwk(&key, "k1")]}).to_string());
        wait_ready(&c, &gw, Duration::from_secs(15)).await;
        let token = mint_token(&key, Some("k1"), &claims("https://idp.test", "alice", json!({})));
        let a = get(&c, &gw.https_url("/users/me"), Some(&token)).await;
        assert_eq!(a.status, 200, "{}", a.text());

        // A reload while the identity provider is down keeps the keys it had: still ready, tokens still verify.
        *idp.body.lock().unwrap() = None;
        let path = gw.dir.path().join("gateway.toml");
        write_atomic(&path, format!("{cfg}\n# reloaded\n").as_bytes());
        wait_metric(&c, &gw, "portcullis_config_reloads_total", &[("result", "ok")], 2.0, Duration::from_secs(5)).await;
        let a = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!(a.status, 200, "keys lost on reload: {}", a.text());
        let hits = up.hits();
        let a = get(&c, &gw.https_url("/users/me"), Some(&token)).await;
        assert_eq!(a.status, 200, "keys lost on reload: {}", a.text());
        assert_eq!(up.hits(), hits + 1);
        // (What a drain does to them: `new_probe_connections_are_served_throughout_a_drain_and_refused_after_it`.)
        tokio::time::timeout(Duration::from_secs(30), gw.stop()).await.expect("drain ends");
    })
    .await;
}

/// GET `path` on a new connection to the admin listener (as a kubelet probes): the status and the whole answer.
async fn probe_new_connection(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("a new connection to the admin listener for {path} was refused: {e}"));
    http1_over(&mut tcp, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_probe_connections_are_served_throughout_a_drain_and_refused_after_it() {
    bounded(async {
        let held = HeldUpstream::start().await;
        let mut gw = spawn_gateway(&public_config(&held.upstream(), "")).await;
        let (http, admin) = (gw.http.unwrap(), gw.admin.unwrap());
        let c = client(&gw);
        let url = gw.http_url("/held");
        let in_flight = tokio::spawn(async move { get(&c, &url, None).await });
        // The drain lasts as long as this request, which lasts until the upstream is released.
        held.wait_arrived(1).await;
        // Admin connections from before the drain: one that probes through it, one idle that must not outlive it.
        let mut kept = h1_connection(admin).await;
        assert_eq!(admin_get(&mut kept, "/readyz").await.0, 200);
        let mut idle_admin = tokio::net::TcpStream::connect(admin).await.unwrap();

        let running = gw.gw.take().expect("running gateway");
        running.begin_shutdown();
        // readyz turns 503 at once on the connection opened before; healthz stays 200.
        let (status, body) = admin_get(&mut kept, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("draining"), "{body}");
        assert_eq!(admin_get(&mut kept, "/healthz").await.0, 200);
        // The drain is under way once the public listener refuses.
        until_refused(http).await;
        for round in 0..3 {
            let (status, text) = probe_new_connection(admin, "/healthz").await;
            assert_eq!(status, 200, "round {round}: /healthz during the drain: {text}");
            let (status, text) = probe_new_connection(admin, "/readyz").await;
            assert_eq!(status, 503, "round {round}: /readyz during the drain: {text}");
            assert!(text.contains("draining"), "{text}");
            let (status, text) = probe_new_connection(admin, "/metrics").await;
            assert_eq!(status, 200, "round {round}: /metrics during the drain: {text}");
            assert!(text.contains("portcullis_build_info"), "{text}");
        }
        assert!(!in_flight.is_finished(), "the drain ended before the held request was answered");

        held.release();
        let a = tokio::time::timeout(BOUND, in_flight).await.expect("answered once released").unwrap();
        assert_eq!((a.status.as_u16(), a.text().as_str()), (200, "released"));
        tokio::time::timeout(BOUND, running.wait()).await.expect("the drain ends with its last request");
        // Once the drain has ended the admin listener is closed, and so is the admin connection left open.
        let refused = tokio::net::TcpStream::connect(admin).await;
        assert!(refused.is_err(), "the admin listener still accepts after the drain ended");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(BOUND, idle_admin.read(&mut buf)).await.expect("the idle admin connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "the idle admin connection answered after the drain: {read:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_when_the_drain_timeout_passes() {
    bounded(async {
        let held = HeldUpstream::start().await;
        let mut gw = spawn_gateway(&public_config(&held.upstream(), "[limits]\ndrain_timeout = \"1s\"\n")).await;
        let admin = gw.admin.unwrap();
        let c = client(&gw);
        let url = gw.http_url("/held");
        let in_flight = tokio::spawn(async move { get(&c, &url, None).await });
        held.wait_arrived(1).await;

        let running = gw.gw.take().expect("running gateway");
        let t = Instant::now();
        running.begin_shutdown();
        let (status, text) = probe_new_connection(admin, "/healthz").await;
        assert_eq!(status, 200, "{text}");
        // The held request never ends: the drain ends at its timeout, and the admin listener with it.
        tokio::time::timeout(BOUND, running.wait()).await.expect("the drain ends at drain_timeout");
        assert!(t.elapsed() >= Duration::from_secs(1), "the drain ended before its timeout with a request in flight");
        assert!(tokio::net::TcpStream::connect(admin).await.is_err(), "the admin listener still accepts after the drain timed out");
        in_flight.abort();
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Admin and public listeners are separate.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_public_listeners_serve_only_their_own_paths() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up).section(&iss.config()).route("api", "/api/*", AUTH_PUBLIC).route("me", "/users/me", "").build();
        let gw = iss.gateway(&cfg).await;
        let c = client(&gw);
        let token = iss.token("alice", &["user"]);

        for path in ["/metrics", "/healthz", "/readyz"] {
            let a = get(&c, &gw.admin_url(path), None).await;
            assert_eq!(a.status, 200, "admin {path}");
            for public in [gw.https_url(path), gw.http_url(path)] {
                let a = get(&c, &public, None).await;
                assert_eq!(a.status, 404, "{public}: {}", a.text());
                assert!(!a.text().contains("portcullis_"), "{public} served metrics");
            }
        }
        for path in ["/api/x", "/users/me"] {
            let a = get(&c, &gw.admin_url(path), Some(&token)).await;
            assert_eq!(a.status, 404, "admin {path}: {}", a.text());
        }
        let a = request_as(&c, Method::POST, &gw.admin_url("/metrics"), None).await;
        assert_eq!(a.status, 405);
        assert_eq!(up.hits(), 0, "the upstream was reached through the admin listener");
        // The public routes still work where they belong.
        assert_eq!(get(&c, &gw.https_url("/api/x"), None).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/users/me"), Some(&token)).await.status, 200);
        assert_eq!(up.hits(), 2);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_protects_metrics_but_not_health_probes() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let secret = "admin-token-for-the-ops-test-0123456789";
        // A variable only this test reads.
        std::env::set_var("PORTCULLIS_OPS_TEST_ADMIN_TOKEN", secret);
        let cfg = ConfigBuilder::new(&up)
            .section("[admin]\ntoken_env = \"PORTCULLIS_OPS_TEST_ADMIN_TOKEN\"")
            .route("api", "/api/*", AUTH_PUBLIC)
            .build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        for wrong in [None, Some("admin-token-for-the-ops-test-012345678X"), Some("short")] {
            let a = get(&c, &gw.admin_url("/metrics"), wrong).await;
            assert_eq!(a.status, 401, "{wrong:?}");
            assert!(!a.text().contains("portcullis_"), "metrics served without the admin token");
            assert_eq!(header(&a, "www-authenticate"), Some("Bearer realm=\"portcullis-admin\""));
        }
        let a = get(&c, &gw.admin_url("/metrics"), Some(secret)).await;
        assert_eq!(a.status, 200);
        assert!(a.text().contains("portcullis_build_info"));
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let req = http::Request::get(gw.admin_url("/metrics"))
            .header("authorization", format!("bearer {secret}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(send(&c, req).await.status, 200);
        // The admin listener only reads: other methods get 405 naming the ones it takes.
        let req = http::Request::post(gw.admin_url("/healthz")).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
        let a = send(&c, req).await;
        assert_eq!(a.status, 405);
        assert_eq!(header(&a, "allow"), Some("GET, HEAD"));
        for probe in ["/healthz", "/readyz"] {
            assert_eq!(get(&c, &gw.admin_url(probe), None).await.status, 200, "{probe} must answer probes without credentials");
        }
        assert_eq!(up.hits(), 0);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// `explain` and the policy tests agree with real requests on the shipped gateway.toml.

/// Copies the shipped gateway.toml, policy-tests.toml and examples/ into `dir`, with the listeners on port 0
/// and the `api` upstream pointed at `upstream`.
fn shipped_config_in(dir: &Path, upstream: &Upstream) {
    std::fs::write(dir.join("gateway.toml"), shipped_config(&upstream.url())).unwrap();
    std::fs::copy(manifest("policy-tests.toml"), dir.join("policy-tests.toml")).unwrap();
    std::fs::create_dir_all(dir.join("examples")).unwrap();
    for e in std::fs::read_dir(manifest("examples")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("examples").join(e.file_name())).unwrap();
    }
}

/// Runs `portcullis check --config … --tests …`; returns the exit code and stdout.
async fn check_cli(config: &Path, tests: &Path) -> (i32, String) {
    let (config, tests) = (config.to_path_buf(), tests.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--tests")
            .arg(&tests)
            .output()
            .expect("portcullis runs");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_real_requests_for_every_shipped_policy_case() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        shipped_config_in(dir.path(), &up);
        let config_path = dir.path().join("gateway.toml");
        let cfg = Config::load(&config_path).unwrap_or_else(|e| panic!("the shipped config does not load:\n{e}"));
        let key_path = dir.path().join("certs/issuer-ed25519.pem");
        let signing = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(&key_path).expect("the issuer key was generated")).unwrap();
        let gw = portcullis::start(cfg.clone()).await.expect("the shipped config starts");
        let https = gw.https.unwrap();
        let tls = tls_config(&dir.path().join("certs/gateway.crt"), &[]);
        let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        let c: TestClient = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(conn);

        let cases = portcullis::tools::explain::load_cases(&dir.path().join("policy-tests.toml")).unwrap();
        assert!(cases.len() >= 10, "the shipped policy tests cover the shipped config");
        for case in &cases {
            let (method, creds) = portcullis::tools::explain::case_request(case).unwrap();
            let decisions = portcullis::tools::explain::explain(&cfg, &method, &case.path, creds).await.unwrap();
            // The shipped config has one issuer: every case is decided once.
            let [decision] = decisions.as_slice() else { panic!("case {:?}: {} decisions", case.name, decisions.len()) };

            let mut b = Request::builder().method(method.clone()).uri(format!("https://localhost:{}{}", https.port(), case.path));
            if let Some(claims) = &case.claims {
                let mut claims = claims.clone();
                for (k, v) in [
                    ("iss", json!("https://gateway.local")),
                    ("aud", json!("api")),
                    ("iat", json!(now())),
                    ("nbf", json!(now())),
                    ("exp", json!(now() + 600)),
                ] {
                    claims.entry(k).or_insert(v);
                }
                let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::EdDSA), &claims, &signing).unwrap();
                b = b.header("authorization", format!("Bearer {token}"));
            }
            let hits = up.hits();
            let real = send(&c, b.body(Full::new(Bytes::new())).unwrap()).await;
            let what = format!("case {:?} ({method} {})", case.name, case.path);
            assert_eq!(
                real.status.as_u16(),
                decision.status,
                "{what}: a real request got {} but explain says {}\n{}\n{}",
                real.status,
                decision.status,
                decision.lines.join("\n"),
                real.text()
            );
            assert_eq!(decision.status, case.expect, "{what}: explain disagrees with the case\n{}", decision.lines.join("\n"));
            let forwarded = decision.upstream.is_some();
            assert_eq!(
                up.hits(),
                hits + usize::from(forwarded),
                "{what}: upstream reached = {}, explain says forward = {forwarded}",
                up.hits() > hits
            );
            assert_eq!(
                header(&real, "www-authenticate").map(str::to_string),
                decision.www_authenticate,
                "{what}: WWW-Authenticate differs"
            );
        }
        let (lines, ok) = portcullis::tools::explain::run_cases(&Arc::new(cfg.clone()), &cases).await;
        assert!(ok, "{}", lines.join("\n"));
        gw.stop().await;

        // The CLI gate: the shipped file passes; a failing case exits 1 and is named.
        let (code, out) = check_cli(&config_path, &dir.path().join("policy-tests.toml")).await;
        assert_eq!(code, 0, "{out}");
        let failing = dir.path().join("failing-tests.toml");
        std::fs::write(
            &failing,
            r#"
[[case]]
name = "admins read admin"
path = "/admin/x"
claims = { sub = "root", roles = ["admin"] }
expect = 200

[[case]]
name = "users may read admin (wrong on purpose)"
path = "/admin/x"
claims = { sub = "bob", roles = ["user"] }
expect = 200
"#,
        )
        .unwrap();
        let (code, out) = check_cli(&config_path, &failing).await;
        assert_eq!(code, 1, "a failing policy case must fail the check:\n{out}");
        assert!(out.contains("FAIL users may read admin (wrong on purpose)"), "the failing case is not named:\n{out}");
        assert!(out.contains("pass admins read admin"), "{out}");
        assert!(out.contains("expected 200, got 403"), "{out}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_ca_file_rewritten_in_place_applies_at_the_reload() {
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let (addr, upstream_ca, hits) = tls_upstream().await;
        let (_, another_ca) = private_ca_server_config();
        let config = ConfigBuilder::new(&up)
            .upstream("secure", &format!("https://{addr}"), r#"ca_file = "up-ca.pem""#)
            .route_to("secure", "secure", "/*", AUTH_PUBLIC)
            .build();
        let gw = spawn_gateway_with_files(&config, &[("up-ca.pem", another_ca.as_bytes())]).await;
        let c = client(&gw);
        assert_eq!(get(&c, &gw.http_url("/x"), None).await.status, 502, "trusted through the wrong CA");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);

        // The CA file is replaced under the same name (a rotation): the reload it triggers builds the upstream anew.
        write_atomic(&gw.dir.path().join("up-ca.pem"), upstream_ca.as_bytes());
        wait_metric(&c, &gw, "portcullis_config_reloads_total", &[("result", "ok")], 2.0, Duration::from_secs(5)).await;
        let a = get(&c, &gw.http_url("/x"), None).await;
        assert_eq!((a.status.as_u16(), a.text().as_str()), (200, "over tls"));
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// `check`'s summary, and claims without `iss` when a route accepts several issuers.

/// Two issuers that read roles from different claims, a route either may serve and one only `a` may.
const TWO_ISSUERS: &str = r#"
[listen]
http = "127.0.0.1:0"

[upstreams.api]
url = "http://127.0.0.1:9"
connect_timeout = "1500ms"
timeout = "2m"

[[issuers]]
id = "a"
issuer = "https://a.test"
algorithms = ["HS256"]
secret_env = "PATH"

[[issuers]]
id = "b"
issuer = "https://b.test"
algorithms = ["HS256", "HS384"]
secret_env = "PATH"
roles_claim = "groups"

[[routes]]
name = "only-a"
path = "/only-a/*"
upstream = "api"
issuers = ["a"]
roles_any = ["admin"]

[[routes]]
name = "admin"
path = "/admin/*"
upstream = "api"
roles_any = ["admin"]

[[routes]]
name = "open"
path = "/open/*"
upstream = "api"
auth = "public"
"#;

/// Runs the portcullis binary; returns the exit code, stdout and stderr.
fn portcullis_cli<I: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = I>) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).args(args).output().expect("portcullis runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_prints_its_summary_in_the_configs_own_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, TWO_ISSUERS).unwrap();
    let (code, out, err) = portcullis_cli([std::ffi::OsStr::new("check"), "--config".as_ref(), config.as_os_str()]);
    assert_eq!(code, 0, "{out}{err}");
    for want in ["connect 1500ms, timeout 2m", "https://a.test  HS256\n", "https://b.test  HS256,HS384\n", "auth=required", "auth=public"] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    for debug in ["Public", "Required", "1.5s", "120s", "[HS256"] {
        assert!(!out.contains(debug), "{debug:?} is Rust's spelling, not the config's:\n{out}");
    }
}

#[test]
fn explain_decides_claims_without_iss_under_each_issuer_the_route_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, TWO_ISSUERS).unwrap();
    let explain = |path: &str, extra: &[&str]| {
        let mut args =
            vec!["explain", "--config", config.to_str().unwrap(), "--path", path, "--claims", r#"{"sub":"root","roles":["admin"]}"#];
        args.extend_from_slice(extra);
        portcullis_cli(args)
    };

    // Two issuers: a decision for each, each line saying whose; the steps they share are printed once.
    let (code, out, err) = explain("/admin/x", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(r#"[issuer "a"] decision: forward to upstream "api""#), "{out}");
    assert!(out.contains(r#"[issuer "b"] decision: 403"#), "{out}");
    assert_eq!(out.matches(r#"route "admin": matches"#).count(), 1, "{out}");
    assert!(out.lines().filter(|l| l.contains("decision:")).all(|l| l.starts_with("[issuer ")), "{out}");

    // --issuer picks one.
    let (code, out, _) = explain("/admin/x", &["--issuer", "b"]);
    assert_eq!(code, 0);
    assert!(out.contains("decision: 403") && !out.contains("[issuer ") && out.contains(r#"issuer "b""#), "{out}");

    // A route that accepts one issuer: that one, and the output says so.
    let (code, out, _) = explain("/only-a/x", &[]);
    assert_eq!(code, 0);
    assert!(out.contains(r#"the one issuer route "only-a" accepts"#) && out.contains("decision: forward"), "{out}");
    assert_eq!(out.matches("decision:").count(), 1, "{out}");

    // An issuer that does not exist, or that the claims' iss contradicts, is a usage error.
    let (code, _, err) = explain("/admin/x", &["--issuer", "c"]);
    assert_eq!(code, 1);
    assert!(err.contains(r#"no issuer "c""#), "{err}");
    let claims = r#"{"sub":"root","iss":"https://a.test"}"#;
    let (code, _, err) =
        portcullis_cli(["explain", "--config", config.to_str().unwrap(), "--path", "/admin/x", "--claims", claims, "--issuer", "b"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not issuer \"b\"'s"), "{err}");
}

#[test]
fn a_policy_case_without_iss_must_name_its_issuer_when_the_route_accepts_several() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, TWO_ISSUERS).unwrap();
    let tests = dir.path().join("policy-tests.toml");
    std::fs::write(
        &tests,
        r#"
[[case]]
name = "no issuer named"
path = "/admin/x"
claims = { sub = "root", roles = ["admin"] }
expect = 200

[[case]]
name = "under b"
path = "/admin/x"
issuer = "b"
claims = { sub = "root", roles = ["admin"] }
expect = 403

[[case]]
name = "under b by iss"
path = "/admin/x"
claims = { sub = "root", groups = ["admin"], iss = "https://b.test" }
expect = 200

[[case]]
name = "the one issuer the route accepts"
path = "/only-a/x"
claims = { sub = "root", roles = ["admin"] }
expect = 200

[[case]]
name = "claims on a public route"
path = "/open/x"
claims = { sub = "root" }
expect = 200
"#,
    )
    .unwrap();
    let (code, out, err) = portcullis_cli(["check", "--config", config.to_str().unwrap(), "--tests", tests.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let fail = out.lines().find(|l| l.starts_with("FAIL no issuer named")).unwrap_or_else(|| panic!("{out}{err}"));
    assert!(fail.contains(r#"["a", "b"]"#) && fail.contains("issuer = "), "{fail}");
    for pass in ["under b", "under b by iss", "the one issuer the route accepts", "claims on a public route"] {
        assert!(out.contains(&format!("pass {pass} (")), "{pass}: {out}{err}");
    }
    assert!(out.contains("policy tests: 4 passed, 1 failed"), "{out}");
}
