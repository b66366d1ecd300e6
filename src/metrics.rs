//! Prometheus metrics: a registry owned by the running gateway (no globals), and per-route handles resolved
//! once per config so the hot path only bumps atomics.

use std::sync::OnceLock;

use http::{Method, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the gateway exports. Names and labels are a contract.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub authz_denied: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub token_issued: IntCounterVec,
    pub token_failures: IntCounterVec,
    pub jwt_cache_hits: IntCounter,
    pub jwt_cache_misses: IntCounter,
    pub jwks_refresh: IntCounterVec,
    pub jwks_keys: IntGaugeVec,
    pub connections_active: IntGaugeVec,
    pub tls_handshake_failures: IntCounter,
    pub connections_refused: IntCounter,
    pub http2_protocol_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: IntGauge,
    /// 1 while the config on disk is the one serving, 0 after a refused reload: an alert on it lasts as long as
    /// the bad file does (a counter of failures would forget it).
    pub config_last_reload_successful: IntGauge,
    pub tracing_spans: IntCounterVec,
    pub upstream_target_healthy: IntGaugeVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub upstream_ejections: IntCounterVec,
    pub decisions: IntCounterVec,
    pub store_requests: IntCounterVec,
    pub store_duration: HistogramVec,
    pub store_up: IntGauge,
    pub rate_limit_fallback: IntCounterVec,
    pub revocations_active: IntGauge,
}

/// Buckets from 100 µs to 10 s: a proxy hop is sub-millisecond, a slow upstream seconds.
const BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // ok: static definitions
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    /// Creates and registers every metric in a new registry.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}")); // ok: static
            let _ = r.register(Box::new(h.clone()));
            h
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}")); // ok: static
            let _ = r.register(Box::new(c.clone()));
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // ok: static
            let _ = r.register(Box::new(g.clone()));
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}")); // ok: static
            let _ = r.register(Box::new(g.clone()));
            g
        };
        let build = gauge_vec("portcullis_build_info", "Build information.", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let last =
            IntGauge::new("portcullis_config_last_reload_success_timestamp_seconds", "Unix time of the last successful config load.")
                .unwrap_or_else(|e| panic!("metric: {e}")); // ok: static
        let _ = r.register(Box::new(last.clone()));
        let successful =
            IntGauge::new("portcullis_config_last_reload_successful", "1 if the last config load or reload succeeded, else 0.")
                .unwrap_or_else(|e| panic!("metric: {e}")); // ok: static
        let _ = r.register(Box::new(successful.clone()));
        // process_* (CPU, resident memory, open descriptors): what every dashboard puts beside the proxy's own.
        #[cfg(target_os = "linux")]
        let _ = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        Metrics {
            requests: counter_vec(
                &r,
                "portcullis_requests_total",
                "Requests answered, by route, method and status.",
                &["route", "method", "status"],
            ),
            request_duration: hist("portcullis_request_duration_seconds", "Time from request head to response head, by route.", &["route"]),
            upstream_duration: hist("portcullis_upstream_duration_seconds", "Upstream time to response head, by upstream.", &["upstream"]),
            upstream_errors: counter_vec(
                &r,
                "portcullis_upstream_errors_total",
                "Upstream failures by kind (connect, timeout, reset).",
                &["upstream", "kind"],
            ),
            auth_failures: counter_vec(
                &r,
                "portcullis_auth_failures_total",
                "Authentication failures by route and reason.",
                &["route", "reason"],
            ),
            authz_denied: counter_vec(&r, "portcullis_authz_denied_total", "Authorization denials by route and rule.", &["route", "rule"]),
            rate_limited: counter_vec(&r, "portcullis_rate_limited_total", "Requests refused by a rate limit.", &["route", "key"]),
            token_issued: counter_vec(&r, "portcullis_token_issued_total", "Tokens issued by the token endpoint, by grant.", &["grant"]),
            token_failures: counter_vec(
                &r,
                "portcullis_token_failures_total",
                "Token endpoint failures by grant and error.",
                &["grant", "error"],
            ),
            jwt_cache_hits: counter("portcullis_jwt_cache_hits_total", "Verified-token cache hits."),
            jwt_cache_misses: counter("portcullis_jwt_cache_misses_total", "Verified-token cache misses (full verification)."),
            jwks_refresh: counter_vec(&r, "portcullis_jwks_refresh_total", "JWKS fetches by issuer and result.", &["issuer", "result"]),
            jwks_keys: gauge_vec("portcullis_jwks_keys", "Keys currently held per JWKS issuer.", &["issuer"]),
            connections_active: gauge_vec("portcullis_connections_active", "Open client connections by listener.", &["listener"]),
            tls_handshake_failures: counter("portcullis_tls_handshake_failures_total", "TLS handshakes that failed or timed out."),
            connections_refused: counter(
                "portcullis_connections_refused_total",
                "Connections closed at accept: their client held max_connections_per_client already.",
            ),
            http2_protocol_errors: counter_vec(
                &r,
                "portcullis_http2_protocol_errors_total",
                "HTTP/2 connections closed for a protocol error or a flood (rapid reset, CONTINUATION, SETTINGS), by reason.",
                &["reason"],
            ),
            config_reloads: counter_vec(&r, "portcullis_config_reloads_total", "Config loads and reloads by result.", &["result"]),
            config_last_reload_success: last,
            config_last_reload_successful: successful,
            tracing_spans: counter_vec(
                &r,
                "portcullis_tracing_spans_total",
                "Spans by what became of them: exported, dropped_queue_full, dropped_export_failed.",
                &["result"],
            ),
            upstream_target_healthy: gauge_vec(
                "portcullis_upstream_target_healthy",
                "1 if the target takes new requests (passing its checks, not ejected), else 0.",
                &["upstream", "target"],
            ),
            upstream_requests: counter_vec(
                &r,
                "portcullis_upstream_requests_total",
                "Attempts sent to each target, by the class of its answer (error: no answer).",
                &["upstream", "target", "status_class"],
            ),
            upstream_retries: counter_vec(
                &r,
                "portcullis_upstream_retries_total",
                "Requests retried on another target, by the failure retried (connect, reset, timeout, 502, 503, 504).",
                &["upstream", "reason"],
            ),
            upstream_ejections: counter_vec(
                &r,
                "portcullis_upstream_ejections_total",
                "Targets ejected after consecutive gateway failures.",
                &["upstream", "target"],
            ),
            decisions: counter_vec(
                &r,
                "portcullis_decisions_total",
                "Forward-auth decisions by route and result (allow, deny, error).",
                &["route", "result"],
            ),
            store_requests: counter_vec(
                &r,
                "portcullis_store_requests_total",
                "Calls to the shared store by operation and result (ok, error, timeout, unavailable: not tried, circuit open).",
                &["op", "result"],
            ),
            store_duration: hist("portcullis_store_duration_seconds", "Time of one call to the shared store, by operation.", &["op"]),
            store_up: gauge("portcullis_store_up", "1 while the shared store answers (circuit closed), else 0."),
            rate_limit_fallback: counter_vec(
                &r,
                "portcullis_rate_limit_fallback_total",
                "Shared-limit decisions made without the store (its on_store_error fallback), by route.",
                &["route"],
            ),
            revocations_active: gauge("portcullis_revocations_active", "Revoked token ids and subject cut-offs held now."),
            registry: r,
        }
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

const METHODS: [Method; 7] = [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS];
const STATUSES: [u16; 22] = [101, 200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503, 504, 206];

const AUTH_REASONS: [&str; 15] = [
    "missing",
    "malformed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "unknown_kid",
    "algorithm",
    "too_large",
    "claim_unforwardable",
    "inactive",
    "introspection_unavailable",
    "cert_binding",
    "revoked",
];
const AUTHZ_RULES: [&str; 5] = ["roles", "scopes", "claims", "issuer", "client_cert"];
const LIMIT_KEYS: [&str; 4] = ["ip", "subject", "route", "claim"];

/// Pre-resolved handles for one route: the request path touches only atomics.
pub struct RouteMetrics {
    route: String,
    duration: Histogram,
    counters: Box<[OnceLock<IntCounter>]>,
    auth_failures: RefusalCounters,
    authz_denied: RefusalCounters,
    rate_limited: RefusalCounters,
}

/// One route's `{route, <reason>}` counters of a refusal metric, resolved on first use so that a flood of
/// refusals takes no lock shared by every request.
struct RefusalCounters {
    labels: &'static [&'static str],
    slots: Box<[OnceLock<IntCounter>]>,
}

impl RefusalCounters {
    fn new(labels: &'static [&'static str]) -> RefusalCounters {
        RefusalCounters { labels, slots: labels.iter().map(|_| OnceLock::new()).collect() }
    }

    fn inc(&self, vec: &IntCounterVec, route: &str, label: &str) {
        match self.labels.iter().position(|l| *l == label) {
            Some(i) => self.slots[i].get_or_init(|| vec.with_label_values(&[route, label])).inc(),
            None => vec.with_label_values(&[route, label]).inc(),
        }
    }
}

impl RouteMetrics {
    /// Resolves the handles of `route`.
    pub fn new(m: &Metrics, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            duration: m.request_duration.with_label_values(&[route]),
            counters: (0..METHODS.len() * STATUSES.len()).map(|_| OnceLock::new()).collect(),
            auth_failures: RefusalCounters::new(&AUTH_REASONS),
            authz_denied: RefusalCounters::new(&AUTHZ_RULES),
            rate_limited: RefusalCounters::new(&LIMIT_KEYS),
        }
    }

    /// Counts a refused token in `portcullis_auth_failures_total{route,reason}`.
    pub fn auth_failure(&self, m: &Metrics, reason: &str) {
        self.auth_failures.inc(&m.auth_failures, &self.route, reason);
    }

    /// Counts a policy denial in `portcullis_authz_denied_total{route,rule}`.
    pub fn authz_denied(&self, m: &Metrics, rule: &str) {
        self.authz_denied.inc(&m.authz_denied, &self.route, rule);
    }

    /// Counts a limited request in `portcullis_rate_limited_total{route,key}`.
    pub fn rate_limited(&self, m: &Metrics, key: &str) {
        self.rate_limited.inc(&m.rate_limited, &self.route, key);
    }

    /// Counts one answered request and its duration.
    pub fn observe(&self, m: &Metrics, method: &Method, status: StatusCode, seconds: f64) {
        self.duration.observe(seconds);
        let mi = METHODS.iter().position(|x| x == method);
        let si = STATUSES.iter().position(|s| *s == status.as_u16());
        match (mi, si) {
            (Some(mi), Some(si)) => {
                let slot = &self.counters[mi * STATUSES.len() + si];
                slot.get_or_init(|| m.requests.with_label_values(&[&self.route, method.as_str(), status.as_str()])).inc();
            }
            // Rare method or status: the labelled lookup is fine off the common path. Methods are client text: any
            // other than the common ones is "OTHER", or each made-up method would add a series (unbounded memory).
            _ => {
                let method = match mi {
                    Some(_) => method.as_str(),
                    None if [Method::TRACE, Method::CONNECT].contains(method) => method.as_str(),
                    None => "OTHER",
                };
                m.requests.with_label_values(&[&self.route, method, status.as_str()]).inc()
            }
        }
    }

    /// Names the route.
    pub fn route(&self) -> &str {
        &self.route
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Metrics::new();
        let r = RouteMetrics::new(&m, "me");
        r.observe(&m, &Method::GET, StatusCode::OK, 0.001);
        r.observe(&m, &Method::from_bytes(b"PROPFIND").unwrap(), StatusCode::IM_A_TEAPOT, 0.001);
        r.observe(&m, &Method::from_bytes(b"MADEUP").unwrap(), StatusCode::IM_A_TEAPOT, 0.001);
        m.auth_failures.with_label_values(&["me", "expired"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("portcullis_requests_total{method=\"GET\",route=\"me\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("portcullis_requests_total{method=\"OTHER\",route=\"me\",status=\"418\"} 2"), "{text}");
        assert!(text.contains("portcullis_request_duration_seconds_bucket"));
        assert!(text.contains("portcullis_build_info"));
    }

    #[test]
    fn refusals_count_under_the_route_and_reason() {
        let m = Metrics::new();
        let r = RouteMetrics::new(&m, "me");
        r.auth_failure(&m, "expired");
        r.auth_failure(&m, "expired");
        r.authz_denied(&m, "roles");
        r.rate_limited(&m, "subject");
        r.rate_limited(&m, "unlisted");
        assert_eq!(m.auth_failures.with_label_values(&["me", "expired"]).get(), 2);
        assert_eq!(m.authz_denied.with_label_values(&["me", "roles"]).get(), 1);
        assert_eq!(m.rate_limited.with_label_values(&["me", "subject"]).get(), 1);
        assert_eq!(m.rate_limited.with_label_values(&["me", "unlisted"]).get(), 1);
    }
}
