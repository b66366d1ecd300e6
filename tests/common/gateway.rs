//! A gateway started from a config text in its own temporary folder, and what its admin listener says about it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis::{Config, RunningGateway};

use super::{get, header, TestClient};

/// A gateway started from a config text in its own temporary folder (certs are generated there).
pub struct TestGateway {
    pub gw: Option<RunningGateway>,
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.https.expect("https listener").port(), path)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http.expect("http listener").port(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin.expect("admin listener").port(), path)
    }

    /// The generated self-signed certificate (PEM), to trust in clients.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("gateway.crt")
    }

    pub async fn stop(mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop().await;
        }
    }
}

/// Writes `config` to `gateway.toml` in a new temp folder, plus any extra files, and starts the gateway.
pub async fn spawn_gateway_with_files(config: &str, files: &[(&str, &[u8])]) -> TestGateway {
    spawn_gateway_resolving(config, files, portcullis::upstream::resolve::system()).await
}

/// [`spawn_gateway_with_files`] with the resolver the gateway asks for upstream host names.
pub async fn spawn_gateway_resolving(config: &str, files: &[(&str, &[u8])], names: portcullis::upstream::Resolver) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files {
        std::fs::write(dir.path().join(name), data).unwrap();
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("config did not validate:\n{e}\n---\n{config}"));
    let gw = portcullis::start_with(cfg, names).await.expect("gateway starts");
    TestGateway { https: gw.https, http: gw.http, admin: gw.admin, gw: Some(gw), dir }
}

pub async fn spawn_gateway(config: &str) -> TestGateway {
    spawn_gateway_with_files(config, &[]).await
}

/// A file of the repository (`examples/…`, the shipped `gateway.toml`).
pub fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The shipped `gateway.toml` with its listeners on port 0 and the `api` upstream at `api_url`, each swap checked
/// to have happened exactly once.
pub fn shipped_config(api_url: &str) -> String {
    let mut text = std::fs::read_to_string(manifest("gateway.toml")).unwrap();
    for (from, to) in [
        ("\"127.0.0.1:8443\"", "\"127.0.0.1:0\"".to_string()),
        ("\"127.0.0.1:8080\"", "\"127.0.0.1:0\"".to_string()),
        ("\"127.0.0.1:9090\"", "\"127.0.0.1:0\"".to_string()),
        ("url = \"http://127.0.0.1:3000\"", format!("url = \"{api_url}\"")),
    ] {
        assert_eq!(text.matches(from).count(), 1, "the shipped gateway.toml no longer has {from} once");
        text = text.replace(from, &to);
    }
    text
}

/// Replaces a file in one step (write beside it, rename over it), as a careful deploy tool would: the gateway's
/// file watcher never sees it half written.
pub fn write_atomic(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls the admin `/readyz` (a readiness signal) until it answers 200, within `within`.
pub async fn wait_ready(c: &TestClient, gw: &TestGateway, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let a = get(c, &gw.admin_url("/readyz"), None).await;
        if a.status == 200 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz still {} after {within:?}: {}", a.status, a.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------------------------
// Metrics.

/// Parses a Prometheus text exposition into `name{sorted labels}` -> value.
pub fn parse_metrics(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or(rest);
                let labels: BTreeMap<String, String> = inner
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .filter_map(|kv| kv.split_once("=\"").map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string())))
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        if let Ok(v) = value.parse::<f64>() {
            out.insert((name, labels), v);
        }
    }
    out
}

/// Reads one sample from a Prometheus text exposition: `name` with exactly these labels.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parse_metrics(text).get(&(name.to_string(), want)).copied()
}

/// The admin listener's `/metrics`: asserts a 200 in the Prometheus text format and returns the exposition.
pub async fn metrics(c: &TestClient, gw: &TestGateway) -> String {
    let a = get(c, &gw.admin_url("/metrics"), None).await;
    assert_eq!(a.status, 200);
    assert!(header(&a, "content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    a.text()
}

/// Polls `/metrics` until `name{labels}` reaches `want`, within `within`.
pub async fn wait_metric(c: &TestClient, gw: &TestGateway, name: &str, labels: &[(&str, &str)], want: f64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = metrics(c, gw).await;
        let have = metric(&text, name, labels);
        if have == Some(want) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name}{labels:?} is {have:?}, not {want}, after {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
