//! Rate limits, secure response headers and CORS, end to end: a real gateway on loopback, a real echo upstream,
//! tokens signed here with a real Ed25519 key.
//!
//! Two clients with different addresses on one machine: the loopback network is all of 127.0.0.0/8, so a
//! client socket bound to 127.0.0.2 is a second client address. Every refusal asserts the upstream was not
//! reached. Every test body runs under a time bound.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use common::*;
use http::Method;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::Algorithm;
use portcullis::edge::ratelimit::{LimitKey, LimitSettings, Limiter};
use serde_json::json;

// ------------------------------------------------------------------------------------------------------------
// Clients and answers.

/// A client of `gw` whose connections come from `local` (any 127.x.y.z address is loopback).
fn client_from(gw: &TestGateway, local: &str) -> TestClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_local_address(Some(local.parse::<IpAddr>().unwrap()));
    let tls = tls_config(&gw.cert_path(), &[]);
    let conn = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(conn)
}

/// Every value of a field (a field the gateway sets must not also arrive with the upstream's value).
fn all<'a>(a: &'a Answer, name: &str) -> Vec<&'a str> {
    a.headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
}

/// The base config, a `[rate_limit]` table with these lines, and one public route: `/api/*`.
fn rate_limited_api(up: &Upstream, rate_limit: &str) -> String {
    ConfigBuilder::new(up).section(&format!("[rate_limit]\n{rate_limit}")).route("api", "/api/*", AUTH_PUBLIC).build()
}

// ------------------------------------------------------------------------------------------------------------
// Global IP limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_ip_limit_refuses_burst_plus_one_and_spares_other_clients() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = rate_limited_api(&up, r#"global = { key = "ip", rate = "1/min", burst = 5 }"#);
        let gw = spawn_gateway(&cfg).await;
        let first = client_from(&gw, "127.0.0.1");
        for i in 0..5 {
            let a = get(&first, &gw.https_url("/api/x"), None).await;
            assert_eq!(a.status, 200, "request {i}: {}", a.text());
        }
        let a = get(&first, &gw.https_url("/api/x"), None).await;
        assert_eq!(a.status, 429, "{}", a.text());
        assert_eq!(a.text(), r#"{"error":"rate_limited"}"#);
        let retry: u64 = header(&a, "retry-after").expect("Retry-After").parse().expect("whole seconds");
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert_eq!(header(&a, "ratelimit-limit"), Some("5"));
        assert_eq!(header(&a, "ratelimit-remaining"), Some("0"));
        let reset: u64 = header(&a, "ratelimit-reset").expect("RateLimit-Reset").parse().unwrap();
        assert!((1..=60).contains(&reset));
        assert_eq!(header(&a, "cache-control"), Some("no-store"));
        assert_eq!(up.hits(), 5, "the upstream must see exactly `burst` requests");

        // The same address on the plaintext listener shares the bucket: it is keyed by client, not listener.
        let a = get(&first, &gw.http_url("/api/x"), None).await;
        assert_eq!(a.status, 429);

        let second = client_from(&gw, "127.0.0.2");
        let a = get(&second, &gw.https_url("/api/x"), None).await;
        assert_eq!(a.status, 200, "a second client was limited: {}", a.text());
        assert_eq!(up.hits(), 6);
        assert_eq!(up.last().unwrap().headers["x-forwarded-for"], "127.0.0.2");

        let text = metrics(&first, &gw).await;
        assert_eq!(metric(&text, "portcullis_rate_limited_total", &[("route", "-"), ("key", "ip")]), Some(2.0), "{text}");
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Per-subject limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_subject_limits_are_independent_and_bad_tokens_spend_nothing() {
    bounded(async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .section("[rate_limit]\nglobal = { key = \"ip\", rate = \"1/min\", burst = 20 }")
            .section(&iss.config())
            .issuer("second", "https://second.test", &["EdDSA"], r#"public_keys = ["second.pub.pem"]"#)
            .route("search", "/search", r#"rate_limit = { key = "subject", rate = "1/min", burst = 3 }"#)
            .build();
        let second = test_key(Algorithm::EdDSA);
        let gw = iss.gateway_with(&cfg, &[("second.pub.pem", second.public_pem.as_bytes())]).await;
        let url = gw.https_url("/search");

        // A flood of forged tokens for alice, from another address: the first 20 are checked and refused, the
        // rest stop at the global limit before any signature check. Alice's own bucket is untouched.
        let forger = test_key(Algorithm::EdDSA);
        let forged = mint_token(&forger, None, &claims(TestIssuer::ISS, "alice", json!({})));
        let flood = client_from(&gw, "127.0.0.2");
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(get(&flood, &url, Some(&forged)).await.status.as_u16());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 20, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10, "{statuses:?}");
        assert_eq!(up.hits(), 0);

        let c = client_from(&gw, "127.0.0.1");
        let text = metrics(&c, &gw).await;
        assert_eq!(
            metric(&text, "portcullis_auth_failures_total", &[("route", "search"), ("reason", "bad_signature")]),
            Some(20.0),
            "signatures checked past the global limit:\n{text}"
        );

        let alice = iss.token("alice", &["user"]);
        let bob = iss.token("bob", &["user"]);
        for (who, token) in [("alice", &alice), ("bob", &bob)] {
            for i in 0..3 {
                let a = get(&c, &url, Some(token)).await;
                assert_eq!(a.status, 200, "{who} request {i}: {}", a.text());
            }
            let before = up.hits();
            let a = get(&c, &url, Some(token)).await;
            assert_eq!(a.status, 429, "{who} past the burst: {}", a.text());
            assert_eq!(header(&a, "ratelimit-limit"), Some("3"));
            assert!(header(&a, "retry-after").is_some());
            assert_eq!(up.hits(), before, "a limited request reached the upstream");
        }
        assert_eq!(up.hits(), 6);
        // Another issuer's "alice" is another caller: her own bucket, not the first alice's.
        let other_alice = mint_token(&second, None, &claims("https://second.test", "alice", json!({})));
        let a = get(&c, &url, Some(&other_alice)).await;
        assert_eq!(a.status, 200, "a subject of another issuer shared the bucket: {}", a.text());
        let text = metrics(&c, &gw).await;
        assert_eq!(metric(&text, "portcullis_rate_limited_total", &[("route", "search"), ("key", "subject")]), Some(2.0), "{text}");
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// X-Forwarded-For only from trusted proxies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_limits_count_numbers_and_never_fall_back_to_the_address_for_a_token() {
    bounded(async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .section(&iss.config())
            .route("tenant", "/t", r#"rate_limit = { key = "claim:tenant", rate = "1/min", burst = 2 }"#)
            .build();
        let gw = iss.gateway(&cfg).await;
        let url = gw.https_url("/t");
        let tok =
            |sub: &str, tenant: serde_json::Value| mint_token(&iss.key, None, &claims(TestIssuer::ISS, sub, json!({ "tenant": tenant })));
        let (a, b, c) = (client_from(&gw, "127.0.0.1"), client_from(&gw, "127.0.0.3"), client_from(&gw, "127.0.0.4"));
        // Tenant 42, a number, over three users and two addresses: one bucket.
        assert_eq!(get(&a, &url, Some(&tok("u1", json!(42)))).await.status, 200);
        assert_eq!(get(&b, &url, Some(&tok("u2", json!(42)))).await.status, 200);
        assert_eq!(get(&a, &url, Some(&tok("u3", json!(42)))).await.status, 429, "a numeric tenant was keyed by address");
        // Tenant 43 from the same address has its own bucket.
        assert_eq!(get(&a, &url, Some(&tok("u1", json!(43)))).await.status, 200);
        // A token without a value to count by is counted by its subject, wherever it comes from.
        let none = tok("u4", serde_json::Value::Null);
        assert_eq!(get(&a, &url, Some(&none)).await.status, 200);
        assert_eq!(get(&b, &url, Some(&none)).await.status, 200);
        assert_eq!(get(&c, &url, Some(&none)).await.status, 429, "a token without the claim bought a bucket per address");
        assert_eq!(up.hits(), 5);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_changes_the_key_only_from_a_trusted_proxy() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = rate_limited_api(
            &up,
            "trusted_proxies = [\"127.0.0.2\", \"10.0.0.0/8\"]\nglobal = { key = \"ip\", rate = \"1/min\", burst = 2 }",
        );
        let gw = spawn_gateway(&cfg).await;
        let url = gw.https_url("/api/x");

        // Untrusted peer: whatever it claims, it is keyed by its socket address.
        let untrusted = client_from(&gw, "127.0.0.1");
        assert_eq!(get_with(&untrusted, &url, &[("x-forwarded-for", "1.2.3.4")]).await.status, 200);
        assert_eq!(up.last().unwrap().headers["x-forwarded-for"], "127.0.0.1", "a spoofed X-Forwarded-For was passed on");
        assert_eq!(get_with(&untrusted, &url, &[("x-forwarded-for", "5.6.7.8")]).await.status, 200);
        let a = get_with(&untrusted, &url, &[("x-forwarded-for", "9.9.9.9")]).await;
        assert_eq!(a.status, 429, "a spoofed X-Forwarded-For bought a fresh bucket");
        assert_eq!(up.hits(), 2);

        // Trusted proxy: the right-most untrusted address is the client.
        let proxy = client_from(&gw, "127.0.0.2");
        let ok = |hops: &'static [&'static str]| {
            let (proxy, url) = (&proxy, &url);
            async move {
                let headers: Vec<(&str, &str)> = hops.iter().map(|h| ("x-forwarded-for", *h)).collect();
                get_with(proxy, url, &headers).await.status.as_u16()
            }
        };
        assert_eq!(ok(&["1.2.3.4"]).await, 200, "1.2.3.4 has its own bucket, not 127.0.0.1's");
        assert_eq!(up.last().unwrap().headers["x-forwarded-for"], "1.2.3.4, 127.0.0.2");
        assert_eq!(ok(&["1.2.3.4"]).await, 200);
        assert_eq!(ok(&["1.2.3.4"]).await, 429, "1.2.3.4 used its burst");
        assert_eq!(ok(&["1.2.3.4, 10.0.0.7"]).await, 429, "trusted hops on the right are skipped");
        assert_eq!(ok(&["1.2.3.4, 7.7.7.7"]).await, 200, "the left-most entry is the client's to forge: the right-most untrusted counts");
        assert_eq!(ok(&["7.7.7.7", "10.1.1.1"]).await, 200, "X-Forwarded-For lines are merged in order");
        assert_eq!(ok(&["6.6.6.6, 7.7.7.7"]).await, 429, "7.7.7.7 used its burst");
        // Garbage is neither trusted nor fatal: it falls back to the peer's own address.
        assert_eq!(ok(&["oh, hi,,,"]).await, 200);
        assert_eq!(ok(&["oh, hi,,"]).await, 200);
        assert_eq!(ok(&["not an address"]).await, 429, "garbage is keyed as the proxy itself");
        // An empty entry (a load balancer's trailing comma) is not a hop: the address left of it is the client.
        assert_eq!(ok(&["8.8.8.8, "]).await, 200, "8.8.8.8 has its own bucket");
        assert_eq!(up.hits(), 9);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_that_writes_forwarded_a_clients_own_x_forwarded_for_buys_nothing() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = rate_limited_api(
            &up,
            "trusted_proxies = [\"127.0.0.2\"]\nforwarded_header = \"forwarded\"\nglobal = { key = \"ip\", rate = \"1/min\", burst = 2 }",
        );
        let gw = spawn_gateway(&cfg).await;
        let url = gw.https_url("/api/x");
        let proxy = client_from(&gw, "127.0.0.2");
        // The proxy names the client 5.5.5.5 in Forwarded (parameter names in any case); the client's own
        // X-Forwarded-For, passed through, changes with every request and must not choose the bucket.
        for (i, (forwarded, xff)) in
            [("for=5.5.5.5", "7.7.7.1"), ("For=5.5.5.5;proto=https", "7.7.7.2"), ("FOR=5.5.5.5", "7.7.7.3")].into_iter().enumerate()
        {
            let a = get_with(&proxy, &url, &[("forwarded", forwarded), ("x-forwarded-for", xff)]).await;
            assert_eq!(a.status, if i < 2 { 200 } else { 429 }, "request {i}: {}", a.text());
        }
        assert_eq!(up.hits(), 2, "a forged X-Forwarded-For bought a fresh bucket");
        // Another client behind the same proxy has its own bucket.
        assert_eq!(get_with(&proxy, &url, &[("forwarded", "for=6.6.6.6")]).await.status, 200);
        assert_eq!(up.hits(), 3);
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// Memory stays bounded under a key flood.

/// Counts the heap bytes each thread holds (allocated minus freed on that thread), so a test on its own
/// thread can measure what it allocates while other tests run in parallel.
struct PerThreadCounting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn held_add(n: isize) {
    // try_with: allocations during thread teardown have no counter to update.
    let _ = HELD.try_with(|h| h.set(h.get() + n));
}

unsafe impl GlobalAlloc for PerThreadCounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            held_add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            held_add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        held_add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            held_add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: PerThreadCounting = PerThreadCounting;

#[test]
fn a_flood_of_100k_distinct_keys_is_pruned_back_to_near_nothing() {
    // Its own thread, so the per-thread byte count is this flood's alone.
    let report = std::thread::spawn(|| {
        let held = || HELD.with(Cell::get);
        let mut out = Vec::new();
        for key in [LimitKey::Ip, LimitKey::Subject] {
            let settings = LimitSettings {
                key: key.clone(),
                per: Duration::from_millis(1),
                burst: NonZeroU32::new(2).unwrap(),
                store: portcullis::edge::ratelimit::LimitStore::Local,
            };
            let limiter = Limiter::new(settings, 64, None);
            let start = held();
            for i in 0..100_000u32 {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
                let subject = format!("user-{i}@tenant.example");
                let k = limiter.key(ip, Some(("local", &subject)), |_| None);
                assert!(limiter.check(&k).is_ok());
            }
            let flooded = held();
            assert_eq!(limiter.len(), 100_000, "{key:?}: every key holds state before pruning");
            // Buckets refill one cell per millisecond: after this, every key is idle again.
            std::thread::sleep(Duration::from_millis(20));
            limiter.prune();
            let pruned = held();
            let per_key = (flooded - start) as f64 / 100_000.0;
            out.push(format!(
                "{key:?}: {} bytes held by 100,000 keys ({per_key:.0} bytes/key), {} bytes after pruning, {} keys left",
                flooded - start,
                pruned - start,
                limiter.len()
            ));
            assert!(flooded - start > 100_000 * 8, "{key:?}: the flood allocated implausibly little: {}", flooded - start);
            assert!(per_key < 256.0, "{key:?}: {per_key:.0} bytes per key");
            assert!(limiter.len() < 100, "{key:?}: {} keys survived pruning", limiter.len());
            assert!(pruned - start < 64 * 1024, "{key:?}: {} bytes still held after pruning", pruned - start);
            drop(limiter);
        }
        out
    })
    .join()
    .expect("the flood thread");
    for line in report {
        eprintln!("{line}");
    }
}

// ------------------------------------------------------------------------------------------------------------
// Secure headers.

/// The configured secure headers (the documented example, which are also the defaults).
const HEADERS: &[(&str, &str)] = &[
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("cross-origin-opener-policy", "same-origin"),
];
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// The `[headers]` table that sets [`HEADERS`] and [`HSTS`], with no permissions policy, and removes the fields
/// that tell what the upstream runs.
fn secure_headers_table() -> String {
    format!(
        r#"[headers]
hsts = "{HSTS}"
content_type_options = "nosniff"
frame_options = "DENY"
referrer_policy = "no-referrer"
content_security_policy = "default-src 'none'; frame-ancestors 'none'"
permissions_policy = ""
cross_origin_opener_policy = "same-origin"
remove = ["Server", "X-Powered-By", "X-AspNet-Version"]"#
    )
}

fn assert_secure_headers(a: &Answer, tls: bool, generated: bool, what: &str) {
    for (name, value) in HEADERS {
        assert_eq!(all(a, name), [*value], "{what}: {name}");
    }
    assert_eq!(header(a, "strict-transport-security"), tls.then_some(HSTS), "{what}: HSTS only over TLS");
    assert!(a.headers.get("permissions-policy").is_none(), "{what}: an empty permissions_policy is not sent");
    if generated {
        assert_eq!(header(a, "cache-control"), Some("no-store"), "{what}");
    }
    for gone in ["server", "x-powered-by", "x-aspnet-version"] {
        assert!(a.headers.get(gone).is_none(), "{what}: {gone} leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_headers_on_proxied_and_generated_answers() {
    bounded(async {
        let up = spawn_upstream().await;
        // An upstream that is down: its port is held, and refuses every connection.
        let (_held, dead) = refusing_addr();
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .upstream("dead", &format!("http://{dead}"), r#"connect_timeout = "1s""#)
            .section("[limits]\nmax_body_bytes = \"1KiB\"")
            .section(&secure_headers_table())
            .section(&iss.config())
            .route("api", "/api/*", AUTH_PUBLIC)
            .route("server-headers", "/with-server-header", AUTH_PUBLIC)
            .route("forced", "/forced/with-server-header", "auth = \"public\"\nstrip_prefix = \"/forced\"\nheaders = { override = true }")
            .route(
                "html",
                "/html/*",
                "auth = \"public\"\nheaders = { content_security_policy = \"default-src 'self'\", frame_options = \"\" }",
            )
            .route("me", "/users/me", "")
            .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
            .route("limited", "/limited", "auth = \"public\"\nrate_limit = { key = \"route\", rate = \"1/min\", burst = 1 }")
            .route("upload", "/upload", AUTH_PUBLIC)
            .route_to("dead", "dead", "/dead/*", AUTH_PUBLIC)
            .build();
        let gw = iss.gateway(&cfg).await;
        let c = client(&gw);
        let user = iss.token("bob", &["user"]);

        for tls in [true, false] {
            let url = |p: &str| if tls { gw.https_url(p) } else { gw.http_url(p) };
            let on = if tls { "https" } else { "http" };

            let a = get(&c, &url("/api/x"), None).await;
            assert_eq!(a.status, 200);
            assert_secure_headers(&a, tls, false, &format!("{on} proxied"));

            // Server / X-Powered-By / X-AspNet-Version from the upstream are stripped; its own
            // X-Frame-Options is kept (no override on this route).
            let hits = up.hits();
            let a = get(&c, &url("/with-server-header"), None).await;
            assert_eq!(a.status, 200);
            assert_eq!(up.hits(), hits + 1);
            assert_eq!(all(&a, "x-frame-options"), ["SAMEORIGIN"], "{on}: the upstream's own value is kept, and only it");
            let id = all(&a, "x-request-id");
            assert!(id.len() == 1 && id[0] != "upstream-id", "{on}: the gateway's request id replaces the upstream's: {id:?}");
            for gone in ["server", "x-powered-by", "x-aspnet-version"] {
                assert!(a.headers.get(gone).is_none(), "{on}: {gone} from the upstream leaked");
            }
            assert_eq!(header(&a, "content-security-policy"), Some("default-src 'none'; frame-ancestors 'none'"));

            // Per-route override: `override = true` replaces the upstream's value.
            let a = get(&c, &url("/forced/with-server-header"), None).await;
            assert_eq!(a.status, 200);
            assert_secure_headers(&a, tls, false, &format!("{on} override route"));
            assert_eq!(all(&a, "x-frame-options"), ["DENY"], "{on}: the override replaces the upstream's value");

            // Per-route values: another CSP, X-Frame-Options disabled, the rest inherited.
            let a = get(&c, &url("/html/page"), None).await;
            assert_eq!(a.status, 200);
            assert_eq!(header(&a, "content-security-policy"), Some("default-src 'self'"), "{on}");
            assert!(a.headers.get("x-frame-options").is_none(), "{on}: frame_options = \"\" disables it");
            assert_eq!(header(&a, "x-content-type-options"), Some("nosniff"));
            assert_eq!(header(&a, "referrer-policy"), Some("no-referrer"));
            assert_eq!(header(&a, "strict-transport-security"), tls.then_some(HSTS));

            // Every gateway-made answer.
            let hits = up.hits();
            let a = get(&c, &url("/users/me"), None).await;
            assert_eq!(a.status, 401);
            assert_secure_headers(&a, tls, true, &format!("{on} 401"));
            let a = get(&c, &url("/admin/x"), Some(&user)).await;
            assert_eq!(a.status, 403);
            assert_secure_headers(&a, tls, true, &format!("{on} 403"));
            let a = get(&c, &url("/nowhere"), None).await;
            assert_eq!(a.status, 404);
            assert_secure_headers(&a, tls, true, &format!("{on} 404"));
            let a = request(&c, Method::POST, &url("/upload"), &[], &[b'x'; 2048]).await;
            assert_eq!(a.status, 413);
            assert_secure_headers(&a, tls, true, &format!("{on} 413"));
            assert_eq!(up.hits(), hits, "{on}: a refused request reached the upstream");
            let a = get(&c, &url("/limited"), None).await;
            assert_eq!(a.status, if tls { 200 } else { 429 });
            let hits = up.hits();
            let a = get(&c, &url("/limited"), None).await;
            assert_eq!(a.status, 429);
            assert_secure_headers(&a, tls, true, &format!("{on} 429"));
            assert_eq!(up.hits(), hits, "{on}: a limited request reached the upstream");
            let a = get(&c, &url("/dead/x"), None).await;
            assert_eq!(a.status, 502);
            assert_secure_headers(&a, tls, true, &format!("{on} 502"));
        }
        gw.stop().await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------------------
// CORS.

/// The CORS policy: one origin, with credentials, four methods and two request headers.
const CORS_POLICY: &str = r#"[cors]
allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "POST", "PUT", "DELETE"]
allow_headers = ["Authorization", "Content-Type"]
allow_credentials = true
max_age = "10m""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_actual_requests() {
    bounded(async {
        let up = spawn_upstream().await;
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .section(CORS_POLICY)
            .section(&iss.config())
            .route("me", "/users/me", r#"methods = ["GET"]"#)
            .route("open", "/open/*", "auth = \"public\"\ncors = { allow_origins = [\"*\"], allow_methods = [\"GET\"] }")
            .route("own-cors", "/with-server-header", AUTH_PUBLIC)
            .build();
        let gw = iss.gateway(&cfg).await;
        let c = client(&gw);
        let url = gw.https_url("/users/me");
        let app = "https://app.example.com";

        // Preflight from an allowed origin: answered by the gateway, no token, no upstream.
        let preflight = |origin: &'static str, method: &'static str, url: String| {
            let c = &c;
            async move {
                let headers = [
                    ("origin", origin),
                    ("access-control-request-method", method),
                    ("access-control-request-headers", "authorization, content-type"),
                ];
                request(c, Method::OPTIONS, &url, &headers, b"").await
            }
        };
        let a = preflight(app, "GET", url.clone()).await;
        assert_eq!(a.status, 204, "{}", a.text());
        assert_eq!(header(&a, "access-control-allow-origin"), Some(app));
        assert_eq!(header(&a, "access-control-allow-methods"), Some("GET, POST, PUT, DELETE"));
        assert_eq!(header(&a, "access-control-allow-headers"), Some("Authorization, Content-Type"));
        assert_eq!(header(&a, "access-control-allow-credentials"), Some("true"));
        assert_eq!(header(&a, "access-control-max-age"), Some("600"));
        assert_eq!(all(&a, "vary"), ["Origin"], "Vary: Origin, once");
        assert_eq!(up.hits(), 0, "a preflight reached the upstream");

        // From a disallowed origin: no allow headers at all.
        let a = preflight("https://evil.example", "GET", url.clone()).await;
        for h in [
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-headers",
            "access-control-allow-credentials",
        ] {
            assert!(a.headers.get(h).is_none(), "disallowed origin got {h}");
        }
        assert_eq!(up.hits(), 0);

        // The actual request from the allowed origin.
        let token = iss.token("alice", &["user"]);
        let auth = format!("Bearer {token}");
        let a = get_with(&c, &url, &[("origin", app), ("authorization", &auth)]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(header(&a, "access-control-allow-origin"), Some(app));
        assert_eq!(header(&a, "access-control-allow-credentials"), Some("true"));
        assert!(a.headers.get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")), "Vary: Origin");
        assert_eq!(up.hits(), 1);
        // Also on the gateway's own refusals, so the browser can read them.
        let a = get_with(&c, &url, &[("origin", app)]).await;
        assert_eq!(a.status, 401);
        assert_eq!(header(&a, "access-control-allow-origin"), Some(app));
        assert_eq!(up.hits(), 1, "a refused request reached the upstream");
        // A disallowed origin gets the answer but no CORS permission to read it.
        let a = get_with(&c, &url, &[("origin", "https://evil.example"), ("authorization", &auth)]).await;
        assert_eq!(a.status, 200);
        assert!(a.headers.get("access-control-allow-origin").is_none());
        assert!(a.headers.get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")));

        // Per-route override: any origin, no credentials, GET only.
        let a = preflight("https://elsewhere.example", "GET", gw.https_url("/open/x")).await;
        assert_eq!(a.status, 204);
        assert_eq!(header(&a, "access-control-allow-origin"), Some("*"));
        assert_eq!(header(&a, "access-control-allow-methods"), Some("GET"));
        assert!(a.headers.get("access-control-allow-credentials").is_none());
        let a = get_with(&c, &gw.https_url("/open/x"), &[("origin", "https://elsewhere.example")]).await;
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "access-control-allow-origin"), Some("*"));
        assert_eq!(up.hits(), 3);
        // An upstream's own allow header gives way to the policy's (one value, not two).
        let a = get_with(&c, &gw.https_url("/with-server-header"), &[("origin", app)]).await;
        assert_eq!(a.status, 200);
        assert_eq!(all(&a, "access-control-allow-origin"), [app]);
        // Nor does it open the answer to an origin the policy does not allow.
        let a = get_with(&c, &gw.https_url("/with-server-header"), &[("origin", "https://evil.example")]).await;
        assert_eq!(a.status, 200);
        assert!(all(&a, "access-control-allow-origin").is_empty(), "the upstream's `*` reached a disallowed origin");
        assert_eq!(up.hits(), 5);
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_page_policy_is_kept_unless_the_route_forces_the_gateways() {
    bounded(async {
        let up = spawn_upstream().await;
        let cfg = ConfigBuilder::new(&up)
            .route("forced", "/forced/*", "auth = \"public\"\nheaders = { override = true }")
            .route("all", "/*", AUTH_PUBLIC)
            .build();
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        // FastAPI's /docs: the upstream's own policy lets its page load its scripts; the JSON default would not.
        let a = get(&c, &gw.http_url("/docs"), None).await;
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "content-security-policy"), Some(UPSTREAM_CSP), "the upstream's own policy is kept");
        // Answers without a policy of their own get the gateway's.
        let a = get(&c, &gw.http_url("/items"), None).await;
        assert_eq!(header(&a, "content-security-policy"), Some("default-src 'none'; frame-ancestors 'none'"));
        // A route that forces the gateway's headers replaces the upstream's policy.
        let a = get(&c, &gw.http_url("/forced/docs"), None).await;
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "content-security-policy"), Some("default-src 'none'; frame-ancestors 'none'"));
        gw.stop().await;
    })
    .await;
}
