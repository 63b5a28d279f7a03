//! The reference shop's shipping service: schedules exactly one shipment per
//! approved order.
//!
//! It takes part in the order process by **choreography**: nobody calls it. It
//! consumes `orders.events` in the group `shipping` and, on `order.approved`,
//! records a shipment and puts `shipment.scheduled`
//! `{"shipment_id","order_id","customer_id"}` on `shipping.events` (key: the order
//! id) through the transactional outbox, in the same transaction as the inbox entry
//! and the shipment row. So either all three happen or none does, and:
//!
//! - a redelivery of the same message is dropped by the inbox;
//! - the same order approved twice under two message ids (a producer's retry, a
//!   replay) finds the shipment already there (`UNIQUE order_id`) and changes
//!   nothing, publishing nothing either;
//! - the event is built with `OutgoingMessage::caused_by`, so it carries the
//!   order's correlation id and names the approval as its cause.
//!
//! Other event types on `orders.events` (`order.rejected`, types added later) are
//! acked and ignored. An `order.approved` this service cannot read (not JSON,
//! fields missing or too long) fails: it is delivered again and, after the
//! subscription's attempts, dead-lettered to `orders.events.dead`, where it can be
//! looked at, instead of being dropped as if no order had been approved.
//!
//! The shipment id is derived from the order id (`shp-<order id>`): one order has
//! one shipment, and the id is the same however often the approval is seen.
//!
//! - `GET /internal/shipments/by-order/{order_id}` answers
//!   `{"shipment_id","order_id","status":"scheduled","created_at"}` (RFC 3339) or 404.

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal::bus::{OutgoingMessage, TopicSpec};
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

/// Where the orders service publishes order events.
pub const ORDERS_TOPIC: &str = "orders.events";
/// Where this service publishes shipping events.
pub const SHIPPING_TOPIC: &str = "shipping.events";
/// Partitions of both topics (docs/shop.md); declaring a topic that exists with
/// the same partitions is a no-op, so whichever service starts first creates it.
const PARTITIONS: u32 = 4;

/// The message header that names the event.
const TYPE_HEADER: &str = "type";
/// The event this service reacts to.
const ORDER_APPROVED: &str = "order.approved";
/// The event it publishes.
pub const SHIPMENT_SCHEDULED: &str = "shipment.scheduled";
/// Longest order or customer id accepted from an event (and in a path): longer
/// ones are not the shop's ids.
const MAX_ID_LEN: usize = 100;

/// The shipping service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("shipping")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .topic(TopicSpec::new(ORDERS_TOPIC, PARTITIONS))
        .topic(TopicSpec::new(SHIPPING_TOPIC, PARTITIONS))
        .outbox()
        .consume(ORDERS_TOPIC, Arc::new(OnOrderEvent))
        .routes(router())
}

fn router() -> Router {
    Router::new().route(
        "/internal/shipments/by-order/{order_id}",
        get(shipment_by_order),
    )
}

/// What shipping reads of `order.approved`; other fields are the orders service's
/// to add (a tolerant reader).
#[derive(Debug, Deserialize)]
struct OrderApproved {
    order_id: String,
    customer_id: String,
}

/// The body of `shipment.scheduled`.
#[derive(Debug, Serialize)]
struct ShipmentScheduled<'a> {
    shipment_id: &'a str,
    order_id: &'a str,
    customer_id: &'a str,
}

/// Reacts to `orders.events`, inside the inbox transaction.
struct OnOrderEvent;

impl Handler for OnOrderEvent {
    fn handle<'a>(
        &'a self,
        ctx: &'a Ctx,
        message: &'a Message,
        tx: &'a mut AnyConnection,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            if message.headers.get(TYPE_HEADER).map(String::as_str) != Some(ORDER_APPROVED) {
                return Ok(());
            }
            let event = read_approved(message)?;
            schedule(ctx, message, &event, tx).await
        })
    }
}

fn unreadable(message: &Message, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        Origin::Upstream,
        format!("order.approved {} cannot be read: {why}", message.id),
    )
}

fn read_approved(message: &Message) -> Result<OrderApproved, Error> {
    let event: OrderApproved =
        serde_json::from_slice(&message.payload).map_err(|e| unreadable(message, e))?;
    for (field, value) in [
        ("order_id", &event.order_id),
        ("customer_id", &event.customer_id),
    ] {
        if value.trim().is_empty() || value.len() > MAX_ID_LEN {
            return Err(unreadable(
                message,
                format!("{field} must be 1 to {MAX_ID_LEN} characters"),
            ));
        }
    }
    Ok(event)
}

fn shipment_id(order_id: &str) -> String {
    format!("shp-{order_id}")
}

fn db_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::internal(what).with_source(e)
}

/// Record the shipment and its event, unless the order has one already.
async fn schedule(
    ctx: &Ctx,
    cause: &Message,
    event: &OrderApproved,
    tx: &mut AnyConnection,
) -> Result<(), Error> {
    let shipment_id = shipment_id(&event.order_id);
    let inserted = sqlx::query(
        "INSERT INTO shipments (shipment_id, order_id, customer_id, status, created_at_ms)
         VALUES ($1, $2, $3, 'scheduled', $4)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&shipment_id)
    .bind(&event.order_id)
    .bind(&event.customer_id)
    .bind(now_ms())
    .execute(&mut *tx)
    .await
    .map_err(db_error("recording a shipment"))?;
    if inserted.rows_affected() == 0 {
        tracing::info!(order_id = %event.order_id, message_id = %cause.id, "order already has a shipment; nothing to do");
        return Ok(());
    }
    let body = serde_json::to_vec(&ShipmentScheduled {
        shipment_id: &shipment_id,
        order_id: &event.order_id,
        customer_id: &event.customer_id,
    })
    .map_err(|e| Error::internal("encoding shipment.scheduled").with_source(e))?;
    let out = OutgoingMessage::new(body)
        .with_key(&event.order_id)
        .with_header(TYPE_HEADER, SHIPMENT_SCHEDULED)
        .caused_by(cause);
    ctx.outbox().enqueue(tx, SHIPPING_TOPIC, &out).await?;
    tracing::info!(order_id = %event.order_id, %shipment_id, "shipment scheduled");
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A shipment as the API shows it.
#[derive(Debug, Serialize)]
struct Shipment {
    shipment_id: String,
    order_id: String,
    status: String,
    created_at: String,
}

async fn shipment_by_order(
    ctx: Ctx,
    Path(order_id): Path<String>,
) -> Result<Json<Shipment>, ApiError> {
    if order_id.len() > MAX_ID_LEN {
        return Err(ApiError::not_found("no shipment for this order"));
    }
    let row = sqlx::query_as::<_, (String, String, String, i64)>(
        "SELECT shipment_id, order_id, status, created_at_ms FROM shipments WHERE order_id = $1",
    )
    .bind(&order_id)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "shipments query failed");
        ApiError::internal("database error")
    })?;
    match row {
        Some((shipment_id, order_id, status, created_at_ms)) => Ok(Json(Shipment {
            shipment_id,
            order_id,
            status,
            created_at: shoal_telemetry::logging::rfc3339(created_at_ms.max(0) as u64),
        })),
        None => Err(ApiError::not_found(format!(
            "no shipment for order {order_id}"
        ))),
    }
}

#[cfg(test)]
mod tests;
