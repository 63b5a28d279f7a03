//! The metrics scraper: every `interval_ms` the control plane reads every registered
//! instance's `/metrics` (docs/metrics.md), keeps a short history of derived figures
//! per service, evaluates the alert rules ([`crate::alerts`]) on them, and answers
//! `GET /v1/metrics/summary`. It also answers `GET /v1/prometheus/targets`, the
//! registry as Prometheus HTTP service discovery, for a production Prometheus.
//!
//! Only figures are kept, never raw series: a rate, an error share and two
//! percentiles per service and interval, in a ring of `history_points`, plus the
//! current breakers, outbox backlogs, sagas and consumer lags. That bounds memory by
//! the number of services, whatever the cardinality of their series. Prometheus is
//! the place for anything longer or finer (deploy/prometheus/).
//!
//! A round asks every target at once (at most [`MAX_CONCURRENT`] in flight), each
//! within `scrape_timeout_ms` and `max_body_bytes`, as the breaker overview does
//! (`breakers.rs`): an instance that does not answer counts as down and holds up
//! nobody else.

use crate::alerts::{AlertRule, Alerts};
use crate::prom_text::{self, Sample};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use shoal_core::Error;
use shoal_registry::Registry;
use shoal_telemetry::Metrics;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Where every shoal process serves its metrics.
const METRICS_PATH: &str = "/metrics";
/// Most instances scraped at once (as many as the registry probes at once).
const MAX_CONCURRENT: usize = 64;
/// Most static targets (`[control_plane.metrics] targets`).
const MAX_STATIC_TARGETS: usize = 64;

/// `[control_plane.metrics]`: the scraper and its short history.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Scrape at all; off, the summary stays empty and no alert rule is evaluated.
    pub enabled: bool,
    /// Time between scrape rounds; 1000 to 300000.
    pub interval_ms: u64,
    /// Points of history kept per service (120 × 5 s = 10 minutes); 1 to 10000.
    pub history_points: usize,
    /// Longest one instance may take to answer, connect included; positive and
    /// at most `interval_ms`.
    pub scrape_timeout_ms: u64,
    /// Largest exposition read from one instance; 1024 to 67108864.
    pub max_body_bytes: usize,
    /// Processes scraped besides the registered instances, which the registry does
    /// not know (the gateway does not register): `{ service = "gateway", addr =
    /// "127.0.0.1:8080" }`.
    pub targets: Vec<StaticTarget>,
    /// Where alerts are posted when their rule names no `webhook` of its own.
    pub alert_webhook: Option<String>,
    /// Longest one webhook call may take, connect included; 100 to 60000.
    pub alert_webhook_timeout_ms: u64,
    /// Attempts per notification (the first included) when the webhook fails or
    /// answers 5xx; 1 to 10.
    pub alert_webhook_attempts: u32,
    /// Notifications waiting to be sent; when full, new ones are dropped and
    /// counted (`shoal_alerts_webhook_failed_total{reason="queue_full"}`); 1 to 10000.
    pub alert_webhook_queue: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 5_000,
            history_points: 120,
            scrape_timeout_ms: 2_000,
            max_body_bytes: 4 * 1024 * 1024,
            targets: Vec::new(),
            alert_webhook: None,
            alert_webhook_timeout_ms: 5_000,
            alert_webhook_attempts: 3,
            alert_webhook_queue: 256,
        }
    }
}

/// A process scraped by address (`[control_plane.metrics] targets`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticTarget {
    /// The service it belongs to in the summary (`gateway`).
    pub service: String,
    /// Where it serves `/metrics`.
    pub addr: SocketAddr,
    /// Its name in the summary; the service name by default.
    #[serde(default)]
    pub instance: Option<String>,
}

impl MetricsConfig {
    /// Check what deserialisation cannot; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |k: &str, why: &str| Err(Error::config(format!("metrics.{k}: {why}")));
        if !(1_000..=300_000).contains(&self.interval_ms) {
            return bad("interval_ms", "must be between 1000 and 300000");
        }
        if !(1..=10_000).contains(&self.history_points) {
            return bad("history_points", "must be between 1 and 10000");
        }
        if self.scrape_timeout_ms == 0 || self.scrape_timeout_ms > self.interval_ms {
            return bad(
                "scrape_timeout_ms",
                "must be positive and at most interval_ms",
            );
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return bad("max_body_bytes", "must be between 1024 and 67108864");
        }
        if self.targets.len() > MAX_STATIC_TARGETS {
            return bad("targets", "at most 64 targets");
        }
        for (i, t) in self.targets.iter().enumerate() {
            shoal_core::names::validate_service_name(&t.service)
                .map_err(|e| Error::config(format!("metrics.targets[{i}].service: {e}")))?;
            if t.addr.port() == 0 {
                return bad(&format!("targets[{i}].addr"), "needs a port");
            }
            if t.instance
                .as_deref()
                .is_some_and(|n| n.is_empty() || n.len() > 128)
            {
                return bad(
                    &format!("targets[{i}].instance"),
                    "must be 1 to 128 characters",
                );
            }
        }
        if let Some(url) = &self.alert_webhook {
            crate::alerts::check_webhook_url(url)
                .map_err(|why| Error::config(format!("metrics.alert_webhook: {why}")))?;
        }
        if !(100..=60_000).contains(&self.alert_webhook_timeout_ms) {
            return bad("alert_webhook_timeout_ms", "must be between 100 and 60000");
        }
        if !(1..=10).contains(&self.alert_webhook_attempts) {
            return bad("alert_webhook_attempts", "must be between 1 and 10");
        }
        if !(1..=10_000).contains(&self.alert_webhook_queue) {
            return bad("alert_webhook_queue", "must be between 1 and 10000");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// The summary (`GET /v1/metrics/summary`)

/// `GET /v1/metrics/summary`: the last round's figures and each service's history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Summary {
    /// Whether the scraper runs (`[control_plane.metrics] enabled`).
    pub(crate) enabled: bool,
    /// Time between rounds.
    pub(crate) interval_ms: u64,
    /// When the last round ended (Unix ms); 0 before the first.
    pub(crate) at_ms: u64,
    /// Every service with a registered instance or a static target, by name.
    pub(crate) services: Vec<ServiceSummary>,
    /// Every circuit breaker of every instance scraped, closed ones included.
    pub(crate) breakers: Vec<BreakerSummary>,
    /// Outbox backlogs, per service that has an outbox.
    pub(crate) outbox: Vec<OutboxSummary>,
    /// Sagas, per service and saga.
    pub(crate) sagas: Vec<SagaSummary>,
    /// Consumer lag of the embedded broker, per topic and group.
    pub(crate) topics: Vec<TopicSummary>,
    /// Instances the last round could not scrape, and why.
    pub(crate) down: Vec<DownTarget>,
}

/// One service's figures over the last interval, and its history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServiceSummary {
    pub(crate) service: String,
    /// Instances scraped in the last round.
    pub(crate) instances_up: u32,
    /// Instances registered (and static targets).
    pub(crate) instances: u32,
    /// Requests answered per second (ops endpoints excluded).
    pub(crate) rate_rps: f64,
    /// Share of those answered with a 5xx, 0 to 1.
    pub(crate) error_rate: f64,
    /// Median latency in ms; `null` when no request was answered in the interval.
    pub(crate) p50_ms: Option<f64>,
    /// 99th percentile latency in ms; `null` likewise.
    pub(crate) p99_ms: Option<f64>,
    /// One point per round, oldest first, at most `history_points`.
    pub(crate) history: Vec<Point>,
}

/// One round's figures of one service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub(crate) at_ms: u64,
    pub(crate) rate_rps: f64,
    pub(crate) error_rate: f64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) instances_up: u32,
}

/// One circuit breaker of one instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct BreakerSummary {
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) dependency: String,
    /// The route prefix of the scope; empty for the dependency's own.
    pub(crate) route: String,
    /// `closed`, `open` or `half_open`.
    pub(crate) state: String,
}

/// A service's outbox backlog, summed over its instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct OutboxSummary {
    pub(crate) service: String,
    pub(crate) backlog: u64,
}

/// One saga of one service, summed over its instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SagaSummary {
    pub(crate) service: String,
    pub(crate) saga: String,
    pub(crate) running: u64,
    pub(crate) started_per_s: f64,
    pub(crate) completed_per_s: f64,
    pub(crate) compensated_per_s: f64,
    pub(crate) stuck: u64,
}

/// A consumer group's lag on a topic of the embedded broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TopicSummary {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) lag: u64,
}

/// An instance the last round could not scrape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DownTarget {
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) error: String,
}

// ---------------------------------------------------------------------------------
// What one scrape of one instance says

/// Something to scrape.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) addr: SocketAddr,
    pub(crate) version: Option<String>,
    /// Serves mutual TLS only: scraped over mTLS, as the control plane.
    pub(crate) mutual_tls: bool,
}

/// The series of one exposition the figures come from.
#[derive(Debug, Default)]
struct Reading {
    /// `shoal_http_server_requests_total` by series: (value, is a 5xx).
    requests: HashMap<String, (f64, bool)>,
    /// `shoal_http_server_request_duration_seconds_bucket` by (series, `le`).
    buckets: HashMap<(String, u64), f64>,
    /// Saga counters by (saga, which).
    saga_counts: HashMap<(String, SagaCounter), f64>,
    saga_running: BTreeMap<String, f64>,
    saga_stuck: BTreeMap<String, f64>,
    /// Breakers: (dependency, route, state: 0 closed, 1 open, 2 half open).
    breakers: Vec<(String, String, usize)>,
    outbox_backlog: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SagaCounter {
    Started,
    Completed,
    Compensated,
}

/// Ops endpoints (probes, scrapes, breaker listings) are not the service's traffic:
/// counted, they would make every idle service look busy.
fn is_ops_route(route: &str) -> bool {
    route.starts_with("/health/") || route == METRICS_PATH || route.starts_with("/ops/")
}

/// A series' identity within one process: its labels but `service` and `le`.
fn series_key(s: &Sample) -> String {
    let mut key = String::new();
    for (k, v) in &s.labels {
        if k != "service" && k != "le" {
            key.push_str(k);
            key.push('=');
            key.push_str(v);
            key.push('\u{1f}');
        }
    }
    key
}

fn finite(v: f64) -> f64 {
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        0.0
    }
}

impl Reading {
    fn from_samples(samples: &[Sample]) -> Self {
        let mut r = Self::default();
        for s in samples {
            let ops = s.label("route").is_some_and(is_ops_route);
            match s.name.as_str() {
                "shoal_http_server_requests_total" if !ops => {
                    let error = s.label("status").is_some_and(|c| c.starts_with('5'));
                    r.requests.insert(series_key(s), (finite(s.value), error));
                }
                "shoal_http_server_request_duration_seconds_bucket" if !ops => {
                    let Some(le) = s.label("le").and_then(|le| le.parse::<f64>().ok()) else {
                        continue;
                    };
                    if le >= 0.0 {
                        r.buckets
                            .insert((series_key(s), le.to_bits()), finite(s.value));
                    }
                }
                "shoal_resilience_breaker_state" => {
                    // 0 closed, 1 open, 2 half open; anything else is not a state.
                    let Some(state) = [0.0, 1.0, 2.0].iter().position(|v| *v == s.value) else {
                        continue;
                    };
                    r.breakers.push((
                        s.label("dependency").unwrap_or_default().to_owned(),
                        s.label("route").unwrap_or_default().to_owned(),
                        state,
                    ));
                }
                "shoal_outbox_backlog" => {
                    *r.outbox_backlog.get_or_insert(0.0) += finite(s.value);
                }
                "shoal_saga_running" | "shoal_saga_stuck" => {
                    let saga = s.label("saga").unwrap_or_default().to_owned();
                    let map = if s.name == "shoal_saga_running" {
                        &mut r.saga_running
                    } else {
                        &mut r.saga_stuck
                    };
                    *map.entry(saga).or_default() += finite(s.value);
                }
                "shoal_saga_started_total"
                | "shoal_saga_completed_total"
                | "shoal_saga_compensated_total" => {
                    let which = match s.name.as_str() {
                        "shoal_saga_started_total" => SagaCounter::Started,
                        "shoal_saga_completed_total" => SagaCounter::Completed,
                        _ => SagaCounter::Compensated,
                    };
                    let saga = s.label("saga").unwrap_or_default().to_owned();
                    r.saga_counts.insert((saga, which), finite(s.value));
                }
                _ => {}
            }
        }
        r
    }
}

/// How much a counter grew since `prev`: all of it when the series is new, or when
/// it went down (the process restarted and its counters began again at 0).
fn delta(cur: f64, prev: Option<f64>) -> f64 {
    match prev {
        Some(p) if cur >= p => cur - p,
        _ => cur,
    }
}

/// The `q` quantile from cumulative bucket counts sorted by upper bound, as
/// Prometheus's `histogram_quantile` computes it: linear within the bucket, the
/// highest finite bound when it falls in `+Inf`. `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if count == below {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below));
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

// ---------------------------------------------------------------------------------
// The store

/// What the scraper remembers between rounds.
#[derive(Default)]
struct Store {
    /// The last reading of each instance, by instance id.
    last: HashMap<String, (Instant, Reading)>,
    /// History per service.
    history: BTreeMap<String, VecDeque<Point>>,
    summary: Summary,
}

/// One target's answer in a round.
pub(crate) struct Scraped {
    pub(crate) target: Target,
    pub(crate) result: Result<Vec<Sample>, String>,
}

#[derive(Default)]
struct ServiceAcc {
    instances: u32,
    up: u32,
    rated: bool,
    rate: f64,
    requests: f64,
    errors: f64,
    buckets: HashMap<u64, f64>,
}

impl Store {
    /// Fold one round into the store and make the new summary. `own` is the control
    /// plane's own exposition (the broker's consumer lag).
    fn ingest(
        &mut self,
        cfg: &MetricsConfig,
        round: Vec<Scraped>,
        own: &[Sample],
        now: Instant,
        at_ms: u64,
    ) -> Summary {
        let mut services: BTreeMap<String, ServiceAcc> = BTreeMap::new();
        let mut breakers = Vec::new();
        let mut outbox: BTreeMap<String, f64> = BTreeMap::new();
        let mut sagas: BTreeMap<(String, String), SagaSummary> = BTreeMap::new();
        let mut down = Vec::new();
        let mut last = HashMap::new();
        for Scraped { target, result } in round {
            let acc = services.entry(target.service.clone()).or_default();
            acc.instances += 1;
            let samples = match result {
                Ok(s) => s,
                Err(error) => {
                    down.push(DownTarget {
                        service: target.service,
                        instance: target.instance,
                        error,
                    });
                    continue;
                }
            };
            acc.up += 1;
            let cur = Reading::from_samples(&samples);
            let prev = self.last.remove(&target.instance);
            let elapsed = prev
                .as_ref()
                .map(|(at, _)| now.saturating_duration_since(*at).as_secs_f64())
                .filter(|dt| *dt > 0.0);
            if let (Some((_, prev)), Some(dt)) = (&prev, elapsed) {
                acc.rated = true;
                let mut requests = 0.0;
                for (key, &(v, error)) in &cur.requests {
                    let d = delta(v, prev.requests.get(key).map(|p| p.0));
                    requests += d;
                    if error {
                        acc.errors += d;
                    }
                }
                acc.requests += requests;
                acc.rate += requests / dt;
                // Per series first (a reset is per series), then merged by bound.
                for (key, &v) in &cur.buckets {
                    let d = delta(v, prev.buckets.get(key).copied());
                    *acc.buckets.entry(key.1).or_default() += d;
                }
                for ((saga, which), &v) in &cur.saga_counts {
                    let d = delta(v, prev.saga_counts.get(&(saga.clone(), *which)).copied());
                    let e = saga_entry(&mut sagas, &target.service, saga);
                    let per_s = d / dt;
                    match which {
                        SagaCounter::Started => e.started_per_s += per_s,
                        SagaCounter::Completed => e.completed_per_s += per_s,
                        SagaCounter::Compensated => e.compensated_per_s += per_s,
                    }
                }
            }
            for (saga, v) in &cur.saga_running {
                saga_entry(&mut sagas, &target.service, saga).running += *v as u64;
            }
            for (saga, v) in &cur.saga_stuck {
                saga_entry(&mut sagas, &target.service, saga).stuck += *v as u64;
            }
            for (dependency, route, state) in &cur.breakers {
                breakers.push(BreakerSummary {
                    service: target.service.clone(),
                    instance: target.instance.clone(),
                    dependency: dependency.clone(),
                    route: route.clone(),
                    state: match state {
                        0 => "closed",
                        1 => "open",
                        _ => "half_open",
                    }
                    .into(),
                });
            }
            if let Some(b) = cur.outbox_backlog {
                *outbox.entry(target.service.clone()).or_default() += b;
            }
            last.insert(target.instance, (now, cur));
        }
        // Instances gone from the catalog are forgotten with their readings.
        self.last = last;
        self.history.retain(|s, _| services.contains_key(s));
        let mut out = Vec::with_capacity(services.len());
        for (service, acc) in services {
            let history = self.history.entry(service.clone()).or_default();
            let mut buckets: Vec<(f64, f64)> = acc
                .buckets
                .iter()
                .map(|(le, c)| (f64::from_bits(*le), *c))
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            // Cumulative counts never go down; a reset mid-series could make them.
            let mut max = 0.0_f64;
            for b in &mut buckets {
                max = max.max(b.1);
                b.1 = max;
            }
            let ms = |q| quantile(q, &buckets).map(|s| round3(s * 1000.0));
            let point = Point {
                at_ms,
                rate_rps: round3(acc.rate),
                error_rate: if acc.requests > 0.0 {
                    round3(acc.errors / acc.requests)
                } else {
                    0.0
                },
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
                instances_up: acc.up,
            };
            // A service none of whose instances had a reading before has no rate yet.
            if acc.rated {
                history.push_back(point.clone());
                while history.len() > cfg.history_points {
                    history.pop_front();
                }
            }
            out.push(ServiceSummary {
                service,
                instances_up: acc.up,
                instances: acc.instances,
                rate_rps: point.rate_rps,
                error_rate: point.error_rate,
                p50_ms: point.p50_ms,
                p99_ms: point.p99_ms,
                history: history.iter().cloned().collect(),
            });
        }
        breakers.sort();
        let mut topics: Vec<TopicSummary> = own
            .iter()
            .filter(|s| s.name == "shoal_broker_consumer_lag")
            .map(|s| TopicSummary {
                topic: s.label("topic").unwrap_or_default().to_owned(),
                group: s.label("group").unwrap_or_default().to_owned(),
                lag: finite(s.value) as u64,
            })
            .collect();
        topics.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
        down.sort_by(|a, b| a.instance.cmp(&b.instance));
        self.summary = Summary {
            enabled: true,
            interval_ms: cfg.interval_ms,
            at_ms,
            services: out,
            breakers,
            outbox: outbox
                .into_iter()
                .map(|(service, b)| OutboxSummary {
                    service,
                    backlog: b as u64,
                })
                .collect(),
            sagas: sagas.into_values().collect(),
            topics,
            down,
        };
        self.summary.clone()
    }
}

fn saga_entry<'a>(
    sagas: &'a mut BTreeMap<(String, String), SagaSummary>,
    service: &str,
    saga: &str,
) -> &'a mut SagaSummary {
    sagas
        .entry((service.to_owned(), saga.to_owned()))
        .or_insert_with(|| SagaSummary {
            service: service.to_owned(),
            saga: saga.to_owned(),
            ..SagaSummary::default()
        })
}

/// Three decimals are plenty for people and keep the JSON short.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------
// The scraper

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// The scraper, its store and the alert rules: cheap to clone.
#[derive(Clone)]
pub(crate) struct Observatory {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: MetricsConfig,
    registry: Registry,
    /// The control plane's own registry: the broker's series are read from it.
    own: Metrics,
    /// Where the control plane itself serves, for Prometheus discovery.
    own_addr: Option<SocketAddr>,
    http: HttpClient,
    store: Mutex<Store>,
    alerts: Alerts,
}

impl Observatory {
    /// A scraper with `cfg` and `rules`, both already validated.
    pub(crate) fn new(
        cfg: MetricsConfig,
        rules: Vec<AlertRule>,
        registry: Registry,
        own: Metrics,
        own_addr: Option<SocketAddr>,
    ) -> Self {
        let timeout = Duration::from_millis(cfg.scrape_timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(cfg.interval_ms.saturating_mul(3)))
            .build(connector);
        let alerts = Alerts::new(rules, &cfg, &own, own_addr);
        let store = Store {
            summary: Summary {
                enabled: cfg.enabled,
                interval_ms: cfg.interval_ms,
                ..Summary::default()
            },
            ..Store::default()
        };
        Self {
            inner: Arc::new(Inner {
                cfg,
                registry,
                own,
                own_addr,
                http,
                store: Mutex::new(store),
                alerts,
            }),
        }
    }

    /// One that never scrapes: the summary stays empty (for [`crate::router`]).
    pub(crate) fn idle(registry: Registry, own: Metrics) -> Self {
        let cfg = MetricsConfig {
            enabled: false,
            ..MetricsConfig::default()
        };
        Self::new(cfg, Vec::new(), registry, own, None)
    }

    pub(crate) fn alerts(&self) -> &Alerts {
        &self.inner.alerts
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // The store is only ever replaced whole; a panic mid-round leaves it usable.
        self.inner
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn summary(&self) -> Summary {
        self.store().summary.clone()
    }

    /// The scraper and the webhook sender, until `stop` turns true. Returns at once
    /// when scraping is disabled.
    pub(crate) fn spawn(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            if !this.inner.cfg.enabled {
                return;
            }
            let sender = this.inner.alerts.run_sender(stop.clone());
            let mut rx = stop;
            let mut tick = tokio::time::interval(Duration::from_millis(this.inner.cfg.interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|s| *s) => break,
                }
                tokio::select! {
                    _ = this.round() => {}
                    _ = rx.wait_for(|s| *s) => break,
                }
            }
            let _ = sender.await;
        })
    }

    /// One round: scrape, fold, evaluate the rules.
    pub(crate) async fn round(&self) -> Summary {
        let targets = self.targets();
        let round = self.scrape_all(targets).await;
        let own = prom_text::parse(&self.inner.own.render()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the control plane's own metrics did not parse");
            Vec::new()
        });
        let summary = self.store().ingest(
            &self.inner.cfg,
            round,
            &own,
            Instant::now(),
            shoal_core::unix_ms(),
        );
        self.inner.alerts.evaluate(&summary, summary.at_ms);
        summary
    }

    /// Every registered instance, then the static targets.
    pub(crate) fn targets(&self) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .inner
            .registry
            .catalog()
            .services
            .into_iter()
            .flat_map(|s| s.instances)
            .map(|i| Target {
                mutual_tls: shoal_tls::serves_mutual_tls(&i.metadata),
                service: i.service,
                instance: i.id,
                addr: i.addr,
                version: Some(i.version),
            })
            .collect();
        out.extend(self.inner.cfg.targets.iter().map(|t| Target {
            service: t.service.clone(),
            instance: t.instance.clone().unwrap_or_else(|| t.service.clone()),
            addr: t.addr,
            version: None,
            mutual_tls: false,
        }));
        out
    }

    async fn scrape_all(&self, targets: Vec<Target>) -> Vec<Scraped> {
        let timeout = Duration::from_millis(self.inner.cfg.scrape_timeout_ms);
        let limit = self.inner.cfg.max_body_bytes;
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
        let mut tasks = JoinSet::new();
        // Kept apart from the tasks so a target whose task panicked is still named.
        let mut by_task = HashMap::new();
        for target in targets {
            let http = self.inner.http.clone();
            let addr = target.addr;
            let tls = target.mutual_tls.then(|| {
                self.inner
                    .registry
                    .probe_tls()
                    .map(|c| c.client(&target.service))
            });
            let permits = permits.clone();
            let task = tasks.spawn(async move {
                // The semaphore is never closed; the permit is held for the whole ask.
                let _permit = permits.acquire_owned().await;
                let answer = async {
                    match tls {
                        None => fetch(&http, &format!("http://{addr}{METRICS_PATH}"), limit).await,
                        Some(Some(Ok(c))) => {
                            fetch(&c, &format!("https://{addr}{METRICS_PATH}"), limit).await
                        }
                        Some(_) => Err(
                            "serves mutual TLS only and the control plane has no identity"
                                .to_owned(),
                        ),
                    }
                };
                match tokio::time::timeout(timeout, answer).await {
                    Ok(answer) => answer,
                    Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                }
            });
            by_task.insert(task.id(), target);
        }
        let mut out = Vec::with_capacity(by_task.len());
        while let Some(done) = tasks.join_next_with_id().await {
            let (task, result) = match done {
                Ok((task, r)) => (task, r),
                Err(e) => (e.id(), Err("scrape task failed".to_owned())),
            };
            if let Some(target) = by_task.remove(&task) {
                if let Err(e) = &result {
                    tracing::debug!(instance = %target.instance, error = %e, "not scraped");
                }
                out.push(Scraped { target, result });
            }
        }
        out
    }
}

/// One exposition, parsed. The error says what went wrong in a few words, for
/// the summary's `down` list.
async fn fetch<C>(
    http: &Client<C, Empty<Bytes>>,
    uri: &str,
    limit: usize,
) -> Result<Vec<Sample>, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let uri: http::Uri = uri.parse().map_err(|e| format!("bad url {uri}: {e}"))?;
    let res = http
        .get(uri)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let status = res.status();
    // A process not built with the SDK may have no metrics: it is up, with none.
    if status == http::StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    let body = Limited::new(res.into_body(), limit)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the body is not UTF-8".to_owned())?;
    prom_text::parse(text).map_err(|e| format!("malformed exposition: {e}"))
}

// ---------------------------------------------------------------------------------
// Routes

/// `GET /v1/metrics/summary`, `GET /v1/prometheus/targets` and the alerts' routes.
pub(crate) fn router(obs: Observatory) -> Router {
    Router::new()
        .route("/v1/metrics/summary", get(summary))
        .route("/v1/prometheus/targets", get(prometheus_targets))
        .with_state(obs.clone())
        .merge(crate::alerts::router(obs.alerts().clone()))
}

async fn summary(State(obs): State<Observatory>) -> Json<Summary> {
    Json(obs.summary())
}

/// One target group of Prometheus HTTP service discovery.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TargetGroup {
    targets: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// The registry as Prometheus HTTP SD: one group per instance. The service goes in
/// `shoal_service`, not `service`, which every exposed series already carries.
async fn prometheus_targets(State(obs): State<Observatory>) -> Json<Vec<TargetGroup>> {
    let mut out = Vec::new();
    let group = |addr: SocketAddr, service: &str, instance: &str| {
        let mut labels = BTreeMap::new();
        labels.insert("shoal_service".to_owned(), service.to_owned());
        labels.insert("shoal_instance".to_owned(), instance.to_owned());
        (addr, labels)
    };
    if let Some(addr) = obs.inner.own_addr {
        let (addr, labels) = group(addr, "control-plane", "control-plane");
        out.push(TargetGroup {
            targets: vec![addr.to_string()],
            labels,
        });
    }
    for t in obs.targets() {
        let (addr, mut labels) = group(t.addr, &t.service, &t.instance);
        if let Some(v) = t.version {
            labels.insert("shoal_version".to_owned(), v);
        }
        if t.mutual_tls {
            labels.insert("__scheme__".to_owned(), "https".to_owned());
        }
        out.push(TargetGroup {
            targets: vec![addr.to_string()],
            labels,
        });
    }
    Json(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(service: &str, instance: &str) -> Target {
        Target {
            service: service.into(),
            instance: instance.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            version: None,
            mutual_tls: false,
        }
    }

    fn ok(service: &str, instance: &str, text: &str) -> Scraped {
        Scraped {
            target: target(service, instance),
            result: Ok(prom_text::parse(text).unwrap()),
        }
    }

    /// An exposition of `ok` 200s and `failed` 500s on one route, `fast` of them in
    /// the 4 ms bucket and the rest in the 64 ms one.
    fn exposition(ok: u64, failed: u64, fast: u64) -> String {
        let all = ok + failed;
        let mut t = String::new();
        let r = r#"route="/api/orders",method="GET""#;
        t.push_str(&format!(
            "shoal_http_server_requests_total{{service=\"orders\",{r},status=\"200\"}} {ok}\n"
        ));
        t.push_str(&format!(
            "shoal_http_server_requests_total{{service=\"orders\",{r},status=\"500\"}} {failed}\n"
        ));
        // Probes and scrapes: never counted.
        t.push_str("shoal_http_server_requests_total{service=\"orders\",route=\"/health/ready\",method=\"GET\",status=\"200\"} 999\n");
        t.push_str("shoal_http_server_request_duration_seconds_bucket{service=\"orders\",le=\"0.5\",route=\"/metrics\",method=\"GET\",status=\"200\"} 999\n");
        for le in ["0.002", "0.004", "0.008", "0.064", "+Inf"] {
            let n = match le {
                "0.002" => 0,
                "0.004" | "0.008" => fast,
                _ => all,
            };
            t.push_str(&format!(
                "shoal_http_server_request_duration_seconds_bucket{{service=\"orders\",le=\"{le}\",{r},status=\"200\"}} {n}\n"
            ));
        }
        t.push_str("# EOF\n");
        t
    }

    /// A process whose `/metrics` is `app`.
    async fn process(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn a_round_scrapes_everyone_at_once_and_names_the_down() {
        use shoal_core::registry::Registration;
        let registry = Registry::new(shoal_registry::RegistryConfig::default()).unwrap();
        let answering = |text: &'static str| {
            Router::new().route(METRICS_PATH, get(move || async move { text }))
        };
        let good = process(answering(
            "shoal_outbox_backlog{service=\"orders\"} 3\n# EOF\n",
        ))
        .await;
        let garbage = process(answering("<html>\n")).await;
        let slow = process(Router::new().route(
            METRICS_PATH,
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                ""
            }),
        ))
        .await;
        let failing = process(Router::new().route(
            METRICS_PATH,
            get(|| async { http::StatusCode::INTERNAL_SERVER_ERROR }),
        ))
        .await;
        // No /metrics at all: up, with nothing to say.
        let plain = process(Router::new()).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for (id, addr) in [
            ("orders-1", good),
            ("orders-2", garbage),
            ("orders-3", slow),
            ("orders-4", failing),
            ("legacy-1", plain),
            ("orders-5", closed),
        ] {
            registry
                .register(Registration {
                    service: id.split('-').next().unwrap().into(),
                    version: "1.0.0".into(),
                    addr,
                    id: Some(id.into()),
                    pid: None,
                    metadata: Default::default(),
                    ttl_ms: Some(60_000),
                })
                .unwrap();
        }
        let cfg = MetricsConfig {
            scrape_timeout_ms: 300,
            targets: vec![StaticTarget {
                service: "gateway".into(),
                addr: good,
                instance: None,
            }],
            ..MetricsConfig::default()
        };
        let obs = Observatory::new(cfg, vec![], registry, Metrics::new("control-plane"), None);
        let start = std::time::Instant::now();
        let s = obs.round().await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the slow one held up the round"
        );
        let counts: Vec<_> = s
            .services
            .iter()
            .map(|s| (s.service.as_str(), s.instances_up, s.instances))
            .collect();
        assert_eq!(
            counts,
            [("gateway", 1, 1), ("legacy", 1, 1), ("orders", 1, 5)]
        );
        let down: Vec<_> = s
            .down
            .iter()
            .map(|d| (d.instance.as_str(), d.error.as_str()))
            .collect();
        assert_eq!(down.len(), 4, "{down:?}");
        assert!(
            down[0].1.starts_with("malformed exposition: line 1: "),
            "{down:?}"
        );
        assert_eq!(down[1], ("orders-3", "no answer within 300 ms"));
        assert_eq!(down[2], ("orders-4", "answered 500 Internal Server Error"));
        assert!(down[3].1.starts_with("unreachable"), "{down:?}");
        assert_eq!(
            s.outbox,
            [
                OutboxSummary {
                    service: "gateway".into(),
                    backlog: 3
                },
                OutboxSummary {
                    service: "orders".into(),
                    backlog: 3
                }
            ]
        );
        assert_eq!(obs.summary(), s);
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let b = [
            (0.1, 0.0),
            (0.2, 50.0),
            (0.4, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(0.5, &b), Some(0.2));
        assert!((quantile(0.75, &b).unwrap() - 0.3).abs() < 1e-9);
        assert!((quantile(0.25, &b).unwrap() - 0.15).abs() < 1e-9);
        // In +Inf: the highest finite bound.
        let b = [(0.1, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &b), Some(0.1));
        // In the first bucket: from 0.
        assert_eq!(
            quantile(0.5, &[(0.1, 10.0), (f64::INFINITY, 10.0)]),
            Some(0.05)
        );
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
    }

    #[test]
    fn rates_errors_and_percentiles_come_from_two_scrapes() {
        let cfg = MetricsConfig::default();
        let mut store = Store::default();
        let t0 = Instant::now();
        let s = store.ingest(
            &cfg,
            vec![ok("orders", "orders-1", &exposition(100, 0, 100))],
            &[],
            t0,
            1_000,
        );
        // One scrape: no rate yet, no history point.
        assert_eq!(s.services.len(), 1);
        assert_eq!(
            (s.services[0].instances_up, s.services[0].instances),
            (1, 1)
        );
        assert_eq!(s.services[0].rate_rps, 0.0);
        assert_eq!(s.services[0].p50_ms, None);
        assert!(s.services[0].history.is_empty());

        // 5 s later: 40 more 200s and 10 500s; 25 of the 50 fast (4 ms), 25 slow.
        let t1 = t0 + Duration::from_secs(5);
        let s = store.ingest(
            &cfg,
            vec![ok("orders", "orders-1", &exposition(140, 10, 125))],
            &[],
            t1,
            6_000,
        );
        let o = &s.services[0];
        assert_eq!(o.rate_rps, 10.0);
        assert_eq!(o.error_rate, 0.2);
        // The median is the top of the 4 ms bucket's range: 25 of 50 at or below 4 ms.
        assert_eq!(o.p50_ms, Some(4.0));
        // p99: rank 49.5 of 50, in (8 ms, 64 ms]: 8 + 56 × 24.5 / 25.
        assert_eq!(o.p99_ms, Some(62.88));
        assert_eq!(o.history.len(), 1);
        assert_eq!(o.history[0].at_ms, 6_000);
        assert_eq!(o.history[0].rate_rps, 10.0);
    }

    #[test]
    fn a_counter_reset_counts_from_zero_and_history_is_a_bounded_ring() {
        let cfg = MetricsConfig {
            history_points: 3,
            ..MetricsConfig::default()
        };
        let mut store = Store::default();
        let t0 = Instant::now();
        store.ingest(
            &cfg,
            vec![ok("orders", "orders-1", &exposition(1000, 0, 1000))],
            &[],
            t0,
            0,
        );
        // The process restarted: its counters began again and now read 20 (5 failed).
        let s = store.ingest(
            &cfg,
            vec![ok("orders", "orders-1", &exposition(15, 5, 20))],
            &[],
            t0 + Duration::from_secs(2),
            2_000,
        );
        assert_eq!(s.services[0].rate_rps, 10.0);
        assert_eq!(s.services[0].error_rate, 0.25);
        assert_eq!(s.services[0].p99_ms, Some(3.98));
        for i in 2..6 {
            store.ingest(
                &cfg,
                vec![ok("orders", "orders-1", &exposition(15, 5, 20))],
                &[],
                t0 + Duration::from_secs(2 * i),
                2_000 * i,
            );
        }
        let s = store.summary.clone();
        let h = &s.services[0].history;
        assert_eq!(
            h.iter().map(|p| p.at_ms).collect::<Vec<_>>(),
            [6_000, 8_000, 10_000]
        );
        // Nothing new: no rate, no percentile.
        assert_eq!(
            (h[2].rate_rps, h[2].error_rate, h[2].p99_ms),
            (0.0, 0.0, None)
        );
    }

    #[test]
    fn several_instances_add_up_and_a_down_one_is_named() {
        let cfg = MetricsConfig::default();
        let mut store = Store::default();
        let t0 = Instant::now();
        let down = |i: &str| Scraped {
            target: target("orders", i),
            result: Err("unreachable".into()),
        };
        store.ingest(
            &cfg,
            vec![
                ok("orders", "orders-1", &exposition(0, 0, 0)),
                ok("orders", "orders-2", &exposition(0, 0, 0)),
                down("orders-3"),
            ],
            &[],
            t0,
            0,
        );
        let s = store.ingest(
            &cfg,
            vec![
                ok("orders", "orders-1", &exposition(10, 0, 10)),
                ok("orders", "orders-2", &exposition(10, 10, 20)),
                down("orders-3"),
            ],
            &[],
            t0 + Duration::from_secs(1),
            1_000,
        );
        let o = &s.services[0];
        assert_eq!((o.instances_up, o.instances), (2, 3));
        assert_eq!(o.rate_rps, 30.0);
        assert!((o.error_rate - 0.333).abs() < 1e-9, "{o:?}");
        assert_eq!(s.down.len(), 1);
        assert_eq!(s.down[0].instance, "orders-3");
        // A service gone from the catalog is forgotten.
        let s = store.ingest(&cfg, vec![], &[], t0 + Duration::from_secs(2), 2_000);
        assert!(s.services.is_empty());
        assert!(store.history.is_empty() && store.last.is_empty());
    }

    #[test]
    fn breakers_outboxes_sagas_and_lag_are_read() {
        let cfg = MetricsConfig::default();
        let mut store = Store::default();
        let text = |started: u64| {
            format!(
                "\
shoal_resilience_breaker_state{{service=\"orders\",dependency=\"payments\",route=\"\"}} 1
shoal_resilience_breaker_state{{service=\"orders\",dependency=\"inventory\",route=\"\"}} 0
shoal_resilience_breaker_state{{service=\"orders\",dependency=\"payments\",route=\"/api/pay\"}} 2
shoal_outbox_backlog{{service=\"orders\"}} 7
shoal_saga_running{{service=\"orders\",saga=\"place-order\"}} 2
shoal_saga_stuck{{service=\"orders\",saga=\"place-order\"}} 1
shoal_saga_started_total{{service=\"orders\",saga=\"place-order\"}} {started}
shoal_saga_completed_total{{service=\"orders\",saga=\"place-order\"}} 3
shoal_saga_compensated_total{{service=\"orders\",saga=\"place-order\"}} 1
"
            )
        };
        let own = prom_text::parse(
            "shoal_broker_consumer_lag{service=\"control-plane\",topic=\"orders.events\",group=\"shipping\"} 4\n",
        )
        .unwrap();
        let t0 = Instant::now();
        store.ingest(&cfg, vec![ok("orders", "orders-1", &text(10))], &own, t0, 0);
        let s = store.ingest(
            &cfg,
            vec![ok("orders", "orders-1", &text(20))],
            &own,
            t0 + Duration::from_secs(10),
            10_000,
        );
        let states: Vec<_> = s
            .breakers
            .iter()
            .map(|b| {
                (
                    b.instance.as_str(),
                    b.dependency.as_str(),
                    b.route.as_str(),
                    b.state.as_str(),
                )
            })
            .collect();
        assert_eq!(
            states,
            [
                ("orders-1", "inventory", "", "closed"),
                ("orders-1", "payments", "", "open"),
                ("orders-1", "payments", "/api/pay", "half_open")
            ]
        );
        assert_eq!(
            s.outbox,
            [OutboxSummary {
                service: "orders".into(),
                backlog: 7
            }]
        );
        assert_eq!(
            s.sagas,
            [SagaSummary {
                service: "orders".into(),
                saga: "place-order".into(),
                running: 2,
                started_per_s: 1.0,
                completed_per_s: 0.0,
                compensated_per_s: 0.0,
                stuck: 1,
            }]
        );
        assert_eq!(
            s.topics,
            [TopicSummary {
                topic: "orders.events".into(),
                group: "shipping".into(),
                lag: 4
            }]
        );
    }

    #[test]
    fn the_summary_has_the_agreed_shape() {
        let v = serde_json::to_value(Summary::default()).unwrap();
        for key in [
            "interval_ms",
            "at_ms",
            "services",
            "breakers",
            "outbox",
            "sagas",
            "topics",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        let v = serde_json::to_value(ServiceSummary::default()).unwrap();
        for key in [
            "service",
            "instances_up",
            "instances",
            "rate_rps",
            "error_rate",
            "p50_ms",
            "p99_ms",
            "history",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn config_is_checked_naming_the_key() {
        assert!(MetricsConfig::default().validate().is_ok());
        let cases: [(MetricsConfig, &str); 6] = [
            (
                MetricsConfig {
                    interval_ms: 10,
                    ..Default::default()
                },
                "metrics.interval_ms",
            ),
            (
                MetricsConfig {
                    history_points: 0,
                    ..Default::default()
                },
                "metrics.history_points",
            ),
            (
                MetricsConfig {
                    scrape_timeout_ms: 6_000,
                    ..Default::default()
                },
                "metrics.scrape_timeout_ms",
            ),
            (
                MetricsConfig {
                    max_body_bytes: 10,
                    ..Default::default()
                },
                "metrics.max_body_bytes",
            ),
            (
                MetricsConfig {
                    alert_webhook: Some("ftp://x".into()),
                    ..Default::default()
                },
                "metrics.alert_webhook",
            ),
            (
                MetricsConfig {
                    targets: vec![StaticTarget {
                        service: "Bad Name".into(),
                        addr: "127.0.0.1:8080".parse().unwrap(),
                        instance: None,
                    }],
                    ..Default::default()
                },
                "metrics.targets[0].service",
            ),
        ];
        for (cfg, key) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
