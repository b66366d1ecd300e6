//! Upstreams as pools: each `[upstreams.NAME]` is a set of targets (configured, or every address a name resolves
//! to), a balancing rule, health (active checks and passive ejection), and per-target connection pools.
//!
//! - [`Upstream`] holds the current [`TargetSet`] behind an `ArcSwap`: re-resolution and health change it without
//!   a lock on the request path; a request keeps the `Arc<Target>` it was sent to, so a target that leaves drains.
//! - [`balance`] picks a target, [`health`] runs the checks and ejections, [`resolve`] re-resolves names,
//!   [`retry`] decides and budgets retries, [`forward()`] sends one request (with its retries) and streams the answer.

pub mod balance;
pub mod forward;
pub mod grpc;
pub mod health;
pub mod resolve;
pub mod retry;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::{IntCounter, IntGauge};

use crate::body::{Body, Places};
use crate::h1::client;
use crate::metrics::Metrics;

pub use balance::{Balance, HashKey};
pub use forward::{forward, forwarded_query, Call, Outbound, ProxyError};
pub use grpc::{grpc_timeout, is_grpc};
pub use health::HealthSettings;
pub use resolve::Resolver;
pub use retry::{Budget, RetryPolicy};

/// How the gateway speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 (the own client for bodiless requests to http:// targets, hyper's for the rest).
    #[default]
    Http1,
    /// HTTP/2 only: ALPN `h2` over TLS, prior knowledge (h2c) over http://. Requests share few connections.
    H2,
    /// ALPN offers `h2` and `http/1.1` on https://; HTTP/1.1 on http://.
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::Auto => "auto",
        }
    }
}

/// One configured target: where, and its share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub authority: Authority,
    pub weight: u32,
}

/// A checked upstream: its targets, how they are balanced and checked, and the timeouts of an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub name: String,
    /// Every target's scheme (one per upstream).
    pub scheme: Scheme,
    pub targets: Vec<TargetSpec>,
    pub balance: Balance,
    pub protocol: Protocol,
    /// Re-resolve host names this often, each address becoming a target; None: connect by name.
    pub resolve_every: Option<Duration>,
    pub health: HealthSettings,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub preserve_host: bool,
    /// PEM CA certificates trusted for this https upstream, beside the system roots.
    pub ca: Option<CaFile>,
    /// Requests in flight to this upstream (each holds one place until its answer's body ends).
    pub max_connections: usize,
    /// How long a request waits for one of those places before it is answered 503.
    pub queue_timeout: Duration,
}

impl UpstreamSettings {
    /// The first target's authority (the only one of a single-`url` upstream).
    pub fn authority(&self) -> Option<&Authority> {
        self.targets.first().map(|t| &t.authority)
    }
}

/// A route's own terms for its upstream exchange.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteCall {
    /// Overrides the upstream's `timeout`.
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

/// A CA file as read at load: its contents are part of the settings, so a reload after the file changed in place
/// builds the upstream anew (an unchanged upstream keeps its pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

type HyperClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Builds the TLS client config for https upstreams: system roots, plus the upstream's own CA file.
pub fn upstream_tls(ca: Option<&CaFile>) -> Result<Arc<rustls::ClientConfig>, crate::tls_client::ClientTlsError> {
    crate::tls_client::client_config(ca.map(|c| (c.path.as_path(), &c.pem[..]))).map(Arc::new)
}

/// One target: where to connect, the name it answers to, its pools, health and counters.
pub struct Target {
    /// Where connections go (`10.0.0.11:8000`, or `api.internal:8000` when names are not re-resolved): the
    /// `target` label of metrics and the access log.
    pub label: Arc<str>,
    /// The authority connected to, and the one requests name (`Host` without `preserve_host`; TLS server name).
    pub connect: Authority,
    pub host: Authority,
    pub weight: u32,
    /// The target's place in consistent hashing: from its label, so every replica agrees.
    pub(crate) hash: u64,
    pub(crate) client: HyperClient,
    /// The lean client, for bodiless requests to plain-http HTTP/1.1 targets.
    pub(crate) lean: Option<client::Client>,
    pub(crate) health: health::TargetHealth,
    /// Exchanges in flight (for `least_request`).
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// `portcullis_upstream_requests_total` by status class (1xx..5xx), then `error` (no answer).
    requests: [IntCounter; 6],
    pub(crate) healthy_gauge: IntGauge,
    pub(crate) ejections: IntCounter,
}

impl Target {
    fn new(
        up: &UpstreamSettings,
        spec_host: &Authority,
        connect: Authority,
        weight: u32,
        tls: &rustls::ClientConfig,
        m: &Metrics,
    ) -> Target {
        let label: Arc<str> = Arc::from(connect.as_str());
        let client = hyper_client(up, spec_host, &connect, tls);
        let lean = (up.scheme == Scheme::HTTP && up.protocol != Protocol::H2)
            .then(|| client::Client::new(&connect, spec_host, up.connect_timeout))
            .flatten();
        let names = [&up.name[..], &label[..]];
        let class = |c: &str| m.upstream_requests.with_label_values(&[names[0], names[1], c]);
        let requests = [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx"), class("error")];
        let healthy_gauge = m.upstream_target_healthy.with_label_values(&names);
        healthy_gauge.set(1);
        let ejections = m.upstream_ejections.with_label_values(&names);
        Target {
            hash: balance::stable_hash(label.as_bytes()),
            label,
            connect,
            host: spec_host.clone(),
            weight,
            client,
            lean,
            health: health::TargetHealth::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            requests,
            healthy_gauge,
            ejections,
        }
    }

    /// Counts one exchange with this target by its answer's status (None: no answer).
    pub(crate) fn count(&self, status: Option<u16>) {
        let i = match status {
            Some(s @ 100..=599) => usize::from(s / 100) - 1,
            _ => 5,
        };
        self.requests[i].inc();
    }

    /// Same target, same way of reaching it: kept across a re-resolution or a reload.
    fn same_as(&self, connect: &Authority, host: &Authority, weight: u32) -> bool {
        self.connect == *connect && self.host == *host && self.weight == weight
    }
}

/// The pooled client of one target. Over TLS the server name is the configured host's, whatever address the
/// connection goes to.
fn hyper_client(up: &UpstreamSettings, host: &Authority, connect: &Authority, tls: &rustls::ClientConfig) -> HyperClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(up.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls.clone()).https_or_http();
    let builder = match rustls_pki_types::ServerName::try_from(host.host().trim_start_matches('[').trim_end_matches(']').to_string()) {
        Ok(name) if host != connect => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
        _ => builder,
    };
    let connector = match up.protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(http),
        Protocol::H2 => builder.enable_http2().wrap_connector(http),
        Protocol::Auto => builder.enable_all_versions().wrap_connector(http),
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(up.max_connections.min(1024))
        .set_host(true);
    if up.protocol == Protocol::H2 {
        // Pings keep an idle multiplexed connection known alive; a dead one is found within 20 s + 10 s.
        b.http2_only(true).http2_keep_alive_interval(Duration::from_secs(20)).http2_keep_alive_timeout(Duration::from_secs(10));
    }
    b.build(connector)
}

/// The targets in use, and the weighted round-robin order over them.
pub struct TargetSet {
    pub targets: Vec<Arc<Target>>,
    /// Indexes into `targets`, each as often as its weight, interleaved (smooth weighted round robin).
    schedule: Vec<u32>,
}

impl TargetSet {
    fn new(targets: Vec<Arc<Target>>) -> TargetSet {
        let schedule = balance::schedule(&targets.iter().map(|t| t.weight).collect::<Vec<_>>());
        TargetSet { targets, schedule }
    }
}

/// An upstream: its settings, its current targets and what is shared by their requests.
pub struct Upstream {
    pub settings: UpstreamSettings,
    targets: ArcSwap<TargetSet>,
    /// The round-robin position.
    next: AtomicUsize,
    /// Places for requests in flight (`max_connections`): an exchange holds one until its answer's body ends, so
    /// no client (an HTTP/2 connection's streams included) can make the gateway open connections without bound.
    places: Arc<Places>,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    resolver: Resolver,
}

/// The clock ejections are counted on: one for the process, so a target kept across a reload keeps a meaningful
/// ejection end.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

impl Upstream {
    /// Builds an upstream and starts its background task (checks, ejection expiry, re-resolution) when it needs
    /// one. Targets of `previous` that are unchanged are kept, with their connections and health. Must run inside
    /// tokio.
    pub fn new(
        settings: UpstreamSettings,
        tls: &Arc<rustls::ClientConfig>,
        metrics: &Arc<Metrics>,
        resolver: &Resolver,
        previous: Option<&Upstream>,
    ) -> Arc<Upstream> {
        let old: Vec<Arc<Target>> =
            previous.filter(|p| same_clients(&p.settings, &settings)).map(|p| p.targets.load().targets.clone()).unwrap_or_default();
        let mut targets = Vec::new();
        for spec in &settings.targets {
            // Addresses already resolved for this name stay until the next resolution.
            let kept: Vec<_> = old.iter().filter(|t| t.host == spec.authority && t.weight == spec.weight).cloned().collect();
            if !kept.is_empty() && settings.resolve_every.is_some() {
                targets.extend(kept);
                continue;
            }
            match old.iter().find(|t| t.same_as(&spec.authority, &spec.authority, spec.weight)) {
                Some(t) => targets.push(t.clone()),
                None => targets.push(Arc::new(Target::new(&settings, &spec.authority, spec.authority.clone(), spec.weight, tls, metrics))),
            }
        }
        let up = Arc::new(Upstream {
            places: Arc::new(Places::new(settings.max_connections)),
            targets: ArcSwap::from_pointee(TargetSet::new(targets)),
            next: AtomicUsize::new(0),
            tls: tls.clone(),
            metrics: metrics.clone(),
            resolver: resolver.clone(),
            settings,
        });
        if health::needs_task(&up) {
            tokio::spawn(health::run(Arc::downgrade(&up)));
        }
        up
    }

    /// The targets in use now.
    pub fn targets(&self) -> arc_swap::Guard<Arc<TargetSet>> {
        self.targets.load()
    }

    /// Milliseconds since this upstream was built (the ejection clock).
    pub(crate) fn now_ms(&self) -> u64 {
        clock_ms()
    }

    /// True when at least one target takes new requests (healthy and not ejected).
    pub fn has_healthy_target(&self) -> bool {
        let now = self.now_ms();
        self.targets.load().targets.iter().any(|t| t.health.available(now))
    }

    /// Replaces the target set (re-resolution), removing the metrics series of targets that left.
    fn replace_targets(&self, targets: Vec<Arc<Target>>) {
        let old = self.targets.swap(Arc::new(TargetSet::new(targets)));
        let now = self.targets.load();
        for t in &old.targets {
            if !now.targets.iter().any(|n| n.label == t.label) {
                self.forget(&t.label);
            }
        }
    }

    /// After a reload has been swapped in: removes the series of this (old) upstream's targets that `now` no
    /// longer has (None: the upstream is gone).
    pub fn forget_targets_missing_from(&self, now: Option<&Upstream>) {
        let kept = now.map(|n| n.targets.load());
        for t in &self.targets.load().targets {
            if !kept.as_ref().is_some_and(|k| k.targets.iter().any(|n| n.label == t.label)) {
                self.forget(&t.label);
            }
        }
    }

    fn forget(&self, label: &str) {
        let names = [&self.settings.name[..], label];
        let _ = self.metrics.upstream_target_healthy.remove_label_values(&names);
        let _ = self.metrics.upstream_ejections.remove_label_values(&names);
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx", "error"] {
            let _ = self.metrics.upstream_requests.remove_label_values(&[names[0], names[1], class]);
        }
    }
}

/// Two settings whose targets can share clients (connections and TLS are built the same way).
fn same_clients(a: &UpstreamSettings, b: &UpstreamSettings) -> bool {
    a.name == b.name
        && a.scheme == b.scheme
        && a.protocol == b.protocol
        && a.ca == b.ca
        && a.connect_timeout == b.connect_timeout
        && a.max_connections == b.max_connections
        && a.resolve_every.is_some() == b.resolve_every.is_some()
}

#[cfg(test)]
mod tests;
