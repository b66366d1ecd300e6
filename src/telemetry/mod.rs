//! Request tracing: the W3C trace context a request arrives with and continues with, and (with `[tracing]`)
//! OpenTelemetry spans for each sampled request, exported in batches over OTLP/HTTP off the request path.
//!
//! A request's spans have a fixed shape (the server span; children for authentication, the route's rate limit
//! and the upstream call), so they are recorded as one plain struct per request and encoded by [`otlp`] only
//! in the exporter task: the request path pays two clock reads and a channel send, not a tracing SDK.

pub mod otlp;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderValue};

use crate::metrics::Metrics;

/// Whose `traceparent` a request's trace continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustIncoming {
    All,
    /// Only requests from `trusted_proxies` (an edge gateway starts its own traces for the internet's requests).
    TrustedProxies,
    None,
}

/// The checked `[tracing]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// Where spans are POSTed (the collector's `/v1/traces`).
    pub endpoint: http::Uri,
    pub sample_ratio: f64,
    pub service_name: String,
    pub trust_incoming: TrustIncoming,
    /// PEM CA certificates trusted for an https collector, beside the system roots.
    pub ca: Option<crate::upstream::CaFile>,
    /// Requests' spans waiting for export; beyond it they are dropped (and counted), never waited for.
    pub max_queue: usize,
}

/// A request's place in its trace, decided when it arrives.
#[derive(Debug, Clone)]
pub struct TraceIds {
    pub trace_id: [u8; 16],
    pub server_span: [u8; 8],
    /// The upstream call's span: the parent the upstream is told of.
    pub upstream_span: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    /// The caller's `tracestate`, kept only when its trace is continued.
    pub tracestate: Option<HeaderValue>,
    /// Unix time of the request's start in nanoseconds (sampled requests only).
    pub wall_start: u64,
}

impl TraceIds {
    /// Sets the upstream's `traceparent` (this trace, the upstream call as parent) and `tracestate`.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        let tp = TraceParent { trace_id: self.trace_id, span_id: self.upstream_span, sampled: self.sampled };
        if let Ok(v) = HeaderValue::from_bytes(&tp.header_value()) {
            headers.insert(TRACEPARENT, v);
        }
        match &self.tracestate {
            Some(ts) => {
                headers.insert(TRACESTATE, ts.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    pub fn trace_id_hex(&self) -> [u8; 32] {
        TraceParent { trace_id: self.trace_id, span_id: self.server_span, sampled: self.sampled }.trace_id_hex()
    }
}

pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// When a stage ran.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: Instant,
    pub end: Instant,
}

/// The upstream call of a request.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    pub upstream: String,
    pub timing: Timing,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
}

/// One sampled request's spans, as recorded on the request path.
#[derive(Debug, Clone)]
pub struct RequestSpans {
    pub ids: TraceIds,
    pub timing: Timing,
    pub method: http::Method,
    pub route: String,
    pub status: u16,
    pub http_version: &'static str,
    pub reason: Option<&'static str>,
    /// Authentication: when, and whether the token came from the verified-token cache.
    pub auth: Option<(Timing, Option<bool>)>,
    /// The route's rate limit: when, and whether it refused.
    pub limit: Option<(Timing, bool)>,
    pub upstream: Option<UpstreamCall>,
}

impl RequestSpans {
    /// How many spans the request makes.
    pub fn span_count(&self) -> u64 {
        1 + u64::from(self.auth.is_some()) + u64::from(self.limit.is_some()) + u64::from(self.upstream.is_some())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("tracing: ca_file {0}")]
    Tls(#[from] crate::tls_client::ClientTlsError),
}

/// Starts traces and hands sampled requests' spans to the exporter task.
pub struct Tracer {
    settings: Arc<TracingSettings>,
    /// A trace id whose last 8 bytes (as a number, halved) fall below this is sampled: the decision depends on
    /// the id alone, as OpenTelemetry's TraceIdRatioBased sampler makes it.
    threshold: u64,
    /// A std channel, not tokio's: sending wakes no task (the exporter drains it on its own clock), so a request
    /// pays a few atomics, not a task switch.
    queue: std::sync::mpsc::SyncSender<RequestSpans>,
    dropped: prometheus::IntCounter,
}

impl Tracer {
    /// Starts the exporter task (inside a tokio runtime). It ends, after a last export, once the tracer is dropped.
    pub fn start(settings: Arc<TracingSettings>, metrics: &Metrics) -> Result<Tracer, TracingError> {
        let (queue, rx) = std::sync::mpsc::sync_channel(settings.max_queue.max(1));
        let exporter = otlp::Exporter::new(&settings, metrics)?;
        tokio::spawn(exporter.run(rx));
        let threshold = (settings.sample_ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
        Ok(Tracer { settings, threshold, queue, dropped: metrics.tracing_spans.with_label_values(&["dropped_queue_full"]) })
    }

    /// The trace a request belongs to: its caller's, if trusted and well-formed, else a new one.
    pub fn begin(&self, headers: &HeaderMap, from_trusted_proxy: bool) -> TraceIds {
        let trusted = match self.settings.trust_incoming {
            TrustIncoming::All => true,
            TrustIncoming::TrustedProxies => from_trusted_proxy,
            TrustIncoming::None => false,
        };
        let parent = if trusted { headers.get(TRACEPARENT).and_then(|v| TraceParent::parse(v.as_bytes())) } else { None };
        let (trace_id, sampled) = match parent {
            Some(p) => (p.trace_id, p.sampled),
            None => {
                let id = random_trace_id();
                (id, self.samples(&id))
            }
        };
        let wall_start = if sampled { unix_nanos(SystemTime::now()) } else { 0 };
        TraceIds {
            trace_id,
            server_span: random_span_id(),
            upstream_span: random_span_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            tracestate: parent.and_then(|_| headers.get(TRACESTATE).cloned()),
            wall_start,
        }
    }

    fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(low) >> 1) < self.threshold
    }

    /// Queues a sampled request's spans; a full queue drops them (counted): the request never waits on export.
    pub fn record(&self, spans: RequestSpans) {
        let n = spans.span_count();
        if self.queue.try_send(spans).is_err() {
            self.dropped.inc_by(n);
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&crate::edge::headers_request::next_random().to_be_bytes());
    id[8..].copy_from_slice(&crate::edge::headers_request::next_random().to_be_bytes());
    id
}

fn random_span_id() -> [u8; 8] {
    // Never all zero (the spec's invalid id): splitmix64 maps exactly one state to 0, so retry once.
    let n = crate::edge::headers_request::next_random();
    if n == 0 {
        return crate::edge::headers_request::next_random().max(1).to_be_bytes();
    }
    n.to_be_bytes()
}

/// A W3C `traceparent` (version 00): which trace a request belongs to and which span is its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; None for anything malformed or the all-zero ids the spec declares invalid.
    /// A later version's longer value is read by its version-00 prefix, as the spec asks.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The value to send on: version 00, this trace, `span_id` as the parent.
    pub fn header_value(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        write_hex(&mut out[3..35], &self.trace_id);
        write_hex(&mut out[36..52], &self.span_id);
        write_hex(&mut out[53..55], &[u8::from(self.sampled)]);
        out
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        write_hex(&mut out, &self.trace_id);
        out
    }
}

/// Lowercase hex only: the spec forbids uppercase.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_back_a_valid_traceparent() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert!(tp.sampled);
        assert_eq!(&tp.trace_id_hex(), b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(&tp.header_value()[..], VALID);
    }

    #[test]
    fn refuses_malformed_values() {
        let cases: &[&[u8]] = &[
            b"",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for c in cases {
            assert_eq!(TraceParent::parse(c), None, "{}", String::from_utf8_lossy(c));
        }
        // A later version may carry more after its own dash.
        assert!(TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }
}
