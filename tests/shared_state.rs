//! Several replicas, one set of limits: shared rate limits, failed logins and revocations in a real
//! `redis-server`, with three gateways against it in one test.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;

/// The HMAC secret every replica verifies and (with the token endpoint) signs with.
const SECRET: &[u8] = b"shared-state-test-secret-of-32-bytes!!";
const ISS: &str = "https://replicas.test";

fn key() -> TestKey {
    hmac_key(jsonwebtoken::Algorithm::HS256, SECRET)
}

/// A token for `sub` (with `extra` claims) that every replica accepts.
fn token(sub: &str, extra: serde_json::Value) -> String {
    mint_token(&key(), None, &claims(ISS, sub, extra))
}

/// A plain-http replica config: the issuer, `[store]` at `redis` (None: no store), `extra` tables and `routes`.
fn replica_config(up: &Upstream, redis: Option<&str>, extra: &str, routes: &[(&str, &str, &str)]) -> String {
    let mut b = ConfigBuilder::new(up).issuer("hs", ISS, &["HS256"], "secret_file = \"hs.secret\"");
    if let Some(url) = redis {
        // 200 ms: a debug build on a busy 2-core machine must not time out (and fall back) by accident.
        b = b.section(&format!("[store]\nurl = \"{url}\"\ntimeout = \"200ms\"\nexpected_replicas = 3\n"));
    }
    b = b.section(extra);
    for (name, path, rest) in routes {
        b = b.route(name, path, rest);
    }
    // Plain http only: no certificate needed by the clients here.
    b.build().replace("https = \"127.0.0.1:0\"\n", "")
}

async fn replica(config: &str, files: &[(&str, &[u8])]) -> TestGateway {
    let mut all: Vec<(&str, &[u8])> = vec![("hs.secret", SECRET)];
    all.extend_from_slice(files);
    spawn_gateway_with_files(config, &all).await
}

/// Starts `n` replicas of one config and waits until each has its store connected and is ready (which, with a
/// store, includes having loaded its revocations).
async fn replicas(n: usize, config: &str, files: &[(&str, &[u8])]) -> Vec<TestGateway> {
    let c = plain_client();
    let mut out = Vec::new();
    for _ in 0..n {
        let gw = replica(config, files).await;
        if config.contains("[store]") {
            wait_metric(&c, &gw, "portcullis_store_up", &[], 1.0, BOUND).await;
            wait_ready(&c, &gw, BOUND).await;
        }
        out.push(gw);
    }
    out
}

fn m(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// Sends `total` GETs to `path`, spread round-robin over `gws` and evenly over `over`, `concurrency` at a time
/// per tick; returns how many were admitted (200) and the time it took.
async fn paced(gws: &[TestGateway], path: &str, token: &str, total: usize, over: Duration) -> (usize, Duration) {
    let c = plain_client();
    let ticks = 30usize;
    let per_tick = total / ticks;
    let mut tick = tokio::time::interval(over / ticks as u32);
    let started = Instant::now();
    let mut admitted = 0;
    for t in 0..ticks {
        tick.tick().await;
        let batch: Vec<_> = (0..per_tick)
            .map(|i| {
                let url = gws[(t * per_tick + i) % gws.len()].http_url(path);
                let c = c.clone();
                let token = token.to_string();
                tokio::spawn(async move { get(&c, &url, Some(&token)).await.status })
            })
            .collect();
        for b in batch {
            let status = b.await.unwrap();
            assert!(status == 200 || status == 429, "unexpected {status}");
            admitted += usize::from(status == 200);
        }
    }
    (admitted, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_limit_where_local_limits_admit_three_times() {
    bounded(async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let shared = "key = \"subject\"\nrate = \"100/s\"\nburst = 100";
        let cfg = replica_config(
            &up,
            Some(&redis.url()),
            "",
            &[
                ("shared", "/shared/*", &format!("rate_limit = {{ {}, store = \"shared\" }}", shared.replace('\n', ", "))),
                ("local", "/local/*", &format!("rate_limit = {{ {} }}", shared.replace('\n', ", "))),
            ],
        );
        let gws = replicas(3, &cfg, &[]).await;
        let t = token("alice", json!({}));

        let (admitted, took) = paced(&gws, "/shared/x", &t, 3000, Duration::from_secs(3)).await;
        // GCRA: the burst, then one per 10 ms of the time the run actually took.
        let expected = 100.0 + 100.0 * took.as_secs_f64();
        let diff = (admitted as f64 - expected).abs();
        assert!(diff <= 0.05 * expected, "shared: admitted {admitted}, expected {expected:.0} (±5 %) over {took:?}");

        let (local, took) = paced(&gws, "/local/x", &t, 3000, Duration::from_secs(3)).await;
        let one_replica = 100.0 + 100.0 * took.as_secs_f64();
        assert!(local as f64 >= 2.5 * one_replica, "local limits: admitted {local}, about 3 × {one_replica:.0} expected");

        // Every shared decision went to Redis; none fell back.
        let c = plain_client();
        for gw in &gws {
            let text = metrics(&c, gw).await;
            assert!(m(&text, "portcullis_store_requests_total", &[("op", "rate_limit"), ("result", "ok")]) > 0.0);
            assert_eq!(m(&text, "portcullis_rate_limit_fallback_total", &[("route", "shared")]), 0.0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_get_exactly_the_burst() {
    bounded(async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        // No refill within the test: exactly the burst may pass, however the requests interleave.
        let cfg = replica_config(
            &up,
            Some(&redis.url()),
            "",
            &[("burst", "/b/*", "rate_limit = { key = \"route\", rate = \"1/h\", burst = 50, store = \"shared\" }")],
        );
        let gws = replicas(3, &cfg, &[]).await;
        let t = token("alice", json!({}));
        let c = plain_client();
        let clients: Vec<_> = (0..64)
            .map(|i| {
                let urls: Vec<String> = gws.iter().map(|g| g.http_url("/b/x")).collect();
                let (c, t) = (c.clone(), t.clone());
                tokio::spawn(async move {
                    let mut ok = 0;
                    for r in 0..3 {
                        ok += usize::from(get(&c, &urls[(i + r) % 3], Some(&t)).await.status == 200);
                    }
                    ok
                })
            })
            .collect();
        let mut admitted = 0;
        for cl in clients {
            admitted += cl.await.unwrap();
        }
        assert_eq!(admitted, 50, "64 clients × 3 requests against a burst of 50");
        assert_eq!(up.hits(), 50, "only the admitted reached the upstream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_the_fallback_answers_in_time_and_sharing_resumes() {
    bounded(async {
        let Some(mut redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let lim = "key = \"subject\", rate = \"1000/s\", burst = 1000, store = \"shared\"";
        let cfg = replica_config(
            &up,
            Some(&redis.url()),
            "",
            &[
                ("fallback", "/f/*", &format!("rate_limit = {{ {lim} }}")),
                ("allow", "/a/*", &format!("rate_limit = {{ {lim}, on_store_error = \"allow\" }}")),
                ("deny", "/d/*", &format!("rate_limit = {{ {lim}, on_store_error = \"deny\" }}")),
            ],
        );
        let gw = &replicas(1, &cfg, &[]).await[0];
        let c = plain_client();
        let t = token("alice", json!({}));
        assert_eq!(get(&c, &gw.http_url("/f/x"), Some(&t)).await.status, 200);

        redis.kill();
        let mut slowest = Duration::ZERO;
        for _ in 0..40 {
            let started = Instant::now();
            assert_eq!(get(&c, &gw.http_url("/f/x"), Some(&t)).await.status, 200, "the local fallback admits");
            slowest = slowest.max(started.elapsed());
        }
        // The store's timeout is 200 ms; a killed Redis fails at once, the circuit opens after three failures, and
        // then nothing waits for it at all.
        assert!(slowest < Duration::from_millis(200 + 100), "a request waited {slowest:?} with Redis down");
        assert_eq!(get(&c, &gw.http_url("/a/x"), Some(&t)).await.status, 200, "on_store_error = allow");
        let denied = get(&c, &gw.http_url("/d/x"), Some(&t)).await;
        assert_eq!(denied.status, 503, "on_store_error = deny");
        assert_eq!(header(&denied, "retry-after"), Some("1"));
        let text = metrics(&c, gw).await;
        assert_eq!(m(&text, "portcullis_store_up", &[]), 0.0);
        assert!(m(&text, "portcullis_rate_limit_fallback_total", &[("route", "fallback")]) >= 40.0);
        assert!(m(&text, "portcullis_store_requests_total", &[("op", "rate_limit"), ("result", "unavailable")]) > 0.0);
        // Still ready: the fallback serves; the answer says the store is down.
        let ready = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!((ready.status.as_u16(), ready.json()["store"].as_str()), (200, Some("down")));

        redis.restart().await;
        wait_metric(&c, gw, "portcullis_store_up", &[], 1.0, BOUND).await;
        let before = m(&metrics(&c, gw).await, "portcullis_store_requests_total", &[("op", "rate_limit"), ("result", "ok")]);
        assert_eq!(get(&c, &gw.http_url("/f/x"), Some(&t)).await.status, 200);
        let text = metrics(&c, gw).await;
        assert_eq!(m(&text, "portcullis_store_requests_total", &[("op", "rate_limit"), ("result", "ok")]), before + 1.0);
        let ready = get(&c, &gw.admin_url("/readyz"), None).await;
        assert_eq!(ready.json()["store"].as_str(), Some("up"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_spread_over_three_replicas_are_blocked_at_the_configured_count() {
    bounded_by(LONG_TEST_BOUND, async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let hash = bcrypt::hash("right-password", 4).unwrap();
        let users = format!("[users.\"carol\"]\npassword_hash = \"{hash}\"\nroles = []\n");
        let endpoint = "[token_endpoint]\npath = \"/token\"\nissuer = \"hs\"\nusers_file = \"users.toml\"\nallow_plaintext = true\n\
                        rate_limit = { rate = \"1/h\", burst = 4 }\n";
        let cfg = replica_config(&up, Some(&redis.url()), endpoint, &[("all", "/*", "")]);
        let gws = replicas(3, &cfg, &[("users.toml", users.as_bytes())]).await;
        let c = plain_client();
        let login = |gw: &TestGateway, password: &str| {
            let (c, url) = (c.clone(), gw.http_url("/token"));
            let body = format!("grant_type=password&username=carol&password={password}");
            async move { request(&c, Method::POST, &url, &[("content-type", "application/x-www-form-urlencoded")], body.as_bytes()).await }
        };
        for i in 0..4 {
            let a = login(&gws[i % 3], "wrong").await;
            assert_eq!(a.status, 400, "failure {} is an ordinary invalid_grant", i + 1);
        }
        for gw in &gws {
            let a = login(gw, "wrong").await;
            assert_eq!(a.status, 429, "blocked on every replica after 4 failures in all");
            assert!(header(&a, "retry-after").is_some());
            // The right password too: the block is on the account and client, before any hashing.
            assert_eq!(login(gw, "right-password").await.status, 429);
        }
        assert_eq!(redis.keys("portcullis:login:*").await.len(), 1);
    })
    .await;
}

/// Polls `url` with `token` until it is refused with 401, within `within`; returns how long it took.
async fn refused_within(c: &TestClient, url: &str, token: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let a = get(c, url, Some(token)).await;
        if a.status == 401 {
            assert!(header(&a, "www-authenticate").is_some_and(|h| h.contains("invalid_token")));
            return started.elapsed();
        }
        assert_eq!(a.status, 200);
        assert!(started.elapsed() < within, "{url} still accepts the revoked token after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn run_revoke(gw: &TestGateway, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("revoke")
        .arg("--config")
        .arg(gw.dir.path().join("gateway.toml"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "revoke failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_every_replica_within_a_second() {
    bounded(async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let cfg = replica_config(&up, Some(&redis.url()), "", &[("all", "/*", "")]);
        let gws = replicas(3, &cfg, &[]).await;
        let c = plain_client();
        let leaked = token("dave", json!({"jti": "leaked-1"}));
        let other = token("dave", json!({"jti": "other-1"}));
        for gw in &gws {
            // Used (and so cached) on every replica first.
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&leaked)).await.status, 200);
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&leaked)).await.status, 200);
        }
        run_revoke(&gws[0], &["--jti", "leaked-1"]);
        for gw in &gws {
            refused_within(&c, &gw.http_url("/x"), &leaked, Duration::from_secs(1)).await;
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&other)).await.status, 200, "another token of the subject still works");
        }
        let hits = up.hits();
        for gw in &gws {
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&leaked)).await.status, 401);
        }
        assert_eq!(up.hits(), hits, "refused requests never reach the upstream");
        let text = metrics(&c, &gws[2]).await;
        assert_eq!(m(&text, "portcullis_revocations_active", &[]), 1.0);
        assert!(m(&text, "portcullis_auth_failures_total", &[("route", "all"), ("reason", "revoked")]) >= 1.0);

        // Log out everywhere: tokens of the subject issued before the cut-off go, one issued after is fine.
        let mut old_claims = claims(ISS, "erin", json!({}));
        old_claims["iat"] = json!(now() - 30);
        let old = mint_token(&key(), None, &old_claims);
        for gw in &gws {
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&old)).await.status, 200);
        }
        run_revoke(&gws[1], &["--sub", "erin", "--before", "now"]);
        let fresh = token("erin", json!({}));
        for gw in &gws {
            refused_within(&c, &gw.http_url("/x"), &old, Duration::from_secs(1)).await;
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&fresh)).await.status, 200, "issued after the cut-off");
        }
        // A replica started later has loaded what was revoked before it by the time it is ready.
        let late = &replicas(1, &cfg, &[]).await[0];
        for t in [&leaked, &old] {
            assert_eq!(get(&c, &late.http_url("/x"), Some(t)).await.status, 401);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_a_redis_restart_and_a_replica_never_ready_without_them() {
    bounded(async {
        let Some(mut redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let cfg = replica_config(&up, Some(&redis.url()), "", &[("all", "/*", "")]);
        let gws = replicas(2, &cfg, &[]).await;
        let c = plain_client();
        let (first, second) = (token("ida", json!({"jti": "before-restart"})), token("ida", json!({"jti": "after-restart"})));
        run_revoke(&gws[0], &["--jti", "before-restart"]);
        for gw in &gws {
            refused_within(&c, &gw.http_url("/x"), &first, Duration::from_secs(1)).await;
        }
        // Redis restarts empty (no persistence here): the replicas keep what they hold, and follow new entries.
        redis.kill();
        redis.restart().await;
        run_revoke(&gws[1], &["--jti", "after-restart"]);
        for gw in &gws {
            refused_within(&c, &gw.http_url("/x"), &second, Duration::from_secs(3)).await;
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&first)).await.status, 401, "kept though the store forgot it");
        }
        // A replica that starts while Redis is down cannot know what is revoked: it is not ready until it does.
        redis.kill();
        let late = replica(&cfg, &[]).await;
        let a = get(&c, &late.admin_url("/readyz"), None).await;
        assert_eq!((a.status.as_u16(), a.json()["error"].as_str()), (503, Some("revocations_not_loaded")));
        redis.restart().await;
        run_revoke(&gws[0], &["--jti", "while-late-was-down"]);
        wait_ready(&c, &late, BOUND).await;
        assert_eq!(get(&c, &late.http_url("/x"), Some(&token("ida", json!({"jti": "while-late-was-down"})))).await.status, 401);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rfc7009_endpoint_revokes_its_own_tokens_for_their_client() {
    bounded_by(LONG_TEST_BOUND, async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let hash = bcrypt::hash("svc-secret", 4).unwrap();
        let other_hash = bcrypt::hash("other-secret", 4).unwrap();
        let clients = format!(
            "[clients.\"svc\"]\npassword_hash = \"{hash}\"\nroles = []\n[clients.\"other\"]\npassword_hash = \"{other_hash}\"\nroles = []\n"
        );
        let endpoint = "[token_endpoint]\npath = \"/token\"\nissuer = \"hs\"\nclients_file = \"clients.toml\"\nallow_plaintext = true\n";
        let cfg = replica_config(&up, Some(&redis.url()), endpoint, &[("all", "/*", "")]);
        let gws = replicas(2, &cfg, &[("clients.toml", clients.as_bytes())]).await;
        let c = plain_client();
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let issued = request(
            &c,
            Method::POST,
            &gws[0].http_url("/token"),
            &form,
            b"grant_type=client_credentials&client_id=svc&client_secret=svc-secret",
        )
        .await;
        assert_eq!(issued.status, 200, "{}", issued.text());
        let t = issued.json()["access_token"].as_str().unwrap().to_string();
        for gw in &gws {
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&t)).await.status, 200);
        }
        // Another client may not revoke it, nor may anyone without authenticating.
        let body = format!("token={t}&client_id=other&client_secret=other-secret");
        let a = request(&c, Method::POST, &gws[1].http_url("/revoke"), &form, body.as_bytes()).await;
        assert_eq!((a.status.as_u16(), a.json()["error"].as_str()), (400, Some("unauthorized_client")));
        let a = request(&c, Method::POST, &gws[1].http_url("/revoke"), &form, format!("token={t}").as_bytes()).await;
        assert_eq!(a.status, 401);
        assert_eq!(get(&c, &gws[0].http_url("/x"), Some(&t)).await.status, 200, "refused revocations changed nothing");
        // Its client may, on any replica; every replica then refuses it.
        let body = format!("token={t}&token_type_hint=access_token&client_id=svc&client_secret=svc-secret");
        let a = request(&c, Method::POST, &gws[1].http_url("/revoke"), &form, body.as_bytes()).await;
        assert_eq!(a.status, 200);
        for gw in &gws {
            refused_within(&c, &gw.http_url("/x"), &t, Duration::from_secs(1)).await;
        }
        // An unknown token, and a token of another issuer, are answered 200 like a revoked one (RFC 7009 §2.2).
        for unknown in [
            "not-a-token",
            &mint_token(
                &hmac_key(jsonwebtoken::Algorithm::HS256, b"another-key-entirely-32-bytes-long"),
                None,
                &claims(ISS, "x", json!({})),
            ),
        ] {
            let body = format!("token={unknown}&client_id=svc&client_secret=svc-secret");
            assert_eq!(request(&c, Method::POST, &gws[0].http_url("/revoke"), &form, body.as_bytes()).await.status, 200);
        }
        let a = request(&c, Method::POST, &gws[0].http_url("/revoke"), &form, b"client_id=svc&client_secret=svc-secret").await;
        assert_eq!((a.status.as_u16(), a.json()["error"].as_str()), (400, Some("invalid_request")), "no token");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_revocation_holds_on_the_replica_across_reloads() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = replica_config(&up, None, "", &[("all", "/*", "")]);
        let gw = replica(&cfg, &[]).await;
        let c = plain_client();
        let t = token("frank", json!({"jti": "local-1"}));
        assert_eq!(get(&c, &gw.http_url("/x"), Some(&t)).await.status, 200);
        let admin = gw.admin.unwrap().to_string();
        run_revoke(&gw, &["--jti", "local-1", "--until", "1h", "--admin", &admin]);
        assert_eq!(get(&c, &gw.http_url("/x"), Some(&t)).await.status, 401);
        let hits = up.hits();
        gw.gw.as_ref().unwrap().reload().await.expect("reload");
        assert_eq!(get(&c, &gw.http_url("/x"), Some(&t)).await.status, 401, "kept across the reload");
        assert_eq!(up.hits(), hits);
        // A body that is not a revocation is 400.
        let a = request(&c, Method::POST, &gw.admin_url("/revocations"), &[("content-type", "application/json")], b"{\"entry\":{}}").await;
        assert_eq!(a.status, 400);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_garbage_and_script_errors_are_contained() {
    bounded(async {
        let Some(redis) = RedisServer::start().await else { return };
        let up = spawn_upstream().await;
        let cfg = replica_config(
            &up,
            Some(&redis.url()),
            "",
            &[
                // A slow rate keeps each key in Redis (it expires once its bucket is full again) until they are listed.
                ("tenants", "/t/*", "rate_limit = { key = \"claim:tenant\", rate = \"1/m\", store = \"shared\" }"),
                ("errs", "/e/*", "rate_limit = { key = \"route\", rate = \"100/s\", store = \"shared\" }"),
            ],
        );
        let gw = &replicas(1, &cfg, &[]).await[0];
        let c = plain_client();
        let mut conn = redis.connection().await.unwrap();
        let _: () = redis::cmd("SET").arg("canary").arg("alive").query_async(&mut conn).await.unwrap();

        // Claims used as keys: protocol text, key separators, hash tags, a huge value. None reaches Redis as text.
        let hostile = ["x\r\n*1\r\n$8\r\nFLUSHALL\r\n", "a:b:{c}*?[", &"k".repeat(4000), "ünïcødé"];
        for h in hostile {
            assert_eq!(get(&c, &gw.http_url("/t/x"), Some(&token("gina", json!({"tenant": h})))).await.status, 200);
        }
        let keys = redis.keys("portcullis:rl:*").await;
        assert_eq!(keys.len(), hostile.len(), "{keys:?}");
        for k in &keys {
            let hash = k.strip_prefix("portcullis:rl:route:tenants:c:").unwrap_or_else(|| panic!("unexpected key {k:?}"));
            assert!(hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "{k:?}");
        }
        let canary: String = redis::cmd("GET").arg("canary").query_async(&mut conn).await.unwrap();
        assert_eq!(canary, "alive");

        // The script errors (the key holds the wrong type): the request falls back, nothing panics.
        let _: () = redis::cmd("HSET").arg("portcullis:rl:route:errs:all").arg("f").arg("v").query_async(&mut conn).await.unwrap();
        for _ in 0..5 {
            assert_eq!(get(&c, &gw.http_url("/e/x"), Some(&token("gina", json!({})))).await.status, 200);
        }
        let text = metrics(&c, gw).await;
        assert_eq!(m(&text, "portcullis_rate_limit_fallback_total", &[("route", "errs")]), 5.0);
        assert_eq!(m(&text, "portcullis_store_requests_total", &[("op", "rate_limit"), ("result", "error")]), 5.0);
        // One bad key is not a dead store: the circuit stays closed and every other limit still counts in Redis.
        assert_eq!(m(&text, "portcullis_store_up", &[]), 1.0);
        assert_eq!(get(&c, &gw.http_url("/t/x"), Some(&token("gina", json!({"tenant": "fine"})))).await.status, 200);
        assert_eq!(m(&metrics(&c, gw).await, "portcullis_rate_limit_fallback_total", &[("route", "tenants")]), 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_answers_garbage_is_down_and_the_fallback_serves() {
    bounded(async {
        // Not Redis: answers every connection with bytes that are no RESP reply.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(b"HTTP/1.1 200 OK\r\n\x00\xff garbage\r\n").await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let up = spawn_upstream().await;
        let cfg = replica_config(
            &up,
            Some(&format!("redis://{addr}/0")),
            "",
            &[("all", "/*", "rate_limit = { key = \"ip\", rate = \"100/s\", store = \"shared\" }")],
        );
        let gw = replica(&cfg, &[]).await;
        let c = plain_client();
        for _ in 0..5 {
            assert_eq!(get(&c, &gw.http_url("/x"), Some(&token("hal", json!({})))).await.status, 200);
        }
        let text = metrics(&c, &gw).await;
        assert_eq!(m(&text, "portcullis_store_up", &[]), 0.0);
        assert_eq!(m(&text, "portcullis_rate_limit_fallback_total", &[("route", "all")]), 5.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_managed_primary_is_found_through_the_sentinels() {
    bounded(async {
        let Some(redis) = RedisServer::start().await else { return };
        let sentinel = Sentinel::start(&redis).await;
        let up = spawn_upstream().await;
        let cfg = replica_config(
            &up,
            None,
            "",
            &[("b", "/b/*", "rate_limit = { key = \"route\", rate = \"1/h\", burst = 2, store = \"shared\" }")],
        )
        .replace(
            "[[issuers]]",
            &format!("[store]\nsentinels = [\"127.0.0.1:{}\"]\nmaster_name = \"mymaster\"\n\n[[issuers]]", sentinel.port),
        );
        let gws = replicas(2, &cfg, &[]).await;
        let c = plain_client();
        let t = token("ivan", json!({}));
        let statuses = [
            get(&c, &gws[0].http_url("/b/x"), Some(&t)).await.status,
            get(&c, &gws[1].http_url("/b/x"), Some(&t)).await.status,
            get(&c, &gws[0].http_url("/b/x"), Some(&t)).await.status,
        ];
        assert_eq!(statuses.map(|s| s.as_u16()), [200, 200, 429], "one burst of 2 across both");
        assert_eq!(redis.keys("portcullis:rl:route:b:all").await.len(), 1);
    })
    .await;
}

#[test]
fn a_malformed_store_is_refused_at_its_line() {
    let up = Upstream::at("127.0.0.1:9".parse().unwrap());
    for (store, wanted) in [
        ("url = \"redis://127.0.0.1:notaport/0\"", "[store] url"),
        ("url = \"http://127.0.0.1:6379\"", "must start with redis://"),
        ("sentinels = [\"127.0.0.1:26379\"]", "needs master_name"),
        ("url = \"redis://127.0.0.1:6379\"\npool_size = 0", "pool_size"),
        ("url = \"redis://127.0.0.1:6379\"\nunknown = 1", "unknown field"),
        ("url = \"redis://127.0.0.1:6379\"\nca_file = \"ca.pem\"", "ca_file is for TLS"),
    ] {
        let cfg = format!("{}\n[store]\n{store}\n", replica_config(&up, None, "", &[("all", "/*", "")]));
        let e = Config::from_toml(std::path::Path::new("gateway.toml"), &cfg).unwrap_err();
        let p = e.problems().iter().find(|p| p.message.contains(wanted)).unwrap_or_else(|| panic!("{store}: {e}"));
        let line = cfg.lines().position(|l| l == "[store]").unwrap() + 1;
        assert!(p.line >= line, "{store}: reported at line {} before [store] at {line}", p.line);
    }
    // A shared limit needs a store.
    let cfg = replica_config(&up, None, "", &[("all", "/*", "rate_limit = { rate = \"1/s\", store = \"shared\" }")]);
    let e = Config::from_toml(std::path::Path::new("gateway.toml"), &cfg).unwrap_err();
    assert!(e.to_string().contains("needs a [store] section"), "{e}");
}
