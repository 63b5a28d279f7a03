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
use std::sync::{Arc, Mutex};

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

/// A process's metrics registry plus the standard HTTP families.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// Server-side HTTP series.
    pub http_server: HttpServerMetrics,
    /// Client-side HTTP series.
    pub http_client: HttpClientMetrics,
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
        let labels = [
            ("route", route.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        self.http_server.requests.get_or_create(&labels).inc();
        self.http_server
            .duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// Record one finished client call (`status` 0 when no response came back).
    pub fn observe_client(&self, target: &str, method: &str, status: u16, seconds: f64) {
        let labels = [
            ("target", target.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        self.http_client.requests.get_or_create(&labels).inc();
        self.http_client
            .duration
            .get_or_create(&labels)
            .observe(seconds);
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
}
