//! The reference shop's orders service: customers place orders and follow them.
//!
//! - The order is an **event-sourced aggregate** (stream `order-<id>` in the
//!   service's own event store, [`order`]); `GET /api/orders/{id}` and its history
//!   are read from the events.
//! - Placing an order starts the **`place-order` saga** ([`saga`]): reserve stock,
//!   authorize the payment, capture it, commit the stock, approve; a refusal
//!   compensates what was done and rejects the order with the reason. The saga log
//!   lives in the same database, so a killed process resumes every order in flight.
//! - Lists come from a **read model** (CQRS, [`view`]), kept by a projection; the
//!   order's end is published on `orders.events` by a second projection through
//!   the outbox.
//! - `Idempotency-Key` is honoured per customer: a repeat with the same body gets
//!   the same order, the same key with another body 422.
//!
//! The API is in docs/shop.md; the business rules in the README's shop section.

mod api;
mod order;
mod saga;
mod view;

use serde::Deserialize;
use shoal::bus::TopicSpec;
use shoal::events::{ProjectionRunner, Upcasters};
use shoal::saga::SagaMetrics;
use shoal::{Ctx, Error, Migration, Service};
use std::sync::Arc;
use std::time::Duration;

/// The read model's schema, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// The service's own settings (`[settings]`, `SHOAL_SETTINGS__*`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long after placing an order an unreachable payment provider is waited
    /// for (the payment step retried with backoff) before the order is rejected
    /// `payment_unavailable`.
    pub payment_deadline_ms: u64,
    /// One payment attempt's time limit.
    pub payment_attempt_timeout_ms: u64,
    /// Attempts per saga step before it counts as failed (the payment deadline
    /// normally ends the payment step first).
    pub step_max_attempts: u32,
    /// Longest pause between two attempts of a step.
    pub step_max_delay_ms: u64,
    /// How often orders whose saga ended are looked for (after a restart, the
    /// saga may have ended while no one was waiting for it).
    pub sweep_interval_ms: u64,
    /// Most orders `GET /api/orders` answers.
    pub list_limit: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            payment_deadline_ms: 30_000,
            payment_attempt_timeout_ms: 10_000,
            step_max_attempts: 1_000,
            step_max_delay_ms: 2_000,
            sweep_interval_ms: 2_000,
            list_limit: 100,
        }
    }
}

impl Settings {
    fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("payment_deadline_ms", self.payment_deadline_ms),
            (
                "payment_attempt_timeout_ms",
                self.payment_attempt_timeout_ms,
            ),
            ("step_max_delay_ms", self.step_max_delay_ms),
            ("sweep_interval_ms", self.sweep_interval_ms),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(Error::config(format!("settings.{key}: must be positive")));
            }
        }
        if !(1..=100_000).contains(&self.step_max_attempts) {
            return Err(Error::config(
                "settings.step_max_attempts: must be 1 to 100000",
            ));
        }
        if !(1..=1_000).contains(&self.list_limit) {
            return Err(Error::config("settings.list_limit: must be 1 to 1000"));
        }
        Ok(())
    }
}

/// The orders service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("orders")
        .version(env!("CARGO_PKG_VERSION"))
        .settings::<Settings>()
        .database(MIGRATIONS)
        .event_store(Upcasters::new())
        .projection(Arc::new(view::OrdersView))
        .topic(TopicSpec::new(view::TOPIC, view::PARTITIONS))
        .outbox()
        .setup(setup)
}

/// Open the saga orchestrator (resuming every order in flight), start the
/// publisher and the sweeper, and build the API on them.
async fn setup(ctx: Ctx) -> Result<axum::Router, Error> {
    let settings = ctx.settings::<Settings>();
    settings.validate()?;
    let orchestrator = saga::Orchestrator::builder(saga::definition(&settings)?, ctx.clone())
        .metrics(SagaMetrics::register(ctx.metrics()))
        .tracer(ctx.tracer().clone())
        .open(ctx.db())
        .await?;

    let publisher = view::Publisher {
        store: ctx.events().clone(),
        outbox: ctx.outbox().clone(),
    };
    let runner = ProjectionRunner::new(ctx.events().clone(), Arc::new(publisher), 500)
        .with_metrics(ctx.metrics());
    ctx.spawn(runner.run(ctx.stopping()));

    let sweeper = sweep(
        ctx.clone(),
        orchestrator.clone(),
        Duration::from_millis(settings.sweep_interval_ms),
    );
    ctx.spawn(sweeper);
    let stop = orchestrator.clone();
    let stopping = ctx.stopping();
    ctx.spawn(async move {
        stopping.await;
        stop.shutdown().await;
    });
    Ok(api::router(orchestrator))
}

/// End the order of saga `id` if the saga has ended: approved when it completed,
/// rejected with its reason when it was compensated.
async fn settle(ctx: &Ctx, orchestrator: &saga::Orchestrator, id: &str) -> Result<(), Error> {
    let Some(status) = orchestrator.status(id).await? else {
        return Ok(());
    };
    let outcome = match status.status {
        shoal::saga::Status::Completed => Ok(()),
        shoal::saga::Status::Compensated => {
            Err(status.error.as_deref().and_then(order::Reason::found_in))
        }
        _ => return Ok(()),
    };
    order::finish(ctx.events(), id, outcome).await
}

/// Wait for saga `id` to end and settle its order (the fast path).
pub(crate) fn settle_when_done(ctx: Ctx, orchestrator: saga::Orchestrator, id: String) {
    tokio::spawn(async move {
        if orchestrator.wait(&id).await.is_ok() {
            if let Err(e) = settle(&ctx, &orchestrator, &id).await {
                tracing::warn!(order = %id, error = %e, "settling the order failed; the sweeper retries");
            }
        }
    });
}

/// Settle, now and then, every pending order whose saga has ended: the path that
/// covers sagas finished after a restart, or whose fast path failed.
async fn sweep(ctx: Ctx, orchestrator: saga::Orchestrator, every: Duration) {
    let stopping = ctx.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Only orders older than a sweep: younger ones have their waiter (the fast
        // path), and asking for each of them would cost a query per order in flight.
        let older_than = shoal::time::unix_ms().saturating_sub(every.as_millis() as u64);
        let pending: Result<Vec<(String,)>, _> = shoal::sqlx::query_as(
            "SELECT id FROM orders_view WHERE status = 'PENDING' AND placed_at_ms < $1
             ORDER BY placed_at_ms LIMIT 500",
        )
        .bind(older_than as i64)
        .fetch_all(ctx.db().pool())
        .await;
        match pending {
            Ok(ids) => {
                for (id,) in ids {
                    if let Err(e) = settle(&ctx, &orchestrator, &id).await {
                        tracing::warn!(order = %id, error = %e, "settling the order failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading pending orders failed"),
        }
    }
}

#[cfg(test)]
mod tests;
