//! The broker's series (see `docs/metrics.md` for the naming rules).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_telemetry::Metrics;

type Labels = Vec<(&'static str, String)>;

/// Families registered once per broker; series are made per topic and group.
#[derive(Clone, Default)]
pub(crate) struct BrokerMetrics {
    published: Family<Labels, Counter>,
    delivered: Family<Labels, Counter>,
    redelivered: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    lag: Family<Labels, Gauge>,
    pub(crate) acked: Counter,
    pub(crate) fsyncs: Counter,
    pub(crate) connections: Gauge,
}

impl BrokerMetrics {
    /// Families registered in `metrics` (counters get their `_total` suffix there).
    pub(crate) fn register(metrics: &Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "shoal_broker_published",
            "Messages published and stored, by topic",
            m.published.clone(),
        );
        metrics.register(
            "shoal_broker_delivered",
            "Deliveries to group members, redeliveries included, by topic and group",
            m.delivered.clone(),
        );
        metrics.register("shoal_broker_acked", "Deliveries acked", m.acked.clone());
        metrics.register(
            "shoal_broker_redelivered",
            "Deliveries after the first attempt, by topic and group",
            m.redelivered.clone(),
        );
        metrics.register(
            "shoal_broker_dead_letters",
            "Messages moved to a dead-letter topic, by source topic and group",
            m.dead_letters.clone(),
        );
        metrics.register(
            "shoal_broker_consumer_lag",
            "Messages stored but not yet acked by the group, by topic and group",
            m.lag.clone(),
        );
        metrics.register(
            "shoal_broker_fsyncs",
            "fdatasync calls on partition logs (group commit shares one among many publishes)",
            m.fsyncs.clone(),
        );
        metrics.register(
            "shoal_broker_connections",
            "Client connections open now",
            m.connections.clone(),
        );
        m
    }

    pub(crate) fn topic(&self, topic: &str) -> TopicMetrics {
        TopicMetrics {
            published: self
                .published
                .get_or_create(&vec![("topic", topic.to_owned())])
                .clone(),
        }
    }

    pub(crate) fn group(&self, topic: &str, group: &str) -> GroupMetrics {
        let l = vec![("topic", topic.to_owned()), ("group", group.to_owned())];
        GroupMetrics {
            delivered: self.delivered.get_or_create(&l).clone(),
            redelivered: self.redelivered.get_or_create(&l).clone(),
            dead_letters: self.dead_letters.get_or_create(&l).clone(),
            lag: self.lag.get_or_create(&l).clone(),
        }
    }
}

/// Series of one topic.
#[derive(Clone)]
pub(crate) struct TopicMetrics {
    pub(crate) published: Counter,
}

/// Series of one group on one topic.
#[derive(Clone)]
pub(crate) struct GroupMetrics {
    pub(crate) delivered: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) lag: Gauge,
}
