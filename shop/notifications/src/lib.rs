//! The reference shop's notifications service: tells customers what happened to
//! their orders. It records the message it would send (the shop sends no mail).
//!
//! It consumes, in the group `notifications`:
//!
//! - `orders.events`: `order.approved` and `order.rejected`;
//! - `shipping.events`: `shipment.scheduled`;
//!
//! and records one notification per order and kind (`UNIQUE (order_id, kind)`; the
//! kind is the event type), in the inbox transaction, so neither a redelivery nor
//! the same event under another message id tells the customer twice.
//!
//! # Messages it cannot read
//!
//! An event of a type it handles whose body it cannot read (not JSON, a field
//! missing or of the wrong type, an id that is empty or longer than 100 characters)
//! **fails**. The platform delivers it again after a backoff and, after
//! [`MAX_DELIVERIES`] attempts, moves it to the dead-letter topic
//! (`orders.events.dead`, `shipping.events.dead`) with headers naming its topic,
//! position, attempts and group. Meanwhile the messages behind it are delivered
//! (more than one in flight per partition), so one bad event does not hold up the
//! others. Failing, rather than acking and forgetting, keeps the bad event for
//! someone to look at: its producer broke a promise.
//!
//! An event of **another type** (or without a `type` header) is acked and ignored
//! whatever its body: producers add event types without asking their consumers,
//! and dead-lettering every new type would flood the dead-letter topic.
//!
//! # API
//!
//! - `GET /internal/notifications?customer_id=…` answers the customer's newest
//!   notifications first, at most [`MAX_LISTED`]:
//!   `[{"customer_id","order_id","kind","text","created_at"}]` (`created_at` in
//!   RFC 3339). Without `customer_id` it is 400 `validation_failed`.

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal::bus::{SubscribeOptions, TopicSpec};
use shoal::messaging::{Handler, HandlerFuture, Message};
use shoal::{ApiError, Ctx, Error, ErrorKind, Migration, Origin, Service};
use sqlx::AnyConnection;
use std::sync::Arc;

/// The schema, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// Order events, published by the orders service.
pub const ORDERS_TOPIC: &str = "orders.events";
/// Shipping events, published by the shipping service.
pub const SHIPPING_TOPIC: &str = "shipping.events";
/// Partitions of both topics (docs/shop.md). Declared here too, so this service
/// can start before their producers; declaring an existing topic with the same
/// partitions is a no-op.
const PARTITIONS: u32 = 4;
/// The consumer group on both topics.
const GROUP: &str = "notifications";
/// Attempts at a message before it is dead-lettered.
pub const MAX_DELIVERIES: u32 = 3;
/// Most notifications one list answers.
pub const MAX_LISTED: i64 = 100;

/// The message header that names the event.
const TYPE_HEADER: &str = "type";
const ORDER_APPROVED: &str = "order.approved";
const ORDER_REJECTED: &str = "order.rejected";
const SHIPMENT_SCHEDULED: &str = "shipment.scheduled";

/// Longest id (order, customer, shipment) accepted from an event or a query.
const MAX_ID_LEN: usize = 100;
/// Longest rejection reason kept in a notification's text (longer ones are cut).
const MAX_REASON_CHARS: usize = 300;

/// The notifications service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    let handler: Arc<dyn Handler> = Arc::new(Notify);
    Service::new("notifications")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .topic(TopicSpec::new(ORDERS_TOPIC, PARTITIONS))
        .topic(TopicSpec::new(SHIPPING_TOPIC, PARTITIONS))
        .consume_with(ORDERS_TOPIC, Some(GROUP), options(), handler.clone())
        .consume_with(SHIPPING_TOPIC, Some(GROUP), options(), handler)
        .routes(router())
}

/// Three attempts, a quick first retry (a passing failure, such as a busy
/// database, clears fast), and the default window of deliveries in flight, so a
/// message waiting for its retry does not block the partition behind it.
fn options() -> SubscribeOptions {
    SubscribeOptions {
        max_deliveries: MAX_DELIVERIES,
        backoff_initial_ms: 250,
        backoff_max_ms: 5_000,
        ..SubscribeOptions::default()
    }
}

fn router() -> Router {
    Router::new().route("/internal/notifications", get(list))
}

#[derive(Debug, Deserialize)]
struct OrderApproved {
    order_id: String,
    customer_id: String,
    total_cents: i64,
}

#[derive(Debug, Deserialize)]
struct OrderRejected {
    order_id: String,
    customer_id: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct ShipmentScheduled {
    shipment_id: String,
    order_id: String,
    customer_id: String,
}

/// A notification about to be recorded.
struct Notice {
    customer_id: String,
    order_id: String,
    text: String,
}

/// Records a notification for each event it knows, inside the inbox transaction.
struct Notify;

impl Handler for Notify {
    fn handle<'a>(
        &'a self,
        _ctx: &'a Ctx,
        message: &'a Message,
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let Some(kind) = message.headers.get(TYPE_HEADER).map(String::as_str) else {
                return Ok(());
            };
            let Some(notice) = read(kind, message)? else {
                return Ok(());
            };
            record(kind, message, &notice, tx).await
        })
    }
}

fn unreadable(kind: &str, message: &Message, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        Origin::Upstream,
        format!(
            "{kind} {} on {} cannot be read: {why}",
            message.id, message.topic
        ),
    )
}

/// The notice for an event, `None` for a type this service does not handle (on
/// a topic it does not expect it on, too), an error for one it cannot read.
fn read(kind: &str, message: &Message) -> Result<Option<Notice>, Error> {
    fn body<T: serde::de::DeserializeOwned>(kind: &str, m: &Message) -> Result<T, Error> {
        serde_json::from_slice(&m.payload).map_err(|e| unreadable(kind, m, e))
    }
    let notice = match (message.topic.as_str(), kind) {
        (ORDERS_TOPIC, ORDER_APPROVED) => {
            let e: OrderApproved = body(kind, message)?;
            let text = format!(
                "Your order {} was approved (total {}).",
                e.order_id,
                euros(e.total_cents)
            );
            Notice {
                customer_id: e.customer_id,
                order_id: e.order_id,
                text,
            }
        }
        (ORDERS_TOPIC, ORDER_REJECTED) => {
            let e: OrderRejected = body(kind, message)?;
            let reason: String = e.reason.trim().chars().take(MAX_REASON_CHARS).collect();
            let text = match reason.is_empty() {
                true => format!("Your order {} was rejected.", e.order_id),
                false => format!("Your order {} was rejected: {reason}.", e.order_id),
            };
            Notice {
                customer_id: e.customer_id,
                order_id: e.order_id,
                text,
            }
        }
        (SHIPPING_TOPIC, SHIPMENT_SCHEDULED) => {
            let e: ShipmentScheduled = body(kind, message)?;
            check_id(kind, message, "shipment_id", &e.shipment_id)?;
            let text = format!(
                "Your order {} is scheduled for shipping (shipment {}).",
                e.order_id, e.shipment_id
            );
            Notice {
                customer_id: e.customer_id,
                order_id: e.order_id,
                text,
            }
        }
        _ => return Ok(None),
    };
    check_id(kind, message, "order_id", &notice.order_id)?;
    check_id(kind, message, "customer_id", &notice.customer_id)?;
    Ok(Some(notice))
}

fn check_id(kind: &str, message: &Message, field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() || value.len() > MAX_ID_LEN {
        return Err(unreadable(
            kind,
            message,
            format!("{field} must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    Ok(())
}

/// `12345` → `EUR 123.45` (money is integer cents, EUR).
fn euros(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("EUR {sign}{}.{:02}", abs / 100, abs % 100)
}

async fn record(
    kind: &str,
    message: &Message,
    notice: &Notice,
    tx: &mut AnyConnection,
) -> Result<(), Error> {
    let inserted = sqlx::query(
        "INSERT INTO notifications (message_id, customer_id, order_id, kind, text, created_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (order_id, kind) DO NOTHING",
    )
    .bind(&message.id)
    .bind(&notice.customer_id)
    .bind(&notice.order_id)
    .bind(kind)
    .bind(&notice.text)
    .bind(now_ms())
    .execute(&mut *tx)
    .await
    .map_err(|e| Error::internal("recording a notification").with_source(e))?;
    if inserted.rows_affected() == 0 {
        tracing::info!(order_id = %notice.order_id, kind, message_id = %message.id, "already notified");
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    customer_id: Option<String>,
}

/// A notification as the API shows it.
#[derive(Debug, Serialize)]
struct Notification {
    customer_id: String,
    order_id: String,
    kind: String,
    text: String,
    created_at: String,
}

fn validation_failed(message: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "validation_failed",
        message,
    )
}

async fn list(ctx: Ctx, Query(q): Query<ListQuery>) -> Result<Json<Vec<Notification>>, ApiError> {
    let customer_id = q.customer_id.as_deref().map(str::trim).unwrap_or("");
    if customer_id.is_empty() {
        return Err(validation_failed("customer_id is required"));
    }
    if customer_id.len() > MAX_ID_LEN {
        return Err(validation_failed(&format!(
            "customer_id is longer than {MAX_ID_LEN} characters"
        )));
    }
    // Newest first; within one millisecond a shipment (which follows its order's
    // approval) counts as the newer.
    let rows = sqlx::query_as::<_, (String, String, String, String, i64)>(
        "SELECT customer_id, order_id, kind, text, created_at_ms FROM notifications
         WHERE customer_id = $1
         ORDER BY created_at_ms DESC,
                  CASE kind WHEN 'shipment.scheduled' THEN 1 ELSE 0 END DESC,
                  message_id DESC
         LIMIT $2",
    )
    .bind(customer_id)
    .bind(MAX_LISTED)
    .fetch_all(ctx.db().pool())
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "notifications query failed");
        ApiError::internal("database error")
    })?;
    Ok(Json(
        rows.into_iter()
            .map(
                |(customer_id, order_id, kind, text, created_at_ms)| Notification {
                    customer_id,
                    order_id,
                    kind,
                    text,
                    created_at: shoal_telemetry::logging::rfc3339(created_at_ms.max(0) as u64),
                },
            )
            .collect(),
    ))
}

#[cfg(test)]
mod tests;
