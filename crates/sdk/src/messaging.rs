//! Messaging in a service: the transactional outbox, the idempotent inbox, and the
//! consumers that use it.
//!
//! - **Outbox.** A handler writes its business rows and the events they cause in one
//!   transaction of the service's own database ([`Outbox::enqueue`]). A relay in
//!   the background publishes what is committed, in order, then deletes it. A crash
//!   between commit and publish loses nothing: the rows are still there at the next
//!   start. A crash between publish and delete publishes again, with the same
//!   message id, so the consumer's inbox drops the duplicate. Replicas sharing a
//!   database take turns through a lease row, so one relay publishes at a time.
//! - **Inbox.** A consumer ([`crate::Service::consume`]) records each message id in
//!   the same transaction as the message's effects. A redelivered message finds its
//!   id and has no second effect: effectively once.

use crate::Ctx;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_bus::{OutgoingMessage, SharedBus, SubscribeOptions};
use shoal_core::trace::TraceContext;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::{db_err, Db};
use shoal_telemetry::spans::ActiveSpan;
use shoal_telemetry::{RequestContext, SpanKind, Tracer};
use sqlx::{AnyConnection, Row};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

pub use shoal_bus::Message;

/// The future a [`Handler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// Handles one message, inside the transaction that also records it as processed.
pub trait Handler: Send + Sync {
    /// Apply `message`'s effects through `tx` (portable SQL, see docs/database.md).
    /// An error rolls the effects back and the message is delivered again later
    /// (dead-lettered after the subscription's `max_deliveries`).
    fn handle<'a>(
        &'a self,
        ctx: &'a Ctx,
        message: &'a Message,
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a>;
}

/// A consumer a service runs: topic, group, options and handler.
pub(crate) struct Consumer {
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
    pub(crate) options: SubscribeOptions,
    pub(crate) handler: Arc<dyn Handler>,
}

const SQLITE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS _shoal_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    msg_key TEXT,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_outbox_lease (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
";

const POSTGRES_TABLES: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_outbox'));
CREATE TABLE IF NOT EXISTS _shoal_outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    msg_key TEXT,
    headers TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_outbox_lease (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
COMMIT;
";

/// Make the outbox and inbox tables if missing.
pub(crate) async fn prepare(db: &Db) -> Result<(), Error> {
    db.ensure_tables(
        SQLITE_TABLES,
        POSTGRES_TABLES,
        "the outbox and inbox tables",
    )
    .await
}

/// The service's outbox: [`Ctx::outbox`].
#[derive(Clone)]
pub struct Outbox {
    wake: Arc<Notify>,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Self {
            wake: Arc::new(Notify::new()),
        }
    }

    /// Put `message` for `topic` in the outbox, inside the caller's transaction
    /// `tx`: it is published once (and only if) that transaction commits. The
    /// message is checked against the bus's limits here, so a bad one fails the
    /// transaction rather than the relay.
    pub async fn enqueue(
        &self,
        tx: &mut AnyConnection,
        topic: &str,
        message: &OutgoingMessage,
    ) -> Result<(), Error> {
        shoal_bus::validate_batch(topic, std::slice::from_ref(message))?;
        // A message put in the outbox while handling a request continues its trace.
        let mut headers = message.headers.clone();
        if let Some(ctx) = RequestContext::current() {
            headers
                .entry(shoal_bus::headers::TRACEPARENT.to_string())
                .or_insert_with(|| ctx.trace.to_header());
        }
        let headers = serde_json::to_string(&headers)
            .map_err(|e| Error::internal("encoding message headers").with_source(e))?;
        sqlx::query(
            "INSERT INTO _shoal_outbox (topic, id, msg_key, headers, payload, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(topic)
        .bind(&message.id)
        .bind(message.key.as_deref())
        .bind(headers)
        .bind(message.payload.to_vec())
        .bind(shoal_core::unix_ms() as i64)
        .execute(&mut *tx)
        .await
        .map_err(db_err(format!(
            "putting message {} in the outbox",
            message.id
        )))?;
        // The relay reads only committed rows; waking it early costs one empty look.
        self.wake.notify_one();
        Ok(())
    }
}

/// `shoal_outbox_*` and `shoal_inbox_*` metrics.
#[derive(Clone)]
pub(crate) struct MessagingMetrics {
    backlog: Gauge,
    relayed: Counter,
    consumed: Family<Vec<(&'static str, String)>, Counter>,
    duplicates: Family<Vec<(&'static str, String)>, Counter>,
    failed: Family<Vec<(&'static str, String)>, Counter>,
}

impl MessagingMetrics {
    pub(crate) fn new(metrics: &shoal_telemetry::Metrics) -> Self {
        let m = Self {
            backlog: Gauge::default(),
            relayed: Counter::default(),
            consumed: Family::default(),
            duplicates: Family::default(),
            failed: Family::default(),
        };
        metrics.register(
            "shoal_outbox_backlog",
            "Messages committed to the outbox and not yet published",
            m.backlog.clone(),
        );
        metrics.register(
            "shoal_outbox_published",
            "Messages the outbox relay published",
            m.relayed.clone(),
        );
        metrics.register(
            "shoal_inbox_processed",
            "Messages handled and committed, by topic",
            m.consumed.clone(),
        );
        metrics.register(
            "shoal_inbox_duplicates",
            "Redelivered messages the inbox recognised and skipped, by topic",
            m.duplicates.clone(),
        );
        metrics.register(
            "shoal_inbox_failed",
            "Messages whose handler failed (to be delivered again), by topic",
            m.failed.clone(),
        );
        m
    }
}

/// Settings of the relay and consumers (from `[bus]`).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) poll: Duration,
    pub(crate) batch: u32,
    pub(crate) inbox_retention_ms: u64,
    /// Records the relay's producer spans.
    pub(crate) tracer: Tracer,
}

/// How long a relay holds its turn without renewing it.
const LEASE_MS: u64 = 5_000;

/// The relay: publish committed outbox rows in order, then delete them. Runs until
/// `stop` turns true.
pub(crate) async fn relay(
    db: Db,
    bus: SharedBus,
    outbox: Outbox,
    owner: String,
    settings: Settings,
    metrics: MessagingMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let result = relay_once(&db, &bus, &owner, &settings, &metrics).await;
        let pause = match result {
            // A full batch: there may be more.
            Ok(n) if n >= settings.batch as usize => {
                failures = 0;
                continue;
            }
            Ok(_) => {
                failures = 0;
                settings.poll
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = settings
                    .poll
                    .saturating_mul(1u32 << failures.min(6))
                    .min(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "outbox relay: publish failed; the messages stay in the outbox");
                pause
            }
        };
        if failures > 0 {
            // Backing off: new messages wait too, or every enqueue would knock on a
            // broker that is down.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(pause) => {}
            }
        } else {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = outbox.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// One round: take the turn, publish up to a batch, delete what was published.
/// Returns how many rows were published.
async fn relay_once(
    db: &Db,
    bus: &SharedBus,
    owner: &str,
    settings: &Settings,
    metrics: &MessagingMetrics,
) -> Result<usize, Error> {
    let now = shoal_core::unix_ms() as i64;
    let turn = sqlx::query(
        "INSERT INTO _shoal_outbox_lease (name, owner, until_ms) VALUES ('relay', $1, $2)
         ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until_ms = excluded.until_ms
         WHERE _shoal_outbox_lease.owner = excluded.owner OR _shoal_outbox_lease.until_ms < $3",
    )
    .bind(owner)
    .bind(now + LEASE_MS as i64)
    .bind(now)
    .execute(db.pool())
    .await
    .map_err(db_err("taking the outbox relay's turn"))?;
    if turn.rows_affected() != 1 {
        // Another replica's relay has the turn.
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT seq, topic, id, msg_key, headers, payload FROM _shoal_outbox ORDER BY seq LIMIT $1",
    )
    .bind(i64::from(settings.batch))
    .fetch_all(db.pool())
    .await
    .map_err(db_err("reading the outbox"))?;
    let backlog: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _shoal_outbox")
        .fetch_one(db.pool())
        .await
        .map_err(db_err("counting the outbox"))?;
    metrics.backlog.set(backlog);
    if rows.is_empty() {
        return Ok(0);
    }
    let mut published = 0usize;
    // Runs of one topic, in order: a batch per run keeps the order of each key.
    let mut run: Vec<(i64, OutgoingMessage)> = Vec::new();
    let mut run_topic = String::new();
    for row in &rows {
        let decode = |e: sqlx::Error| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Internal,
                "an outbox row cannot be read",
            )
            .with_source(e)
        };
        let topic: String = row.try_get(1).map_err(decode)?;
        if topic != run_topic && !run.is_empty() {
            published += publish_run(
                db,
                bus,
                &run_topic,
                std::mem::take(&mut run),
                &settings.tracer,
            )
            .await?;
        }
        run_topic = topic;
        let headers: String = row.try_get(4).map_err(decode)?;
        let headers: BTreeMap<String, String> = serde_json::from_str(&headers).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Internal,
                "outbox headers are not JSON",
            )
            .with_source(e)
        })?;
        let payload: Vec<u8> = row.try_get(5).map_err(decode)?;
        run.push((
            row.try_get(0).map_err(decode)?,
            OutgoingMessage {
                id: row.try_get(2).map_err(decode)?,
                key: row.try_get(3).map_err(decode)?,
                headers,
                payload: payload.into(),
            },
        ));
    }
    if !run.is_empty() {
        published += publish_run(db, bus, &run_topic, run, &settings.tracer).await?;
    }
    metrics.relayed.inc_by(published as u64);
    metrics.backlog.set((backlog - published as i64).max(0));
    Ok(published)
}

/// Publish one topic's run of rows, then delete them.
async fn publish_run(
    db: &Db,
    bus: &SharedBus,
    topic: &str,
    run: Vec<(i64, OutgoingMessage)>,
    tracer: &Tracer,
) -> Result<usize, Error> {
    let (seqs, mut batch): (Vec<i64>, Vec<OutgoingMessage>) = run.into_iter().unzip();
    // A producer span per message of a traced request; the consumer's span is its
    // child, so the broker hop shows between them.
    let mut spans: Vec<ActiveSpan> = Vec::new();
    if tracer.is_enabled() {
        for m in &mut batch {
            let Some(parent) = m
                .headers
                .get(shoal_bus::headers::TRACEPARENT)
                .and_then(|v| TraceContext::parse(v))
            else {
                continue;
            };
            let mut span = tracer.span(
                parent.child(),
                Some(parent.span_id),
                SpanKind::Producer,
                format!("{topic} publish"),
            );
            span.set("messaging.destination.name", topic.to_string());
            span.set("messaging.message.id", m.id.clone());
            m.headers.insert(
                shoal_bus::headers::TRACEPARENT.to_string(),
                span.context().to_header(),
            );
            spans.push(span);
        }
    }
    if let Err(e) = bus.publish(topic, batch).await {
        for s in &mut spans {
            s.fail(e.to_string());
        }
        return Err(e);
    }
    drop(spans);
    // Published: now they may go. A crash right here publishes them again at the
    // next start (same ids: consumers' inboxes drop the repeats).
    let placeholders: Vec<String> = (1..=seqs.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "DELETE FROM _shoal_outbox WHERE seq IN ({})",
        placeholders.join(",")
    );
    // Built from placeholders only; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for s in &seqs {
        q = q.bind(*s);
    }
    q.execute(db.pool())
        .await
        .map_err(db_err("deleting published outbox rows"))?;
    Ok(seqs.len())
}

/// A consumer: subscribe, then for each delivery record it in the inbox and run the
/// handler in one transaction; ack after commit, nack on failure. Runs until `stop`.
pub(crate) async fn consume(
    ctx: Ctx,
    bus: SharedBus,
    consumer: Consumer,
    settings: Settings,
    metrics: MessagingMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let group = consumer
        .group
        .clone()
        .unwrap_or_else(|| ctx.service().to_string());
    let inbox_key = format!("{}/{group}", consumer.topic);
    let labels = vec![("topic", consumer.topic.clone())];
    let mut failures = 0u32;
    let mut last_cleanup = 0u64;
    loop {
        let subscribed = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            s = bus.subscribe(&consumer.topic, &group, consumer.options.clone()) => s,
        };
        let mut sub = match subscribed {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(100u64 << failures.min(7));
                tracing::warn!(topic = %consumer.topic, error = %e, retry_in_ms = pause.as_millis() as u64, "cannot subscribe; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        failures = 0;
        loop {
            let delivery = tokio::select! {
                _ = stop.wait_for(|s| *s) => None,
                d = sub.next() => Some(d),
            };
            let Some(delivery) = delivery else {
                let _ = sub.close().await;
                return;
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(topic = %consumer.topic, error = %e, "delivery failed; subscribing again");
                    break;
                }
            };
            let now = shoal_core::unix_ms();
            if now.saturating_sub(last_cleanup) > 60_000 {
                last_cleanup = now;
                forget_old(ctx.db(), settings.inbox_retention_ms).await;
            }
            let message = &delivery.message;
            let parent = message
                .headers
                .get(shoal_bus::headers::TRACEPARENT)
                .and_then(|v| TraceContext::parse(v));
            let tracer = ctx.tracer().clone();
            let trace = parent
                .map(|p| p.child())
                .unwrap_or_else(|| tracer.new_root());
            let mut span = tracer.span(
                trace,
                parent.map(|p| p.span_id),
                SpanKind::Consumer,
                format!("{} process", consumer.topic),
            );
            span.set("messaging.destination.name", consumer.topic.clone());
            span.set("messaging.consumer.group.name", group.clone());
            span.set("messaging.message.id", message.id.clone());
            span.set("messaging.delivery.attempt", delivery.attempt);
            // The handler's logs carry the trace id, its calls and messages the trace.
            let log_span = tracing::info_span!(
                "message",
                trace_id = %trace.trace_id_hex(),
                topic = %consumer.topic,
                message_id = %message.id,
            );
            let outcome = RequestContext::background(trace, tracer)
                .scope(handle(&ctx, &inbox_key, &consumer, message))
                .instrument(log_span.clone())
                .await;
            match &outcome {
                Ok(fresh) => log_span.in_scope(|| {
                    tracing::info!(
                        attempt = delivery.attempt,
                        duplicate = !fresh,
                        "message handled"
                    )
                }),
                Err(e) => span.fail(e.to_string()),
            }
            drop(span);
            match outcome {
                Ok(true) => {
                    metrics.consumed.get_or_create(&labels).inc();
                    if let Err(e) = sub.ack(&delivery).await {
                        // Committed: a redelivery is recognised by the inbox.
                        tracing::warn!(error = %e, "ack failed after commit");
                    }
                }
                Ok(false) => {
                    metrics.duplicates.get_or_create(&labels).inc();
                    let _ = sub.ack(&delivery).await;
                }
                Err(e) => {
                    metrics.failed.get_or_create(&labels).inc();
                    tracing::warn!(topic = %consumer.topic, message_id = %delivery.message.id, attempt = delivery.attempt, error = %e, "handler failed; the message will be delivered again");
                    let _ = sub.nack(&delivery, None).await;
                }
            }
        }
    }
}

/// Record and handle one message in one transaction. `Ok(false)`: seen before.
async fn handle(
    ctx: &Ctx,
    inbox_key: &str,
    consumer: &Consumer,
    message: &Message,
) -> Result<bool, Error> {
    let mut tx = ctx
        .db()
        .pool()
        .begin()
        .await
        .map_err(db_err("starting a message transaction"))?;
    let fresh = sqlx::query(
        "INSERT INTO _shoal_inbox (consumer, message_id, processed_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(inbox_key)
    .bind(&message.id)
    .bind(shoal_core::unix_ms() as i64)
    .execute(&mut *tx)
    .await
    .map_err(db_err("recording a message in the inbox"))?;
    if fresh.rows_affected() == 0 {
        return Ok(false);
    }
    consumer.handler.handle(ctx, message, &mut tx).await?;
    tx.commit()
        .await
        .map_err(db_err("committing a message's effects"))?;
    Ok(true)
}

/// Drop inbox entries older than the retention: a redelivery later than that would
/// be handled again (the bus's own retention is usually shorter).
async fn forget_old(db: &Db, retention_ms: u64) {
    let before = shoal_core::unix_ms().saturating_sub(retention_ms) as i64;
    if let Err(e) = sqlx::query("DELETE FROM _shoal_inbox WHERE processed_at_ms < $1")
        .bind(before)
        .execute(db.pool())
        .await
    {
        tracing::warn!(error = %e, "cannot trim the inbox");
    }
}
