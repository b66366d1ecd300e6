//! Forward-auth decisions: a real nginx with `auth_request` asking the gateway about each request, then the same
//! matrix with Traefik's and Envoy's conventions sent raw, and a spoofed original request from an untrusted peer.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway's decision config: `/api/*` needs the `reader` role, `/limited/*` allows two requests a minute
/// per subject, `/public/*` is open. nginx (127.0.0.1) is the trusted proxy; 127.0.0.3 is not.
fn config(upstream: &Upstream, issuer: &TestIssuer) -> String {
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[rate_limit]
trusted_proxies = ["127.0.0.1/32"]

[forward_auth]
path = "/auth"

[upstreams.api]
url = "{}"

{}

[[routes]]
name = "api"
path = "/api/*"
upstream = "api"
roles_any = ["reader"]

[[routes]]
name = "limited"
path = "/limited/*"
upstream = "api"
rate_limit = {{ key = "subject", rate = "2/min", burst = 2 }}

[[routes]]
name = "public"
path = "/public/*"
upstream = "api"
auth = "public"
"#,
        upstream.url(),
        issuer.config()
    )
}

/// One raw HTTP/1.1 exchange from `from` (a loopback address to bind) to `to`; returns the answer's head.
async fn raw_from(from: &str, to: SocketAddr, request: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut out)).await.expect("the gateway answered and closed");
    let text = String::from_utf8_lossy(&out).to_string();
    text.split("\r\n\r\n").next().unwrap_or_default().to_string()
}

fn status_of(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn field<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

/// A decision request as `from` sends it, with `headers` and the connection closed after it.
async fn decide(from: &str, gw: SocketAddr, path: &str, method: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw_from(from, gw, &req).await
}

#[tokio::test]
async fn nginx_auth_request_asks_the_gateway_and_passes_its_answers_on() {
    let Some(nginx) = require_tool(&["nginx"], "nginx") else { return };
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let gw = issuer.gateway(&config(&up, &issuer)).await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            auth_request /_portcullis;
            auth_request_set $auth_subject $upstream_http_x_auth_subject;
            auth_request_set $auth_status $upstream_status;
            auth_request_set $auth_retry_after $upstream_http_retry_after;
            proxy_set_header X-Auth-Subject $auth_subject;
            proxy_pass http://{up};
            error_page 500 = @auth_error;
        }}
        location = /_portcullis {{
            internal;
            proxy_pass http://{gw}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
        location @auth_error {{
            if ($auth_status = 429) {{
                add_header Retry-After $auth_retry_after always;
                return 429;
            }}
            return 500;
        }}
    }}
}}
"#,
            up = up.addr,
            gw = gw.http.unwrap()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = std::process::Command::new(nginx)
            .args(["-e", &format!("{d}/error.log"), "-c"])
            .arg(&conf_path)
            .args(["-g", "daemon off; master_process off;"])
            .spawn()
            .expect("nginx starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = tokio::time::Instant::now() + BOUND;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let via_nginx = |path: &str, token: Option<String>| {
            let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
            let req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{auth}Connection: close\r\n\r\n");
            async move { raw_from("127.0.0.1", addr, &req).await }
        };

        let reader = issuer.token("alice", &["reader"]);
        let head = via_nginx("/api/orders?page=2", Some(reader.clone())).await;
        assert_eq!(status_of(&head), 200, "{head}");
        let seen = up.last().expect("the upstream got the request");
        assert_eq!(seen.path_and_query, "/api/orders?page=2");
        assert_eq!(seen.headers.get("x-auth-subject").map(|v| v.to_str().unwrap()), Some("alice"), "nginx copied the subject");

        let hits = up.hits();
        let head = via_nginx("/api/orders", None).await;
        assert_eq!(status_of(&head), 401, "{head}");
        assert!(field(&head, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{head}");
        let head = via_nginx("/api/orders", Some(issuer.token("bob", &["writer"]))).await;
        assert_eq!(status_of(&head), 403, "{head}");
        let limited = issuer.token("carol", &[]);
        for _ in 0..2 {
            assert_eq!(status_of(&via_nginx("/limited/x", Some(limited.clone())).await), 200);
        }
        let head = via_nginx("/limited/x", Some(limited)).await;
        assert_eq!(status_of(&head), 429, "{head}");
        assert!(field(&head, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "{head}");
        assert_eq!(up.hits(), hits + 2, "no refused request reached the upstream");

        let c = plain_client();
        let m = metrics(&c, &gw).await;
        assert_eq!(metric(&m, "portcullis_decisions_total", &[("route", "api"), ("result", "allow")]), Some(1.0));
        assert_eq!(metric(&m, "portcullis_decisions_total", &[("route", "api"), ("result", "deny")]), Some(2.0));
        assert_eq!(metric(&m, "portcullis_decisions_total", &[("route", "limited"), ("result", "deny")]), Some(1.0));
        let _ = child.kill();
        let _ = child.wait();
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn traefik_and_envoy_conventions_get_the_same_decisions() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let gw = issuer.gateway(&config(&up, &issuer)).await;
        let at = gw.http.unwrap();
        let reader = format!("Bearer {}", issuer.token("alice", &["reader"]));
        let writer = format!("Bearer {}", issuer.token("bob", &["writer"]));

        // Traefik ForwardAuth and Caddy forward_auth: the original in X-Forwarded-*.
        let traefik = |uri: &'static str, auth: Option<String>| {
            let mut h = vec![
                ("X-Forwarded-Method", "GET".to_string()),
                ("X-Forwarded-Uri", uri.to_string()),
                ("X-Forwarded-Host", "app.test".to_string()),
                ("X-Forwarded-Proto", "https".to_string()),
            ];
            if let Some(a) = auth {
                h.push(("Authorization", a));
            }
            async move {
                let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                decide("127.0.0.1", at, "/auth", "GET", &h).await
            }
        };
        let head = traefik("/api/orders", Some(reader.clone())).await;
        assert_eq!((status_of(&head), field(&head, "x-auth-subject")), (200, Some("alice")), "{head}");
        let head = traefik("/api/orders", None).await;
        assert_eq!(status_of(&head), 401, "{head}");
        assert!(field(&head, "www-authenticate").is_some());
        assert_eq!(status_of(&traefik("/api/orders", Some(writer.clone())).await), 403);
        let head = traefik("/public/page", None).await;
        assert_eq!((status_of(&head), field(&head, "x-auth-subject")), (200, None), "a public route: allowed, nobody");

        // Envoy ext_authz (HTTP service, path_prefix "/auth"): the original method and path, prefixed.
        let head = decide("127.0.0.1", at, "/auth/api/orders?x=1", "DELETE", &[("Authorization", &reader)]).await;
        assert_eq!((status_of(&head), field(&head, "x-auth-subject")), (200, Some("alice")), "{head}");
        let head = decide("127.0.0.1", at, "/auth/api/orders", "GET", &[]).await;
        assert_eq!(status_of(&head), 401, "{head}");
        let head = decide("127.0.0.1", at, "/auth/api/orders", "GET", &[("Authorization", &writer)]).await;
        assert_eq!(status_of(&head), 403, "{head}");
        // Over the limit: 429 with Retry-After, for the proxy to pass on.
        let limited = format!("Bearer {}", issuer.token("carol", &[]));
        for _ in 0..2 {
            assert_eq!(status_of(&decide("127.0.0.1", at, "/auth/limited/x", "GET", &[("Authorization", &limited)]).await), 200);
        }
        let head = decide("127.0.0.1", at, "/auth/limited/x", "GET", &[("Authorization", &limited)]).await;
        assert_eq!(status_of(&head), 429, "{head}");
        assert!(field(&head, "retry-after").is_some());
        // No route for the original: 404, as for a proxied request.
        assert_eq!(status_of(&decide("127.0.0.1", at, "/auth/nowhere", "GET", &[("Authorization", &reader)]).await), 404);
        assert_eq!(up.hits(), 0, "a decision forwards nothing");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_spoofed_original_request_from_an_untrusted_peer_is_refused() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let gw = issuer.gateway(&config(&up, &issuer)).await;
        let at = gw.http.unwrap();
        // 127.0.0.3 is not a trusted proxy: it asks about /public/x (allowed for anyone) to get an allow it could
        // then use for /api/x, and sends a forged subject on top.
        let head = decide("127.0.0.3", at, "/auth", "GET", &[("X-Original-URI", "/public/x"), ("X-Auth-Subject", "admin")]).await;
        assert_eq!(status_of(&head), 403, "{head}");
        assert_eq!(field(&head, "x-auth-subject"), None);
        let head = decide("127.0.0.3", at, "/auth/public/x", "GET", &[]).await;
        assert_eq!(status_of(&head), 403, "Envoy's convention from an untrusted peer too: {head}");
        // The same from the trusted proxy is allowed: the refusal was the peer's, not the path's.
        let head = decide("127.0.0.1", at, "/auth", "GET", &[("X-Original-URI", "/public/x")]).await;
        assert_eq!(status_of(&head), 200, "{head}");
        // A malformed original is refused, not guessed at.
        let head = decide("127.0.0.1", at, "/auth", "GET", &[("X-Original-URI", "http://evil.test/api/x")]).await;
        assert_eq!(status_of(&head), 400, "{head}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_decisions_listener_takes_every_path_as_a_decision() {
    bounded(async {
        let up = spawn_upstream().await;
        let issuer = TestIssuer::new();
        let cfg = config(&up, &issuer).replace("admin = \"127.0.0.1:0\"", "admin = \"127.0.0.1:0\"\ndecisions = \"127.0.0.1:0\"");
        let gw = issuer.gateway(&cfg).await;
        let decisions = gw.gw.as_ref().unwrap().decisions.expect("the decisions listener is bound");
        let reader = format!("Bearer {}", issuer.token("alice", &["reader"]));
        // Envoy without a path_prefix: the original path as it is.
        let head = decide("127.0.0.1", decisions, "/api/orders", "GET", &[("Authorization", &reader)]).await;
        assert_eq!((status_of(&head), field(&head, "x-auth-subject")), (200, Some("alice")), "{head}");
        assert_eq!(status_of(&decide("127.0.0.1", decisions, "/api/orders", "GET", &[]).await), 401);
        // nginx's fields work there too.
        let head = decide("127.0.0.1", decisions, "/anything", "GET", &[("X-Original-URI", "/api/x"), ("Authorization", &reader)]).await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert_eq!(up.hits(), 0, "nothing is proxied from the decisions listener");
        // The public listener still proxies the same path.
        let head = decide("127.0.0.1", gw.http.unwrap(), "/api/orders", "GET", &[("Authorization", &reader)]).await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert_eq!(up.hits(), 1);
        gw.stop().await;
    })
    .await;
}
