//! Alert rules (`[[control_plane.alerts]]`), evaluated on the scraper's figures after
//! every round ([`crate::scrape`]), listed at `GET /v1/alerts`, and posted to a
//! webhook when they fire and when they resolve.
//!
//! A rule watches one figure of every service it applies to (or of every topic and
//! group, for `consumer_lag`). A service over the threshold is *pending*; pending
//! for `for_ms` it *fires*; back under, a firing alert is *resolved* and the
//! service's alert is *inactive* again, as Prometheus does. The webhook body is
//! Alertmanager's (version 4), so a receiver written for Alertmanager reads it.
//!
//! Notifications wait in a bounded queue and one task sends them in order, each
//! within a timeout and a bounded number of attempts: a slow or dead receiver never
//! slows the scraper, and what cannot be queued or sent is dropped and counted
//! (`shoal_alerts_webhook_failed_total`).

use crate::scrape::{MetricsConfig, Summary};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use shoal_core::Error;
use shoal_telemetry::Metrics;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Most rules in a system file.
const MAX_RULES: usize = 256;
/// Longest `for_ms`: a day.
const MAX_FOR_MS: u64 = 86_400_000;
/// Longest webhook URL.
const MAX_URL_BYTES: usize = 2048;
/// The first retry's delay; doubled each time, at most [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The minimum request rate of `error_rate` and `latency_p99` rules that set none.
const DEFAULT_MIN_RATE_RPS: f64 = 1.0;

/// What a rule watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The share of requests a service answered with a 5xx (0 to 1) is over
    /// `threshold`, at `min_rate_rps` or more.
    ErrorRate,
    /// A service's 99th percentile latency in ms is over `threshold`, at
    /// `min_rate_rps` or more.
    LatencyP99,
    /// More than `threshold` (default 0) circuit breakers of a service (towards
    /// `dependency`, if given) are open or half open.
    BreakerOpen,
    /// More than `threshold` (default 0) of a service's instances were not scraped.
    InstanceDown,
    /// A service's outbox backlog (messages) is over `threshold`.
    OutboxBacklog,
    /// A consumer group's lag (messages) on a topic of the embedded broker is over
    /// `threshold`.
    ConsumerLag,
}

impl AlertKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "error_rate",
            Self::LatencyP99 => "latency_p99",
            Self::BreakerOpen => "breaker_open",
            Self::InstanceDown => "instance_down",
            Self::OutboxBacklog => "outbox_backlog",
            Self::ConsumerLag => "consumer_lag",
        }
    }
}

/// One `[[control_plane.alerts]]` rule.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// The alert's name (`alertname` in the webhook); unique among the rules.
    pub name: String,
    /// What it watches.
    pub kind: AlertKind,
    /// Only this service; every service when absent (not for `consumer_lag`).
    #[serde(default)]
    pub service: Option<String>,
    /// `breaker_open` only: only breakers towards this service.
    #[serde(default)]
    pub dependency: Option<String>,
    /// `consumer_lag` only: only this topic.
    #[serde(default)]
    pub topic: Option<String>,
    /// `consumer_lag` only: only this group.
    #[serde(default)]
    pub group: Option<String>,
    /// The value above which the alert is pending: a share from 0 to 1 for
    /// `error_rate` (0.05 is 5 %), ms for `latency_p99`, a count otherwise.
    /// Required but for `breaker_open` and `instance_down` (default 0).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// How long the value must stay over the threshold before the alert fires; 0
    /// (the default) fires at the first round over it. At most a day.
    #[serde(default)]
    pub for_ms: u64,
    /// `error_rate` and `latency_p99`: below this many requests per second a
    /// service never alerts, so a handful of failures on an idle service do not
    /// page anyone. Default 1.
    #[serde(default)]
    pub min_rate_rps: Option<f64>,
    /// Where this rule's notifications go; `[control_plane.metrics] alert_webhook`
    /// when absent. http or https.
    #[serde(default)]
    pub webhook: Option<String>,
}

impl AlertRule {
    fn threshold(&self) -> f64 {
        self.threshold.unwrap_or(0.0)
    }

    fn min_rate_rps(&self) -> f64 {
        self.min_rate_rps.unwrap_or(DEFAULT_MIN_RATE_RPS)
    }
}

/// Whether `url` is an http(s) URL with a host; the error says what is wrong.
pub(crate) fn check_webhook_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("longer than {MAX_URL_BYTES} bytes"));
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url:?} must start with http:// or https://"));
    }
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => Err("user names in URLs are not supported".into()),
        Some(a) if !a.host().is_empty() => Ok(()),
        _ => Err(format!("{url:?} names no host")),
    }
}

/// Check the rules of a system file; the error names the rule and the key
/// (`alerts[2].threshold: …`).
pub fn validate_alerts(rules: &[AlertRule]) -> Result<(), Error> {
    if rules.len() > MAX_RULES {
        return Err(Error::config(format!("alerts: at most {MAX_RULES} rules")));
    }
    let mut names = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let bad = |k: &str, why: String| Err(Error::config(format!("alerts[{i}].{k}: {why}")));
        if r.name.is_empty() || r.name.len() > 128 || r.name.chars().any(char::is_control) {
            return bad("name", "must be 1 to 128 printable characters".into());
        }
        if !names.insert(r.name.as_str()) {
            return bad("name", format!("{:?} names another rule already", r.name));
        }
        let kind = r.kind.as_str();
        for (key, value) in [("service", &r.service), ("dependency", &r.dependency)] {
            if let Some(v) = value {
                if let Err(e) = shoal_core::names::validate_service_name(v) {
                    return bad(key, e);
                }
            }
        }
        let consumer = r.kind == AlertKind::ConsumerLag;
        if consumer && r.service.is_some() {
            return bad(
                "service",
                "consumer_lag is per topic and group; use topic and group".into(),
            );
        }
        if !consumer && (r.topic.is_some() || r.group.is_some()) {
            return bad(
                "topic",
                format!("only consumer_lag rules have one, not {kind}"),
            );
        }
        if r.dependency.is_some() && r.kind != AlertKind::BreakerOpen {
            return bad(
                "dependency",
                format!("only breaker_open rules have one, not {kind}"),
            );
        }
        for (key, v) in [("topic", &r.topic), ("group", &r.group)] {
            if v.as_deref().is_some_and(|v| v.is_empty() || v.len() > 255) {
                return bad(key, "must be 1 to 255 characters".into());
            }
        }
        let t = match (r.threshold, r.kind) {
            (None, AlertKind::BreakerOpen | AlertKind::InstanceDown) => 0.0,
            (None, _) => return bad("threshold", format!("required for {kind}")),
            (Some(t), _) => t,
        };
        let range_ok = match r.kind {
            AlertKind::ErrorRate => (0.0..1.0).contains(&t),
            AlertKind::LatencyP99 => t > 0.0,
            _ => t >= 0.0,
        };
        if !t.is_finite() || !range_ok {
            let why = match r.kind {
                AlertKind::ErrorRate => "must be at least 0 and below 1 (a share: 0.05 is 5 %)",
                AlertKind::LatencyP99 => "must be a positive number of ms",
                _ => "must be 0 or more",
            };
            return bad("threshold", why.into());
        }
        if r.for_ms > MAX_FOR_MS {
            return bad("for_ms", format!("at most {MAX_FOR_MS} (a day)"));
        }
        if let Some(m) = r.min_rate_rps {
            if !matches!(r.kind, AlertKind::ErrorRate | AlertKind::LatencyP99) {
                return bad(
                    "min_rate_rps",
                    format!("only error_rate and latency_p99 rules have one, not {kind}"),
                );
            }
            if !m.is_finite() || m < 0.0 {
                return bad("min_rate_rps", "must be 0 or more".into());
            }
        }
        if let Some(url) = &r.webhook {
            check_webhook_url(url)
                .map_err(|why| Error::config(format!("alerts[{i}].webhook: {why}")))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// State

/// What one alert of a rule is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Subject {
    service: Option<String>,
    dependency: Option<String>,
    topic: Option<String>,
    group: Option<String>,
}

/// An alert over its threshold.
#[derive(Clone, Debug)]
struct Active {
    /// Since when it is over the threshold.
    active_since_ms: u64,
    /// When it fired, once it has.
    fired_at_ms: Option<u64>,
    value: f64,
}

#[derive(Debug, Default)]
struct RuleState {
    active: BTreeMap<Subject, Active>,
    /// When the last of its alerts went inactive (or evaluation began).
    inactive_since_ms: u64,
    /// The highest value seen in the last round, of any subject.
    last_value: Option<f64>,
}

/// `GET /v1/alerts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct AlertList {
    pub(crate) alerts: Vec<AlertView>,
}

/// One alert: a pending or firing one, or a rule none of whose alerts is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AlertView {
    pub(crate) name: String,
    pub(crate) kind: AlertKind,
    /// The service alerted on; for an inactive rule, the rule's own (`null`: every
    /// service; always `null` for `consumer_lag`).
    pub(crate) service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dependency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// `pending`, `firing` or `inactive`.
    pub(crate) state: String,
    /// Pending: since it went over; firing: since it fired; inactive: since the
    /// last alert resolved (or evaluation began).
    pub(crate) since_ms: u64,
    /// The value; for an inactive rule, the highest of the last round (`null`:
    /// nothing to measure).
    pub(crate) value: Option<f64>,
    pub(crate) threshold: f64,
    pub(crate) for_ms: u64,
    pub(crate) message: String,
}

/// A notification waiting for the webhook.
#[derive(Debug)]
struct Notification {
    url: String,
    body: Bytes,
}

struct Inner {
    rules: Vec<AlertRule>,
    state: Mutex<Vec<RuleState>>,
    global_webhook: Option<String>,
    timeout: Duration,
    attempts: u32,
    queue: mpsc::Sender<Notification>,
    queued: Mutex<Option<mpsc::Receiver<Notification>>>,
    /// The control plane's URL, for `externalURL` and `generatorURL`.
    external_url: String,
    sent: Counter,
    failed: Family<Vec<(&'static str, String)>, Counter>,
}

/// The rules and their alerts: cheap to clone.
#[derive(Clone)]
pub(crate) struct Alerts {
    inner: Arc<Inner>,
}

impl Alerts {
    /// `rules` (validated) with the webhook settings of `cfg`. The webhook series
    /// are registered in `metrics` when scraping is enabled.
    pub(crate) fn new(
        rules: Vec<AlertRule>,
        cfg: &MetricsConfig,
        metrics: &Metrics,
        own_addr: Option<SocketAddr>,
    ) -> Self {
        let (queue, queued) = mpsc::channel(cfg.alert_webhook_queue.max(1));
        let sent = Counter::default();
        let failed = Family::<Vec<(&'static str, String)>, Counter>::default();
        if cfg.enabled {
            metrics.register(
                "shoal_alerts_webhook_sent",
                "Alert notifications the webhook accepted (2xx)",
                sent.clone(),
            );
            metrics.register(
                "shoal_alerts_webhook_failed",
                "Alert notifications dropped, by reason: queue_full, or failed after every attempt",
                failed.clone(),
            );
        }
        let now = shoal_core::unix_ms();
        let state = rules
            .iter()
            .map(|_| RuleState {
                inactive_since_ms: now,
                ..RuleState::default()
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                rules,
                state: Mutex::new(state),
                global_webhook: cfg.alert_webhook.clone(),
                timeout: Duration::from_millis(cfg.alert_webhook_timeout_ms),
                attempts: cfg.alert_webhook_attempts.max(1),
                queue,
                queued: Mutex::new(Some(queued)),
                external_url: own_addr.map(|a| format!("http://{a}")).unwrap_or_default(),
                sent,
                failed,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, Vec<RuleState>> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Evaluate every rule on `summary` at `now_ms`: move alerts between pending,
    /// firing and inactive, and queue the notifications of those that fired or
    /// resolved.
    pub(crate) fn evaluate(&self, summary: &Summary, now_ms: u64) {
        let mut out = Vec::new();
        {
            let mut states = self.state();
            for (rule, st) in self.inner.rules.iter().zip(states.iter_mut()) {
                let observed = observe(rule, summary);
                st.last_value = observed
                    .iter()
                    .map(|o| o.1)
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
                let mut over = BTreeSet::new();
                for (subject, value, is_over) in observed {
                    if !is_over {
                        continue;
                    }
                    let a = st.active.entry(subject.clone()).or_insert(Active {
                        active_since_ms: now_ms,
                        fired_at_ms: None,
                        value,
                    });
                    a.value = value;
                    if a.fired_at_ms.is_none()
                        && now_ms.saturating_sub(a.active_since_ms) >= rule.for_ms
                    {
                        a.fired_at_ms = Some(now_ms);
                        out.push(self.notification(rule, &subject, a, None));
                    }
                    over.insert(subject);
                }
                let gone: Vec<Subject> = st
                    .active
                    .keys()
                    .filter(|s| !over.contains(*s))
                    .cloned()
                    .collect();
                for subject in gone {
                    if let Some(a) = st.active.remove(&subject) {
                        st.inactive_since_ms = now_ms;
                        if a.fired_at_ms.is_some() {
                            out.push(self.notification(rule, &subject, &a, Some(now_ms)));
                        }
                    }
                }
            }
        }
        for n in out.into_iter().flatten() {
            self.enqueue(n);
        }
    }

    fn enqueue(&self, n: Notification) {
        if let Err(e) = self.inner.queue.try_send(n) {
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "stopped",
            };
            tracing::warn!(reason, "alert notification dropped");
            self.inner
                .failed
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc();
        }
    }

    /// The notification of `a` firing (or resolved at `resolved_ms`), if the rule
    /// has a webhook.
    fn notification(
        &self,
        rule: &AlertRule,
        subject: &Subject,
        a: &Active,
        resolved_ms: Option<u64>,
    ) -> Option<Notification> {
        let url = rule
            .webhook
            .as_ref()
            .or(self.inner.global_webhook.as_ref())?;
        let status = if resolved_ms.is_some() {
            "resolved"
        } else {
            "firing"
        };
        let mut labels = BTreeMap::new();
        labels.insert("alertname", rule.name.clone());
        labels.insert("kind", rule.kind.as_str().to_owned());
        for (k, v) in [
            ("service", &subject.service),
            ("dependency", &subject.dependency),
            ("topic", &subject.topic),
            ("group", &subject.group),
        ] {
            if let Some(v) = v {
                labels.insert(k, v.clone());
            }
        }
        let threshold = rule.threshold();
        let annotations = serde_json::json!({
            "summary": describe(rule, subject, a.value),
            "value": a.value.to_string(),
            "threshold": threshold.to_string(),
        });
        let starts = a.fired_at_ms.unwrap_or(a.active_since_ms);
        let ends = resolved_ms.map_or_else(
            || "0001-01-01T00:00:00Z".to_owned(),
            shoal_telemetry::logging::rfc3339,
        );
        let fingerprint = fingerprint(&labels);
        let external = &self.inner.external_url;
        let body = serde_json::json!({
            "version": "4",
            "groupKey": format!("{{}}:{{alertname=\"{}\"}}", rule.name),
            "truncatedAlerts": 0,
            "status": status,
            "receiver": "shoal-control-plane",
            "groupLabels": {"alertname": rule.name},
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": external,
            "alerts": [{
                "status": status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": shoal_telemetry::logging::rfc3339(starts),
                "endsAt": ends,
                "generatorURL": format!("{external}/v1/alerts"),
                "fingerprint": fingerprint,
            }],
        });
        Some(Notification {
            url: url.clone(),
            body: Bytes::from(body.to_string()),
        })
    }

    /// `GET /v1/alerts`: every pending and firing alert, and each rule that has
    /// none as one inactive entry; in rule order.
    pub(crate) fn list(&self) -> AlertList {
        let states = self.state();
        let mut alerts = Vec::new();
        for (rule, st) in self.inner.rules.iter().zip(states.iter()) {
            let threshold = rule.threshold();
            let view = |subject: &Subject, state: &str, since_ms, value, message| AlertView {
                name: rule.name.clone(),
                kind: rule.kind,
                service: subject.service.clone(),
                dependency: subject.dependency.clone(),
                topic: subject.topic.clone(),
                group: subject.group.clone(),
                state: state.to_owned(),
                since_ms,
                value,
                threshold,
                for_ms: rule.for_ms,
                message,
            };
            if st.active.is_empty() {
                let subject = Subject {
                    service: rule.service.clone(),
                    dependency: rule.dependency.clone(),
                    topic: rule.topic.clone(),
                    group: rule.group.clone(),
                };
                let message = match st.last_value {
                    Some(v) => format!("under the threshold (highest now {})", show(rule, v)),
                    None => "nothing to measure yet".to_owned(),
                };
                alerts.push(view(
                    &subject,
                    "inactive",
                    st.inactive_since_ms,
                    st.last_value,
                    message,
                ));
            }
            for (subject, a) in &st.active {
                let (state, since) = match a.fired_at_ms {
                    Some(at) => ("firing", at),
                    None => ("pending", a.active_since_ms),
                };
                alerts.push(view(
                    subject,
                    state,
                    since,
                    Some(a.value),
                    describe(rule, subject, a.value),
                ));
            }
        }
        AlertList { alerts }
    }

    /// The webhook sender, until `stop` turns true. Only the first call gets the
    /// queue; later ones return at once.
    pub(crate) fn run_sender(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let queued = self
            .inner
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let this = self.clone();
        tokio::spawn(async move {
            let Some(mut rx) = queued else {
                return;
            };
            loop {
                let n = tokio::select! {
                    n = rx.recv() => n,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Some(n) = n else {
                    return;
                };
                tokio::select! {
                    _ = this.deliver(&n) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    }

    /// Post `n`, retrying failures and 5xx answers up to the configured attempts.
    async fn deliver(&self, n: &Notification) {
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        for attempt in 1..=self.inner.attempts {
            match tokio::time::timeout(self.inner.timeout, post(&n.url, n.body.clone())).await {
                Ok(Ok(status)) if status.is_success() => {
                    self.inner.sent.inc();
                    return;
                }
                Ok(Ok(status)) if status.is_client_error() => {
                    // The receiver refuses the body: sending it again changes nothing.
                    last_error = format!("answered {status}");
                    break;
                }
                Ok(Ok(status)) => last_error = format!("answered {status}"),
                Ok(Err(e)) => last_error = e,
                Err(_) => {
                    last_error = format!("no answer within {} ms", self.inner.timeout.as_millis())
                }
            }
            if attempt < self.inner.attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tracing::warn!(url = %n.url, error = %last_error, "alert notification not delivered");
        self.inner
            .failed
            .get_or_create(&vec![("reason", "failed".to_owned())])
            .inc();
    }
}

/// The subjects `rule` applies to in `summary`: (subject, value, over the threshold).
fn observe(rule: &AlertRule, summary: &Summary) -> Vec<(Subject, f64, bool)> {
    let t = rule.threshold();
    let wanted = |service: &str| rule.service.as_deref().is_none_or(|s| s == service);
    let of = |service: &str| Subject {
        service: Some(service.to_owned()),
        dependency: rule.dependency.clone(),
        ..Subject::default()
    };
    let mut out = Vec::new();
    match rule.kind {
        AlertKind::ErrorRate | AlertKind::LatencyP99 => {
            for s in summary.services.iter().filter(|s| wanted(&s.service)) {
                let busy = s.rate_rps >= rule.min_rate_rps();
                let value = if rule.kind == AlertKind::ErrorRate {
                    Some(s.error_rate)
                } else {
                    s.p99_ms
                };
                if let Some(v) = value {
                    out.push((of(&s.service), v, busy && v > t));
                }
            }
        }
        AlertKind::InstanceDown => {
            for s in summary.services.iter().filter(|s| wanted(&s.service)) {
                let down = f64::from(s.instances.saturating_sub(s.instances_up));
                out.push((of(&s.service), down, down > t));
            }
        }
        AlertKind::BreakerOpen => {
            let mut counts: BTreeMap<&str, f64> = summary
                .services
                .iter()
                .filter(|s| wanted(&s.service))
                .map(|s| (s.service.as_str(), 0.0))
                .collect();
            for b in &summary.breakers {
                let dep_ok = rule.dependency.as_deref().is_none_or(|d| d == b.dependency);
                if wanted(&b.service) && dep_ok && b.state != "closed" {
                    *counts.entry(b.service.as_str()).or_default() += 1.0;
                }
            }
            for (service, n) in counts {
                out.push((of(service), n, n > t));
            }
        }
        AlertKind::OutboxBacklog => {
            for o in summary.outbox.iter().filter(|o| wanted(&o.service)) {
                let v = o.backlog as f64;
                out.push((of(&o.service), v, v > t));
            }
        }
        AlertKind::ConsumerLag => {
            for l in &summary.topics {
                let topic_ok = rule.topic.as_deref().is_none_or(|x| x == l.topic);
                let group_ok = rule.group.as_deref().is_none_or(|x| x == l.group);
                if topic_ok && group_ok {
                    let v = l.lag as f64;
                    let subject = Subject {
                        topic: Some(l.topic.clone()),
                        group: Some(l.group.clone()),
                        ..Subject::default()
                    };
                    out.push((subject, v, v > t));
                }
            }
        }
    }
    out
}

/// A value as people read it: a share as a percentage, ms with a unit.
fn show(rule: &AlertRule, v: f64) -> String {
    match rule.kind {
        AlertKind::ErrorRate => format!("{:.1} %", v * 100.0),
        AlertKind::LatencyP99 => format!("{v:.1} ms"),
        _ => format!("{v}"),
    }
}

/// One line for people: what is over which threshold.
fn describe(rule: &AlertRule, subject: &Subject, v: f64) -> String {
    let who = subject.service.as_deref().unwrap_or_default();
    let t = show(rule, rule.threshold());
    let v_ = show(rule, v);
    match rule.kind {
        AlertKind::ErrorRate => format!("{who}: {v_} of requests answered 5xx (threshold {t})"),
        AlertKind::LatencyP99 => format!("{who}: p99 latency {v_} (threshold {t})"),
        AlertKind::BreakerOpen => match &subject.dependency {
            Some(d) => format!("{who}: {v_} circuit breaker(s) towards {d} open (threshold {t})"),
            None => format!("{who}: {v_} circuit breaker(s) open (threshold {t})"),
        },
        AlertKind::InstanceDown => format!("{who}: {v_} instance(s) not scraped (threshold {t})"),
        AlertKind::OutboxBacklog => format!("{who}: {v_} message(s) in the outbox (threshold {t})"),
        AlertKind::ConsumerLag => format!(
            "group {} is {v_} message(s) behind on {} (threshold {t})",
            subject.group.as_deref().unwrap_or_default(),
            subject.topic.as_deref().unwrap_or_default()
        ),
    }
}

/// FNV-1a over the labels, as hex: a stable id for receivers that deduplicate.
fn fingerprint(labels: &BTreeMap<&str, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

// ---------------------------------------------------------------------------------
// The webhook call

/// POST `body` to `url` (http or https) over a fresh connection; the answer's status.
/// Notifications are rare, so no pool: a connection per call, closed after the head.
async fn post(url: &str, body: Bytes) -> Result<http::StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let authority = uri
        .authority()
        .ok_or_else(|| "the url names no host".to_owned())?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let req = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "shoal-control-plane")
        .body(Full::new(body))
        .map_err(|e| format!("bad request: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !https {
        return send(hyper_util::rt::TokioIo::new(tcp), req).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: not a TLS server name ({e})"))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config()?)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {authority}: {e}"))?;
    send(hyper_util::rt::TokioIo::new(tls), req).await
}

async fn send<I>(io: I, req: http::Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = std::pin::pin!(conn);
    tokio::select! {
        res = sender.send_request(req) => res
            .map(|r| r.status())
            .map_err(|e| format!("sending: {e}")),
        done = conn => Err(match done {
            Ok(()) => "the connection closed before an answer".to_owned(),
            Err(e) => format!("connection: {e}"),
        }),
    }
}

/// The TLS client of https webhooks: the system's root certificates, loaded once.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no trusted root certificates on this system (https webhooks need them)".into(),
                );
            }
            let mut cfg = rustls::ClientConfig::builder_with_provider(shoal_tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        })
        .clone()
}

// ---------------------------------------------------------------------------------
// Routes

/// `GET /v1/alerts`.
pub(crate) fn router(alerts: Alerts) -> Router {
    Router::new()
        .route("/v1/alerts", get(list))
        .with_state(alerts)
}

async fn list(State(a): State<Alerts>) -> Json<AlertList> {
    Json(a.list())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::{BreakerSummary, ServiceSummary, TopicSummary};
    use axum::routing::post as post_route;

    fn rule(kind: AlertKind, threshold: Option<f64>, for_ms: u64) -> AlertRule {
        AlertRule {
            name: format!("{}-rule", kind.as_str()),
            kind,
            service: None,
            dependency: None,
            topic: None,
            group: None,
            threshold,
            for_ms,
            min_rate_rps: None,
            webhook: None,
        }
    }

    fn service(name: &str, rate: f64, errors: f64) -> ServiceSummary {
        ServiceSummary {
            service: name.into(),
            instances_up: 1,
            instances: 1,
            rate_rps: rate,
            error_rate: errors,
            p50_ms: Some(1.0),
            p99_ms: Some(10.0),
            history: vec![],
        }
    }

    fn summary(services: Vec<ServiceSummary>) -> Summary {
        Summary {
            enabled: true,
            interval_ms: 5000,
            services,
            ..Summary::default()
        }
    }

    fn alerts(rules: Vec<AlertRule>, webhook: Option<String>) -> Alerts {
        let cfg = MetricsConfig {
            alert_webhook: webhook,
            alert_webhook_attempts: 2,
            ..MetricsConfig::default()
        };
        Alerts::new(rules, &cfg, &Metrics::new("control-plane"), None)
    }

    fn states(a: &Alerts) -> Vec<(String, Option<String>, u64)> {
        a.list()
            .alerts
            .into_iter()
            .map(|v| (v.state, v.service, v.since_ms))
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_ms_then_inactive_after_recovery() {
        let a = alerts(vec![rule(AlertKind::ErrorRate, Some(0.05), 30_000)], None);
        let bad = summary(vec![
            service("orders", 10.0, 0.5),
            service("catalog", 10.0, 0.0),
        ]);
        let good = summary(vec![
            service("orders", 10.0, 0.0),
            service("catalog", 10.0, 0.0),
        ]);
        a.evaluate(&good, 1_000);
        let l = a.list();
        assert_eq!(l.alerts.len(), 1);
        assert_eq!(l.alerts[0].state, "inactive");
        assert_eq!(l.alerts[0].value, Some(0.0));
        a.evaluate(&bad, 10_000);
        assert_eq!(
            states(&a),
            [("pending".into(), Some("orders".into()), 10_000)]
        );
        a.evaluate(&bad, 39_999);
        assert_eq!(states(&a)[0].0, "pending");
        a.evaluate(&bad, 40_000);
        assert_eq!(
            states(&a),
            [("firing".into(), Some("orders".into()), 40_000)]
        );
        let v = &a.list().alerts[0];
        assert_eq!((v.value, v.threshold, v.for_ms), (Some(0.5), 0.05, 30_000));
        assert_eq!(
            v.message,
            "orders: 50.0 % of requests answered 5xx (threshold 5.0 %)"
        );
        a.evaluate(&good, 45_000);
        assert_eq!(states(&a), [("inactive".into(), None, 45_000)]);
        // Pending and back under before for_ms: never fires.
        a.evaluate(&bad, 50_000);
        a.evaluate(&good, 55_000);
        assert_eq!(states(&a)[0].0, "inactive");
    }

    #[test]
    fn an_idle_service_does_not_alert_and_filters_apply() {
        let mut r = rule(AlertKind::ErrorRate, Some(0.05), 0);
        r.service = Some("orders".into());
        let a = alerts(vec![r], None);
        // 100 % errors, but at 0.5 req/s: under the default minimum rate of 1.
        a.evaluate(&summary(vec![service("orders", 0.5, 1.0)]), 0);
        assert_eq!(states(&a)[0].0, "inactive");
        // Another service's errors are not this rule's.
        a.evaluate(&summary(vec![service("catalog", 50.0, 1.0)]), 0);
        assert_eq!(states(&a)[0].0, "inactive");
        // for_ms = 0 fires at once.
        a.evaluate(&summary(vec![service("orders", 5.0, 1.0)]), 7);
        assert_eq!(states(&a), [("firing".into(), Some("orders".into()), 7)]);
    }

    #[test]
    fn every_kind_reads_its_figure() {
        let mut s = summary(vec![
            ServiceSummary {
                instances_up: 1,
                instances: 3,
                p99_ms: Some(900.0),
                ..service("orders", 10.0, 0.0)
            },
            service("catalog", 10.0, 0.0),
        ]);
        s.breakers = vec![BreakerSummary {
            service: "orders".into(),
            instance: "orders-1".into(),
            dependency: "payments".into(),
            route: String::new(),
            state: "open".into(),
        }];
        // A closed breaker is listed but never alerts.
        s.breakers.push(BreakerSummary {
            service: "catalog".into(),
            instance: "catalog-1".into(),
            state: "closed".into(),
            ..s.breakers[0].clone()
        });
        s.outbox = vec![crate::scrape::OutboxSummary {
            service: "orders".into(),
            backlog: 500,
        }];
        s.topics = vec![
            TopicSummary {
                topic: "orders.events".into(),
                group: "shipping".into(),
                lag: 2000,
            },
            TopicSummary {
                topic: "orders.events".into(),
                group: "mail".into(),
                lag: 0,
            },
        ];
        let mut dep = rule(AlertKind::BreakerOpen, None, 0);
        dep.name = "payments-breaker".into();
        dep.dependency = Some("payments".into());
        let mut other_dep = dep.clone();
        other_dep.name = "inventory-breaker".into();
        other_dep.dependency = Some("inventory".into());
        let a = alerts(
            vec![
                rule(AlertKind::LatencyP99, Some(500.0), 0),
                rule(AlertKind::InstanceDown, None, 0),
                dep,
                other_dep,
                rule(AlertKind::OutboxBacklog, Some(100.0), 0),
                rule(AlertKind::ConsumerLag, Some(1000.0), 0),
            ],
            None,
        );
        a.evaluate(&s, 1);
        let got: Vec<_> = a
            .list()
            .alerts
            .into_iter()
            .map(|v| (v.name, v.state, v.service, v.group, v.value))
            .collect();
        let firing = |n: &str, svc: Option<&str>, group: Option<&str>, v: f64| {
            (
                n.to_owned(),
                "firing".to_owned(),
                svc.map(Into::into),
                group.map(Into::into),
                Some(v),
            )
        };
        assert_eq!(
            got,
            [
                firing("latency_p99-rule", Some("orders"), None, 900.0),
                firing("instance_down-rule", Some("orders"), None, 2.0),
                firing("payments-breaker", Some("orders"), None, 1.0),
                (
                    "inventory-breaker".into(),
                    "inactive".into(),
                    None,
                    None,
                    Some(0.0)
                ),
                firing("outbox_backlog-rule", Some("orders"), None, 500.0),
                firing("consumer_lag-rule", None, Some("shipping"), 2000.0),
            ]
        );
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let ok = rule(AlertKind::ErrorRate, Some(0.05), 30_000);
        assert!(validate_alerts(std::slice::from_ref(&ok)).is_ok());
        let with = |f: &dyn Fn(&mut AlertRule)| {
            let mut r = ok.clone();
            f(&mut r);
            vec![r]
        };
        let cases: Vec<(Vec<AlertRule>, &str)> = vec![
            (
                with(&|r| r.threshold = Some(5.0)),
                "alerts[0].threshold: must be at least 0 and below 1",
            ),
            (
                with(&|r| r.threshold = None),
                "alerts[0].threshold: required for error_rate",
            ),
            (
                with(&|r| r.threshold = Some(f64::NAN)),
                "alerts[0].threshold",
            ),
            (with(&|r| r.for_ms = MAX_FOR_MS + 1), "alerts[0].for_ms"),
            (
                with(&|r| r.webhook = Some("ftp://x/".into())),
                "alerts[0].webhook: \"ftp://x/\" must start with http:// or https://",
            ),
            (
                with(&|r| r.webhook = Some("http://".into())),
                "alerts[0].webhook",
            ),
            (with(&|r| r.name = String::new()), "alerts[0].name"),
            (
                with(&|r| r.service = Some("Not A Name".into())),
                "alerts[0].service",
            ),
            (
                with(&|r| r.dependency = Some("payments".into())),
                "alerts[0].dependency: only breaker_open",
            ),
            (
                with(&|r| r.topic = Some("t".into())),
                "alerts[0].topic: only consumer_lag",
            ),
            (
                with(&|r| r.min_rate_rps = Some(-1.0)),
                "alerts[0].min_rate_rps",
            ),
            (vec![ok.clone(), ok.clone()], "alerts[1].name"),
            (
                vec![AlertRule {
                    service: Some("orders".into()),
                    ..rule(AlertKind::ConsumerLag, Some(1.0), 0)
                }],
                "alerts[0].service: consumer_lag",
            ),
            (
                vec![rule(AlertKind::LatencyP99, Some(0.0), 0)],
                "alerts[0].threshold: must be a positive",
            ),
            (
                vec![AlertRule {
                    min_rate_rps: Some(1.0),
                    ..rule(AlertKind::InstanceDown, None, 0)
                }],
                "alerts[0].min_rate_rps: only",
            ),
        ];
        for (rules, want) in cases {
            let err = validate_alerts(&rules).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err}");
        }
        assert!(check_webhook_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_webhook_url("http://[::1]:9093/").is_ok());
        assert!(check_webhook_url("http://u:p@h/").is_err());
    }

    #[test]
    fn rules_deserialize_from_toml_and_refuse_unknown_keys() {
        #[derive(Deserialize)]
        struct File {
            alerts: Vec<AlertRule>,
        }
        let f: File = toml::from_str(
            r#"
[[alerts]]
name = "orders-errors"
kind = "error_rate"
service = "orders"
threshold = 0.05
for_ms = 30000
"#,
        )
        .unwrap();
        assert_eq!(f.alerts[0].kind, AlertKind::ErrorRate);
        assert_eq!(f.alerts[0].threshold, Some(0.05));
        let err = toml::from_str::<File>(
            "[[alerts]]\nname = \"x\"\nkind = \"error_rate\"\nthreshhold = 1\n",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("threshhold"), "{err}");
    }

    #[test]
    fn the_shops_rules_are_valid() {
        #[derive(Deserialize)]
        struct System {
            control_plane: crate::ControlPlaneConfig,
        }
        let text = include_str!("../../../shoal.toml");
        let s: System = toml::from_str(text).unwrap();
        let cp = s.control_plane;
        cp.metrics.validate().unwrap();
        validate_alerts(&cp.alerts).unwrap();
        let kinds: BTreeSet<&str> = cp.alerts.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds.len(), 6, "one rule of each kind: {kinds:?}");
    }

    /// A receiver on 127.0.0.1:0 that answers `statuses` in turn (then 200) and
    /// keeps what it was sent.
    async fn receiver(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(statuses));
        let kept = got.clone();
        let app = Router::new().route(
            "/hook",
            post_route(move |body: Bytes| {
                let kept = kept.clone();
                let answers = answers.clone();
                async move {
                    kept.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let mut a = answers.lock().unwrap();
                    let code = if a.is_empty() { 200 } else { a.remove(0) };
                    http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/hook"), got)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never {what}");
    }

    #[tokio::test]
    async fn the_webhook_gets_firing_then_resolved_in_alertmanager_form() {
        // The first call fails with a 503: retried.
        let (url, got) = receiver(vec![503]).await;
        let mut r = rule(AlertKind::ErrorRate, Some(0.05), 10_000);
        r.name = "orders-errors".into();
        let a = alerts(vec![r], Some(url));
        let (stop_tx, stop) = watch::channel(false);
        let sender = a.run_sender(stop);
        let bad = summary(vec![service("orders", 10.0, 0.25)]);
        a.evaluate(&bad, 1_764_700_000_000);
        a.evaluate(&bad, 1_764_700_010_000);
        a.evaluate(
            &summary(vec![service("orders", 10.0, 0.0)]),
            1_764_700_015_000,
        );
        until("sent twice", || got.lock().unwrap().len() == 3).await;
        let bodies = got.lock().unwrap().clone();
        assert_eq!(bodies[0], bodies[1], "the retry sends the same body");
        let firing = &bodies[1];
        assert_eq!(firing["version"], "4");
        assert_eq!(firing["status"], "firing");
        let alert = &firing["alerts"][0];
        assert_eq!(alert["status"], "firing");
        assert_eq!(alert["labels"]["alertname"], "orders-errors");
        assert_eq!(alert["labels"]["kind"], "error_rate");
        assert_eq!(alert["labels"]["service"], "orders");
        assert_eq!(alert["annotations"]["value"], "0.25");
        assert_eq!(alert["annotations"]["threshold"], "0.05");
        assert_eq!(alert["startsAt"], "2025-12-02T18:26:50.000Z");
        assert_eq!(alert["endsAt"], "0001-01-01T00:00:00Z");
        let resolved = &bodies[2];
        assert_eq!(resolved["status"], "resolved");
        assert_eq!(resolved["alerts"][0]["startsAt"], alert["startsAt"]);
        assert_eq!(resolved["alerts"][0]["endsAt"], "2025-12-02T18:26:55.000Z");
        assert_eq!(resolved["alerts"][0]["fingerprint"], alert["fingerprint"]);
        assert_eq!(a.inner.sent.get(), 2);
        stop_tx.send(true).unwrap();
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_a_dead_webhook_gives_up() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/hook", l.local_addr().unwrap())
        };
        let cfg = MetricsConfig {
            alert_webhook: Some(dead),
            alert_webhook_attempts: 2,
            alert_webhook_queue: 1,
            ..MetricsConfig::default()
        };
        let metrics = Metrics::new("control-plane");
        let a = Alerts::new(
            vec![rule(AlertKind::ErrorRate, Some(0.05), 0)],
            &cfg,
            &metrics,
            None,
        );
        let bad = summary(vec![service("a", 10.0, 1.0), service("b", 10.0, 1.0)]);
        // Two alerts fire, the queue holds one: the other is dropped.
        a.evaluate(&bad, 0);
        let text = metrics.render();
        assert!(
            text.contains(r#"shoal_alerts_webhook_failed_total{service="control-plane",reason="queue_full"} 1"#),
            "{text}"
        );
        let (_stop_tx, stop) = watch::channel(false);
        let _sender = a.run_sender(stop);
        until("given up", || {
            metrics.render().contains(
                r#"shoal_alerts_webhook_failed_total{service="control-plane",reason="failed"} 1"#,
            )
        })
        .await;
    }

    /// The whole path through a real control plane (`crate::run`): an instance
    /// registered over HTTP serves a `/metrics` the test controls; the scraper reads
    /// it, the summary shows it, an `error_rate` rule fires and its webhook is called.
    #[tokio::test]
    async fn a_real_control_plane_scrapes_an_instance_and_fires_an_error_rate_alert() {
        use http_body_util::BodyExt;
        use hyper_util::client::legacy::{connect::HttpConnector, Client};
        let exposition = Arc::new(Mutex::new(String::new()));
        let set = |ok: u64, failed: u64| {
            *exposition.lock().unwrap() = format!(
                "# TYPE shoal_http_server_requests counter\n\
                 shoal_http_server_requests_total{{service=\"orders\",route=\"/api/orders\",method=\"POST\",status=\"201\"}} {ok}\n\
                 shoal_http_server_requests_total{{service=\"orders\",route=\"/api/orders\",method=\"POST\",status=\"503\"}} {failed}\n\
                 shoal_resilience_breaker_state{{service=\"orders\",dependency=\"payments\",route=\"\"}} 1\n\
                 # EOF\n"
            );
        };
        set(100, 0);
        let served = exposition.clone();
        let instance = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let served = served.clone();
                    async move { served.lock().unwrap().clone() }
                }),
            )
            .route("/health/ready", get(|| async { "ready" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let instance_addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, instance).await });
        let (hook, got) = receiver(vec![]).await;

        let dir = std::env::temp_dir().join(format!("shoal-cp-alerts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = crate::ControlPlaneConfig {
            data_dir: dir.clone(),
            ..crate::ControlPlaneConfig::default()
        };
        cfg.broker.enabled = false;
        cfg.metrics.interval_ms = 1_000;
        cfg.metrics.scrape_timeout_ms = 500;
        cfg.alerts = vec![AlertRule {
            name: "orders-errors".into(),
            service: Some("orders".into()),
            min_rate_rps: Some(0.1),
            webhook: Some(hook),
            ..rule(AlertKind::ErrorRate, Some(0.05), 0)
        }];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::run(cfg, listener, async {
            let _ = stopped.await;
        }));

        let http: Client<HttpConnector, Full<Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
        let call = |method: http::Method, path: &str, body: Option<serde_json::Value>| {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{cp}{path}"))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(
                    body.map(|b| b.to_string()).unwrap_or_default(),
                )))
                .unwrap();
            let http = http.clone();
            async move {
                let res = http.request(req).await?;
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, v))
            }
        };
        let registration = serde_json::json!({
            "service": "orders", "version": "1.0.0", "addr": instance_addr.to_string(),
            "id": "orders-1", "ttl_ms": 60_000,
        });
        let mut registered = false;
        for _ in 0..200 {
            if let Ok((status, _)) = call(
                http::Method::POST,
                "/v1/instances",
                Some(registration.clone()),
            )
            .await
            {
                assert!(status.is_success(), "{status}");
                registered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(registered, "the control plane never answered");

        // Scraped once: up, its open breaker listed, no rate yet.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let summary = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no such summary in time"
            );
            let (_, v) = call(http::Method::GET, "/v1/metrics/summary", None)
                .await
                .unwrap();
            if v["services"][0]["instances_up"] == 1 {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(summary["interval_ms"], 1000);
        assert_eq!(summary["services"][0]["service"], "orders");
        assert_eq!(summary["services"][0]["instances"], 1);
        assert_eq!(summary["breakers"][0]["instance"], "orders-1");
        assert_eq!(summary["breakers"][0]["dependency"], "payments");
        assert_eq!(summary["breakers"][0]["state"], "open");
        let (_, targets) = call(http::Method::GET, "/v1/prometheus/targets", None)
            .await
            .unwrap();
        let labels: Vec<_> = targets
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["targets"][0].clone(),
                    g["labels"]["shoal_service"].clone(),
                )
            })
            .collect();
        assert!(
            labels.contains(&(instance_addr.to_string().into(), "orders".into())),
            "{targets}"
        );
        assert!(
            labels.contains(&(cp.to_string().into(), "control-plane".into())),
            "{targets}"
        );

        // A third of the next requests fail: the rule fires and the webhook hears of it.
        set(200, 50);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let summary = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no such summary in time"
            );
            let (_, v) = call(http::Method::GET, "/v1/metrics/summary", None)
                .await
                .unwrap();
            if v["services"][0]["error_rate"].as_f64().unwrap_or(0.0) > 0.0 {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(summary["services"][0]["error_rate"], 0.333, "{summary}");
        assert_eq!(
            summary["services"][0]["history"].as_array().unwrap().len(),
            1
        );
        let (status, alerts) = call(http::Method::GET, "/v1/alerts", None).await.unwrap();
        assert_eq!(status, 200);
        let a = &alerts["alerts"][0];
        assert_eq!(
            (&a["name"], &a["kind"], &a["service"]),
            (
                &"orders-errors".into(),
                &"error_rate".into(),
                &"orders".into()
            )
        );
        assert_eq!(a["state"], "firing", "{alerts}");
        assert_eq!(a["threshold"], 0.05);
        until("the webhook called", || !got.lock().unwrap().is_empty()).await;
        let body = got.lock().unwrap()[0].clone();
        assert_eq!(body["status"], "firing");
        assert_eq!(body["alerts"][0]["labels"]["alertname"], "orders-errors");
        assert_eq!(body["externalURL"], format!("http://{cp}"));

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
