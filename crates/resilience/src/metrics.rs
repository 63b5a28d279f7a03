//! Resilience series (named in `docs/metrics.md`). Only the rare events are counted
//! (rejections, retries, transitions), so a call that goes well touches no metric here.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_core::resilience::BreakerState;
use shoal_telemetry::Metrics;

type Labels = Vec<(&'static str, String)>;

/// The families, registered once per process.
#[derive(Clone)]
pub struct ResilienceMetrics {
    breaker_state: Family<Labels, Gauge>,
    breaker_transitions: Family<Labels, Counter>,
    breaker_rejected: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    budget_exhausted: Family<Labels, Counter>,
    bulkhead_rejected: Family<Labels, Counter>,
    rate_limited: Family<Labels, Counter>,
    faults_injected: Family<Labels, Counter>,
}

impl ResilienceMetrics {
    /// Register the families in `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self {
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            breaker_rejected: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            bulkhead_rejected: Family::default(),
            rate_limited: Family::default(),
            faults_injected: Family::default(),
        };
        metrics.register(
            "shoal_resilience_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        metrics.register(
            "shoal_resilience_breaker_transitions",
            "Circuit breaker state changes, by from and to state",
            m.breaker_transitions.clone(),
        );
        metrics.register(
            "shoal_resilience_breaker_rejected",
            "Calls failed fast by an open circuit breaker",
            m.breaker_rejected.clone(),
        );
        metrics.register(
            "shoal_resilience_retries",
            "Retried attempts of calls to other services",
            m.retries.clone(),
        );
        metrics.register(
            "shoal_resilience_retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            m.budget_exhausted.clone(),
        );
        metrics.register(
            "shoal_resilience_bulkhead_rejected",
            "Calls rejected because a bulkhead's pool and queue were full",
            m.bulkhead_rejected.clone(),
        );
        metrics.register(
            "shoal_resilience_rate_limited",
            "Calls refused by a client-side rate limit",
            m.rate_limited.clone(),
        );
        metrics.register(
            "shoal_resilience_faults_injected",
            "Requests hit by an injected fault, by kind",
            m.faults_injected.clone(),
        );
        m
    }

    fn scope_labels(dependency: &str, route: Option<&str>) -> Labels {
        vec![
            ("dependency", dependency.to_string()),
            ("route", route.unwrap_or("").to_string()),
        ]
    }

    /// Handles of one breaker's series.
    pub fn breaker(&self, dependency: &str, route: Option<&str>) -> BreakerHandles {
        let labels = Self::scope_labels(dependency, route);
        BreakerHandles {
            state: self.breaker_state.get_or_create(&labels).clone(),
            rejected: self.breaker_rejected.get_or_create(&labels).clone(),
            transitions: self.breaker_transitions.clone(),
            labels,
        }
    }

    /// Handles of one scope's (dependency and route) call series.
    pub fn scope(&self, dependency: &str, route: Option<&str>) -> ScopeHandles {
        let labels = Self::scope_labels(dependency, route);
        ScopeHandles {
            retries: self.retries.get_or_create(&labels).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&labels).clone(),
            bulkhead_rejected: self.bulkhead_rejected.get_or_create(&labels).clone(),
            rate_limited: self.rate_limited.get_or_create(&labels).clone(),
        }
    }

    /// Count an injected fault.
    pub fn fault_injected(&self, kind: &'static str) {
        self.faults_injected
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }
}

/// One breaker's series.
#[derive(Clone)]
pub struct BreakerHandles {
    state: Gauge,
    pub(crate) rejected: Counter,
    transitions: Family<Labels, Counter>,
    labels: Labels,
}

impl BreakerHandles {
    pub(crate) fn set_state(&self, s: BreakerState) {
        self.state.set(match s {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        });
    }

    pub(crate) fn transition(&self, from: BreakerState, to: BreakerState) {
        let mut labels = self.labels.clone();
        labels.push(("from", from.as_str().to_string()));
        labels.push(("to", to.as_str().to_string()));
        self.transitions.get_or_create(&labels).inc();
    }
}

/// One scope's call series.
#[derive(Clone, Default)]
pub struct ScopeHandles {
    pub(crate) retries: Counter,
    pub(crate) budget_exhausted: Counter,
    pub(crate) bulkhead_rejected: Counter,
    pub(crate) rate_limited: Counter,
}
