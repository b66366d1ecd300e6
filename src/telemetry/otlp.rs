//! OTLP/HTTP export: requests' spans encoded as an `ExportTraceServiceRequest` (protobuf, opentelemetry-proto's
//! trace schema) and POSTed in batches to the collector, from one task beside the request path.
//!
//! The encoder writes only the fields the gateway's fixed span shape uses; tests/observability.rs decodes what it
//! sends with opentelemetry-proto's generated types, so the two stay in agreement.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::mpsc::{Receiver, TryRecvError};

use super::{RequestSpans, Timing, TracingError, TracingSettings};
use crate::metrics::Metrics;

/// The queue is drained this often; what it held is sent in batches of at most [`BATCH`] requests.
const BATCH: usize = 512;
const DRAIN_EVERY: Duration = Duration::from_millis(100);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The exporter task's state: the collector's address, a client for it, and the counters of what became of spans.
pub struct Exporter {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: http::Uri,
    service_name: String,
    exported: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl Exporter {
    pub fn new(settings: &TracingSettings, metrics: &Metrics) -> Result<Exporter, TracingError> {
        let tls = crate::tls_client::client_config(settings.ca.as_ref().map(|c| (c.path.as_path(), &c.pem[..])))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        Ok(Exporter {
            client: Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector),
            endpoint: settings.endpoint.clone(),
            service_name: settings.service_name.clone(),
            exported: metrics.tracing_spans.with_label_values(&["exported"]),
            failed: metrics.tracing_spans.with_label_values(&["dropped_export_failed"]),
        })
    }

    /// Drains the queue every 100 ms and sends what it holds, in batches; once every sender is gone it
    /// sends what is left and ends.
    pub async fn run(self, rx: Receiver<RequestSpans>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            let mut done = false;
            loop {
                match rx.try_recv() {
                    Ok(spans) => batch.push(spans),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        done = true;
                        break;
                    }
                }
                if batch.len() >= BATCH {
                    self.export(&mut batch, &mut warned).await;
                }
            }
            if !batch.is_empty() {
                self.export(&mut batch, &mut warned).await;
            }
            if done {
                return;
            }
        }
    }

    async fn export(&self, batch: &mut Vec<RequestSpans>, warned: &mut Option<std::time::Instant>) {
        let spans: u64 = batch.iter().map(RequestSpans::span_count).sum();
        match self.send(encode(batch, &self.service_name)).await {
            Ok(()) => self.exported.inc_by(spans),
            Err(e) => {
                self.failed.inc_by(spans);
                // One line a minute at most: a collector that is down is a state, not a stream of events.
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    *warned = Some(std::time::Instant::now());
                    tracing::warn!(collector = %self.endpoint, error = %e, "span export failed; spans are dropped until the collector answers (portcullis_tracing_spans_total)");
                }
            }
        }
        batch.clear();
    }

    async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let req = http::Request::post(&self.endpoint)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(EXPORT_TIMEOUT, self.client.request(req)).await {
            Err(_) => Err("timed out".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(rsp)) if rsp.status().is_success() => Ok(()),
            Ok(Ok(rsp)) => Err(format!("collector answered {}", rsp.status())),
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Protobuf: field numbers from opentelemetry/proto/{collector/trace,trace,common,resource}/v1.

const SPAN_KIND_INTERNAL: u64 = 1;
const SPAN_KIND_SERVER: u64 = 2;
const SPAN_KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;

/// The `ExportTraceServiceRequest` for a batch: one resource (this service), one scope, every request's spans.
pub fn encode(batch: &[RequestSpans], service_name: &str) -> Vec<u8> {
    let mut resource = Vec::new();
    attribute(&mut resource, 1, "service.name", &Value::Str(service_name));
    let mut scope = Vec::new();
    string(&mut scope, 1, "portcullis");
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    let mut scope_spans = Vec::with_capacity(64 + batch.len() * 640);
    message(&mut scope_spans, 1, &scope);
    let mut span = Vec::with_capacity(256);
    for r in batch {
        write_spans(r, &mut scope_spans, &mut span);
    }
    // ResourceSpans { resource = 1, scope_spans = 2 }, its length summed rather than built and copied.
    let field_len = |n: usize| 1 + varint_len(n as u64) + n;
    let resource_spans_len = field_len(resource.len()) + field_len(scope_spans.len());
    let mut out = Vec::with_capacity(field_len(resource_spans_len));
    tag(&mut out, 1, 2);
    varint(&mut out, resource_spans_len as u64);
    message(&mut out, 1, &resource);
    message(&mut out, 2, &scope_spans);
    out
}

enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

/// One span as the encoder writes it. Its name is written in pieces (method, space, route): no string is built.
struct Span<'a> {
    trace_id: &'a [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: Option<&'a [u8]>,
    name: [&'a str; 3],
    kind: u64,
    start: u64,
    end: u64,
    error: Option<&'a str>,
}

/// Writes a request's spans, each as a `Span` field of `scope_spans`, using `scratch` for the one being written.
fn write_spans(r: &RequestSpans, scope_spans: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    let ids = &r.ids;
    let at = |t: std::time::Instant| ids.wall_start.saturating_add(nanos(t.saturating_duration_since(r.timing.start)));
    let child = |span_id, name: &'static str, kind, t: &Timing, error| Span {
        trace_id: &ids.trace_id,
        span_id,
        parent: Some(ids.server_span),
        trace_state: None,
        name: [name, "", ""],
        kind,
        start: at(t.start),
        end: at(t.end),
        error,
    };
    let mut put = |span: Span<'_>, attributes: &[(&str, Value<'_>)]| {
        scratch.clear();
        span.write(scratch, attributes);
        message(scope_spans, 2, scratch);
    };
    let server = Span {
        trace_id: &ids.trace_id,
        span_id: ids.server_span,
        parent: ids.parent,
        trace_state: ids.tracestate.as_ref().map(|v| v.as_bytes()),
        name: [r.method.as_str(), " ", &r.route],
        kind: SPAN_KIND_SERVER,
        start: at(r.timing.start),
        end: at(r.timing.end),
        error: (r.status >= 500).then_some("server error"),
    };
    let base = [
        ("http.request.method", Value::Str(r.method.as_str())),
        ("http.route", Value::Str(&r.route)),
        ("http.response.status_code", Value::Int(i64::from(r.status))),
        ("network.protocol.version", Value::Str(r.http_version)),
    ];
    match r.reason {
        Some(reason) => {
            let [a, b, c, d] = base;
            put(server, &[a, b, c, d, ("portcullis.reason", Value::Str(reason))]);
        }
        None => put(server, &base),
    }
    if let Some((t, cache_hit)) = &r.auth {
        match cache_hit {
            Some(hit) => put(
                child(super::random_span_id(), "authenticate", SPAN_KIND_INTERNAL, t, None),
                &[("portcullis.auth.cache_hit", Value::Bool(*hit))],
            ),
            None => put(child(super::random_span_id(), "authenticate", SPAN_KIND_INTERNAL, t, Some(r.reason.unwrap_or("refused"))), &[]),
        }
    }
    if let Some((t, limited)) = &r.limit {
        put(
            child(super::random_span_id(), "rate_limit", SPAN_KIND_INTERNAL, t, None),
            &[("portcullis.rate_limited", Value::Bool(*limited))],
        );
    }
    if let Some(u) = &r.upstream {
        let span = child(ids.upstream_span, "upstream", SPAN_KIND_CLIENT, &u.timing, u.error);
        match u.status {
            Some(status) => {
                put(span, &[("portcullis.upstream", Value::Str(&u.upstream)), ("http.response.status_code", Value::Int(i64::from(status)))])
            }
            None => put(span, &[("portcullis.upstream", Value::Str(&u.upstream))]),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Span<'_> {
    fn write(&self, out: &mut Vec<u8>, attributes: &[(&str, Value<'_>)]) {
        bytes(out, 1, self.trace_id);
        bytes(out, 2, &self.span_id);
        if let Some(ts) = self.trace_state {
            bytes(out, 3, ts);
        }
        if let Some(p) = &self.parent {
            bytes(out, 4, p);
        }
        tag(out, 5, 2);
        varint(out, self.name.iter().map(|p| p.len() as u64).sum());
        for piece in self.name {
            out.extend_from_slice(piece.as_bytes());
        }
        varint_field(out, 6, self.kind);
        fixed64(out, 7, self.start);
        fixed64(out, 8, self.end);
        for (k, v) in attributes {
            attribute(out, 9, k, v);
        }
        if let Some(text) = self.error {
            // Status { message = 2, code = 3 }
            tag(out, 15, 2);
            varint(out, (1 + varint_len(text.len() as u64) + text.len() + 2) as u64);
            string(out, 2, text);
            varint_field(out, 3, STATUS_ERROR);
        }
    }
}

/// A `KeyValue` as field `field` of the enclosing message, written in place: its lengths are known ahead, so no
/// scratch buffer per attribute.
fn attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &Value<'_>) {
    let any_len = match value {
        Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Value::Bool(b) => 1 + varint_len(u64::from(*b)),
        Value::Int(i) => 1 + varint_len(*i as u64),
    };
    let kv_len = 1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(any_len as u64) + any_len;
    tag(out, field, 2);
    varint(out, kv_len as u64);
    string(out, 1, key);
    tag(out, 2, 2);
    varint(out, any_len as u64);
    match value {
        Value::Str(s) => string(out, 1, s),
        Value::Bool(b) => varint_field(out, 2, u64::from(*b)),
        // int64 is written as its two's complement varint.
        Value::Int(i) => varint_field(out, 3, *i as u64),
    }
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 0);
    varint(out, v);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

fn message(out: &mut Vec<u8>, field: u32, m: &[u8]) {
    bytes(out, field, m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(varint_len(v), out.len(), "{v}");
        }
    }
}
