//! Structured JSON logs: one object per line on stdout.
//!
//! Every line has `ts`, `level`, `service`, `instance`, `target` and `message`, the
//! event's own fields, and the fields of every span it is inside (so a line written
//! while handling a request carries `request_id` and `trace_id`). Lines are flat
//! objects so `shoal logs` and any log shipper can filter on a key without parsing
//! nested spans.

use serde_json::{Map, Value};
use std::io::Write;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};

/// Changes the log filter of a running process.
#[derive(Clone)]
pub struct LogHandle {
    reload: Option<reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
}

impl LogHandle {
    /// Set a new filter (`info`, `debug`, `info,sqlx=warn`, …) without a restart.
    pub fn set_level(&self, directives: &str) -> Result<(), shoal_core::Error> {
        let filter = parse_filter(directives)?;
        match &self.reload {
            Some(h) => h.reload(filter).map_err(|e| {
                shoal_core::Error::internal("log filter reload failed").with_source(e)
            }),
            None => Ok(()),
        }
    }
}

impl LogHandle {
    /// Whether this handle changes the process's filter: false when another logger
    /// was installed first (several services in one test process).
    pub fn is_live(&self) -> bool {
        self.reload.is_some()
    }
}

/// Check a filter directive (`debug`, `info,sqlx=warn`) the way [`LogHandle::set_level`]
/// parses it, without applying it: the control plane refuses a bad one up front
/// rather than letting every process fail to apply it.
pub fn check_filter(directives: &str) -> Result<(), shoal_core::Error> {
    parse_filter(directives).map(|_| ())
}

fn parse_filter(directives: &str) -> Result<EnvFilter, shoal_core::Error> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| shoal_core::Error::config(format!("log level {directives:?}: {e}")))
}

/// Install the JSON logger for this process.
///
/// A process has one logger; when one is installed already (several services in one
/// test process), the first stays and the returned handle changes nothing.
pub fn init(service: &str, instance: &str, level: &str) -> Result<LogHandle, shoal_core::Error> {
    let filter = parse_filter(level)?;
    let (filter, handle) = reload::Layer::new(filter);
    let layer = JsonLayer::new(service, instance, std::io::stdout());
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .is_ok();
    Ok(LogHandle {
        reload: installed.then_some(handle),
    })
}

/// The layer that writes one JSON object per event.
pub struct JsonLayer<W> {
    service: String,
    instance: String,
    out: Mutex<W>,
}

impl<W: Write> JsonLayer<W> {
    /// A layer writing to `out`; `service` and `instance` go on every line.
    pub fn new(service: &str, instance: &str, out: W) -> Self {
        Self {
            service: service.to_string(),
            instance: instance.to_string(),
            out: Mutex::new(out),
        }
    }
}

/// Span fields, kept as JSON in the span's extensions.
struct SpanFields(Map<String, Value>);

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain: the top error alone rarely says what to do.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.0.insert(field.name().into(), Value::from(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: Write + 'static,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
                values.record(&mut JsonVisitor(map));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("ts".into(), Value::from(rfc3339_now()));
        line.insert("level".into(), Value::from(meta.level().as_str()));
        line.insert("service".into(), Value::from(self.service.as_str()));
        line.insert("instance".into(), Value::from(self.instance.as_str()));
        line.insert("target".into(), Value::from(meta.target()));
        // The request (or background work) being handled names itself: its ids are
        // in the task's context, read only when a line is written. A span's or the
        // event's own field of the same name wins.
        crate::context::RequestContext::with_current(|c| {
            line.insert("request_id".into(), Value::from(c.request_id.as_str()));
            line.insert("trace_id".into(), Value::from(c.trace.trace_id_hex()));
        });
        // Outer spans first, so an inner span's field wins over an outer one's.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(map)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in map {
                        line.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        if let Ok(mut out) = self.out.lock() {
            // A log line that cannot be written is dropped: logging must never take
            // the service down.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    rfc3339(shoal_core::unix_ms())
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (`2026-11-23T14:29:18.123Z`).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_service_instance_and_span_fields() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(
            "catalog",
            "catalog-1",
            buf.clone(),
        ));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "r-1", trace_id = "t-1");
            let _g = span.enter();
            tracing::warn!(status = 503u64, "upstream failed");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["service"], "catalog");
        assert_eq!(v["instance"], "catalog-1");
        assert_eq!(v["request_id"], "r-1");
        assert_eq!(v["trace_id"], "t-1");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["status"], 503);
        assert_eq!(v["message"], "upstream failed");
    }

    #[tokio::test]
    async fn lines_in_a_request_carry_its_ids_without_a_span() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(
            "catalog",
            "catalog-1",
            buf.clone(),
        ));
        let _default = tracing::subscriber::set_default(subscriber);
        let trace = shoal_core::trace::TraceContext::new_root();
        let ctx = crate::context::RequestContext {
            request_id: "r-7".into(),
            trace,
            deadline: None,
            tracer: crate::spans::Tracer::disabled(),
        };
        ctx.scope(async {
            tokio::task::yield_now().await;
            tracing::warn!("inside");
            // A field of the line's own wins over the context's.
            tracing::warn!(request_id = "r-own", "own id");
        })
        .await;
        tracing::warn!("outside");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["request_id"], "r-7");
        assert_eq!(lines[0]["trace_id"], trace.trace_id_hex().as_str());
        assert_eq!(lines[1]["request_id"], "r-own");
        assert!(lines[2].get("request_id").is_none(), "{text}");
        assert!(lines[2].get("trace_id").is_none(), "{text}");
    }

    #[test]
    fn filters_are_checked_like_they_are_applied() {
        check_filter("debug").unwrap();
        check_filter("info,sqlx=warn").unwrap();
        let e = check_filter("info,sqlx=loud").unwrap_err().to_string();
        assert!(e.contains("sqlx=loud"), "{e}");
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_444_158_000), "2026-11-23T14:29:18.000Z");
    }
}
