//! Deployment artefacts (deploy/), checked without a container daemon or a cluster: the Dockerfiles' rules, the
//! Kubernetes manifests against the gateway's own config and against each other, the ConfigMap's gateway.toml
//! through `portcullis check`, the alert rules and the dashboard's queries through promtool, and every metric they
//! query against a real gateway's /metrics.
//!
//! The manifests are read as text (no YAML crate): each check looks for a few lines in one block, and says what
//! it looked for when it fails. The schemas themselves are checked by kubernetes-validate in .ci/run.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::Value;

fn read(rel: &str) -> String {
    std::fs::read_to_string(manifest(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn show(out: &Output) -> String {
    format!("exit {:?}\n{}{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ------------------------------------------------------------------------------------------------------------
// Dockerfiles.

/// One Dockerfile instruction: its keyword in upper case and its arguments, continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        // Comment lines end nothing, even inside a continuation, as in Docker.
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push(Instruction { keyword: keyword.to_ascii_uppercase(), args: args.trim().to_string() });
                current.clear();
            }
        }
    }
    out
}

/// An exec-form (`["a", "b"]`) or shell-form command, as words.
fn command_words(s: &str) -> Vec<String> {
    let s = s.trim();
    if s.starts_with('[') {
        serde_json::from_str(s).unwrap_or_default()
    } else {
        s.split_whitespace().map(str::to_string).collect()
    }
}

/// The sources of a COPY from the build context (none for `COPY --from=…`), without `./` or a trailing `/`.
fn context_sources(i: &Instruction) -> Vec<String> {
    let words: Vec<String> = command_words(&i.args).into_iter().filter(|w| !w.starts_with("--")).collect();
    if i.args.split_whitespace().any(|w| w.starts_with("--from=")) || words.len() < 2 {
        return Vec::new();
    }
    words[..words.len() - 1].iter().map(|w| w.trim_start_matches("./").trim_end_matches('/').to_string()).collect()
}

/// What the build context may give the image: the manifest, the lock file, the sources, and the demo's config and
/// accounts, which the binary embeds (`portcullis demo` without a gateway.toml) and the runtime stage never copies.
const CONTEXT_ALLOWED: [&str; 7] =
    ["Cargo.toml", "Cargo.lock", ".cargo/config.toml", "src", "gateway.toml", "examples/demo-users.toml", "examples/demo-clients.toml"];

/// Every rule `text` breaks: numeric non-root USER, a HEALTHCHECK running `portcullis healthcheck`, nothing from
/// the context but the manifest, lock file and sources (no examples/, gateway.toml, certs/ or keys), a dependency
/// layer built before the sources arrive, a stripped binary with its debug info split off, and the runtime's
/// default command.
fn dockerfile_problems(text: &str) -> Vec<String> {
    let all = instructions(text);
    let mut problems = Vec::new();
    let Some(start) = all.iter().rposition(|i| i.keyword == "FROM") else { return vec!["no FROM".into()] };
    let runtime = &all[start..];
    let last = |k: &str| runtime.iter().rev().find(|i| i.keyword == k);

    if runtime[0].args.starts_with("rust") {
        problems.push(format!("the runtime stage runs on the build image {:?}", runtime[0].args));
    }
    let numeric_non_root = |u: &str| {
        let ids: Vec<&str> = u.split(':').collect();
        ids.len() <= 2 && ids.iter().all(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())) && ids[0].parse() != Ok(0u32)
    };
    match last("USER") {
        Some(u) if numeric_non_root(&u.args) => {}
        u => problems.push(format!(
            "USER must be a numeric non-root uid:gid (Kubernetes runAsNonRoot cannot verify a name), not {:?}",
            u.map(|u| &u.args)
        )),
    }
    let healthcheck = last("HEALTHCHECK").and_then(|h| h.args.split_once("CMD").map(|(_, cmd)| command_words(cmd)));
    match healthcheck {
        Some(w) if w.first().is_some_and(|b| b.ends_with("portcullis")) && w.iter().any(|a| a == "healthcheck") => {}
        w => problems.push(format!("HEALTHCHECK must run `portcullis healthcheck`, not {w:?}")),
    }
    for i in &all {
        if i.keyword == "ADD" {
            problems.push(format!("ADD {}: use COPY (ADD fetches URLs and unpacks archives)", i.args));
        }
        if i.keyword == "COPY" {
            for s in context_sources(i) {
                if !CONTEXT_ALLOWED.contains(&s.as_str()) {
                    problems.push(format!(
                        "COPY {s}: only {CONTEXT_ALLOWED:?} may come from the build context (no certs/, keys or other files)"
                    ));
                }
            }
        }
    }
    for i in runtime.iter().filter(|i| i.keyword == "COPY") {
        if !context_sources(i).is_empty() {
            problems.push(format!("COPY {}: the runtime stage takes files from build stages only", i.args));
        }
    }

    let first = |pred: &dyn Fn(&Instruction) -> bool| all.iter().position(pred);
    let lock = first(&|i| i.keyword == "COPY" && context_sources(i).iter().any(|s| s == "Cargo.lock"));
    let deps = first(&|i| i.keyword == "RUN" && (i.args.contains("cargo build") || i.args.contains("cargo fetch")));
    let src = first(&|i| i.keyword == "COPY" && context_sources(i).iter().any(|s| s == "src"));
    if !matches!((lock, deps, src), (Some(l), Some(d), Some(s)) if l < d && d < s) {
        problems
            .push("no dependency-caching stage: COPY Cargo.toml and Cargo.lock, build (or fetch) the dependencies, then COPY src".into());
    }

    let strip = all.iter().find(|i| i.keyword == "RUN" && i.args.contains("--only-keep-debug") && i.args.contains("strip"));
    match strip {
        None => problems.push("the binary is not stripped with its debug info split off (objcopy --only-keep-debug, then strip)".into()),
        Some(strip) => {
            let binary = runtime.iter().find(|i| i.keyword == "COPY" && i.args.contains("--from=") && i.args.contains("portcullis"));
            let from = binary.map(|b| command_words(&b.args).into_iter().find(|w| !w.starts_with("--")).unwrap_or_default());
            if !from.as_ref().is_some_and(|f| strip.args.contains(&format!("-o {f}")) || strip.args.contains(&format!(" {f} "))) {
                problems.push(format!("the runtime's binary {from:?} is not the stripped one"));
            }
        }
    }

    match last("ENTRYPOINT").map(|e| command_words(&e.args)) {
        Some(w) if w.len() == 1 && w[0].ends_with("/portcullis") => {}
        w => problems.push(format!("ENTRYPOINT must be the binary alone, so `docker run IMAGE demo` works, not {w:?}")),
    }
    let cmd = last("CMD").map(|c| command_words(&c.args));
    if cmd.as_deref() != Some(&["run".to_string(), "--config".into(), "/etc/portcullis/gateway.toml".into()][..]) {
        problems.push(format!("CMD must be run --config /etc/portcullis/gateway.toml, not {cmd:?}"));
    }
    problems
}

#[test]
fn both_dockerfiles_are_the_same_and_follow_the_image_rules() {
    let deploy = read("deploy/Dockerfile");
    assert_eq!(read("Dockerfile"), deploy, "the top-level Dockerfile must be a copy of deploy/Dockerfile: cp deploy/Dockerfile Dockerfile");
    let problems = dockerfile_problems(&deploy);
    assert!(problems.is_empty(), "deploy/Dockerfile:\n{}", problems.join("\n"));
    // The context itself keeps local keys, demo accounts and build output out, whatever a later COPY says.
    let ignore: Vec<String> = read(".dockerignore").lines().map(|l| l.trim().to_string()).filter(|l| !l.starts_with('#')).collect();
    assert_eq!(ignore.first().map(String::as_str), Some("*"), ".dockerignore must exclude everything first: {ignore:?}");
    let allowed: BTreeSet<&str> = ignore.iter().filter_map(|l| l.strip_prefix('!')).collect();
    assert_eq!(allowed, CONTEXT_ALLOWED.into_iter().collect(), ".dockerignore lets in more than the image needs");
}

/// The image before issue #26: a named user, no health check, the demo config and accounts copied in, no
/// dependency layer, an unstripped binary.
const OLD_DOCKERFILE: &str = r#"
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/portcullis portcullis \
    && mkdir -p /etc/portcullis && chown portcullis /etc/portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY gateway.toml /etc/portcullis/gateway.toml
COPY examples /etc/portcullis/examples
USER portcullis
WORKDIR /etc/portcullis
EXPOSE 8443 8080 9090
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/gateway.toml"]
"#;

#[test]
fn the_dockerfile_rules_catch_each_fault_of_the_old_image() {
    let problems = dockerfile_problems(OLD_DOCKERFILE).join("\n");
    for fault in ["USER", "HEALTHCHECK", "COPY examples", "COPY gateway.toml", "COPY benches", "dependency-caching", "stripped"] {
        assert!(problems.contains(fault), "the old Dockerfile's fault {fault:?} went unreported:\n{problems}");
    }
    let ok = read("deploy/Dockerfile");
    let root_user = ok.replace("USER 10001:10001", "USER 0:0");
    assert!(dockerfile_problems(&root_user).iter().any(|p| p.contains("USER")), "USER 0 passed");
    let no_deps_layer = ok.replace("COPY Cargo.toml Cargo.lock ./", "COPY Cargo.toml Cargo.lock src ./");
    assert!(
        dockerfile_problems(&no_deps_layer).iter().any(|p| p.contains("dependency-caching")),
        "sources before the dependency build passed"
    );
}

// ------------------------------------------------------------------------------------------------------------
// Kubernetes manifests, read as text.

/// A YAML file without its comment lines (comments may name metrics that do not exist yet).
fn without_comments(text: &str) -> String {
    text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n")
}

/// The documents of a multi-document YAML file.
fn documents(text: &str) -> Vec<&str> {
    text.split("\n---\n").collect()
}

/// The document of `kind` named `name` among `docs`.
fn find_doc<'a>(docs: &[&'a str], kind: &str, name: &str) -> &'a str {
    docs.iter()
        .find(|d| d.lines().any(|l| l == format!("kind: {kind}")) && d.lines().any(|l| l == format!("  name: {name}")))
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

/// The lines nested under the first line that is `key:` (or `- key:`), unindented to the key's level plus two.
fn block(text: &str, key: &str) -> String {
    let mut lines = text.lines();
    let Some(indent) = lines.by_ref().find_map(|l| {
        let t = l.trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        (t == format!("{key}:") || t.starts_with(&format!("{key}: "))).then(|| l.len() - l.trim_start().len())
    }) else {
        panic!("no {key}: in\n{text}")
    };
    let body: Vec<&str> = lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent).collect();
    body.iter().map(|l| l.get(indent + 2..).unwrap_or("").trim_end()).collect::<Vec<_>>().join("\n")
}

/// The value of the first `key: value` line (a list item's too), unquoted, without a trailing comment.
fn scalar(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let t = l.trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        let v = t.strip_prefix(&format!("{key}:"))?.trim();
        let v = v.split(" #").next().unwrap_or(v).trim();
        (!v.is_empty()).then(|| v.trim_matches('"').to_string())
    })
}

/// `key: value` lines of a block (labels, selectors), as a set.
fn pairs(block: &str) -> BTreeSet<String> {
    block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// The `gateway.toml: |` literal block of the ConfigMap, as the file it mounts.
fn configmap_gateway_toml(cm: &str) -> String {
    let mut lines = cm.lines().skip_while(|l| l.trim() != "gateway.toml: |");
    assert!(lines.next().is_some(), "the ConfigMap has no `gateway.toml: |` block");
    let mut text = String::new();
    for l in lines.take_while(|l| l.is_empty() || l.starts_with("    ")) {
        text.push_str(l.get(4..).unwrap_or(""));
        text.push('\n');
    }
    // YAML's default chomping keeps one final line break.
    format!("{}\n", text.trim_end_matches('\n'))
}

fn k8s_config() -> toml::Table {
    toml::from_str(&read("deploy/kubernetes/gateway.toml")).unwrap()
}

fn config_str<'a>(t: &'a toml::Table, table: &str, key: &str) -> &'a str {
    t[table][key].as_str().unwrap_or_else(|| panic!("[{table}] {key} is not a string"))
}

/// A temp folder laid out as the pod's /etc/portcullis: gateway.toml, and tls/ with a fresh self-signed pair.
fn pod_config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), configmap_gateway_toml(&read("deploy/kubernetes/configmap.yaml"))).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["portcullis.example".to_string()]).unwrap().self_signed(&key).unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    std::fs::write(dir.path().join("tls/tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls/tls.key"), key.serialize_pem()).unwrap();
    dir
}

/// `portcullis check` on the pod's config, with the admin token variable set to `token`.
fn check_pod_config(dir: &Path, token: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(dir.join("gateway.toml"))
        .env("PORTCULLIS_ADMIN_TOKEN", token)
        .output()
        .unwrap()
}

#[test]
fn the_configmap_carries_deploy_gateway_toml_and_check_accepts_it() {
    let file = read("deploy/kubernetes/gateway.toml");
    let embedded = configmap_gateway_toml(&read("deploy/kubernetes/configmap.yaml"));
    assert!(embedded == file, "configmap.yaml's gateway.toml differs from deploy/kubernetes/gateway.toml:\n{embedded}");
    let dir = pod_config_dir();
    let out = check_pod_config(dir.path(), "an-admin-token-of-32-characters!");
    assert!(out.status.success(), "portcullis check refused the ConfigMap's gateway.toml: {}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("warning:"), "the production config should pass without warnings: {stdout}");
    // Reachable from other pods and the kubelet, never only on loopback.
    assert!(stdout.contains("https 0.0.0.0:8443") && stdout.contains("admin 0.0.0.0:9090"), "{stdout}");
    let t = k8s_config();
    assert_eq!(t["tls"]["self_signed"].as_bool(), Some(false), "a cluster must not generate its own certificate");
}

#[test]
fn the_secret_example_holds_placeholders_that_the_gateway_refuses() {
    for entry in walk(&manifest("deploy")).into_iter().chain([manifest("Dockerfile")]) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(!text.contains("PRIVATE KEY") && !text.contains("BEGIN CERTIFICATE"), "{} holds key material", entry.display());
    }
    let secrets = read("deploy/kubernetes/secret.example.yaml");
    let admin = find_doc(&documents(&secrets), "Secret", "portcullis-admin");
    let token = scalar(admin, "token").expect("the admin Secret has a token");
    let out = check_pod_config(pod_config_dir().path(), &token);
    assert!(!out.status.success(), "the placeholder admin token {token:?} was accepted: applied as is, it would serve: {}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORTCULLIS_ADMIN_TOKEN"), "{}", show(&out));
    let tls = find_doc(&documents(&secrets), "Secret", "portcullis-tls");
    assert_eq!(scalar(tls, "type").as_deref(), Some("kubernetes.io/tls"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn port_of(addr: &str) -> String {
    addr.rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default()
}

#[test]
fn the_deployment_drains_within_its_grace_period_and_runs_locked_down() {
    let dep = read("deploy/kubernetes/deployment.yaml");
    let cfg = k8s_config();
    let secs = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{s:?} is not a number of seconds"));

    // The drain arithmetic: preStop sleep, then SIGTERM and up to drain_timeout, then exit, all within the grace.
    let drain = portcullis::config::parse_duration(config_str(&cfg, "limits", "drain_timeout")).unwrap().as_secs();
    let grace = secs(&scalar(&dep, "terminationGracePeriodSeconds").expect("terminationGracePeriodSeconds"));
    let pre_stop = command_words(&scalar(&block(&dep, "preStop"), "command").expect("a preStop command"));
    assert_eq!(pre_stop.first().map(String::as_str), Some("sleep"), "{pre_stop:?}");
    let sleep = secs(&pre_stop[1]);
    assert!(sleep >= 2, "preStop sleeps {sleep} s: too short for endpoints to be removed everywhere");
    assert!(
        grace >= sleep + drain + 2 && grace <= sleep + drain + 30,
        "terminationGracePeriodSeconds {grace} should be preStop {sleep} + drain_timeout {drain} + a few seconds to exit"
    );

    let replicas = secs(&scalar(&dep, "replicas").expect("replicas"));
    assert!(replicas >= 2, "{replicas} replicas");
    // Ports: the container's are the config's listeners; the probes ask the admin listener.
    let ports = block(&dep, "ports");
    let container_port = |name: &str| {
        let after = ports.split(&format!("name: {name}\n")).nth(1).unwrap_or_else(|| panic!("no port {name}"));
        scalar(after, "containerPort").unwrap()
    };
    assert_eq!(container_port("https"), port_of(config_str(&cfg, "listen", "https")));
    assert_eq!(container_port("admin"), port_of(config_str(&cfg, "listen", "admin")));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let b = block(&dep, probe);
        assert_eq!((scalar(&b, "path").as_deref(), scalar(&b, "port").as_deref()), (Some(path), Some("admin")), "{probe}:\n{b}");
    }
    let env = block(&dep, "env");
    assert_eq!(scalar(&env, "name").as_deref(), Some(config_str(&cfg, "admin", "token_env")), "the admin token's variable");

    // Locked down, at pod and container level.
    let pod_security = pairs(&block(&dep, "securityContext"));
    for want in ["runAsNonRoot: true", "runAsUser: 10001"] {
        assert!(pod_security.contains(want), "pod securityContext lacks {want}: {pod_security:?}");
    }
    let container = block(&dep, "containers");
    let security = pairs(&block(&container, "securityContext"));
    for want in ["runAsNonRoot: true", "runAsUser: 10001", "allowPrivilegeEscalation: false", "readOnlyRootFilesystem: true"] {
        assert!(security.contains(want), "container securityContext lacks {want}: {security:?}");
    }
    assert!(block(&block(&container, "securityContext"), "capabilities").contains("drop: [\"ALL\"]"), "capabilities not all dropped");
    let resources = block(&container, "resources");
    for part in ["requests", "limits"] {
        let b = block(&resources, part);
        assert!(scalar(&b, "cpu").is_some() && scalar(&b, "memory").is_some(), "resources.{part} needs cpu and memory:\n{b}");
    }
    // The config writes nothing (no generated pair or key), so nothing is writable; a subPath mount never updates.
    assert!(cfg["issuers"].as_array().unwrap().iter().all(|i| i.get("generate_key").is_none()));
    let spec = without_comments(&dep);
    assert!(!spec.contains("emptyDir") && !spec.contains("subPath"), "a writable volume or a subPath mount");
}

#[test]
fn the_services_budget_and_service_monitor_select_the_deployments_pods() {
    let dep = read("deploy/kubernetes/deployment.yaml");
    let pods = pairs(&block(&block(&dep, "selector"), "matchLabels"));
    let template = pairs(&block(&block(&dep, "template"), "labels"));
    assert!(pods.is_subset(&template), "the Deployment's selector {pods:?} misses its own pods {template:?}");
    let services = read("deploy/kubernetes/service.yaml");
    let docs = documents(&services);
    let (public, admin) = (find_doc(&docs, "Service", "portcullis"), find_doc(&docs, "Service", "portcullis-admin"));
    for s in [public, admin] {
        assert_eq!(pairs(&block(&block(s, "spec"), "selector")), pods, "a Service's selector");
    }
    let public_ports = block(public, "ports");
    assert!(!public_ports.contains("9090") && !public_ports.contains("admin"), "the public Service exposes the admin listener");
    assert_eq!(scalar(&block(public, "ports"), "targetPort").as_deref(), Some("https"));
    assert_eq!(scalar(&block(admin, "ports"), "name").as_deref(), Some("admin"));
    let pdb = read("deploy/kubernetes/pdb.yaml");
    assert_eq!(pairs(&block(&block(&pdb, "selector"), "matchLabels")), pods, "the PodDisruptionBudget's selector");

    let sm = read("deploy/kubernetes/servicemonitor.yaml");
    assert!(sm.contains("apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\n"));
    let admin_labels = pairs(&block(&block(admin, "metadata"), "labels"));
    let wanted = pairs(&block(&block(&sm, "selector"), "matchLabels"));
    assert!(wanted.is_subset(&admin_labels), "the ServiceMonitor selects {wanted:?}, the admin Service has {admin_labels:?}");
    let endpoint = block(&sm, "endpoints");
    assert_eq!((scalar(&endpoint, "port").as_deref(), scalar(&endpoint, "path").as_deref()), (Some("admin"), Some("/metrics")));
    // The scrape sends the token the pods read, and is labelled job="portcullis", which the alert rules select.
    let credentials = block(&endpoint, "credentials");
    let secret_ref = block(&dep, "secretKeyRef");
    for key in ["name", "key"] {
        assert_eq!(scalar(&credentials, key), scalar(&secret_ref, key), "the ServiceMonitor's token and the pods' differ in {key}");
    }
    let job_label = scalar(&sm, "jobLabel").expect("jobLabel");
    assert!(admin_labels.contains(&format!("{job_label}: portcullis")), "job label {job_label} is not portcullis on {admin_labels:?}");
    assert!(read("deploy/prometheus/alerts.yml").contains("job=\"portcullis\""));
}

// ------------------------------------------------------------------------------------------------------------
// Alert rules and the dashboard.

/// Metric names in PromQL (or any text): `portcullis_*` and `process_*` identifiers.
fn metric_names(text: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.split(|c: char| !ident(c)).filter(|w| w.starts_with("portcullis_") || w.starts_with("process_")).map(str::to_string).collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/portcullis.json")).expect("the dashboard is JSON")
}

/// Every PromQL query of the dashboard: panel targets and variable queries.
fn dashboard_queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("a target without expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

#[test]
fn the_dashboard_uses_the_datasource_variable_and_covers_the_gateway() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let mut areas: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("").to_string();
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}"));
        assert!(n("x") + n("w") <= 24, "{title} is wider than the dashboard");
        for (x, y, w, h, other) in &areas {
            let apart = n("x") >= x + w || x >= &(n("x") + n("w")) || n("y") >= y + h || y >= &(n("y") + n("h"));
            assert!(apart, "{title} overlaps {other}");
        }
        areas.push((n("x"), n("y"), n("w"), n("h"), title.clone()));
        if p["type"] == "row" {
            continue;
        }
        // Bound to the variable, never to one installation's datasource uid.
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title} has no targets"));
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    let queried: BTreeSet<String> = dashboard_queries(&d).iter().flat_map(|q| metric_names(q)).collect();
    for want in [
        "portcullis_requests_total",
        "portcullis_request_duration_seconds_bucket",
        "portcullis_auth_failures_total",
        "portcullis_rate_limited_total",
        "portcullis_upstream_errors_total",
        "portcullis_token_issued_total",
        "portcullis_token_failures_total",
        "portcullis_jwks_refresh_total",
        "portcullis_config_reloads_total",
        "portcullis_connections_active",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(queried.contains(want), "the dashboard has no panel on {want}");
    }
}

fn run_promtool(promtool: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(promtool).args(args).current_dir(dir).output().expect("promtool runs")
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_has_a_firing_unit_test() {
    let Some(promtool) = require_tool(&["promtool"], "prometheus") else { return };
    let dir = manifest("deploy/prometheus");
    let out = run_promtool(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(out.status.success(), "promtool check rules: {}", show(&out));
    let out = run_promtool(&promtool, &["test", "rules", "alerts_test.yml"], &dir);
    assert!(out.status.success(), "promtool test rules: {}", show(&out));

    // Each alert is expected to fire somewhere (exp_alerts with labels after its alertname).
    let tests = read("deploy/prometheus/alerts_test.yml");
    let alerts: Vec<String> = read("deploy/prometheus/alerts.yml").lines().filter_map(|l| scalar(l, "alert")).collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for a in &alerts {
        let fires = tests.split("alertname: ").filter(|t| t.starts_with(&format!("{a}\n"))).any(|t| t.contains("exp_labels:"));
        assert!(fires, "alerts_test.yml never expects {a} to fire");
    }
}

#[test]
fn the_dashboards_queries_are_valid_promql() {
    let Some(promtool) = require_tool(&["promtool"], "prometheus") else { return };
    // Each query as a recording rule, Grafana's variables replaced by what they stand for, through promtool.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, q) in dashboard_queries(&dashboard()).iter().enumerate() {
        let q = q.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*");
        // A variable's label_values(SELECTOR, LABEL) is Grafana's: its PromQL is the selector.
        let q = match q.strip_prefix("label_values(").and_then(|rest| rest.rsplit_once(',')) {
            Some((selector, _)) => selector.to_string(),
            None => q,
        };
        rules.push_str(&format!("      - record: dashboard_query_{n}\n        expr: {}\n", serde_json::to_string(&q).unwrap()));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), &rules).unwrap();
    let out = run_promtool(&promtool, &["check", "rules", "dashboard.yml"], dir.path());
    assert!(out.status.success(), "a dashboard query is not valid PromQL: {}\n{rules}", show(&out));
}

// ------------------------------------------------------------------------------------------------------------
// Every metric queried exists in a real gateway's exposition.

/// Metric families in an exposition, from its `# TYPE name type` lines.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' ').map(|(n, t)| (n.to_string(), t.trim().to_string())))
        .collect()
}

/// The names in `queried` that `exposition` does not export: a histogram's `_bucket`, `_sum` and `_count` count
/// as its own.
fn missing_metrics(queried: &BTreeSet<String>, exposition: &str) -> Vec<String> {
    let fam = families(exposition);
    let exported = |name: &str| {
        fam.iter().any(|(n, t)| n == name && t != "histogram" && t != "summary")
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| fam.iter().any(|(n, t)| n == base && (t == "histogram" || (t == "summary" && *s != "_bucket"))))
            })
    };
    queried.iter().filter(|q| !exported(q)).cloned().collect()
}

#[test]
fn the_metric_check_tells_histograms_from_counters() {
    let exposition =
        "# TYPE portcullis_a_seconds histogram\nportcullis_a_seconds_count 1\n# TYPE portcullis_b_total counter\nportcullis_b_total 1\n";
    let queried: BTreeSet<String> =
        ["portcullis_a_seconds_bucket", "portcullis_a_seconds", "portcullis_b_total", "portcullis_b_total_count", "portcullis_c_total"]
            .map(String::from)
            .into();
    assert_eq!(missing_metrics(&queried, exposition), ["portcullis_a_seconds", "portcullis_b_total_count", "portcullis_c_total"]);
    assert_eq!(metric_names("sum by (le) (rate(portcullis_a_seconds_bucket{job=~\"$job\"}[5m])) / process_open_fds"), {
        let want: BTreeSet<String> = ["portcullis_a_seconds_bucket", "process_open_fds"].map(String::from).into();
        want
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded_by(LONG_TEST_BOUND, async {
        let up = spawn_upstream().await;
        let (_held_upstream, dead) = refusing_addr();
        let (_held_jwks, no_jwks) = refusing_addr();
        let iss = TestIssuer::new();
        let cfg = ConfigBuilder::new(&up)
            .upstream("dead", &format!("http://{dead}"), r#"connect_timeout = "1s""#)
            .section(&iss.config())
            .issuer("local", "https://gateway.local", &["EdDSA"], "private_key = \"issuer-ed25519.pem\"\ngenerate_key = true")
            .issuer("idp", "https://idp.test", &["RS256"], &format!("jwks_url = \"http://{no_jwks}/keys\""))
            .section("[token_endpoint]\npath = \"/token\"\nissuer = \"local\"\nusers_file = \"users.toml\"")
            .route("me", "/users/me", "")
            .route("admin", "/admin/*", r#"roles_any = ["admin"]"#)
            .route("limited", "/limited", "auth = \"public\"\nrate_limit = { key = \"route\", rate = \"1/min\", burst = 1 }")
            .route_to("dead", "dead", "/dead/*", AUTH_PUBLIC)
            .build();
        let users = std::fs::read(manifest("examples/demo-users.toml")).unwrap();
        let gw = iss.gateway_with(&cfg, &[("users.toml", &users)]).await;
        let c = client(&gw);

        // One of each outcome the dashboard and the alerts look at.
        assert_eq!(get(&c, &gw.https_url("/users/me"), Some(&iss.token("bob", &["user"]))).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/users/me"), None).await.status, 401);
        assert_eq!(get(&c, &gw.https_url("/admin/x"), Some(&iss.token("bob", &["user"]))).await.status, 403);
        assert_eq!(get(&c, &gw.https_url("/limited"), None).await.status, 200);
        assert_eq!(get(&c, &gw.https_url("/limited"), None).await.status, 429);
        assert_eq!(get(&c, &gw.https_url("/dead/x"), None).await.status, 502);
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let login = |password: &str| format!("grant_type=password&username=john.doe&password={password}");
        let a = request(&c, Method::POST, &gw.https_url("/token"), &form, login("securepassword").as_bytes()).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let a = request(&c, Method::POST, &gw.https_url("/token"), &form, login("wrong").as_bytes()).await;
        assert_eq!(a.status, 400, "{}", a.text());
        // An HTTP/2 connection that sends HTTP/1 instead of the preface: a protocol error.
        let mut tls = gateway_tls(&gw, &[b"h2"]).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut sink)).await;

        // The JWKS fetch for `idp` fails in the background; wait until it has been counted.
        let deadline = tokio::time::Instant::now() + BOUND;
        let text = loop {
            let text = metrics(&c, &gw).await;
            if text.contains("portcullis_jwks_refresh_total{") && text.contains("portcullis_http2_protocol_errors_total{") {
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "no JWKS refresh or HTTP/2 error counted:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let dash: BTreeSet<String> = dashboard_queries(&dashboard()).iter().flat_map(|q| metric_names(q)).collect();
        let rules: BTreeSet<String> = ["alerts.yml", "alerts_test.yml"]
            .iter()
            .flat_map(|f| metric_names(&without_comments(&read(&format!("deploy/prometheus/{f}")))))
            .collect();
        assert!(dash.len() >= 20 && rules.len() >= 6, "too few names found: {dash:?} {rules:?}");
        let queried: BTreeSet<String> = dash.union(&rules).cloned().collect();
        assert_eq!(queried.iter().filter(|n| n.starts_with("process_")).count(), 3, "{queried:?}");
        let missing = missing_metrics(&queried, &text);
        assert!(missing.is_empty(), "queried but not exported: {missing:?}\n--- exposition ---\n{text}");
        gw.stop().await;
    })
    .await;
}
