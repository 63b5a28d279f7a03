//! The read side: `orders_view` (one row per order, for lists) and the publisher
//! that turns an order's end into an event on `orders.events`. Both are
//! projections of the event store, so each change commits together with its
//! checkpoint: a crash can neither skip an event nor apply it twice, and the
//! event store itself is the outbox of the order's end.

use crate::order::{Order, OrderEvent};
use serde_json::json;
use shoal::bus::OutgoingMessage;
use shoal::events::{EventStore, Projection, ProjectionFuture, RecordedEvent};
use shoal::messaging::Outbox;
use shoal::sqlx::AnyConnection;
use shoal::Error;

/// The topic orders publish their ends on.
pub(crate) const TOPIC: &str = "orders.events";
/// Its partitions (messages are keyed by order id).
pub(crate) const PARTITIONS: u32 = 4;

fn order_id(event: &RecordedEvent) -> &str {
    event.stream.strip_prefix("order-").unwrap_or(&event.stream)
}

fn db_error(e: shoal::sqlx::Error) -> Error {
    Error::internal("orders read model").with_source(e)
}

/// Keeps `orders_view` current.
pub(crate) struct OrdersView;

impl Projection for OrdersView {
    fn name(&self) -> &str {
        "orders_view"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            let id = order_id(event);
            let version = event.version as i64;
            match event.decode::<OrderEvent>()? {
                OrderEvent::OrderPlaced {
                    customer_id,
                    items,
                    total_cents,
                    placed_at_ms,
                    ..
                } => {
                    let items = serde_json::to_string(&items)
                        .map_err(|e| Error::internal("encoding items").with_source(e))?;
                    shoal::sqlx::query(
                        "INSERT INTO orders_view
                           (id, customer_id, status, reason, total_cents, items, placed_at_ms, version)
                         VALUES ($1, $2, 'PENDING', NULL, $3, $4, $5, $6)
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(customer_id)
                    .bind(total_cents)
                    .bind(items)
                    .bind(placed_at_ms as i64)
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                }
                OrderEvent::OrderApproved => {
                    set_status(tx, id, "APPROVED", None, version).await?;
                }
                OrderEvent::OrderRejected { reason } => {
                    set_status(tx, id, "REJECTED", reason.map(|r| r.as_str()), version).await?;
                }
                _ => {
                    shoal::sqlx::query("UPDATE orders_view SET version = $1 WHERE id = $2")
                        .bind(version)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                }
            }
            Ok(())
        })
    }

    fn reset<'a>(&'a self, tx: &'a mut AnyConnection) -> ProjectionFuture<'a> {
        Box::pin(async move {
            shoal::sqlx::query("DELETE FROM orders_view")
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            Ok(())
        })
    }
}

async fn set_status(
    tx: &mut AnyConnection,
    id: &str,
    status: &str,
    reason: Option<&str>,
    version: i64,
) -> Result<(), Error> {
    shoal::sqlx::query(
        "UPDATE orders_view SET status = $1, reason = $2, version = $3 WHERE id = $4",
    )
    .bind(status)
    .bind(reason)
    .bind(version)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Publishes `order.approved` and `order.rejected` through the outbox, in the
/// projection's transaction. The message id is the event's, so a consumer's inbox
/// recognises a repeat whatever happens on the way.
pub(crate) struct Publisher {
    pub(crate) store: EventStore,
    pub(crate) outbox: Outbox,
}

/// The message an order's end becomes, or `None` for the other events.
pub(crate) fn message_for(
    order: &Order,
    id: &str,
    event: &OrderEvent,
) -> Option<(&'static str, serde_json::Value)> {
    match event {
        OrderEvent::OrderApproved => Some((
            "order.approved",
            json!({
                "order_id": id,
                "customer_id": order.customer_id,
                "items": order.items,
                "total_cents": order.total_cents,
            }),
        )),
        OrderEvent::OrderRejected { reason } => Some((
            "order.rejected",
            json!({
                "order_id": id,
                "customer_id": order.customer_id,
                "reason": reason.map(|r| r.as_str()),
            }),
        )),
        _ => None,
    }
}

impl Projection for Publisher {
    fn name(&self) -> &str {
        "orders_publisher"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            let decoded = event.decode::<OrderEvent>()?;
            if !matches!(
                decoded,
                OrderEvent::OrderApproved | OrderEvent::OrderRejected { .. }
            ) {
                return Ok(());
            }
            let id = order_id(event);
            // The order's earlier events are committed (they come before this one).
            let order = self.store.load::<Order>(id).await?.state;
            let Some((kind, body)) = message_for(&order, id, &decoded) else {
                return Ok(());
            };
            let payload = serde_json::to_vec(&body)
                .map_err(|e| Error::internal("encoding an order event").with_source(e))?;
            let mut m = OutgoingMessage::new(payload).with_key(id);
            m.id = event.id.clone();
            m.headers.insert("type".into(), kind.into());
            m.headers.insert(
                shoal::bus::headers::CORRELATION_ID.into(),
                event
                    .metadata
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| id.to_string()),
            );
            self.outbox.enqueue(tx, TOPIC, &m).await
        })
    }

    fn reset<'a>(&'a self, _tx: &'a mut AnyConnection) -> ProjectionFuture<'a> {
        // Nothing to empty: a rebuild publishes again, with the same message ids.
        Box::pin(async { Ok(()) })
    }
}
