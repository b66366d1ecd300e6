//! What an operator reads: access-log lines that say why a request was refused and where it went (in both log
//! formats, with no token material), metrics under the right route labels with the process metrics beside them,
//! `${VAR}` in the config, and `portcullis healthcheck`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A blocking HTTP/1.1 GET with `Connection: close`; returns the status.
fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\nUser-Agent: observability-test/1.0\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// A refused request: its path, the status it gets, its headers, and the reason its log line must give.
type Refusal<'a> = (&'a str, u16, Vec<(&'a str, String)>, &'a str);

fn is_access_for(line: &str, path: &str, status: u16) -> bool {
    line.contains("portcullis::access")
        && field(line, "path").as_deref() == Some(path)
        && field(line, "status").as_deref() == Some(status.to_string().as_str())
}

fn access_log_explains_every_refusal(format: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let up = rt.block_on(spawn_upstream());
    let (_held, dead) = refusing_addr();
    let iss = TestIssuer::new();
    let cfg = ConfigBuilder::new(&up)
        .upstream("dead", &format!("http://{dead}"), r#"connect_timeout = "1s""#)
        .section(&iss.config())
        .route("reports", "/reports", "")
        .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
        .route("limited", "/limited", "auth = \"public\"\nrate_limit = { key = \"route\", rate = \"1/min\", burst = 1 }")
        .route_to("dead", "dead", "/dead/*", AUTH_PUBLIC)
        .route("open", "/open/*", AUTH_PUBLIC)
        .build();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("issuer.pub.pem"), &iss.key.public_pem).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, cfg).unwrap();
    let mut gw = GatewayProcess::run(&config, &["--log-format", format], &[]);
    let addr = gw.http.expect("an http listener");

    let expired = mint_token(
        &iss.key,
        None,
        &claims(TestIssuer::ISS, "alice", json!({"exp": now() - 3600, "iat": now() - 7200, "nbf": now() - 7200})),
    );
    let other_audience = mint_token(&iss.key, None, &claims(TestIssuer::ISS, "alice", json!({"aud": "billing"})));
    let user = iss.token("bob", &["user"]);
    let tokens = [&expired, &other_audience, &user];
    let bearer = |t: &str| format!("Bearer {t}");

    let cases: Vec<Refusal> = vec![
        ("/reports", 401, vec![("Authorization", bearer(&expired))], "expired"),
        ("/reports", 401, vec![("Authorization", bearer(&other_audience))], "audience"),
        ("/reports", 401, vec![], "missing"),
        ("/admin/x", 403, vec![("Authorization", bearer(&user))], "roles"),
        ("/dead/x", 502, vec![], "upstream_connect"),
    ];
    for (path, status, headers, reason) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(get(addr, path, &headers), *status, "{path} {reason}");
        let line = gw.wait_line(|l| is_access_for(l, path, *status) && field(l, "reason").as_deref() == Some(reason), BOUND);
        assert_eq!(field(&line, "route").as_deref(), Some(path.trim_start_matches('/').split('/').next().unwrap()), "{line}");
        if *status == 502 {
            assert_eq!(field(&line, "upstream").as_deref(), Some("dead"), "{line}");
            assert_eq!(field(&line, "upstream_status"), None, "no upstream answered: {line}");
        } else {
            assert_eq!(field(&line, "upstream"), None, "a refused request went nowhere: {line}");
        }
    }
    assert_eq!(get(addr, "/limited", &[]), 200);
    assert_eq!(get(addr, "/limited", &[]), 429);
    let line = gw.wait_line(|l| is_access_for(l, "/limited", 429), BOUND);
    assert_eq!(field(&line, "reason").as_deref(), Some("route"), "the limit's key: {line}");
    assert_eq!(field(&line, "rate_limited").as_deref(), Some("true"), "{line}");

    // A proxied request: where it went, what it answered, and who asked.
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    assert_eq!(get(addr, "/open/x", &[("traceparent", &traceparent)]), 200);
    let line = gw.wait_line(|l| is_access_for(l, "/open/x", 200), BOUND);
    for (name, want) in [
        ("route", "open"),
        ("upstream", "api"),
        ("upstream_status", "200"),
        ("host", "gw.test"),
        ("user_agent", "observability-test/1.0"),
        ("http_version", "1.1"),
        ("trace_id", TRACE_ID),
    ] {
        assert_eq!(field(&line, name).as_deref(), Some(want), "{name} in {line}");
    }
    assert_eq!(field(&line, "reason"), None, "an answered request has no refusal reason: {line}");
    if format == "json" {
        for l in gw.seen.iter().filter(|l| l.contains("portcullis::access")) {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        }
    }
    // No token, nor any piece of one (its signature), in any line.
    for l in &gw.seen {
        for t in tokens {
            let signature = t.rsplit('.').next().unwrap();
            assert!(!l.contains(t.as_str()) && !l.contains(signature), "token material in the log: {l}");
        }
        assert!(!l.contains("Bearer"), "a credential in the log: {l}");
    }
}

#[test]
fn access_log_explains_every_refusal_in_text() {
    access_log_explains_every_refusal("text");
}

#[test]
fn access_log_explains_every_refusal_in_json() {
    access_log_explains_every_refusal("json");
}

// ------------------------------------------------------------------------------------------------------------
// `${VAR}` in the config.

fn check(config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("check").arg("--config").arg(config).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const ENV_CONFIG: &str = r#"[listen]
http = "127.0.0.1:${PORTCULLIS_TEST_PORT:-0}"

[upstreams.api]
url = "http://${PORTCULLIS_TEST_UPSTREAM_HOST}:8000"

[[routes]]
name = "all"
path = "/*"
upstream = "api"
auth = "public"
"#;

#[test]
fn config_values_come_from_the_environment_and_an_unset_one_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, ENV_CONFIG).unwrap();

    // Set, and defaulted: valid, with the values in the summary.
    let (code, stdout, stderr) = check(&config, &[("PORTCULLIS_TEST_UPSTREAM_HOST", "api.internal")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("http://api.internal:8000"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:0"), "the default: {stdout}");
    let (code, stdout, stderr) = check(&config, &[("PORTCULLIS_TEST_UPSTREAM_HOST", "api.internal"), ("PORTCULLIS_TEST_PORT", "18080")]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("127.0.0.1:18080"), "{stdout}");

    // Unset: the error names the variable, at its value's line and column.
    let (code, stdout, stderr) = check(&config, &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let at = format!("{}:5:7", config.display());
    assert!(stderr.contains(&at) && stderr.contains("PORTCULLIS_TEST_UPSTREAM_HOST is not set"), "{stderr}");
}

// ------------------------------------------------------------------------------------------------------------
// `portcullis healthcheck`.

fn healthcheck(url: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["healthcheck", "--url", url, "--timeout", "5s"]).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_when_ready_and_1_otherwise() {
    bounded(async {
        let up = spawn_upstream().await;
        let gw = spawn_gateway(&public_config(&up, "")).await;
        let ready = gw.admin_url("/readyz");
        let (code, stderr) = tokio::task::spawn_blocking(move || healthcheck(&ready)).await.unwrap();
        assert_eq!(code, 0, "{stderr}");

        // Not ready: an issuer whose keys cannot be fetched (its JWKS address refuses).
        let (_held_jwks, jwks) = refusing_addr();
        let cfg = ConfigBuilder::new(&up)
            .issuer("idp", "https://idp.test", &["EdDSA"], &format!("jwks_url = \"http://{jwks}/jwks.json\"\njwks_timeout = \"1s\""))
            .route("me", "/users/me", "")
            .build();
        let unready = spawn_gateway(&cfg).await;
        let not_ready = unready.admin_url("/readyz");
        let (code, stderr) = tokio::task::spawn_blocking(move || healthcheck(&not_ready)).await.unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("answered 503"), "{stderr}");

        // Absent: nothing listens.
        let (_held, dead) = refusing_addr();
        let absent = format!("http://{dead}/readyz");
        let (code, stderr) = tokio::task::spawn_blocking(move || healthcheck(&absent)).await.unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("cannot connect"), "{stderr}");

        let (code, stderr) = tokio::task::spawn_blocking(|| healthcheck("https://127.0.0.1:1/readyz")).await.unwrap();
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("not an http:// URL"), "{stderr}");
    })
    .await;
}
