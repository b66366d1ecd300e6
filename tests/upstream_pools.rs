//! Upstream pools against real servers on loopback: balancing, health checks and ejection, retries and their
//! budget, consistent hashing, HTTP/2 upstreams, gRPC through the gateway, re-resolution and hot reload.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A gateway on plain http (and admin) with `upstream` as `[upstreams.pool]` and `routes`, plus `extra`.
fn pool_config(upstream: &str, routes: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[limits]
max_requests_per_client = 4096

[upstreams.pool]
connect_timeout = "500ms"
timeout = "5s"
{upstream}

{extra}

{routes}
"#
    )
}

const PUBLIC_ROUTE: &str = "[[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"pool\"\nauth = \"public\"\n";

fn targets(backends: &[&Backend]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.url())).collect();
    format!("targets = [{}]", list.join(", "))
}

/// Which backend answered.
fn backend_of(a: &Answer) -> String {
    header(a, "x-backend").unwrap_or("-").to_string()
}

/// Sends `n` GETs, `conc` at a time, and returns the answers' statuses and backends.
async fn spray(c: &TestClient, url: &str, n: usize, conc: usize, token: Option<&str>) -> Vec<(u16, String)> {
    let mut out = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(conc);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (c, url, token) = (c.clone(), url.to_string(), token.map(str::to_string));
            set.spawn(async move {
                let a = get(&c, &url, token.as_deref()).await;
                (a.status.as_u16(), backend_of(&a))
            });
        }
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        left -= batch;
    }
    out
}

fn shares(answers: &[(u16, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, b) in answers {
        *m.entry(b.clone()).or_insert(0) += 1;
    }
    m
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn weighted_round_robin_gives_each_target_its_share() {
    bounded(async {
        let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
        let up = format!("targets = [\"{}\", \"{}\", {{ url = \"{}\", weight = 2 }}]", a.url(), b.url(), c.url());
        let gw = spawn_gateway(&pool_config(&up, PUBLIC_ROUTE, "")).await;
        let client = plain_client();
        let answers = spray(&client, &gw.http_url("/x"), 3000, 16, None).await;
        assert!(answers.iter().all(|(s, _)| *s == 200));
        let got = shares(&answers);
        for (name, want) in [("a", 0.25), ("b", 0.25), ("c", 0.5)] {
            let share = got.get(name).copied().unwrap_or(0) as f64 / 3000.0;
            assert!((share - want).abs() <= want * 0.05, "{name}: share {share:.3}, want {want} ± 5 %: {got:?}");
        }
        // Counted per target, by status class.
        let m = metrics(&client, &gw).await;
        let counted = sample(
            &m,
            "portcullis_upstream_requests_total",
            &[("upstream", "pool"), ("target", &c.addr.to_string()), ("status_class", "2xx")],
        );
        assert_eq!(counted as usize, got["c"]);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn least_request_prefers_the_target_with_less_in_flight() {
    bounded(async {
        let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
        slow.set_delay(Duration::from_millis(200));
        let up = format!("{}\nbalance = \"least_request\"", targets(&[&fast, &slow]));
        let gw = spawn_gateway(&pool_config(&up, PUBLIC_ROUTE, "")).await;
        // 8 clients, each sending its next request as soon as the last is answered.
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, url) = (plain_client(), gw.http_url("/x"));
            workers.spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..25 {
                    let a = get(&client, &url, None).await;
                    seen.push((a.status.as_u16(), backend_of(&a)));
                }
                seen
            });
        }
        let mut answers = Vec::new();
        while let Some(r) = workers.join_next().await {
            answers.extend(r.unwrap());
        }
        let got = shares(&answers);
        assert!(answers.iter().all(|(s, _)| *s == 200));
        // Round robin would give each half; the slow target holds its requests, so it is mostly passed over.
        assert!(got.get("fast").copied().unwrap_or(0) > 3 * got.get("slow").copied().unwrap_or(0), "{got:?}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_killed_target_is_ejected_without_client_errors_and_comes_back() {
    bounded(async {
        let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
        let interval_ms = 200;
        let up = format!(
            "{}\n[upstreams.pool.health]\npath = \"/healthz\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"150ms\"\nunhealthy_after = 2\nhealthy_after = 2\neject_after_errors = 0\n",
            targets(&[&a, &b, &c])
        );
        // A third of the traffic fails until b is ejected (passive ejection is off here): the budget must cover it,
        // or the test measures how fast this machine spends the default 20 %.
        let route = format!("{PUBLIC_ROUTE}retries = {{ attempts = 2, on = [\"connect\", \"reset\"], budget_percent = 100 }}\n");
        let gw = spawn_gateway(&pool_config(&up, &route, "")).await;
        let client = plain_client();
        let target_b = b.addr.to_string();
        let healthy_b = [("upstream", "pool"), ("target", target_b.as_str())];
        wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &healthy_b, 1.0, BOUND).await;

        // Traffic all along: 8 clients in a loop until told to stop.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, url, stop) = (client.clone(), gw.http_url("/x"), stop.clone());
            load.spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let a = get(&client, &url, None).await;
                    seen.push((a.status.as_u16(), backend_of(&a), Instant::now()));
                }
                seen
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        b.stop();
        // Out within unhealthy_after × interval (plus one interval for the check in flight, and scheduling).
        wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &healthy_b, 0.0, BOUND).await;
        let out_after = killed.elapsed();
        assert!(out_after <= Duration::from_millis(3 * interval_ms + 300), "ejected after {out_after:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.restart().await;
        let back = Instant::now();
        wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &healthy_b, 1.0, BOUND).await;
        assert!(back.elapsed() <= Duration::from_millis(3 * interval_ms + 300), "healthy again after {:?}", back.elapsed());
        let hits_back = b.hits();
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut all = Vec::new();
        while let Some(r) = load.join_next().await {
            all.extend(r.unwrap());
        }
        let errors: Vec<_> = all
            .iter()
            .filter(|(s, _, _)| *s != 200)
            .map(|(s, t, at)| (s, t, at.saturating_duration_since(killed), at.saturating_duration_since(back)))
            .collect();
        assert!(
            errors.is_empty(),
            "{} of {} requests failed (status, target, since the kill, since the restart): {:?}",
            errors.len(),
            all.len(),
            &errors[..errors.len().min(5)]
        );
        assert!(b.hits() > hits_back, "b got no traffic after it came back");
        let m = metrics(&client, &gw).await;
        assert!(sample(&m, "portcullis_upstream_retries_total", &[("upstream", "pool"), ("reason", "connect")]) >= 1.0
            || sample(&m, "portcullis_upstream_retries_total", &[("upstream", "pool"), ("reason", "reset")]) >= 1.0);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn passive_ejection_takes_a_failing_target_out_and_readyz_names_a_dead_upstream() {
    bounded(async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        b.set_status(503);
        let up = format!("{}\n[upstreams.pool.health]\neject_after_errors = 3\neject_for = \"1m\"\n", targets(&[&a, &b]));
        let gw = spawn_gateway(&pool_config(&up, PUBLIC_ROUTE, "")).await;
        let client = plain_client();
        let answers = spray(&client, &gw.http_url("/x"), 40, 1, None).await;
        // b answered 503 three times, then got nothing more.
        assert_eq!(answers.iter().filter(|(s, _)| *s == 503).count(), 3, "{answers:?}");
        assert_eq!(b.hits(), 3);
        let m = metrics(&client, &gw).await;
        let target_b = b.addr.to_string();
        let labels = [("upstream", "pool"), ("target", target_b.as_str())];
        assert_eq!(sample(&m, "portcullis_upstream_ejections_total", &labels), 1.0);
        assert_eq!(metric(&m, "portcullis_upstream_target_healthy", &labels), Some(0.0));
        let ready = get(&client, &gw.admin_url("/readyz"), None).await;
        assert_eq!((ready.status.as_u16(), ready.text()), (200, "{\"status\":\"ready\"}".to_string()));
        gw.stop().await;

        // Every target of an upstream down: still ready, and named; requests still tried (panic mode).
        let (d1, d2) = (Backend::start("d1").await, Backend::start("d2").await);
        d1.stop();
        d2.stop();
        let up = format!(
            "{}\n[upstreams.pool.health]\npath = \"/healthz\"\ninterval = \"100ms\"\nunhealthy_after = 1\nhealthy_after = 1000\n",
            targets(&[&d1, &d2])
        );
        let gw = spawn_gateway(&pool_config(&up, PUBLIC_ROUTE, "")).await;
        for d in [&d1, &d2] {
            let target = d.addr.to_string();
            wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &[("upstream", "pool"), ("target", &target)], 0.0, BOUND).await;
        }
        let ready = get(&client, &gw.admin_url("/readyz"), None).await;
        assert_eq!(ready.status, 200);
        assert_eq!(ready.json()["upstreams_without_healthy_target"], serde_json::json!(["pool"]));
        // Both still marked down (healthy_after is out of reach), one of them answering again: it is tried.
        d2.restart().await;
        for _ in 0..4 {
            let a = get(&client, &gw.http_url("/x"), None).await;
            assert!(a.status == 200 || a.status == 502, "{}", a.status);
        }
        assert!(d2.hits() >= 1, "panic mode still sends to targets marked down");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retries_stay_within_their_budget_and_the_client_gets_the_503() {
    bounded(async {
        let bs = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
        for b in &bs {
            b.set_status(503);
        }
        // No ejection here: every answer is a 503, and the budget alone must hold the retries back.
        let up = format!("{}\n[upstreams.pool.health]\neject_after_errors = 0\n", targets(&[&bs[0], &bs[1], &bs[2]]));
        let route = format!("{PUBLIC_ROUTE}retries = {{ attempts = 2, on = [\"503\"], budget_percent = 20 }}\n");
        let gw = spawn_gateway(&pool_config(&up, &route, "")).await;
        let client = plain_client();
        let n = 300;
        let answers = spray(&client, &gw.http_url("/x"), n, 4, None).await;
        assert!(answers.iter().all(|(s, _)| *s == 503), "the client gets the upstream's 503");
        let m = metrics(&client, &gw).await;
        let retries = sample(&m, "portcullis_upstream_retries_total", &[("upstream", "pool"), ("reason", "503")]) as usize;
        let hits: usize = bs.iter().map(Backend::hits).sum();
        assert_eq!(hits, n + retries, "every retry reached a target");
        // 20 % of the requests, plus the floor of 3 per window.
        assert!(retries <= n / 5 + 3, "{retries} retries for {n} requests");
        assert!(retries >= n / 5 - 10, "the budget was used: {retries}");
        // A POST is not retried on a 503 (it may have been acted on).
        let before: usize = bs.iter().map(Backend::hits).sum();
        let a = request(&client, http::Method::POST, &gw.http_url("/x"), &[], b"").await;
        assert_eq!(a.status, 503);
        assert_eq!(bs.iter().map(Backend::hits).sum::<usize>(), before + 1);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn hashing_by_subject_is_sticky_and_moves_only_the_removed_targets_share() {
    bounded(async {
        let issuer = TestIssuer::new();
        let bs = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
        let route = "[[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"pool\"\n";
        let cfg = |list: &[&Backend]| pool_config(&format!("{}\nbalance = \"hash:claim:sub\"", targets(list)), route, &issuer.config());
        let client = plain_client();
        let subjects: Vec<String> = (0..120).map(|i| format!("user-{i}")).collect();
        let place = |gw: TestGateway| {
            let (client, subjects) = (client.clone(), subjects.clone());
            let tokens: Vec<String> = subjects.iter().map(|s| issuer.token(s, &[])).collect();
            async move {
                let mut at = HashMap::new();
                for (s, t) in subjects.iter().zip(&tokens) {
                    let seen: Vec<String> = spray(&client, &gw.http_url("/x"), 3, 3, Some(t))
                        .await
                        .into_iter()
                        .map(|(st, b)| {
                            assert_eq!(st, 200);
                            b
                        })
                        .collect();
                    assert!(seen.iter().all(|b| *b == seen[0]), "{s} went to {seen:?}");
                    at.insert(s.clone(), seen[0].clone());
                }
                gw.stop().await;
                at
            }
        };
        let before = place(issuer.gateway(&cfg(&[&bs[0], &bs[1], &bs[2]])).await).await;
        let spread = shares(&before.values().map(|b| (200, b.clone())).collect::<Vec<_>>());
        assert_eq!(spread.len(), 3, "every target has keys: {spread:?}");
        // Another replica agrees; without "b", only b's subjects move.
        let again = place(issuer.gateway(&cfg(&[&bs[0], &bs[1], &bs[2]])).await).await;
        assert_eq!(before, again);
        let after = place(issuer.gateway(&cfg(&[&bs[0], &bs[2]])).await).await;
        for s in &subjects {
            if before[s] != "b" {
                assert_eq!(before[s], after[s], "{s} moved though its target stayed");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_http2_upstream_carries_a_thousand_concurrent_requests_on_few_connections() {
    bounded(async {
        let b = Backend::start("h2").await;
        b.set_delay(Duration::from_millis(100));
        let up = format!("{}\nprotocol = \"h2\"\nmax_connections = 2000", targets(&[&b]));
        let gw = spawn_gateway(&pool_config(&up, PUBLIC_ROUTE, "")).await;
        // Many client connections (HTTP/1.1, one request each at a time), 1000 requests in flight at once.
        let client = plain_client();
        let started = Instant::now();
        let answers = spray(&client, &gw.http_url("/x"), 1000, 1000, None).await;
        assert!(answers.iter().all(|(s, _)| *s == 200), "{:?}", answers.iter().find(|(s, _)| *s != 200));
        assert_eq!(b.hits(), 1000);
        let conns = b.connections.load(std::sync::atomic::Ordering::SeqCst);
        assert!(conns <= 4, "{conns} upstream connections for 1000 concurrent requests");
        // Concurrent, not one after another: 1000 × 100 ms in a few seconds.
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn targets_follow_the_addresses_a_name_resolves_to() {
    bounded(async {
        let a = Backend::start_at("a", "127.0.0.2:0".parse().unwrap()).await;
        let b = Backend::start_at("b", SocketAddr::new("127.0.0.3".parse().unwrap(), a.addr.port())).await;
        let answer: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(vec![a.addr]));
        let asked = answer.clone();
        let resolver: portcullis::upstream::Resolver = Arc::new(move |host: &str, port: u16| {
            let addrs =
                if host == "pool.test" { asked.lock().unwrap().iter().map(|a| SocketAddr::new(a.ip(), port)).collect() } else { vec![] };
            Box::pin(async move { Ok(addrs) })
        });
        let up = format!("targets = [\"http://pool.test:{}\"]\nresolve_every = \"100ms\"\npreserve_host = false", a.addr.port());
        let gw = spawn_gateway_resolving(&pool_config(&up, PUBLIC_ROUTE, ""), &[], resolver).await;
        let client = plain_client();
        let (ta, tb) = (a.addr.to_string(), b.addr.to_string());
        wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &[("upstream", "pool"), ("target", &ta)], 1.0, BOUND).await;
        let got = shares(&spray(&client, &gw.http_url("/x"), 20, 4, None).await);
        assert_eq!(got.get("a"), Some(&20), "{got:?}");

        *answer.lock().unwrap() = vec![a.addr, b.addr];
        wait_metric(&client, &gw, "portcullis_upstream_target_healthy", &[("upstream", "pool"), ("target", &tb)], 1.0, BOUND).await;
        let got = shares(&spray(&client, &gw.http_url("/x"), 40, 4, None).await);
        assert_eq!((got.get("a"), got.get("b")), (Some(&20), Some(&20)), "{got:?}");

        *answer.lock().unwrap() = vec![b.addr];
        let deadline = Instant::now() + BOUND;
        while metric(&metrics(&client, &gw).await, "portcullis_upstream_target_healthy", &[("upstream", "pool"), ("target", &ta)]).is_some()
        {
            assert!(Instant::now() < deadline, "a's target was not removed");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let got = shares(&spray(&client, &gw.http_url("/x"), 20, 4, None).await);
        assert_eq!(got.get("b"), Some(&20), "{got:?}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_reload_changes_the_targets_without_dropping_requests_in_flight() {
    bounded(async {
        let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
        let gw = spawn_gateway(&pool_config(&targets(&[&a]), PUBLIC_ROUTE, "")).await;
        let client = plain_client();
        let slow = {
            let (client, url) = (client.clone(), gw.http_url("/slow"));
            tokio::spawn(async move { get(&client, &url, None).await })
        };
        let deadline = Instant::now() + BOUND;
        while a.hits() == 0 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        write_atomic(&gw.dir.path().join("gateway.toml"), pool_config(&targets(&[&b, &c]), PUBLIC_ROUTE, "").as_bytes());
        gw.gw.as_ref().unwrap().reload().await.unwrap();
        let got = shares(&spray(&client, &gw.http_url("/x"), 20, 2, None).await);
        assert_eq!((got.get("b"), got.get("c"), got.get("a")), (Some(&10), Some(&10), None), "{got:?}");
        let held = slow.await.unwrap();
        assert_eq!((held.status.as_u16(), backend_of(&held)), (200, "a".to_string()), "the request in flight finished on its target");
        let m = metrics(&client, &gw).await;
        assert_eq!(metric(&m, "portcullis_upstream_target_healthy", &[("upstream", "pool"), ("target", &a.addr.to_string())]), None);
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_route_timeout_overrides_the_upstreams() {
    bounded(async {
        let a = Backend::start("a").await;
        let route = format!("{PUBLIC_ROUTE}timeout = \"150ms\"\n");
        let gw = spawn_gateway(&pool_config(&targets(&[&a]), &route, "")).await;
        let client = plain_client();
        let started = Instant::now();
        let a1 = get(&client, &gw.http_url("/slow"), None).await;
        assert_eq!(a1.status, 504);
        // The route's 150 ms, not the upstream's 5 s (generous for a slow machine).
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn check_locates_every_pool_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let cfg = r#"
[listen]
http = "127.0.0.1:0"

[upstreams.a]
targets = ["http://127.0.0.1:1/v1", { url = "http://127.0.0.1:2", weight = 0 }]

[upstreams.b]
url = "http://127.0.0.1:3"
balance = "random"

[upstreams.c]
url = "http://127.0.0.1:4"
balance = "hash:header:"

[upstreams.d]
url = "http://127.0.0.1:5"
balance = "hash:claim:tenant"

[upstreams.e]
targets = ["http://127.0.0.1:6", "https://127.0.0.1:7"]

[upstreams.g]
url = "http://127.0.0.1:9"
protocol = "h3"

[upstreams.f]
url = "http://127.0.0.1:8"
[upstreams.f.health]
interval = "0s"

[[routes]]
name = "r"
path = "/*"
upstream = "d"
auth = "public"
retries = { attempts = 0, on = ["404"] }
"#;
    std::fs::write(&path, cfg).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    for want in [
        "target \"http://127.0.0.1:1/v1\" has a path",
        "weight 0",
        "unknown balance \"random\"",
        "is not a header name",
        "balances by claim \"tenant\"",
        "same scheme",
        "unknown variant `h3`",
        "health checks need a path",
        "retries.attempts must be 1 to 10",
        "\"404\" is not connect, reset, timeout or a 5xx status",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // Located: every line names file:line:column.
    for line in err.lines().filter(|l| l.contains("upstream") || l.contains("route")) {
        assert!(line.contains("gateway.toml:"), "not located: {line}");
    }
}

#[tokio::test]
async fn explain_names_the_upstream_its_targets_and_the_balancing_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let issuer = TestIssuer::new();
    std::fs::write(dir.path().join("issuer.pub.pem"), &issuer.key.public_pem).unwrap();
    let up = "targets = [\"http://127.0.0.1:8001\", { url = \"http://127.0.0.1:8002\", weight = 3 }]\nbalance = \"hash:claim:tenant\"";
    let route = "[[routes]]\nname = \"all\"\npath = \"/*\"\nupstream = \"pool\"\ntimeout = \"2s\"\nretries = { attempts = 1 }\n";
    std::fs::write(&path, pool_config(up, route, &issuer.config())).unwrap();
    let cfg = Config::load(&path).unwrap();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "alice".into());
    claims.insert("tenant".into(), "acme".into());
    let creds = portcullis::tools::explain::Credentials::Claims { claims, issuer: Some("test".into()) };
    let decisions = portcullis::tools::explain::explain(&cfg, &http::Method::GET, "/x", creds).await.unwrap();
    let lines = decisions[0].lines.join("\n");
    assert!(
        lines.contains("upstream \"pool\": hash:claim:tenant over [http://127.0.0.1:8001 (weight 1), http://127.0.0.1:8002 (weight 3)], key tenant=\"acme\""),
        "{lines}"
    );
    assert!(lines.contains("timeout 2s, up to 1 retries within 20% of requests"), "{lines}");
}
