//! The `place-order` saga: reserve stock, authorize the payment, capture it (the
//! point of no return), commit the stock, approve. Each step calls its participant
//! with the saga's idempotency key, so a step repeated after a crash has one
//! effect, and records its progress as an event of the order.
//!
//! A refusal (out of stock, card declined) compensates the steps before it, newest
//! first; the order is then rejected by [`crate::finisher`] with the reason the
//! saga ended with.

use crate::order::{self, Item, OrderEvent};
use crate::Settings;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal::saga::{RetryConfig, Saga, Step, StepCtx, StepError};
use shoal::{Ctx, Error, ErrorKind, Origin};
use std::time::Duration;

/// What the saga carries from step to step (stored in the saga log).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PlaceOrder {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) items: Vec<Item>,
    pub(crate) total_cents: i64,
    /// Needed by the authorize step only; dropped from the saga's data once the
    /// payment is authorized, so the log keeps no card number longer than that.
    pub(crate) card_number: Option<String>,
    /// After this (Unix ms) an unreachable payment provider rejects the order.
    pub(crate) payment_deadline_ms: u64,
    /// The card's last four digits, for the order's record.
    pub(crate) card_last4: String,
    /// When the order was accepted (Unix ms).
    pub(crate) placed_at_ms: u64,
}

impl PlaceOrder {
    /// The event that places this order.
    pub(crate) fn placed(&self) -> OrderEvent {
        OrderEvent::OrderPlaced {
            customer_id: self.customer_id.clone(),
            items: self.items.clone(),
            total_cents: self.total_cents,
            card_last4: self.card_last4.clone(),
            placed_at_ms: self.placed_at_ms,
        }
    }
}

/// The orchestrator of placed orders; its steps get the service's context.
pub(crate) type Orchestrator = shoal::saga::Orchestrator<PlaceOrder, Ctx>;

/// The saga's definition.
pub(crate) fn definition(settings: &Settings) -> Result<Saga<PlaceOrder, Ctx>, Error> {
    let patient = RetryConfig {
        max_attempts: settings.step_max_attempts,
        base_delay_ms: 100,
        max_delay_ms: settings.step_max_delay_ms,
        ..RetryConfig::default()
    };
    Saga::builder("place-order")
        .step(
            Step::new("place", place)
                .compensate(keep)
                .retry(patient.clone()),
        )
        .step(
            Step::new("reserve", reserve)
                .compensate(release)
                .retry(patient.clone()),
        )
        .step(
            Step::new("authorize", authorize)
                .compensate(void)
                .retry(patient.clone())
                .timeout(Duration::from_millis(settings.payment_attempt_timeout_ms)),
        )
        .step(Step::new("capture", capture).pivot().retry(patient.clone()))
        .step(
            Step::new("commit", commit)
                .retriable()
                .retry(patient.clone()),
        )
        .step(Step::new("approve", approve).retriable().retry(patient))
        .build()
}

/// What a participant answered.
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// POST `body` to `service` under the step's idempotency key. Failing to get any
/// answer (no instance, refused, timed out, breaker open) is retryable: the saga
/// tries again with backoff.
async fn call(
    cx: &StepCtx<Ctx>,
    service: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Answer, StepError> {
    let key = cx.idempotency_key();
    let mut req = cx
        .env
        .client(service)
        .post(path)
        .header("idempotency-key", &key)
        .header(shoal::bus::headers::CORRELATION_ID, &cx.correlation_id);
    if let Some(body) = &body {
        req = req.json(body);
    }
    match req.send().await {
        Ok(res) => {
            let status = res.status.as_u16();
            let body = serde_json::from_slice(&res.body).unwrap_or(Value::Null);
            if status >= 500 || status == 429 {
                return Err(StepError::Failed(
                    Error::unavailable(format!("{service} answered {status} to {path}"))
                        .with_retryable(true),
                ));
            }
            Ok(Answer { status, body })
        }
        Err(e) => Err(StepError::Failed(
            Error::unavailable(format!("calling {service} {path}: {e}")).with_retryable(true),
        )),
    }
}

/// An answer no retry can change: the step fails for good (a compensable step is
/// then compensated too, since its effect is uncertain).
fn unexpected(service: &str, path: &str, a: &Answer) -> StepError {
    StepError::Failed(
        Error::new(
            ErrorKind::Protocol,
            Origin::Upstream,
            format!("{service} answered {} {} to {path}", a.status, a.code()),
        )
        .with_retryable(false),
    )
}

/// Record a step's progress; a failure to record is retried like the call.
async fn record(cx: &StepCtx<Ctx>, d: &PlaceOrder, event: OrderEvent) -> Result<(), StepError> {
    order::record(cx.env.events(), &d.order_id, event)
        .await
        .map_err(|e| StepError::Failed(e.with_retryable(true)))
}

/// Record the order as placed. The API does it too before it answers; this step
/// covers a crash between the saga's start and that write (the saga starts first,
/// so an order always has a saga to finish it).
async fn place(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    order::place(cx.env.events(), &d.order_id, d.placed(), false)
        .await
        .map_err(|e| StepError::Failed(e.with_retryable(true)))?;
    Ok(d)
}

/// Nothing to undo for a placed order: the finisher rejects it.
async fn keep(_cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    Ok(d)
}

async fn reserve(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    let items: Vec<Value> = d
        .items
        .iter()
        .map(|i| json!({"product_id": i.product_id, "quantity": i.quantity}))
        .collect();
    let path = "/internal/reservations";
    let a = call(
        &cx,
        "inventory",
        path,
        Some(json!({"reservation_id": d.order_id, "items": items})),
    )
    .await?;
    match (a.status, a.code()) {
        (200, _) => {
            record(&cx, &d, OrderEvent::StockReserved).await?;
            Ok(d)
        }
        (409, "out_of_stock") => Err(StepError::rejected("out_of_stock")),
        (404, _) => Err(StepError::rejected("unknown_product")),
        _ => Err(unexpected("inventory", path, &a)),
    }
}

async fn release(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    let path = format!("/internal/reservations/{}/release", d.order_id);
    let a = call(&cx, "inventory", &path, None).await?;
    match a.status {
        200 => Ok(d),
        _ => Err(unexpected("inventory", &path, &a)),
    }
}

async fn authorize(cx: StepCtx<Ctx>, mut d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    // Past the deadline the provider counts as unreachable for good. Failing (not
    // refusing) the step compensates it too: an authorization whose answer was
    // lost is voided, so no money stays held.
    if shoal::time::unix_ms() > d.payment_deadline_ms {
        return Err(StepError::Failed(
            Error::new(
                ErrorKind::Timeout,
                Origin::Upstream,
                "payment_unavailable: the payment provider did not answer before the deadline",
            )
            .with_retryable(false),
        ));
    }
    let Some(card) = d.card_number.clone() else {
        // Only possible if the data lost the card before the step succeeded.
        return Err(StepError::Failed(
            Error::internal("authorize: the saga has no card number").with_retryable(false),
        ));
    };
    let path = "/internal/payments";
    let a = call(
        &cx,
        "payments",
        path,
        Some(json!({
            "order_id": d.order_id,
            "customer_id": d.customer_id,
            "amount_cents": d.total_cents,
            "currency": "EUR",
            "card_number": card,
        })),
    )
    .await?;
    match (a.status, a.code()) {
        (200, _) => {
            record(&cx, &d, OrderEvent::PaymentAuthorized).await?;
            d.card_number = None;
            Ok(d)
        }
        (402, _) => Err(StepError::rejected("payment_declined")),
        _ => Err(unexpected("payments", path, &a)),
    }
}

async fn void(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    let path = format!("/internal/payments/{}/void", d.order_id);
    let a = call(&cx, "payments", &path, None).await?;
    match a.status {
        200 => Ok(d),
        _ => Err(unexpected("payments", &path, &a)),
    }
}

async fn capture(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    let path = format!("/internal/payments/{}/capture", d.order_id);
    let a = call(&cx, "payments", &path, None).await?;
    match a.status {
        200 => {
            record(&cx, &d, OrderEvent::PaymentCaptured).await?;
            Ok(d)
        }
        _ => Err(unexpected("payments", &path, &a)),
    }
}

async fn commit(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    let path = format!("/internal/reservations/{}/commit", d.order_id);
    let a = call(&cx, "inventory", &path, None).await?;
    match a.status {
        200 => {
            record(&cx, &d, OrderEvent::StockCommitted).await?;
            Ok(d)
        }
        _ => Err(unexpected("inventory", &path, &a)),
    }
}

async fn approve(cx: StepCtx<Ctx>, d: PlaceOrder) -> Result<PlaceOrder, StepError> {
    order::finish(cx.env.events(), &d.order_id, Ok(()))
        .await
        .map_err(|e| StepError::Failed(e.with_retryable(true)))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_accepted() {
        let saga = definition(&Settings::default()).unwrap();
        let names: Vec<&str> = saga.steps().iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "place",
                "reserve",
                "authorize",
                "capture",
                "commit",
                "approve"
            ]
        );
    }
}
