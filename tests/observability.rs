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
    let target = field(&line, "upstream_target").unwrap_or_default();
    assert!(target.parse::<std::net::SocketAddr>().is_ok(), "the target the request went to: {line}");
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

// ------------------------------------------------------------------------------------------------------------
// OpenTelemetry: spans to an OTLP/HTTP receiver, the trace continued and propagated.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::sync::{Arc, Mutex};

/// An OTLP/HTTP receiver: decodes every POSTed `ExportTraceServiceRequest` and keeps its spans and its
/// resource's `service.name`.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Collector {
    async fn start() -> Collector {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (kept, notify) = (spans.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (kept, notify) = (kept.clone(), notify.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (kept, notify) = (kept.clone(), notify.clone());
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).expect("a valid ExportTraceServiceRequest");
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|a| a.key == "service.name")
                                    .and_then(|a| a.value.as_ref()?.value.as_ref())
                                    .map(|v| match v {
                                        AnyValue::StringValue(s) => s.clone(),
                                        other => format!("{other:?}"),
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    kept.lock().unwrap().extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                                }
                            }
                            notify.notify_waiters();
                            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
                });
            }
        });
        Collector { addr, spans, arrived }
    }

    /// Waits until `n` spans of `trace_id` have arrived, and returns them.
    async fn wait_spans(&self, trace_id: &[u8], n: usize) -> Vec<(String, Span)> {
        tokio::time::timeout(BOUND, async {
            loop {
                let notified = self.arrived.notified();
                let got: Vec<_> = self.spans.lock().unwrap().iter().filter(|(_, s)| s.trace_id == trace_id).cloned().collect();
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} spans arrived: {:#?}", self.spans.lock().unwrap()))
    }
}

fn attr(s: &Span, key: &str) -> Option<AnyValue> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.clone())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn spans_reach_the_collector_continuing_the_callers_trace() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (up, collector) = rt.block_on(async { (spawn_upstream().await, Collector::start().await) });
    let iss = TestIssuer::new();
    let cfg = ConfigBuilder::new(&up)
        .section(&format!(
            "[rate_limit]\ntrusted_proxies = [\"127.0.0.1\"]\n\n[tracing]\notlp_endpoint = \"http://{}\"\nservice_name = \"edge-gw\"\n",
            collector.addr
        ))
        .section(&iss.config())
        .route("me", "/users/me", "rate_limit = { key = \"subject\", rate = \"100/s\", burst = 100 }")
        .build();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("issuer.pub.pem"), &iss.key.public_pem).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, cfg).unwrap();
    let mut gw = GatewayProcess::run(&config, &[], &[]);
    let addr = gw.http.unwrap();

    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{TRACE_ID}-{parent}-01");
    let token = iss.token("bob", &["user"]);
    let status =
        get(addr, "/users/me", &[("traceparent", &traceparent), ("tracestate", "vendor=1"), ("Authorization", &format!("Bearer {token}"))]);
    assert_eq!(status, 200);

    let spans = rt.block_on(collector.wait_spans(&unhex(TRACE_ID), 4));
    let by_name =
        |name: &str| spans.iter().map(|(_, s)| s).find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span: {spans:#?}"));
    assert!(spans.iter().all(|(service, _)| service == "edge-gw"), "{spans:#?}");
    let server = by_name("GET me");
    assert_eq!(server.kind, 2, "SERVER");
    assert_eq!(hex(&server.parent_span_id), parent, "the caller's span is the parent");
    assert_eq!(server.trace_state, "vendor=1");
    assert_eq!(attr(server, "http.route"), Some(AnyValue::StringValue("me".into())));
    assert_eq!(attr(server, "http.response.status_code"), Some(AnyValue::IntValue(200)));
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano && server.start_time_unix_nano > 1_700_000_000_000_000_000);
    let auth = by_name("authenticate");
    assert_eq!(attr(auth, "portcullis.auth.cache_hit"), Some(AnyValue::BoolValue(false)));
    let limit = by_name("rate_limit");
    assert_eq!(attr(limit, "portcullis.rate_limited"), Some(AnyValue::BoolValue(false)));
    let call = by_name("upstream");
    assert_eq!(call.kind, 3, "CLIENT");
    for child in [auth, limit, call] {
        assert_eq!(child.parent_span_id, server.span_id, "{} is the server span's child", child.name);
        assert!(child.start_time_unix_nano >= server.start_time_unix_nano && child.end_time_unix_nano <= server.end_time_unix_nano);
    }
    // Subject-free: no attribute carries the subject or the token.
    for (_, s) in &spans {
        for a in &s.attributes {
            let v = format!("{:?}", a.value);
            assert!(!v.contains("bob") && !v.contains(&token[..20]), "{} in {}", a.key, s.name);
        }
    }

    // The upstream saw this trace with the gateway's upstream span as parent, and the caller's tracestate.
    let seen = up.last().unwrap();
    assert_eq!(seen.headers["traceparent"], format!("00-{TRACE_ID}-{}-01", hex(&call.span_id)));
    assert_eq!(seen.headers["tracestate"], "vendor=1");

    // The access line names the same trace.
    let line = gw.wait_line(|l| is_access_for(l, "/users/me", 200), BOUND);
    assert_eq!(field(&line, "trace_id").as_deref(), Some(TRACE_ID), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_callers_trace_is_not_continued() {
    bounded(async {
        let up = spawn_upstream().await;
        let collector = Collector::start().await;
        let cfg = public_config(&up, &format!("[tracing]\notlp_endpoint = \"http://{}\"\n", collector.addr));
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        let req = http::Request::get(gw.http_url("/x"))
            .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
            .header("tracestate", "vendor=1")
            .body(Default::default())
            .unwrap();
        assert_eq!(send(&c, req).await.status, 200);
        let seen = up.last().unwrap();
        let tp = seen.headers["traceparent"].to_str().unwrap().to_string();
        assert!(!tp.contains(TRACE_ID), "a trace from an untrusted caller was continued: {tp}");
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(!seen.headers.contains_key("tracestate"), "the untrusted caller's tracestate was forwarded");
        // The new trace is exported with no parent.
        let spans = collector.wait_spans(&unhex(&tp[3..35]), 2).await;
        let server = spans.iter().map(|(_, s)| s).find(|s| s.kind == 2).unwrap();
        assert!(server.parent_span_id.is_empty(), "{server:?}");
        gw.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing() {
    bounded(async {
        let up = spawn_upstream().await;
        let (_held, dead) = refusing_addr();
        let cfg = public_config(&up, &format!("[tracing]\notlp_endpoint = \"http://{dead}\"\n"));
        let gw = spawn_gateway(&cfg).await;
        let c = client(&gw);
        for i in 0..50 {
            let a = send(&c, http::Request::get(gw.http_url(&format!("/r{i}"))).body(Default::default()).unwrap()).await;
            assert_eq!(a.status, 200);
        }
        assert_eq!(up.hits(), 50);
        // Every span is accounted for as dropped once the export fails (within the 1 s batch interval).
        wait_metric(&c, &gw, "portcullis_tracing_spans_total", &[("result", "dropped_export_failed")], 100.0, BOUND).await;
        gw.stop().await;
    })
    .await;
}
