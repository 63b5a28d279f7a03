//! The orchestrator: runs sagas of one definition, writing each transition to the
//! saga log before moving on, and resumes every unfinished saga when it opens.

use crate::definition::{Action, Saga, Step, StepError, StepKind};
use crate::log::{HistoryEntry, SagaLog, SagaRow, Status, Transition};
use crate::{headers, Phase, Reply, StepCtx};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_bus::{OutgoingMessage, SharedBus, SubscribeOptions, TopicSpec};
use shoal_core::trace::TraceContext;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::Db;
use shoal_telemetry::{RequestContext, SpanKind, Tracer};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

/// The longest saga id.
pub const MAX_ID_LEN: usize = 200;

/// `shoal_saga_*` metrics, labelled by saga: register once per service and hand
/// to every orchestrator ([`OrchestratorBuilder::metrics`]).
#[derive(Clone, Default)]
pub struct SagaMetrics {
    started: Family<Vec<(&'static str, String)>, Counter>,
    completed: Family<Vec<(&'static str, String)>, Counter>,
    compensated: Family<Vec<(&'static str, String)>, Counter>,
    running: Family<Vec<(&'static str, String)>, Gauge>,
    stuck: Family<Vec<(&'static str, String)>, Gauge>,
    ignored_replies: Family<Vec<(&'static str, String)>, Counter>,
}

impl SagaMetrics {
    /// The metrics, registered in `metrics` (see docs/metrics.md).
    pub fn register(metrics: &shoal_telemetry::Metrics) -> Self {
        let m = Self::default();
        metrics.register("shoal_saga_started", "Sagas started", m.started.clone());
        metrics.register(
            "shoal_saga_completed",
            "Sagas whose every step succeeded",
            m.completed.clone(),
        );
        metrics.register(
            "shoal_saga_compensated",
            "Sagas that failed and were compensated",
            m.compensated.clone(),
        );
        metrics.register(
            "shoal_saga_running",
            "Sagas in flight in this process",
            m.running.clone(),
        );
        metrics.register(
            "shoal_saga_stuck",
            "Sagas whose current step or compensation keeps failing past its attempts",
            m.stuck.clone(),
        );
        metrics.register(
            "shoal_saga_ignored_replies",
            "Reply events that matched no awaited step (duplicates, late or out of order)",
            m.ignored_replies.clone(),
        );
        m
    }
}

/// What [`Orchestrator::status`] tells of a saga.
#[derive(Clone, Debug, Serialize)]
pub struct SagaStatus {
    /// Its id.
    pub id: String,
    /// Its definition's name.
    pub saga: String,
    /// Where it stands.
    pub status: Status,
    /// Running: the next step's index. Compensating: how many steps remain to undo.
    pub step: usize,
    /// The current step or compensation keeps failing past its attempts (it is
    /// still being retried).
    pub stuck: bool,
    /// Why it is compensating or was compensated.
    pub error: Option<String>,
    /// Its correlation id.
    pub correlation_id: String,
    /// Its data, as stored.
    pub data: serde_json::Value,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// Sets up an [`Orchestrator`].
pub struct OrchestratorBuilder<D, E> {
    saga: Saga<D, E>,
    env: E,
    max_running: usize,
    bus: Option<SharedBus>,
    reply_topic: Option<String>,
    metrics: SagaMetrics,
    tracer: Tracer,
}

impl<D, E> OrchestratorBuilder<D, E>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// Sagas in flight at most (default 10,000); [`Orchestrator::start`] refuses
    /// more with a retryable `Overloaded` error.
    #[must_use]
    pub fn max_running(mut self, n: usize) -> Self {
        self.max_running = n.max(1);
        self
    }

    /// The bus for command steps: commands are published on it and replies read
    /// from `reply_topic` (made if missing, one group per saga definition).
    #[must_use]
    pub fn bus(mut self, bus: SharedBus, reply_topic: impl Into<String>) -> Self {
        self.bus = Some(bus);
        self.reply_topic = Some(reply_topic.into());
        self
    }

    /// Count into these metrics.
    #[must_use]
    pub fn metrics(mut self, metrics: SagaMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Record a span per step attempt here (by default, into the tracer of the
    /// request that starts the saga, if any). A saga continues the trace of the
    /// request that started it, after a restart too.
    #[must_use]
    pub fn tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Open the saga log in `db` and resume every unfinished saga of this
    /// definition: a running one goes on from the step it was at (repeating it,
    /// under the same idempotency key), a compensating one goes on compensating.
    pub async fn open(self, db: &Db) -> Result<Orchestrator<D, E>, Error> {
        let has_commands = self.saga.steps.iter().any(|s| {
            matches!(s.action, Action::Command { .. })
                || matches!(s.compensation, Some(Action::Command { .. }))
        });
        if has_commands && self.bus.is_none() {
            return Err(Error::config(format!(
                "saga {}: a step sends a command; give the orchestrator a bus",
                self.saga.name
            )));
        }
        let log = SagaLog::open(db).await?;
        let labels = vec![("saga", self.saga.name.clone())];
        let inner = Arc::new(Inner {
            log,
            env: self.env,
            permits: Arc::new(Semaphore::new(self.max_running)),
            bus: self.bus.clone().zip(self.reply_topic.clone()),
            pending: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            metrics: self.metrics,
            tracer: self.tracer,
            labels,
            saga: self.saga,
        });
        let orch = Orchestrator { inner };
        if let (Some(bus), Some(topic)) = (self.bus, self.reply_topic) {
            orch.listen(bus, topic).await?;
        }
        orch.recover().await?;
        Ok(orch)
    }
}

type ReplyKey = (String, usize, Phase);

/// How the `started` history entry keeps the trace a saga continues.
const TRACE_DETAIL: &str = "traceparent ";

struct Inner<D, E> {
    saga: Saga<D, E>,
    log: SagaLog,
    env: E,
    permits: Arc<Semaphore>,
    bus: Option<(SharedBus, String)>,
    /// The replies runners wait for.
    pending: Mutex<HashMap<ReplyKey, oneshot::Sender<Reply>>>,
    /// Callers of [`Orchestrator::wait`].
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Status>>>>,
    tasks: Mutex<JoinSet<()>>,
    metrics: SagaMetrics,
    tracer: Tracer,
    labels: Vec<(&'static str, String)>,
}

/// Runs the sagas of one definition; cheap to clone.
pub struct Orchestrator<D, E = ()> {
    inner: Arc<Inner<D, E>>,
}

impl<D, E> Clone for Orchestrator<D, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// How one action or compensation ended, after its attempts. Only a compensable
/// or pivot action is ever `Rejected`, only a compensable one `Failed`: the rest
/// are retried until they succeed.
enum Ended<D> {
    Done(D),
    Rejected(String),
    /// Attempts ran out; the effect is uncertain.
    Failed(Error),
}

impl<D, E> Orchestrator<D, E>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// An orchestrator for `saga`; `env` is handed to every step (the service's
    /// context, clients, anything the steps need).
    pub fn builder(saga: Saga<D, E>, env: E) -> OrchestratorBuilder<D, E> {
        OrchestratorBuilder {
            saga,
            env,
            max_running: 10_000,
            bus: None,
            reply_topic: None,
            metrics: SagaMetrics::default(),
            tracer: Tracer::disabled(),
        }
    }

    /// Start saga `id` with `data`; its correlation id is `id`. `Ok(false)`
    /// when a saga with this id exists already (nothing is started: a repeated
    /// request is harmless). Returns once the start is durable; the saga runs in
    /// the background ([`Self::wait`], [`Self::status`]).
    pub async fn start(&self, id: &str, data: D) -> Result<bool, Error> {
        self.start_correlated(id, id, data).await
    }

    /// [`Self::start`] with the correlation id of the request or flow it serves.
    pub async fn start_correlated(
        &self,
        id: &str,
        correlation_id: &str,
        data: D,
    ) -> Result<bool, Error> {
        let bad = |what: String| {
            Err(Error::new(
                ErrorKind::InvalidInput,
                Origin::Downstream,
                what,
            ))
        };
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return bad(format!("saga id must be 1 to {MAX_ID_LEN} characters"));
        }
        if correlation_id.len() > MAX_ID_LEN {
            return bad(format!(
                "correlation id must be at most {MAX_ID_LEN} characters"
            ));
        }
        let permit = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Error::new(
                    ErrorKind::Overloaded,
                    Origin::Internal,
                    format!(
                        "saga {}: too many sagas in flight, try again later",
                        self.inner.saga.name
                    ),
                )
            })?;
        let json = serde_json::to_string(&data)
            .map_err(|e| Error::internal("saga data: encoding").with_source(e))?;
        let mut row = SagaRow {
            id: id.to_string(),
            status: Status::Running,
            step: 0,
            stuck: false,
            data: json,
            correlation_id: correlation_id.to_string(),
            error: None,
            next_seq: 0,
            trace: None,
        };
        // The saga continues the trace of the request that starts it.
        if let Some(c) = RequestContext::current() {
            let tracer = if self.inner.tracer.is_enabled() {
                self.inner.tracer.clone()
            } else {
                c.tracer
            };
            row.trace = Some((c.trace, tracer));
        }
        let name = self.inner.saga.name.clone();
        let fresh = self
            .inner
            .log
            .write(Transition {
                row: row.clone(),
                step_name: name.clone(),
                event: "started",
                detail: row
                    .trace
                    .as_ref()
                    .map(|(t, _)| format!("{TRACE_DETAIL}{}", t.to_header())),
                insert: Some(name),
            })
            .await?;
        if !fresh {
            return Ok(false);
        }
        row.next_seq = 1;
        self.inner
            .metrics
            .started
            .get_or_create(&self.inner.labels)
            .inc();
        self.spawn(row, data, permit);
        Ok(true)
    }

    /// Wait until saga `id` has ended and say how; `NotFound` for an unknown id.
    pub async fn wait(&self, id: &str) -> Result<Status, Error> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.inner.waiters.lock() {
            w.entry(id.to_string()).or_default().push(tx);
        }
        // Registered first, read second: an end between the two still wakes us.
        match self.inner.log.get(id).await? {
            None => Err(Error::new(
                ErrorKind::NotFound,
                Origin::Downstream,
                format!("no saga {id}"),
            )),
            Some((_, row, _)) if row.status.is_final() => Ok(row.status),
            Some(_) => rx
                .await
                .map_err(|_| Error::unavailable(format!("saga {id}: the orchestrator stopped"))),
        }
    }

    /// Saga `id` as the log has it, with its history.
    pub async fn status(&self, id: &str) -> Result<Option<SagaStatus>, Error> {
        let Some((saga, row, history)) = self.inner.log.get(id).await? else {
            return Ok(None);
        };
        Ok(Some(SagaStatus {
            id: row.id,
            saga,
            status: row.status,
            step: row.step,
            stuck: row.stuck,
            error: row.error,
            correlation_id: row.correlation_id,
            data: serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null),
            history,
        }))
    }

    /// Resume every unfinished saga of this definition found in the log (done by
    /// [`OrchestratorBuilder::open`]); returns how many.
    async fn recover(&self) -> Result<usize, Error> {
        let rows = self.inner.log.unfinished(&self.inner.saga.name).await?;
        let n = rows.len();
        for mut row in rows {
            // Resumed sagas go on in the trace that started them.
            if let Some((_, _, history)) = self.inner.log.get(&row.id).await? {
                let started = history
                    .iter()
                    .find(|h| h.event == "started")
                    .and_then(|h| h.detail.as_deref())
                    .and_then(|d| d.strip_prefix(TRACE_DETAIL))
                    .and_then(TraceContext::parse);
                row.trace = started.map(|t| (t, self.inner.tracer.clone()));
            }
            let data: D = serde_json::from_str(&row.data).map_err(|e| {
                Error::internal(format!(
                    "saga {}: its stored data does not decode (a changed data type?)",
                    row.id
                ))
                .with_source(e)
            })?;
            // Recovered sagas take permits too; past the limit they wait for one.
            let permit = match self.inner.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => self
                    .inner
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::internal("saga permits closed"))?,
            };
            if row.stuck {
                self.inner
                    .metrics
                    .stuck
                    .get_or_create(&self.inner.labels)
                    .inc();
            }
            self.spawn(row, data, permit);
        }
        if n > 0 {
            tracing::info!(saga = %self.inner.saga.name, resumed = n, "resuming unfinished sagas");
        }
        Ok(n)
    }

    /// Stop every running saga where it is (as a crash would): each resumes from
    /// the log when an orchestrator opens on this database again.
    pub async fn shutdown(&self) {
        let mut set = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        set.shutdown().await;
    }

    fn spawn(&self, row: SagaRow, data: D, permit: OwnedSemaphorePermit) {
        let inner = self.inner.clone();
        inner.metrics.running.get_or_create(&inner.labels).inc();
        let fut = async move {
            let id = row.id.clone();
            let end = drive(&inner, row, data).await;
            inner.metrics.running.get_or_create(&inner.labels).dec();
            drop(permit);
            let waiters = inner
                .waiters
                .lock()
                .ok()
                .and_then(|mut w| w.remove(&id))
                .unwrap_or_default();
            for w in waiters {
                let _ = w.send(end);
            }
        };
        if let Ok(mut t) = self.inner.tasks.lock() {
            // Reap finished runners so the set stays as large as what runs.
            while t.try_join_next().is_some() {}
            t.spawn(fut);
        }
    }

    /// Read replies from `topic` and hand each to the runner waiting for it.
    async fn listen(&self, bus: SharedBus, topic: String) -> Result<(), Error> {
        match bus.create_topic(&TopicSpec::new(&topic, 1)).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Conflict => {} // it exists, with its own partitions
            Err(e) => return Err(e),
        }
        let group = format!("saga.{}", self.inner.saga.name);
        let mut consumer = bus
            .subscribe(&topic, &group, SubscribeOptions::default())
            .await?;
        let inner = self.inner.clone();
        let fut = async move {
            loop {
                let d = match consumer.next().await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, "saga replies: reading failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                inner.deliver(&d.message);
                if let Err(e) = consumer.ack(&d).await {
                    tracing::warn!(error = %e, "saga replies: ack failed");
                }
            }
        };
        if let Ok(mut t) = self.inner.tasks.lock() {
            t.spawn(fut);
        }
        Ok(())
    }
}

impl<D, E> Inner<D, E> {
    /// Hand a reply to the runner waiting for it. Anything else (a duplicate, a
    /// reply to a step already done, one for a step not yet reached, one for
    /// another saga) is dropped: it changes nothing.
    fn deliver(&self, m: &shoal_bus::Message) {
        let Some(reply) = Reply::from_message(m) else {
            self.metrics
                .ignored_replies
                .get_or_create(&self.labels)
                .inc();
            tracing::debug!(id = %m.id, "saga replies: not a saga reply; dropped");
            return;
        };
        let key = (reply.saga_id.clone(), reply.step, reply.phase);
        let waiting = self.pending.lock().ok().and_then(|mut p| p.remove(&key));
        match waiting {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => {
                self.metrics
                    .ignored_replies
                    .get_or_create(&self.labels)
                    .inc();
                tracing::debug!(saga_id = %key.0, step = key.1, "saga replies: nobody waits for it; dropped");
            }
        }
    }
}

/// Run one saga from where `row` says to its end.
async fn drive<D, E>(inner: &Arc<Inner<D, E>>, mut row: SagaRow, mut data: D) -> Status
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    let steps = &inner.saga.steps;
    loop {
        match row.status {
            Status::Completed | Status::Compensated => return row.status,
            Status::Running => {
                let i = row.step;
                let Some(step) = steps.get(i) else {
                    row.status = Status::Completed;
                    let name = inner.saga.name.clone();
                    commit(inner, &mut row, &data, name, "completed", None).await;
                    continue;
                };
                match run(inner, &mut row, step, i, Phase::Do, &step.action, &data).await {
                    Ended::Done(d) => {
                        data = d;
                        row.step = i + 1;
                        let done = row.step == steps.len();
                        if done {
                            row.status = Status::Completed;
                        }
                        commit(inner, &mut row, &data, step.name.clone(), "done", None).await;
                        if done {
                            inner.metrics.completed.get_or_create(&inner.labels).inc();
                        }
                    }
                    // Nothing of this step was applied: undo the ones before it.
                    Ended::Rejected(why) => {
                        begin_compensation(inner, &mut row, &data, step, i, "rejected", why).await;
                    }
                    // Uncertain (only a compensable step ends so): undo it too.
                    Ended::Failed(e) => {
                        let why = e.to_string();
                        begin_compensation(inner, &mut row, &data, step, i + 1, "failed", why)
                            .await;
                    }
                }
            }
            Status::Compensating => {
                if row.step == 0 {
                    row.status = Status::Compensated;
                    let name = inner.saga.name.clone();
                    commit(inner, &mut row, &data, name, "compensated", None).await;
                    continue;
                }
                let i = row.step - 1;
                let step = &steps[i.min(steps.len() - 1)];
                let Some(comp) = &step.compensation else {
                    // Only compensable steps come before the point of no return.
                    row.step = i;
                    continue;
                };
                if let Ended::Done(d) =
                    run(inner, &mut row, step, i, Phase::Undo, comp, &data).await
                {
                    data = d;
                }
                row.step = i;
                let end = row.step == 0;
                if end {
                    row.status = Status::Compensated;
                }
                commit(
                    inner,
                    &mut row,
                    &data,
                    step.name.clone(),
                    "compensated",
                    None,
                )
                .await;
                if end {
                    inner.metrics.compensated.get_or_create(&inner.labels).inc();
                }
            }
        }
    }
}

async fn begin_compensation<D, E>(
    inner: &Arc<Inner<D, E>>,
    row: &mut SagaRow,
    data: &D,
    step: &Step<D, E>,
    to_undo: usize,
    event: &'static str,
    why: String,
) where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    tracing::info!(saga = %inner.saga.name, saga_id = %row.id, correlation_id = %row.correlation_id,
        step = %step.name, reason = %why, "saga step {event}; compensating");
    row.status = if to_undo == 0 {
        Status::Compensated
    } else {
        Status::Compensating
    };
    row.step = to_undo;
    row.error = Some(format!("{}: {why}", step.name));
    commit(inner, row, data, step.name.clone(), event, Some(why)).await;
    if to_undo == 0 {
        inner.metrics.compensated.get_or_create(&inner.labels).inc();
    }
}

/// Write `row` (with `data`) durably, trying until the database takes it: a saga
/// must not move on from a transition it has not recorded.
async fn commit<D: Serialize, E>(
    inner: &Arc<Inner<D, E>>,
    row: &mut SagaRow,
    data: &D,
    step_name: String,
    event: &'static str,
    detail: Option<String>,
) {
    row.data = serde_json::to_string(data).unwrap_or_else(|_| row.data.clone());
    let mut failures = 0u32;
    loop {
        let t = Transition {
            row: row.clone(),
            step_name: step_name.clone(),
            event,
            detail: detail.clone(),
            insert: None,
        };
        match inner.log.write(t).await {
            Ok(_) => break,
            Err(e) => {
                failures += 1;
                tracing::error!(saga_id = %row.id, error = %e, "saga log: write failed; retrying");
                let ms = 50u64.saturating_mul(1 << failures.min(6));
                tokio::time::sleep(Duration::from_millis(ms.min(2_000))).await;
            }
        }
    }
    row.next_seq += 1;
}

/// Carry out `action` of step `i` under the step's retry policy and timeout.
/// Compensable and pivot actions end after their attempts; compensations and
/// retriable actions are retried until they succeed, the saga marked stuck once
/// their attempts are used up (and unmarked when they succeed).
async fn run<D, E>(
    inner: &Arc<Inner<D, E>>,
    row: &mut SagaRow,
    step: &Step<D, E>,
    i: usize,
    phase: Phase,
    action: &Action<D, E>,
    data: &D,
) -> Ended<D>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    let forward_can_end = phase == Phase::Do && step.kind != StepKind::Retriable;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let cx = StepCtx {
            saga: inner.saga.name.clone(),
            saga_id: row.id.clone(),
            step: step.name.clone(),
            index: i,
            phase,
            attempt,
            correlation_id: row.correlation_id.clone(),
            env: inner.env.clone(),
        };
        let outcome = match &row.trace {
            Some((parent, tracer)) if tracer.is_enabled() => {
                let mut span = tracer.span(
                    parent.child(),
                    Some(parent.span_id),
                    SpanKind::Internal,
                    format!(
                        "saga {} {} {}",
                        inner.saga.name,
                        if phase == Phase::Do { "step" } else { "undo" },
                        step.name
                    ),
                );
                span.set("saga.name", inner.saga.name.clone());
                span.set("saga.id", row.id.clone());
                span.set("saga.step", step.name.clone());
                span.set("saga.phase", phase.as_str());
                span.set("saga.attempt", attempt);
                let here = span.context();
                let log_span = tracing::info_span!("saga_step", trace_id = %here.trace_id_hex());
                let out = RequestContext::background(here, tracer.clone())
                    .scope(once(inner, cx, step, action, data.clone()))
                    .instrument(log_span)
                    .await;
                match &out {
                    Ok(_) => {}
                    Err(StepError::Rejected(why)) => span.fail(format!("rejected: {why}")),
                    Err(StepError::Failed(e)) => span.fail(e.to_string()),
                }
                out
            }
            _ => once(inner, cx, step, action, data.clone()).await,
        };
        let failure = match outcome {
            Ok(d) => {
                if row.stuck {
                    row.stuck = false;
                    inner.metrics.stuck.get_or_create(&inner.labels).dec();
                }
                return Ended::Done(d);
            }
            Err(StepError::Rejected(why)) if forward_can_end => return Ended::Rejected(why),
            Err(StepError::Rejected(why)) => {
                // A compensation or retriable step may not refuse; treat it as a
                // failure that needs an operator, and keep trying.
                Error::new(
                    ErrorKind::Conflict,
                    Origin::Upstream,
                    format!("refused: {why}"),
                )
                .with_retryable(true)
            }
            Err(StepError::Failed(e)) => e,
        };
        let retry_ok = failure.is_retryable() || !forward_can_end;
        if attempt < step.retry.max_attempts && retry_ok {
            let pause = shoal_resilience::backoff(&step.retry, attempt, fastrand::f64());
            tokio::time::sleep(pause).await;
            continue;
        }
        if forward_can_end && step.kind == StepKind::Compensable {
            return Ended::Failed(failure);
        }
        // A pivot with an uncertain outcome cannot be undone nor skipped; a
        // compensation or a retriable step must succeed. Keep trying, slowly.
        if !row.stuck {
            row.stuck = true;
            inner.metrics.stuck.get_or_create(&inner.labels).inc();
            tracing::error!(saga = %inner.saga.name, saga_id = %row.id, step = %step.name,
                phase = phase.as_str(), error = %failure, "saga stuck: retrying until it succeeds");
            let detail = Some(format!("{}: {failure}", phase.as_str()));
            commit(inner, row, data, step.name.clone(), "stuck", detail).await;
        }
        tokio::time::sleep(Duration::from_millis(step.retry.max_delay_ms.max(1))).await;
    }
}

/// One attempt, within the step's timeout.
async fn once<D, E>(
    inner: &Arc<Inner<D, E>>,
    cx: StepCtx<E>,
    step: &Step<D, E>,
    action: &Action<D, E>,
    data: D,
) -> Result<D, StepError>
where
    D: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    let timed_out = || {
        StepError::Failed(Error::new(
            ErrorKind::Timeout,
            Origin::Upstream,
            format!("step {} took longer than {:?}", step.name, step.timeout),
        ))
    };
    match action {
        Action::Call(f) => tokio::time::timeout(step.timeout, f(cx, data))
            .await
            .unwrap_or_else(|_| Err(timed_out())),
        Action::Command { build, on_reply } => {
            let Some((bus, reply_topic)) = &inner.bus else {
                return Err(StepError::Failed(Error::config(
                    "command step without a bus",
                )));
            };
            let command = build(&cx, &data)?;
            let key = (cx.saga_id.clone(), cx.index, cx.phase);
            let (tx, rx) = oneshot::channel();
            if let Ok(mut p) = inner.pending.lock() {
                p.insert(key.clone(), tx);
            }
            // A fresh message id each attempt: the participant recognises a repeat
            // by the idempotency key and answers it again, so a reply lost while
            // this process was down is asked for anew.
            let msg = OutgoingMessage::new(command.payload)
                .with_key(cx.saga_id.clone())
                .with_header(headers::SAGA_ID, &cx.saga_id)
                .with_header(headers::SAGA_STEP, cx.index.to_string())
                .with_header(headers::SAGA_PHASE, cx.phase.as_str())
                .with_header(headers::REPLY_TO, reply_topic.as_str())
                .with_header(shoal_core::headers::IDEMPOTENCY_KEY, cx.idempotency_key())
                .with_header(shoal_bus::headers::CORRELATION_ID, &cx.correlation_id);
            let sent = shoal_bus::publish_one(bus.as_ref(), &command.topic, msg).await;
            let result = match sent {
                Err(e) => Err(StepError::Failed(e)),
                Ok(_) => match tokio::time::timeout(step.timeout, rx).await {
                    Ok(Ok(reply)) => match &reply.rejected {
                        Some(why) => Err(StepError::Rejected(why.clone())),
                        None => on_reply(data, &reply),
                    },
                    Ok(Err(_)) | Err(_) => Err(timed_out()),
                },
            };
            if let Ok(mut p) = inner.pending.lock() {
                p.remove(&key);
            }
            result
        }
    }
}
