//! Distributed tracing: the spans a process records and their export over OTLP/HTTP.
//!
//! A [`Tracer`] belongs to one service instance (its resource: service name, instance,
//! version). Spans are recorded where work crosses a boundary: the server middleware
//! records one per request ([`crate::http`]), the service client one per attempt, the
//! outbox relay one per publish, the consumer one per message, the saga orchestrator
//! one per step. Each is a W3C trace position ([`TraceContext`]) plus a parent, so
//! the spans of one request in every process form one tree.
//!
//! Recording never blocks and never fails the work it describes: a span goes into a
//! bounded queue (dropped and counted when the queue is full) and an exporter task
//! wakes when a batch is full or its flush interval has passed, and sends batches
//! as OTLP/HTTP JSON (`POST <endpoint>`, the encoding the OTLP spec
//! defines for HTTP) to the control plane's collector by default, or to any OTLP
//! receiver (an OpenTelemetry Collector, Jaeger, Tempo) by configuration.
//!
//! The spans are written here rather than through the `opentelemetry` crates: the
//! model shoal needs is small (five kinds, a few attributes, one status), and the
//! OTLP exporter crates bring protobuf and gRPC stacks into every service's build.

use crate::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use shoal_core::trace::TraceContext;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// What a span stands for, as OTLP numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside a process (a saga step).
    Internal = 1,
    /// A request this process served.
    Server = 2,
    /// A call this process made.
    Client = 3,
    /// A message this process published.
    Producer = 4,
    /// A message this process consumed.
    Consumer = 5,
}

impl SpanKind {
    /// The lowercase name the collector's API and `shoal trace` show.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Internal => "internal",
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
        }
    }

    /// From the OTLP number (unknown numbers are internal, as the spec's default).
    pub fn from_otlp(n: i64) -> Self {
        match n {
            2 => SpanKind::Server,
            3 => SpanKind::Client,
            4 => SpanKind::Producer,
            5 => SpanKind::Consumer,
            _ => SpanKind::Internal,
        }
    }
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// Text.
    Str(String),
    /// A whole number.
    Int(i64),
    /// True or false.
    Bool(bool),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<u16> for AttrValue {
    fn from(v: u16) -> Self {
        AttrValue::Int(i64::from(v))
    }
}
impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        AttrValue::Int(i64::from(v))
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// Its trace and its own span id.
    pub context: TraceContext,
    /// The span it is part of (`None` for a trace's root).
    pub parent: Option<[u8; 8]>,
    /// What it did: `POST /api/orders`, `saga place-order step reserve`.
    pub name: String,
    /// Its kind.
    pub kind: SpanKind,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// Attributes (`http.route`, `messaging.destination.name`, …).
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// `Some(message)` when the work failed.
    pub error: Option<String>,
}

/// The `[tracing]` table of a service (and `[gateway.tracing]`): where spans go.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Record and export spans at all.
    pub enabled: bool,
    /// OTLP/HTTP traces endpoint (`http://host:4318/v1/traces`); by default the
    /// control plane's collector (`<registry_url>/v1/traces`).
    pub endpoint: Option<String>,
    /// Share of new traces recorded, 0.0 to 1.0; a trace that arrives sampled (its
    /// `traceparent` says so) is always recorded, one that arrives unsampled never.
    pub sample_ratio: f64,
    /// Most spans waiting for export; more are dropped and counted.
    pub queue_spans: usize,
    /// Most spans in one export request.
    pub batch_spans: usize,
    /// Longest a span waits before its batch is sent.
    pub flush_interval_ms: u64,
    /// Longest an export request may take.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            sample_ratio: 1.0,
            queue_spans: 8192,
            batch_spans: 512,
            flush_interval_ms: 1000,
            export_timeout_ms: 5000,
        }
    }
}

impl TracingConfig {
    /// Check the limits; the message names the key.
    pub fn validate(&self, table: &str) -> Result<(), shoal_core::Error> {
        let bad = |m: String| Err(shoal_core::Error::config(format!("[{table}] {m}")));
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return bad(format!(
                "sample_ratio must be between 0.0 and 1.0, not {}",
                self.sample_ratio
            ));
        }
        if self.queue_spans == 0 || self.queue_spans > 1_000_000 {
            return bad("queue_spans must be 1 to 1000000".into());
        }
        if self.batch_spans == 0 || self.batch_spans > 10_000 {
            return bad("batch_spans must be 1 to 10000".into());
        }
        if self.flush_interval_ms == 0 || self.export_timeout_ms == 0 {
            return bad("flush_interval_ms and export_timeout_ms must be above 0".into());
        }
        if let Some(e) = &self.endpoint {
            if let Err(m) = check_endpoint(e) {
                return bad(format!("endpoint {e:?}: {m}"));
            }
        }
        Ok(())
    }
}

fn check_endpoint(e: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = e.parse().map_err(|err| format!("not a URL ({err})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The exporter speaks plain HTTP; a remote collector behind TLS is reached
        // through a local OpenTelemetry Collector (the usual agent setup).
        Some(s) => return Err(format!("scheme {s} is not supported, use http")),
        None => return Err("needs http://host:port/path".into()),
    }
    if uri.host().is_none() {
        return Err("has no host".into());
    }
    Ok(uri)
}

/// Who records the spans: OTLP's resource attributes.
#[derive(Clone, Debug)]
pub struct Resource {
    /// `service.name`.
    pub service: String,
    /// `service.instance.id`.
    pub instance: String,
    /// `service.version`.
    pub version: String,
}

struct Inner {
    resource: Resource,
    queue: Arc<Queue>,
    sample_ratio: f64,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Drop for Inner {
    // The last tracer is gone: the exporter sends what is queued and ends.
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.arrived.notify_one();
        self.queue.ready.notify_one();
    }
}

/// Finished spans waiting for the exporter. A vector under a lock rather than a
/// channel: a request's spans are two pushes, and the exporter is woken twice per
/// batch (its first span, and a full batch), not once per span.
struct Queue {
    spans: Mutex<Vec<SpanRecord>>,
    capacity: usize,
    batch: usize,
    /// The queue went from empty to one span: the batch's flush interval starts.
    arrived: Notify,
    /// The queue holds a full batch.
    ready: Notify,
    closed: AtomicBool,
}

impl Queue {
    /// Queue `span`; `false` when the queue is full.
    fn push(&self, span: SpanRecord) -> bool {
        let Ok(mut spans) = self.spans.lock() else {
            return false;
        };
        if spans.len() >= self.capacity {
            return false;
        }
        spans.push(span);
        if spans.len() == 1 {
            self.arrived.notify_one();
        }
        if spans.len() == self.batch {
            self.ready.notify_one();
        }
        true
    }

    fn len(&self) -> usize {
        self.spans.lock().map_or(0, |s| s.len())
    }

    /// Swap the queued spans into `buf` (empty, its capacity kept for the queue).
    fn take(&self, buf: &mut Vec<SpanRecord>) {
        if let Ok(mut spans) = self.spans.lock() {
            std::mem::swap(&mut *spans, buf);
        }
    }
}

/// Records spans for one service instance; cheap to clone. [`Tracer::disabled`]
/// records nothing.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(i) => write!(f, "Tracer({})", i.resource.instance),
            None => f.write_str("Tracer(disabled)"),
        }
    }
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn disabled() -> Self {
        Self(None)
    }

    /// Start exporting `resource`'s spans to `endpoint` as `cfg` says (a task on the
    /// current runtime; it ends when every clone of the tracer is dropped, after
    /// sending what is queued). Counts `shoal_trace_spans_exported_total` and
    /// `shoal_trace_spans_dropped_total{reason}` in `metrics`.
    pub fn start(
        resource: Resource,
        endpoint: &str,
        cfg: &TracingConfig,
        metrics: &Metrics,
    ) -> Result<Self, shoal_core::Error> {
        cfg.validate("tracing")?;
        if !cfg.enabled {
            return Ok(Self::disabled());
        }
        let uri = check_endpoint(endpoint).map_err(|m| {
            shoal_core::Error::config(format!("tracing endpoint {endpoint:?}: {m}"))
        })?;
        let queue = Arc::new(Queue {
            spans: Mutex::new(Vec::with_capacity(cfg.batch_spans.min(cfg.queue_spans))),
            capacity: cfg.queue_spans,
            batch: cfg.batch_spans,
            arrived: Notify::new(),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let dropped = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let exported = Counter::default();
        metrics.register(
            "shoal_trace_spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed)",
            dropped.clone(),
        );
        metrics.register(
            "shoal_trace_spans_exported",
            "Spans accepted by the trace collector",
            exported.clone(),
        );
        let exporter = Exporter {
            uri,
            resource: resource.clone(),
            batch: cfg.batch_spans,
            flush: Duration::from_millis(cfg.flush_interval_ms),
            timeout: Duration::from_millis(cfg.export_timeout_ms),
            dropped: dropped.clone(),
            exported,
        };
        tokio::spawn(exporter.run(queue.clone()));
        Ok(Self(Some(Arc::new(Inner {
            resource,
            queue,
            sample_ratio: cfg.sample_ratio,
            dropped,
        }))))
    }

    /// Whether spans are recorded at all.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// A new root trace position, sampled by the configured ratio.
    pub fn new_root(&self) -> TraceContext {
        let mut t = TraceContext::new_root();
        let ratio = self.0.as_ref().map_or(1.0, |i| i.sample_ratio);
        if ratio < 1.0 && fastrand::f64() >= ratio {
            t.flags &= !1;
        }
        t
    }

    /// Queue a finished span (nothing when disabled or the trace is not sampled).
    pub fn record(&self, span: SpanRecord) {
        let Some(inner) = &self.0 else { return };
        if span.context.flags & 1 == 0 {
            return;
        }
        if !inner.queue.push(span) {
            inner
                .dropped
                .get_or_create(&[("reason", "queue_full")])
                .inc();
        }
    }

    /// Start a span at `context` (a child of `parent`) that is recorded when the
    /// returned guard is dropped, however the work ends.
    pub fn span(
        &self,
        context: TraceContext,
        parent: Option<[u8; 8]>,
        kind: SpanKind,
        name: impl Into<String>,
    ) -> ActiveSpan {
        // Every request asks for its server span: a disabled tracer makes nothing
        // (no record, no wall-clock read), not a record it throws away.
        if self.0.is_none() || context.flags & 1 == 0 {
            return ActiveSpan {
                tracer: Tracer::disabled(),
                record: None,
                started: std::time::Instant::now(),
            };
        }
        ActiveSpan {
            tracer: self.clone(),
            record: Some(SpanRecord {
                context,
                parent,
                name: name.into(),
                kind,
                start_unix_nanos: unix_nanos(),
                end_unix_nanos: 0,
                attributes: Vec::new(),
                error: None,
            }),
            started: std::time::Instant::now(),
        }
    }

    /// The instance this tracer records for.
    pub fn resource(&self) -> Option<&Resource> {
        self.0.as_ref().map(|i| &i.resource)
    }
}

/// A span being recorded; it is queued when dropped.
pub struct ActiveSpan {
    tracer: Tracer,
    record: Option<SpanRecord>,
    // The end is the start plus a monotonic duration: a wall-clock step during the
    // span does not give it a negative length.
    started: std::time::Instant,
}

impl ActiveSpan {
    /// This span's trace position (what a call it makes carries as parent).
    pub fn context(&self) -> TraceContext {
        self.record
            .as_ref()
            .map(|r| r.context)
            .unwrap_or_else(TraceContext::new_root)
    }

    /// Add an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let Some(r) = &mut self.record {
            r.attributes.push((key, value.into()));
        }
    }

    /// Mark the span failed.
    pub fn fail(&mut self, message: impl Into<String>) {
        if let Some(r) = &mut self.record {
            r.error = Some(message.into());
        }
    }

    /// Rename it (a server span learns its route after routing).
    pub fn rename(&mut self, name: impl Into<String>) {
        if let Some(r) = &mut self.record {
            r.name = name.into();
        }
    }
}

impl Drop for ActiveSpan {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            let elapsed = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            r.end_unix_nanos = r.start_unix_nanos.saturating_add(elapsed);
            self.tracer.record(r);
        }
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Exporter {
    uri: http::Uri,
    resource: Resource,
    batch: usize,
    flush: Duration,
    timeout: Duration,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
    exported: Counter,
}

impl Exporter {
    async fn run(self, queue: Arc<Queue>) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let mut buf: Vec<SpanRecord> = Vec::new();
        let closed = || queue.closed.load(Ordering::Acquire);
        loop {
            // Wait for a first span, then for more until the batch is full or the
            // flush interval has passed since that first one: spans recorded close
            // together (one request's, in one process) go in one export. A wake-up
            // left over from an earlier batch only makes the loop look again.
            while queue.len() == 0 && !closed() {
                queue.arrived.notified().await;
            }
            let until = tokio::time::Instant::now() + self.flush;
            while queue.len() < self.batch && !closed() {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    () = queue.ready.notified() => {}
                }
            }
            let closed = closed();
            queue.take(&mut buf);
            for chunk in buf.chunks(self.batch) {
                self.send(&client, chunk).await;
            }
            buf.clear();
            if closed {
                // Closed means no tracer is left (a span being recorded holds
                // one), so nothing can be queued after the take above.
                return;
            }
        }
    }

    async fn send(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
        spans: &[SpanRecord],
    ) {
        let body = encode_otlp(&self.resource, spans);
        let req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        let n = spans.len() as u64;
        // One attempt: spans are diagnostics, and a retry queue would only grow
        // while the collector is away.
        let ok = match tokio::time::timeout(self.timeout, client.request(req)).await {
            Ok(Ok(res)) => res.status().is_success(),
            _ => false,
        };
        if ok {
            self.exported.inc_by(n);
        } else {
            self.dropped
                .get_or_create(&[("reason", "export_failed")])
                .inc_by(n);
        }
    }
}

// The export body is written straight into bytes: building a `serde_json::Value`
// tree per span cost several microseconds, on the path of every request.

fn push_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string writer does the JSON escaping; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2 + 2);
    out.push(b'"');
    out.extend(
        bytes
            .iter()
            .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]),
    );
    out.push(b'"');
}

fn push_attr(out: &mut Vec<u8>, key: &str, v: &AttrValue) {
    out.extend_from_slice(b"{\"key\":");
    push_str(out, key);
    out.extend_from_slice(b",\"value\":{");
    match v {
        AttrValue::Str(s) => {
            out.extend_from_slice(b"\"stringValue\":");
            push_str(out, s);
        }
        // OTLP's JSON encoding carries 64-bit integers as strings.
        AttrValue::Int(i) => {
            out.extend_from_slice(b"\"intValue\":\"");
            out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes());
            out.push(b'"');
        }
        AttrValue::Bool(b) => {
            out.extend_from_slice(if *b {
                b"\"boolValue\":true"
            } else {
                b"\"boolValue\":false"
            });
        }
    }
    out.extend_from_slice(b"}}");
}

fn push_span(out: &mut Vec<u8>, s: &SpanRecord) {
    // Written by hand (itoa for the numbers): the gateway encodes two spans per
    // request, and `write!` goes through the formatter for every number.
    out.extend_from_slice(b"{\"traceId\":");
    push_hex(out, &s.context.trace_id);
    out.extend_from_slice(b",\"spanId\":");
    push_hex(out, &s.context.span_id);
    if let Some(p) = &s.parent {
        out.extend_from_slice(b",\"parentSpanId\":");
        push_hex(out, p);
    }
    out.extend_from_slice(b",\"name\":");
    push_str(out, &s.name);
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b",\"kind\":");
    out.extend_from_slice(n.format(s.kind as i64).as_bytes());
    out.extend_from_slice(b",\"startTimeUnixNano\":\"");
    out.extend_from_slice(n.format(s.start_unix_nanos).as_bytes());
    out.extend_from_slice(b"\",\"endTimeUnixNano\":\"");
    out.extend_from_slice(n.format(s.end_unix_nanos).as_bytes());
    out.extend_from_slice(b"\",\"attributes\":[");
    for (i, (k, v)) in s.attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_attr(out, k, v);
    }
    out.extend_from_slice(b"],\"status\":");
    match &s.error {
        Some(m) => {
            out.extend_from_slice(b"{\"code\":2,\"message\":");
            push_str(out, m);
            out.push(b'}');
        }
        None => out.extend_from_slice(b"{\"code\":1}"),
    }
    out.push(b'}');
}

/// `spans` of `resource` as one OTLP/HTTP JSON `ExportTraceServiceRequest`.
pub fn encode_otlp(resource: &Resource, spans: &[SpanRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 512);
    out.extend_from_slice(b"{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
    push_attr(
        &mut out,
        "service.name",
        &AttrValue::Str(resource.service.clone()),
    );
    out.push(b',');
    push_attr(
        &mut out,
        "service.instance.id",
        &AttrValue::Str(resource.instance.clone()),
    );
    out.push(b',');
    push_attr(
        &mut out,
        "service.version",
        &AttrValue::Str(resource.version.clone()),
    );
    out.extend_from_slice(b"]},\"scopeSpans\":[{\"scope\":{\"name\":\"shoal\"},\"spans\":[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_span(&mut out, s);
    }
    out.extend_from_slice(b"]}]}]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn resource() -> Resource {
        Resource {
            service: "orders".into(),
            instance: "orders-1".into(),
            version: "1.0.0".into(),
        }
    }

    #[test]
    fn encodes_the_otlp_json_shape() {
        let root = TraceContext::new_root();
        let child = root.child();
        let span = SpanRecord {
            context: child,
            parent: Some(root.span_id),
            name: "POST /api/orders".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1_000,
            end_unix_nanos: 2_500,
            attributes: vec![
                ("http.response.status_code", AttrValue::Int(201)),
                ("url.path", AttrValue::Str("/a\"b\\c\n".into())),
                ("retried", AttrValue::Bool(false)),
            ],
            error: Some("boom".into()),
        };
        let v: Value = serde_json::from_slice(&encode_otlp(&resource(), &[span])).unwrap();
        let rs = &v["resourceSpans"][0];
        assert_eq!(rs["resource"]["attributes"][0]["key"], "service.name");
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "orders"
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], child.trace_id_hex());
        assert_eq!(s["spanId"], child.span_id_hex());
        assert_eq!(s["parentSpanId"], root.span_id_hex());
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1000");
        assert_eq!(s["endTimeUnixNano"], "2500");
        assert_eq!(s["attributes"][0]["value"]["intValue"], "201");
        assert_eq!(s["attributes"][1]["value"]["stringValue"], "/a\"b\\c\n");
        assert_eq!(s["attributes"][2]["value"]["boolValue"], false);
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["status"]["message"], "boom");
    }

    #[test]
    fn config_is_checked() {
        let ok = TracingConfig::default();
        assert!(ok.validate("tracing").is_ok());
        let bad = TracingConfig {
            sample_ratio: 1.5,
            ..TracingConfig::default()
        };
        assert!(bad
            .validate("tracing")
            .unwrap_err()
            .to_string()
            .contains("sample_ratio"));
        let https = TracingConfig {
            endpoint: Some("https://collector:4318/v1/traces".into()),
            ..TracingConfig::default()
        };
        assert!(https
            .validate("tracing")
            .unwrap_err()
            .to_string()
            .contains("use http"));
    }

    /// A receiver on 127.0.0.1:0 that keeps the span names of every export.
    async fn receiver() -> (String, Arc<Mutex<Vec<Vec<String>>>>) {
        let got: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let keep = got.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let keep = keep.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    let names = v["resourceSpans"][0]["scopeSpans"][0]["spans"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["name"].as_str().unwrap().to_string())
                        .collect();
                    keep.lock().unwrap().push(names);
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, got)
    }

    async fn wait_for(got: &Mutex<Vec<Vec<String>>>, exports: usize) -> Vec<Vec<String>> {
        for _ in 0..500 {
            let now = got.lock().unwrap().clone();
            if now.len() >= exports {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {exports} exports: {:?}", got.lock().unwrap());
    }

    #[tokio::test]
    async fn a_full_batch_goes_at_once_and_the_last_spans_at_close() {
        let (url, got) = receiver().await;
        let metrics = Metrics::new("orders");
        // A flush interval far longer than the test: only a full batch, or the
        // tracer's end, sends anything.
        let t = Tracer::start(
            resource(),
            &url,
            &TracingConfig {
                batch_spans: 3,
                flush_interval_ms: 3_600_000,
                ..TracingConfig::default()
            },
            &metrics,
        )
        .unwrap();
        let root = TraceContext::new_root();
        for name in ["a", "b", "c"] {
            drop(t.span(root.child(), Some(root.span_id), SpanKind::Internal, name));
        }
        let first = wait_for(&got, 1).await;
        assert_eq!(first[0], ["a", "b", "c"]);
        drop(t.span(root.child(), Some(root.span_id), SpanKind::Internal, "d"));
        let held = t.clone();
        drop(t);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(got.lock().unwrap().len(), 1, "a clone still records");
        drop(held);
        let all = wait_for(&got, 2).await;
        assert_eq!(all[1], ["d"]);
    }

    #[tokio::test]
    async fn unsampled_and_disabled_spans_are_not_queued() {
        let t = Tracer::disabled();
        let mut root = TraceContext::new_root();
        drop(t.span(root, None, SpanKind::Internal, "x"));
        let metrics = Metrics::new("orders");
        // Nothing listens on port 9: sends fail, and are counted as such.
        let t = Tracer::start(
            resource(),
            "http://127.0.0.1:9/v1/traces",
            &TracingConfig {
                queue_spans: 1,
                ..TracingConfig::default()
            },
            &metrics,
        )
        .unwrap();
        root.flags = 0;
        for _ in 0..5 {
            drop(t.span(root, None, SpanKind::Internal, "unsampled"));
        }
        assert!(!metrics.render().contains("queue_full"));
        root.flags = 1;
        for _ in 0..5 {
            drop(t.span(root, None, SpanKind::Internal, "sampled"));
        }
        // A queue of one: the exporter takes at most a couple, the rest overflow.
        assert!(metrics.render().contains("reason=\"queue_full\""));
    }
}
