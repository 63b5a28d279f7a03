//! Prometheus metrics, named and labelled as `docs/metrics.md` specifies.
//!
//! One [`Metrics`] per process (per service in a test process that hosts several).
//! Every series carries a constant `service` label. Platform parts register their own
//! families through [`Metrics::register`].

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Content type of [`Metrics::render`]'s output: the OpenMetrics text format
/// (it ends with `# EOF`), which Prometheus scrapes natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of HTTP series: `[route, method, status]` for servers,
/// `[target, method, status]` for clients.
pub type HttpLabels = [(&'static str, String); 3];

type HistFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Latency buckets in seconds: 0.5 ms to about 16 s, doubling.
pub fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// The HTTP server series every shoal server exposes.
#[derive(Clone)]
pub struct HttpServerMetrics {
    /// `shoal_http_server_requests_total{route,method,status}`
    pub requests: Family<HttpLabels, Counter>,
    /// `shoal_http_server_request_duration_seconds{route,method,status}`
    pub duration: HistFamily,
    /// `shoal_http_server_requests_in_flight`
    pub in_flight: Gauge,
}

/// The HTTP client series of the SDK's service client and the gateway's proxy.
#[derive(Clone)]
pub struct HttpClientMetrics {
    /// `shoal_http_client_requests_total{target,method,status}`
    pub requests: Family<HttpLabels, Counter>,
    /// `shoal_http_client_request_duration_seconds{target,method,status}`
    pub duration: HistFamily,
}

/// The most HTTP series of one kind (server or client) a process keeps handles to;
/// past it, requests are still counted, through the family's own look-up.
const MAX_CACHED_SERIES: usize = 4096;

/// One (route or target, method, status) series pair, held so that counting a
/// request is two atomic updates: no label strings built, no family look-up.
#[derive(Clone)]
struct Series {
    requests: Counter,
    duration: Histogram,
}

/// Handles to the series already seen, by route (or target), then method and
/// status. A look-up borrows the request's strings.
#[derive(Default)]
struct SeriesCache {
    by_label: RwLock<HashMap<Box<str>, Vec<MethodStatus>>>,
}

/// A method label, a status and their series.
type MethodStatus = (&'static str, u16, Series);

impl SeriesCache {
    fn observe(
        &self,
        families: (&Family<HttpLabels, Counter>, &HistFamily),
        key: &'static str,
        label: &str,
        method: &str,
        status: u16,
        seconds: f64,
    ) {
        let method = method_label(method);
        if let Ok(map) = self.by_label.read() {
            if let Some(s) = map.get(label).and_then(|v| {
                v.iter()
                    .find(|(m, st, _)| *m == method && *st == status)
                    .map(|(_, _, s)| s)
            }) {
                s.requests.inc();
                s.duration.observe(seconds);
                return;
            }
        }
        let labels = [
            (key, label.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        let series = Series {
            requests: families.0.get_or_create(&labels).clone(),
            duration: families.1.get_or_create(&labels).clone(),
        };
        series.requests.inc();
        series.duration.observe(seconds);
        if let Ok(mut map) = self.by_label.write() {
            let held: usize = map.values().map(Vec::len).sum();
            if held < MAX_CACHED_SERIES {
                let list = map.entry(label.into()).or_default();
                if !list.iter().any(|(m, st, _)| *m == method && *st == status) {
                    list.push((method, status, series));
                }
            }
        }
    }
}

/// The method label: the standard methods by name, any other token as `_OTHER` (as
/// OpenTelemetry's conventions do), so a client inventing methods cannot grow the
/// series without bound.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("_OTHER")
}

/// A process's metrics registry plus the standard HTTP families.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// Server-side HTTP series.
    pub http_server: HttpServerMetrics,
    /// Client-side HTTP series.
    pub http_client: HttpClientMetrics,
    server_series: Arc<SeriesCache>,
    client_series: Arc<SeriesCache>,
}

impl Metrics {
    /// A registry whose series all carry `service="<service>"`.
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_labels(
            [(Cow::Borrowed("service"), Cow::Owned(service.to_string()))].into_iter(),
        );
        let http_server = HttpServerMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            in_flight: Gauge::default(),
        };
        let http_client = HttpClientMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
        };
        registry.register(
            "shoal_http_server_requests",
            "HTTP requests served, by route, method and status",
            http_server.requests.clone(),
        );
        registry.register(
            "shoal_http_server_request_duration_seconds",
            "Time to the response head, by route, method and status",
            http_server.duration.clone(),
        );
        registry.register(
            "shoal_http_server_requests_in_flight",
            "HTTP requests being served now",
            http_server.in_flight.clone(),
        );
        registry.register(
            "shoal_http_client_requests",
            "HTTP calls made to other services, by target service, method and status",
            http_client.requests.clone(),
        );
        registry.register(
            "shoal_http_client_request_duration_seconds",
            "Time to the response head of calls to other services",
            http_client.duration.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            http_server,
            http_client,
            server_series: Arc::default(),
            client_series: Arc::default(),
        }
    }

    /// Register another metric (a platform part's or a service's own).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    /// Record one finished server request.
    pub fn observe_server(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.server_series.observe(
            (&self.http_server.requests, &self.http_server.duration),
            "route",
            route,
            method,
            status,
            seconds,
        );
    }

    /// Record one finished client call (`status` 0 when no response came back).
    pub fn observe_client(&self, target: &str, method: &str, status: u16, seconds: f64) {
        self.client_series.observe(
            (&self.http_client.requests, &self.http_client.duration),
            "target",
            target,
            method,
            status,
            seconds,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_names_with_service_label() {
        let m = Metrics::new("catalog");
        m.observe_server("/api/products", "GET", 200, 0.002);
        let text = m.render();
        assert!(text.contains(
            r#"shoal_http_server_requests_total{service="catalog",route="/api/products",method="GET",status="200"} 1"#
        ), "{text}");
        assert!(
            text.contains("shoal_http_server_request_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("shoal_http_server_requests_in_flight{service=\"catalog\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn repeated_series_count_through_their_handles() {
        let m = Metrics::new("gateway");
        for _ in 0..3 {
            m.observe_server("/hello", "GET", 200, 0.001);
        }
        m.observe_server("/hello", "GET", 503, 0.001);
        m.observe_client("hello", "GET", 200, 0.001);
        m.observe_client("hello", "GET", 200, 0.001);
        // An invented method is one series, whatever its spelling.
        m.observe_server("/hello", "BREW", 200, 0.001);
        m.observe_server("/hello", "PROPFIND", 200, 0.001);
        let text = m.render();
        for want in [
            r#"shoal_http_server_requests_total{service="gateway",route="/hello",method="GET",status="200"} 3"#,
            r#"shoal_http_server_requests_total{service="gateway",route="/hello",method="GET",status="503"} 1"#,
            r#"shoal_http_client_requests_total{service="gateway",target="hello",method="GET",status="200"} 2"#,
            r#"shoal_http_server_requests_total{service="gateway",route="/hello",method="_OTHER",status="200"} 2"#,
            r#"shoal_http_server_request_duration_seconds_count{service="gateway",route="/hello",method="GET",status="200"} 3"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("BREW"), "{text}");
    }
}
