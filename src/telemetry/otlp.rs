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
use tokio::sync::mpsc::Receiver;

use super::{RequestSpans, Timing, TracingError, TracingSettings};
use crate::metrics::Metrics;

/// A batch is sent when it holds this many requests, or every [`EXPORT_EVERY`].
const BATCH: usize = 256;
const EXPORT_EVERY: Duration = Duration::from_secs(1);
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

    /// Sends batches until every sender is gone, then sends what is left.
    pub async fn run(self, mut rx: Receiver<RequestSpans>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(EXPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<std::time::Instant> = None;
        loop {
            let (flush, done) = tokio::select! {
                got = rx.recv() => match got {
                    Some(spans) => {
                        batch.push(spans);
                        (batch.len() >= BATCH, false)
                    }
                    None => (true, true),
                },
                _ = tick.tick() => (true, false),
            };
            if flush && !batch.is_empty() {
                let spans: u64 = batch.iter().map(RequestSpans::span_count).sum();
                match self.send(encode(&batch, &self.service_name)).await {
                    Ok(()) => self.exported.inc_by(spans),
                    Err(e) => {
                        self.failed.inc_by(spans);
                        // One line a minute at most: a collector that is down is a state, not a stream of events.
                        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                            warned = Some(std::time::Instant::now());
                            tracing::warn!(collector = %self.endpoint, error = %e, "span export failed; spans are dropped until the collector answers (portcullis_tracing_spans_total)");
                        }
                    }
                }
                batch.clear();
            }
            if done {
                return;
            }
        }
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
    attribute(&mut resource, 1, "service.name", Value::Str(service_name));
    let mut scope = Vec::new();
    string(&mut scope, 1, "portcullis");
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    let mut scope_spans = Vec::new();
    message(&mut scope_spans, 1, &scope);
    let mut span = Vec::new();
    for r in batch {
        for s in spans_of(r) {
            span.clear();
            s.write(&mut span);
            message(&mut scope_spans, 2, &span);
        }
    }
    let mut resource_spans = Vec::new();
    message(&mut resource_spans, 1, &resource);
    message(&mut resource_spans, 2, &scope_spans);
    let mut out = Vec::with_capacity(resource_spans.len() + 8);
    message(&mut out, 1, &resource_spans);
    out
}

enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

struct Span<'a> {
    trace_id: &'a [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: Option<&'a [u8]>,
    name: String,
    kind: u64,
    start: u64,
    end: u64,
    attributes: Vec<(&'static str, Value<'a>)>,
    error: Option<&'a str>,
}

fn spans_of(r: &RequestSpans) -> Vec<Span<'_>> {
    let ids = &r.ids;
    let at = |t: std::time::Instant| ids.wall_start.saturating_add(nanos(t.saturating_duration_since(r.timing.start)));
    let times = |t: &Timing| (at(t.start), at(t.end));
    let child = |span_id, name: &str, kind, t: &Timing| {
        let (start, end) = times(t);
        Span {
            trace_id: &ids.trace_id,
            span_id,
            parent: Some(ids.server_span),
            trace_state: None,
            name: name.to_string(),
            kind,
            start,
            end,
            attributes: Vec::new(),
            error: None,
        }
    };
    let mut server = Span {
        trace_id: &ids.trace_id,
        span_id: ids.server_span,
        parent: ids.parent,
        trace_state: ids.tracestate.as_ref().map(|v| v.as_bytes()),
        name: format!("{} {}", r.method, r.route),
        kind: SPAN_KIND_SERVER,
        start: at(r.timing.start),
        end: at(r.timing.end),
        attributes: vec![
            ("http.request.method", Value::Str(r.method.as_str())),
            ("http.route", Value::Str(&r.route)),
            ("http.response.status_code", Value::Int(i64::from(r.status))),
            ("network.protocol.version", Value::Str(r.http_version)),
        ],
        error: (r.status >= 500).then_some("server error"),
    };
    if let Some(reason) = r.reason {
        server.attributes.push(("portcullis.reason", Value::Str(reason)));
    }
    let mut out = vec![server];
    if let Some((t, cache_hit)) = &r.auth {
        let mut s = child(super::random_span_id(), "authenticate", SPAN_KIND_INTERNAL, t);
        match cache_hit {
            Some(hit) => s.attributes.push(("portcullis.auth.cache_hit", Value::Bool(*hit))),
            None => s.error = Some(r.reason.unwrap_or("refused")),
        }
        out.push(s);
    }
    if let Some((t, limited)) = &r.limit {
        let mut s = child(super::random_span_id(), "rate_limit", SPAN_KIND_INTERNAL, t);
        s.attributes.push(("portcullis.rate_limited", Value::Bool(*limited)));
        out.push(s);
    }
    if let Some(u) = &r.upstream {
        let mut s = child(ids.upstream_span, "upstream", SPAN_KIND_CLIENT, &u.timing);
        s.attributes.push(("portcullis.upstream", Value::Str(&u.upstream)));
        if let Some(status) = u.status {
            s.attributes.push(("http.response.status_code", Value::Int(i64::from(status))));
        }
        s.error = u.error;
        out.push(s);
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Span<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        bytes(out, 1, self.trace_id);
        bytes(out, 2, &self.span_id);
        if let Some(ts) = self.trace_state {
            bytes(out, 3, ts);
        }
        if let Some(p) = &self.parent {
            bytes(out, 4, p);
        }
        string(out, 5, &self.name);
        varint_field(out, 6, self.kind);
        fixed64(out, 7, self.start);
        fixed64(out, 8, self.end);
        for (k, v) in &self.attributes {
            attribute(
                out,
                9,
                k,
                match v {
                    Value::Str(s) => Value::Str(s),
                    Value::Int(i) => Value::Int(*i),
                    Value::Bool(b) => Value::Bool(*b),
                },
            );
        }
        if let Some(message_text) = self.error {
            let mut status = Vec::new();
            string(&mut status, 2, message_text);
            varint_field(&mut status, 3, STATUS_ERROR);
            message(out, 15, &status);
        }
    }
}

/// A `KeyValue` as field `field` of the enclosing message.
fn attribute(out: &mut Vec<u8>, field: u32, key: &str, value: Value<'_>) {
    let mut any = Vec::new();
    match value {
        Value::Str(s) => string(&mut any, 1, s),
        Value::Bool(b) => varint_field(&mut any, 2, u64::from(b)),
        // int64 is written as its two's complement varint.
        Value::Int(i) => varint_field(&mut any, 3, i as u64),
    }
    let mut kv = Vec::new();
    string(&mut kv, 1, key);
    message(&mut kv, 2, &any);
    message(out, field, &kv);
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
