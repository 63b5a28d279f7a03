//! The trace collector: an OTLP/HTTP receiver (`POST /v1/traces`, JSON encoding)
//! that keeps recent traces in memory for `shoal trace`, the dashboard and
//! `GET /v1/traces`.
//!
//! Bounded on every side: the body of one export, the spans kept in all (the oldest
//! traces go first), the spans kept of one trace, the length of every text. It is a
//! laptop's Jaeger, not a store: a restart forgets, and production sends its spans
//! to a real OTLP backend by configuration (`[tracing] endpoint`).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_core::ApiError;
use shoal_telemetry::SpanKind;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// The `[control_plane.traces]` table: how much the collector keeps.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TraceStoreConfig {
    /// Spans kept in all; past it the oldest traces are forgotten.
    pub max_spans: usize,
    /// Spans kept of one trace; more are counted, not kept.
    pub max_spans_per_trace: usize,
    /// Largest export request body.
    pub max_body_bytes: usize,
}

impl Default for TraceStoreConfig {
    fn default() -> Self {
        Self {
            max_spans: 200_000,
            max_spans_per_trace: 5_000,
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

impl TraceStoreConfig {
    /// Check the limits; the message names the key.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        if self.max_spans == 0 || self.max_spans > 10_000_000 {
            return Err(shoal_core::Error::config(
                "[control_plane.traces] max_spans must be 1 to 10000000",
            ));
        }
        if self.max_spans_per_trace == 0 || self.max_spans_per_trace > self.max_spans {
            return Err(shoal_core::Error::config(
                "[control_plane.traces] max_spans_per_trace must be 1 to max_spans",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(shoal_core::Error::config(
                "[control_plane.traces] max_body_bytes must be at least 1024",
            ));
        }
        Ok(())
    }
}

/// Longest name, attribute key or value kept (longer ones are cut).
const MAX_TEXT: usize = 1024;
/// Most attributes kept of one span.
const MAX_ATTRIBUTES: usize = 64;
/// Most traces `GET /v1/traces` lists.
const MAX_LIST: usize = 500;

/// One span as the collector keeps it and `GET /v1/traces/{id}` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoredSpan {
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, absent for a root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    /// What it did.
    pub name: String,
    /// `server`, `client`, `producer`, `consumer` or `internal`.
    pub kind: &'static str,
    /// The resource's `service.name`.
    pub service: String,
    /// The resource's `service.instance.id`.
    pub instance: String,
    /// Start, Unix nanoseconds.
    pub start_unix_nanos: u64,
    /// End, Unix nanoseconds.
    pub end_unix_nanos: u64,
    /// `ok` or `error`.
    pub status: &'static str,
    /// The error's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// Attributes, as text.
    pub attributes: BTreeMap<String, String>,
}

struct Trace {
    spans: Vec<StoredSpan>,
    /// Spans not kept because the trace was full.
    cut: u64,
    /// When it last received a span (for the recent list).
    touched: u64,
}

#[derive(Default)]
struct Store {
    traces: HashMap<String, Trace>,
    /// Trace ids by first arrival, oldest first: eviction order.
    order: VecDeque<String>,
    spans: usize,
    seq: u64,
}

/// The collector's in-memory traces; cheap to clone.
#[derive(Clone)]
pub struct TraceStore {
    cfg: TraceStoreConfig,
    inner: Arc<Mutex<Store>>,
}

impl TraceStore {
    /// An empty store with these limits.
    pub fn new(cfg: TraceStoreConfig) -> Self {
        Self {
            cfg,
            inner: Arc::new(Mutex::new(Store::default())),
        }
    }

    /// Keep the spans of each trace, forgetting the oldest traces past the limit.
    /// One lock for a whole export.
    fn add(&self, traces: impl IntoIterator<Item = (String, Vec<StoredSpan>)>) {
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let st = &mut *guard;
        let per_trace = self.cfg.max_spans_per_trace;
        for (trace_id, spans) in traces {
            st.seq += 1;
            let seq = st.seq;
            let t = match st.traces.entry(trace_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    st.order.push_back(e.key().clone());
                    e.insert(Trace {
                        spans: Vec::new(),
                        cut: 0,
                        touched: seq,
                    })
                }
            };
            t.touched = seq;
            let room = per_trace.saturating_sub(t.spans.len());
            let n = spans.len().min(room);
            t.cut += (spans.len() - n) as u64;
            t.spans.extend(spans.into_iter().take(n));
            st.spans += n;
        }
        while st.spans > self.cfg.max_spans {
            let Some(oldest) = st.order.pop_front() else {
                break;
            };
            if let Some(t) = st.traces.remove(&oldest) {
                st.spans -= t.spans.len();
            }
        }
    }

    /// The spans of one trace, by start time.
    pub fn get(&self, trace_id: &str) -> Option<(Vec<StoredSpan>, u64)> {
        let st = self.inner.lock().ok()?;
        let t = st.traces.get(trace_id)?;
        let mut spans = t.spans.clone();
        spans.sort_by_key(|s| s.start_unix_nanos);
        Some((spans, t.cut))
    }

    /// The most recently updated traces, newest first, optionally only those
    /// `service` took part in.
    pub fn recent(&self, limit: usize, service: Option<&str>) -> Vec<TraceSummary> {
        let Ok(st) = self.inner.lock() else {
            return Vec::new();
        };
        let mut all: Vec<(&String, &Trace)> = st
            .traces
            .iter()
            .filter(|(_, t)| service.is_none_or(|s| t.spans.iter().any(|sp| sp.service == s)))
            .collect();
        all.sort_by_key(|(_, t)| std::cmp::Reverse(t.touched));
        all.into_iter()
            .take(limit)
            .map(|(id, t)| summarise(id, t))
            .collect()
    }
}

/// One line of `GET /v1/traces`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceSummary {
    /// 32 hex digits.
    pub trace_id: String,
    /// The root span's name (the earliest span's when the root is missing).
    pub root: String,
    /// The root span's service.
    pub service: String,
    /// Start of the earliest span, Unix nanoseconds.
    pub start_unix_nanos: u64,
    /// From the earliest start to the latest end.
    pub duration_ms: f64,
    /// Spans kept.
    pub spans: usize,
    /// Services taking part, sorted.
    pub services: Vec<String>,
    /// Any span failed.
    pub error: bool,
}

fn summarise(id: &str, t: &Trace) -> TraceSummary {
    let start = t
        .spans
        .iter()
        .map(|s| s.start_unix_nanos)
        .min()
        .unwrap_or(0);
    let end = t.spans.iter().map(|s| s.end_unix_nanos).max().unwrap_or(0);
    let root = t
        .spans
        .iter()
        .filter(|s| s.parent_span_id.is_none())
        .min_by_key(|s| s.start_unix_nanos)
        .or_else(|| t.spans.iter().min_by_key(|s| s.start_unix_nanos));
    let mut services: Vec<String> = t.spans.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    TraceSummary {
        trace_id: id.to_string(),
        root: root.map(|s| s.name.clone()).unwrap_or_default(),
        service: root.map(|s| s.service.clone()).unwrap_or_default(),
        start_unix_nanos: start,
        duration_ms: end.saturating_sub(start) as f64 / 1e6,
        spans: t.spans.len(),
        services,
        error: t.spans.iter().any(|s| s.status == "error"),
    }
}

// The OTLP JSON shapes read here. Unknown fields are ignored, not refused: OTLP
// receivers must accept messages from newer senders (the spec's compatibility rule).

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExportRequest {
    #[serde(default)]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans {
    #[serde(default)]
    resource: Option<OtlpResource>,
    #[serde(default)]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Deserialize)]
struct OtlpResource {
    #[serde(default)]
    attributes: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct ScopeSpans {
    #[serde(default)]
    spans: Vec<OtlpSpan>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OtlpSpan {
    trace_id: String,
    span_id: String,
    #[serde(default)]
    parent_span_id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: i64,
    start_time_unix_nano: Nanos,
    end_time_unix_nano: Nanos,
    #[serde(default)]
    attributes: Vec<KeyValue>,
    #[serde(default)]
    status: Option<OtlpStatus>,
}

/// OTLP JSON carries 64-bit integers as strings; some senders write numbers.
/// Read by hand: serde's untagged enums buffer every value first, and this one
/// comes twice in every span.
struct Nanos(Option<u64>);

impl Nanos {
    fn value(&self) -> Option<u64> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Nanos {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Nanos;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("whole nanoseconds, as a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Nanos, E> {
                Ok(Nanos(v.parse().ok()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Nanos, E> {
                Ok(Nanos(Some(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Nanos, E> {
                Ok(Nanos(u64::try_from(v).ok()))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Nanos, E> {
                Ok(Nanos(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct OtlpStatus {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: Option<AnyValue>,
}

/// OTLP's `AnyValue`: one of its fields is set. The scalar kinds are read as they
/// are (no `serde_json::Value` map per attribute); arrays, maps and bytes are kept
/// as their JSON text.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct AnyValue {
    string_value: Option<String>,
    int_value: Option<IntText>,
    double_value: Option<f64>,
    bool_value: Option<bool>,
    array_value: Option<serde_json::Value>,
    kvlist_value: Option<serde_json::Value>,
    bytes_value: Option<String>,
}

/// An `intValue`, as text: a string in OTLP JSON, a number from some senders.
struct IntText(String);

impl<'de> Deserialize<'de> for IntText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer, as a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntText, E> {
                Ok(IntText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntText, E> {
                Ok(IntText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntText, E> {
                Ok(IntText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<IntText, E> {
                Ok(IntText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn attr_text(v: AnyValue) -> String {
    if let Some(s) = v.string_value {
        return s;
    }
    if let Some(IntText(i)) = v.int_value {
        return i;
    }
    if let Some(f) = v.double_value {
        return f.to_string();
    }
    if let Some(b) = v.bool_value {
        return b.to_string();
    }
    v.array_value
        .or(v.kvlist_value)
        .map(|j| j.to_string())
        .or(v.bytes_value)
        .unwrap_or_default()
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// Read an export request; every span is checked before any is kept.
fn decode(body: &[u8]) -> Result<Vec<(String, StoredSpan)>, String> {
    let req: ExportRequest =
        serde_json::from_slice(body).map_err(|e| format!("not an OTLP JSON export: {e}"))?;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let mut attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let mut find = |k: &str| {
            attrs
                .iter_mut()
                .find(|a| a.key == k)
                .and_then(|a| a.value.take())
                .map(attr_text)
        };
        let service = cut(find("service.name").unwrap_or_else(|| "unknown_service".into()));
        let instance = cut(find("service.instance.id").unwrap_or_else(|| service.clone()));
        for ss in rs.scope_spans {
            for s in ss.spans {
                // OTLP JSON spells ids in hex (not base64 as protobuf's JSON mapping
                // would); lowercase is what logs and traceparent carry.
                let (mut trace_id, mut span_id) = (s.trace_id, s.span_id);
                trace_id.make_ascii_lowercase();
                span_id.make_ascii_lowercase();
                if !is_hex(&trace_id, 32) || !is_hex(&span_id, 16) {
                    return Err(format!(
                        "span {:?}: traceId must be 32 and spanId 16 hex digits, not all zero",
                        s.name
                    ));
                }
                let parent = s
                    .parent_span_id
                    .map(|mut p| {
                        p.make_ascii_lowercase();
                        p
                    })
                    .filter(|p| !p.is_empty());
                if let Some(p) = &parent {
                    if !is_hex(p, 16) {
                        return Err(format!(
                            "span {span_id}: parentSpanId must be 16 hex digits"
                        ));
                    }
                }
                let (Some(start), Some(end)) =
                    (s.start_time_unix_nano.value(), s.end_time_unix_nano.value())
                else {
                    return Err(format!("span {span_id}: times must be whole nanoseconds"));
                };
                let status = s.status.unwrap_or(OtlpStatus {
                    code: 0,
                    message: None,
                });
                let attributes = s
                    .attributes
                    .into_iter()
                    .take(MAX_ATTRIBUTES)
                    .map(|kv| {
                        let v = kv.value.map(attr_text).unwrap_or_default();
                        (cut(kv.key), cut(v))
                    })
                    .collect();
                out.push((
                    trace_id,
                    StoredSpan {
                        span_id,
                        parent_span_id: parent,
                        name: cut(s.name),
                        kind: SpanKind::from_otlp(s.kind).as_str(),
                        service: service.clone(),
                        instance: instance.clone(),
                        start_unix_nanos: start,
                        end_unix_nanos: end.max(start),
                        status: if status.code == 2 { "error" } else { "ok" },
                        status_message: status.message.filter(|m| !m.is_empty()).map(cut),
                        attributes,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// `POST /v1/traces`, `GET /v1/traces`, `GET /v1/traces/{id}`.
pub(crate) fn router(store: TraceStore) -> Router {
    Router::new()
        .route("/v1/traces", post(export).get(list))
        .route("/v1/traces/{id}", get(one))
        .with_state(store)
}

async fn export(State(store): State<TraceStore>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the collector takes OTLP/HTTP with JSON encoding (Content-Type: application/json), not {ct:?}"
            ),
        )
        .into_response();
    }
    if body.len() > store.cfg.max_body_bytes {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "an export may carry at most {} bytes",
                store.cfg.max_body_bytes
            ),
        )
        .into_response();
    }
    let spans = match decode(&body) {
        Ok(s) => s,
        Err(why) => return ApiError::bad_request(why).into_response(),
    };
    let mut by_trace: HashMap<String, Vec<StoredSpan>> = HashMap::new();
    for (t, s) in spans {
        by_trace.entry(t).or_default().push(s);
    }
    store.add(by_trace);
    // The OTLP success answer: an ExportTraceServiceResponse with nothing rejected.
    Json(serde_json::json!({})).into_response()
}

/// The query of `GET /v1/traces`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    service: Option<String>,
}

async fn list(State(store): State<TraceStore>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIST);
    let traces = store.recent(limit, q.service.as_deref());
    Json(serde_json::json!({ "traces": traces })).into_response()
}

async fn one(State(store): State<TraceStore>, Path(id): Path<String>) -> Response {
    let id = id.to_ascii_lowercase();
    if !is_hex(&id, 32) {
        return ApiError::bad_request("a trace id is 32 hex digits").into_response();
    }
    match store.get(&id) {
        Some((spans, cut)) => Json(serde_json::json!({
            "trace_id": id,
            "spans": spans,
            "spans_not_kept": cut,
        }))
        .into_response(),
        None => ApiError::not_found(format!(
            "no trace {id} here (not received yet, or forgotten: the collector keeps the latest spans only)"
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::trace::TraceContext;
    use shoal_telemetry::spans::{encode_otlp, AttrValue, Resource, SpanRecord};

    fn span(ctx: TraceContext, parent: Option<[u8; 8]>, name: &str) -> SpanRecord {
        SpanRecord {
            context: ctx,
            parent,
            name: name.into(),
            kind: SpanKind::Server,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            attributes: vec![("http.route", AttrValue::Str("/x".into()))],
            error: None,
        }
    }

    fn resource(s: &str) -> Resource {
        Resource {
            service: s.into(),
            instance: format!("{s}-1"),
            version: "1".into(),
        }
    }

    #[test]
    fn reads_what_the_exporter_writes() {
        let root = TraceContext::new_root();
        let body = encode_otlp(&resource("orders"), &[span(root, None, "POST /api/orders")]);
        let spans = decode(&body).unwrap();
        assert_eq!(spans.len(), 1);
        let (t, s) = &spans[0];
        assert_eq!(t, &root.trace_id_hex());
        assert_eq!(s.span_id, root.span_id_hex());
        assert_eq!(s.service, "orders");
        assert_eq!(s.instance, "orders-1");
        assert_eq!(s.kind, "server");
        assert_eq!(s.status, "ok");
        assert_eq!(s.attributes["http.route"], "/x");
    }

    #[test]
    fn bad_exports_are_refused_whole() {
        assert!(decode(b"{not json")
            .unwrap_err()
            .contains("not an OTLP JSON"));
        let bad_id = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"00000000000000000000000000000000","spanId":"0102030405060708",
             "name":"x","startTimeUnixNano":"1","endTimeUnixNano":"2"}]}]}]}"#;
        assert!(decode(bad_id).unwrap_err().contains("traceId"));
        let bad_time = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
             "name":"x","startTimeUnixNano":"soon","endTimeUnixNano":"2"}]}]}]}"#;
        assert!(decode(bad_time).unwrap_err().contains("nanoseconds"));
    }

    #[test]
    fn every_attribute_kind_reads_as_text() {
        let body = br#"{"resourceSpans":[{"resource":{"attributes":[
              {"key":"service.name","value":{"stringValue":"billing"}}]},
            "scopeSpans":[{"spans":[
            {"traceId":"0102030405060708090A0B0C0D0E0F10","spanId":"0102030405060708",
             "name":"x","startTimeUnixNano":1000,"endTimeUnixNano":"2000",
             "attributes":[
               {"key":"s","value":{"stringValue":"text"}},
               {"key":"i","value":{"intValue":"-42"}},
               {"key":"n","value":{"intValue":7}},
               {"key":"d","value":{"doubleValue":0.5}},
               {"key":"b","value":{"boolValue":true}},
               {"key":"a","value":{"arrayValue":{"values":[{"intValue":"1"}]}}},
               {"key":"none"}
             ]}]}]}]}"#;
        let spans = decode(body).unwrap();
        let (trace, s) = &spans[0];
        assert_eq!(trace, "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(s.service, "billing");
        assert_eq!(s.instance, "billing");
        assert_eq!((s.start_unix_nanos, s.end_unix_nanos), (1000, 2000));
        let a = &s.attributes;
        assert_eq!(a["s"], "text");
        assert_eq!(a["i"], "-42");
        assert_eq!(a["n"], "7");
        assert_eq!(a["d"], "0.5");
        assert_eq!(a["b"], "true");
        assert_eq!(a["a"], r#"{"values":[{"intValue":"1"}]}"#);
        assert_eq!(a["none"], "");
    }

    #[test]
    fn oldest_traces_go_first_and_a_full_trace_counts_the_rest() {
        let store = TraceStore::new(TraceStoreConfig {
            max_spans: 4,
            max_spans_per_trace: 3,
            max_body_bytes: 1 << 20,
        });
        let mk = |n: usize| -> Vec<StoredSpan> {
            (0..n)
                .map(|i| StoredSpan {
                    span_id: format!("{:016x}", i + 1),
                    parent_span_id: None,
                    name: format!("s{i}"),
                    kind: "internal",
                    service: "a".into(),
                    instance: "a-1".into(),
                    start_unix_nanos: i as u64,
                    end_unix_nanos: i as u64 + 1,
                    status: "ok",
                    status_message: None,
                    attributes: BTreeMap::new(),
                })
                .collect()
        };
        store.add([("t1".into(), mk(5))]);
        let (spans, cut) = store.get("t1").unwrap();
        assert_eq!((spans.len(), cut), (3, 2));
        store.add([("t2".into(), mk(2))]);
        // 5 spans kept > 4: t1, the oldest, is forgotten whole.
        assert!(store.get("t1").is_none());
        assert_eq!(store.get("t2").unwrap().0.len(), 2);
        assert_eq!(store.recent(10, None)[0].trace_id, "t2");
        assert!(store.recent(10, Some("nobody")).is_empty());
    }
}
