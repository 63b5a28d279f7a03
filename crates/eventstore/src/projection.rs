//! Projections (the read side of CQRS): a runner feeds events, in global order, into
//! a read model in the same database, and stores how far it got (its checkpoint) in
//! the same transaction as the read-model change. A crash between the two cannot
//! happen: both commit or neither does, so no event is applied twice.

use crate::store::{db_err, EventStore};
use crate::types::RecordedEvent;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_core::Error;
use shoal_telemetry::Metrics;
use sqlx::AnyConnection;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The future a projection's hooks return.
pub type ProjectionFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// A read model kept from events.
pub trait Projection: Send + Sync {
    /// Its name; its checkpoint is kept under it.
    fn name(&self) -> &str;

    /// Change the read model for `event`, inside the runner's transaction `tx` (the
    /// service's database through the portable API: `$1` placeholders, SQL that
    /// both backends accept).
    fn apply<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a>;

    /// Change the read model for a batch of events, in order, inside `tx`. The
    /// default applies them one by one; a projection that can fold a batch into
    /// fewer statements (sums, upserts of the last value) should, since every
    /// statement is a round trip to the database.
    fn apply_batch<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        events: &'a [RecordedEvent],
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            for e in events {
                // The event's trace is current while it is applied: a message the
                // projection puts in the outbox continues it.
                match e
                    .metadata
                    .extra
                    .get(crate::TRACEPARENT_KEY)
                    .and_then(|t| shoal_core::trace::TraceContext::parse(t))
                {
                    Some(trace) => {
                        shoal_telemetry::RequestContext::background(
                            trace,
                            shoal_telemetry::Tracer::disabled(),
                        )
                        .scope(self.apply(tx, e))
                        .await?
                    }
                    None => self.apply(tx, e).await?,
                }
            }
            Ok(())
        })
    }

    /// Empty the read model (for a rebuild), inside `tx`.
    fn reset<'a>(&'a self, tx: &'a mut AnyConnection) -> ProjectionFuture<'a>;
}

/// Runs one projection against a store.
#[derive(Clone)]
pub struct ProjectionRunner {
    store: EventStore,
    projection: Arc<dyn Projection>,
    batch: usize,
    metrics: Option<RunnerMetrics>,
    /// The checkpoint this runner last committed: saves reading it back before
    /// every batch. The conditional update still checks it against the table.
    known: Arc<std::sync::Mutex<Option<u64>>>,
}

/// `shoal_eventstore_projection_lag{projection}` and
/// `shoal_eventstore_projection_applied_total{projection}`.
#[derive(Clone)]
struct RunnerMetrics {
    lag: Gauge,
    applied: Counter,
}

impl ProjectionRunner {
    /// A runner applying up to `batch` events per transaction.
    pub fn new(store: EventStore, projection: Arc<dyn Projection>, batch: usize) -> Self {
        Self {
            store,
            projection,
            batch: batch.clamp(1, crate::types::limits::MAX_READ),
            metrics: None,
            known: Arc::default(),
        }
    }

    /// Report lag and events applied in `metrics` (kept current by [`Self::run`]).
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        let labels = vec![("projection", self.projection.name().to_string())];
        let lag: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
        let applied: Family<Vec<(&'static str, String)>, Counter> = Family::default();
        metrics.register(
            "shoal_eventstore_projection_lag",
            "Events committed that a projection has not applied yet",
            lag.clone(),
        );
        metrics.register(
            "shoal_eventstore_projection_applied",
            "Events a projection has applied",
            applied.clone(),
        );
        self.metrics = Some(RunnerMetrics {
            lag: lag.get_or_create(&labels).clone(),
            applied: applied.get_or_create(&labels).clone(),
        });
        self
    }

    /// The position of the last event applied.
    pub async fn checkpoint(&self) -> Result<u64, Error> {
        let p: Option<i64> =
            sqlx::query_scalar("SELECT position FROM _shoal_es_checkpoints WHERE projection = $1")
                .bind(self.projection.name())
                .fetch_optional(self.store.db().pool())
                .await
                .map_err(db_err("reading a projection checkpoint"))?;
        Ok(p.unwrap_or(0) as u64)
    }

    /// Events committed but not yet applied.
    pub async fn lag(&self) -> Result<u64, Error> {
        Ok(self.store.head().saturating_sub(self.checkpoint().await?))
    }

    /// Apply every event stored now; returns how many were applied.
    pub async fn catch_up(&self) -> Result<u64, Error> {
        let mut applied = 0;
        loop {
            let n = self.step().await?;
            if n == 0 {
                return Ok(applied);
            }
            applied += n;
        }
    }

    /// Apply one batch in one transaction with its checkpoint.
    fn remember(&self, position: Option<u64>) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = position;
    }

    async fn step(&self) -> Result<u64, Error> {
        let known = *self.known.lock().unwrap_or_else(|p| p.into_inner());
        let from = match known {
            Some(p) => p,
            None => self.checkpoint().await?,
        };
        let events = self.store.read_all(from, self.batch).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(0);
        };
        let mut tx = self
            .store
            .db()
            .pool()
            .begin()
            .await
            .map_err(db_err("starting a projection transaction"))?;
        self.projection.apply_batch(&mut tx, &events).await?;
        // Checkpoint moves only from where this batch started: two runners of the
        // same projection cannot both apply a batch.
        let moved = sqlx::query(
            "INSERT INTO _shoal_es_checkpoints (projection, position) VALUES ($1, $2)
             ON CONFLICT (projection) DO UPDATE SET position = excluded.position
             WHERE _shoal_es_checkpoints.position = $3",
        )
        .bind(self.projection.name())
        .bind(last as i64)
        .bind(from as i64)
        .execute(&mut *tx)
        .await
        .map_err(db_err("saving a projection checkpoint"))?;
        if moved.rows_affected() != 1 {
            self.remember(None);
            return Err(Error::new(
                shoal_core::ErrorKind::Conflict,
                shoal_core::Origin::Internal,
                format!(
                    "projection {} moved on under another runner",
                    self.projection.name()
                ),
            ));
        }
        if let Err(e) = tx.commit().await {
            self.remember(None);
            return Err(db_err("committing a projection batch")(e));
        }
        self.remember(Some(last));
        Ok(events.len() as u64)
    }

    /// Empty the read model and its checkpoint in one transaction, then apply every
    /// event from the start.
    pub async fn rebuild(&self) -> Result<u64, Error> {
        let mut tx = self
            .store
            .db()
            .pool()
            .begin()
            .await
            .map_err(db_err("starting a projection rebuild"))?;
        self.projection.reset(&mut tx).await?;
        sqlx::query("DELETE FROM _shoal_es_checkpoints WHERE projection = $1")
            .bind(self.projection.name())
            .execute(&mut *tx)
            .await
            .map_err(db_err("resetting a projection checkpoint"))?;
        tx.commit()
            .await
            .map_err(db_err("committing a projection reset"))?;
        self.remember(Some(0));
        self.catch_up().await
    }

    /// Keep applying events as they are committed until `shutdown` resolves. A
    /// failing batch is retried after a pause (it is applied whole or not at all).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut head = self.store.head_watch();
        loop {
            match self.catch_up().await {
                Ok(applied) => {
                    if let Some(m) = &self.metrics {
                        m.applied.inc_by(applied);
                        if let Ok(lag) = self.lag().await {
                            m.lag.set(lag as i64);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(projection = self.projection.name(), error = %e, "projection batch failed; retrying");
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = head.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}
