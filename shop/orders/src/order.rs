//! The order aggregate: its events, the state they fold into, and the decisions
//! that append them. Every decision looks at the state first, so repeating one (a
//! saga step retried after a crash) appends nothing the second time.

use serde::{Deserialize, Serialize};
use shoal::events::{Aggregate, EventStore, Metadata};
use shoal::Error;

/// One line of an order, priced when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) product_id: String,
    pub(crate) quantity: u32,
    pub(crate) price_cents: i64,
}

/// Where an order stands, as the API shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum Status {
    #[default]
    Pending,
    Approved,
    Rejected,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Approved => "APPROVED",
            Self::Rejected => "REJECTED",
        }
    }
}

/// Why an order was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reason {
    OutOfStock,
    PaymentDeclined,
    PaymentUnavailable,
    UnknownProduct,
}

impl Reason {
    pub(crate) const ALL: [Reason; 4] = [
        Self::OutOfStock,
        Self::PaymentDeclined,
        Self::PaymentUnavailable,
        Self::UnknownProduct,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentUnavailable => "payment_unavailable",
            Self::UnknownProduct => "unknown_product",
        }
    }

    /// The reason a saga's failure text names, if any (steps refuse with these).
    pub(crate) fn found_in(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| text.contains(r.as_str()))
    }
}

/// What happens to an order. Stored with its `type` inside the data (the store
/// decodes events from their data alone); the history shows the data without it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum OrderEvent {
    /// Accepted from the customer: prices and total fixed at this moment.
    OrderPlaced {
        customer_id: String,
        items: Vec<Item>,
        total_cents: i64,
        card_last4: String,
        placed_at_ms: u64,
    },
    /// Inventory holds the stock.
    StockReserved,
    /// The card was authorized for the total.
    PaymentAuthorized,
    /// The money was taken (the saga's point of no return).
    PaymentCaptured,
    /// The held stock left the warehouse's books.
    StockCommitted,
    /// The order went through.
    OrderApproved,
    /// The order did not go through; nothing of it stays reserved or charged.
    OrderRejected { reason: Option<Reason> },
}

/// An order's state, folded from its events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) placed: bool,
    pub(crate) customer_id: String,
    pub(crate) items: Vec<Item>,
    pub(crate) total_cents: i64,
    pub(crate) card_last4: String,
    pub(crate) placed_at_ms: u64,
    pub(crate) status: Status,
    pub(crate) reason: Option<Reason>,
    pub(crate) stock_reserved: bool,
    pub(crate) payment_authorized: bool,
    pub(crate) payment_captured: bool,
    pub(crate) stock_committed: bool,
}

impl Aggregate for Order {
    type Event = OrderEvent;
    const KIND: &'static str = "order";
    const SNAPSHOT_EVERY: u64 = 0;

    fn event_type(event: &OrderEvent) -> &'static str {
        match event {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::StockReserved => "StockReserved",
            OrderEvent::PaymentAuthorized => "PaymentAuthorized",
            OrderEvent::PaymentCaptured => "PaymentCaptured",
            OrderEvent::StockCommitted => "StockCommitted",
            OrderEvent::OrderApproved => "OrderApproved",
            OrderEvent::OrderRejected { .. } => "OrderRejected",
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                items,
                total_cents,
                card_last4,
                placed_at_ms,
            } => {
                self.placed = true;
                self.customer_id = customer_id.clone();
                self.items = items.clone();
                self.total_cents = *total_cents;
                self.card_last4 = card_last4.clone();
                self.placed_at_ms = *placed_at_ms;
            }
            OrderEvent::StockReserved => self.stock_reserved = true,
            OrderEvent::PaymentAuthorized => self.payment_authorized = true,
            OrderEvent::PaymentCaptured => self.payment_captured = true,
            OrderEvent::StockCommitted => self.stock_committed = true,
            OrderEvent::OrderApproved => self.status = Status::Approved,
            OrderEvent::OrderRejected { reason } => {
                self.status = Status::Rejected;
                self.reason = *reason;
            }
        }
    }
}

impl Order {
    /// Whether `event` (a step's progress) still has to be recorded.
    fn lacks(&self, event: &OrderEvent) -> bool {
        match event {
            OrderEvent::StockReserved => !self.stock_reserved,
            OrderEvent::PaymentAuthorized => !self.payment_authorized,
            OrderEvent::PaymentCaptured => !self.payment_captured,
            OrderEvent::StockCommitted => !self.stock_committed,
            _ => true,
        }
    }
}

/// The total the business rules ask for: Σ price × quantity.
pub(crate) fn total_of(items: &[Item]) -> i64 {
    items
        .iter()
        .map(|i| i.price_cents * i64::from(i.quantity))
        .sum()
}

fn meta(order_id: &str) -> Metadata {
    Metadata {
        correlation_id: Some(order_id.to_string()),
        ..Metadata::default()
    }
}

/// Place the order (once: a repeat changes nothing), rejected at once when a
/// product is unknown. Answers the state after it.
pub(crate) async fn place(
    store: &EventStore,
    id: &str,
    placed: OrderEvent,
    unknown_product: bool,
) -> Result<Order, Error> {
    let (state, _) = store
        .execute::<Order, _>(id, meta(id), |state| {
            if state.placed {
                return Ok(vec![]);
            }
            let mut events = vec![placed.clone()];
            if unknown_product {
                events.push(OrderEvent::OrderRejected {
                    reason: Some(Reason::UnknownProduct),
                });
            }
            Ok(events)
        })
        .await?;
    Ok(state)
}

/// Record a step's progress, unless it is recorded already.
pub(crate) async fn record(store: &EventStore, id: &str, event: OrderEvent) -> Result<(), Error> {
    store
        .execute::<Order, _>(id, meta(id), |state| {
            Ok(match state.placed && state.lacks(&event) {
                true => vec![event.clone()],
                false => vec![],
            })
        })
        .await?;
    Ok(())
}

/// End a pending order: approved, or rejected for `reason`. An order that ended
/// already keeps its end.
pub(crate) async fn finish(
    store: &EventStore,
    id: &str,
    outcome: Result<(), Option<Reason>>,
) -> Result<(), Error> {
    store
        .execute::<Order, _>(id, meta(id), |state| {
            if !state.placed || state.status != Status::Pending {
                return Ok(vec![]);
            }
            Ok(vec![match outcome {
                Ok(()) => OrderEvent::OrderApproved,
                Err(reason) => OrderEvent::OrderRejected { reason },
            }])
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            customer_id: "alice".into(),
            items: vec![Item {
                product_id: "p-1".into(),
                quantity: 2,
                price_cents: 150,
            }],
            total_cents: 300,
            card_last4: "4242".into(),
            placed_at_ms: 1,
        }
    }

    #[test]
    fn events_fold_into_the_state() {
        let mut o = Order::default();
        for e in [
            placed(),
            OrderEvent::StockReserved,
            OrderEvent::PaymentAuthorized,
            OrderEvent::OrderRejected {
                reason: Some(Reason::PaymentDeclined),
            },
        ] {
            o.apply(&e);
        }
        assert!(o.placed && o.stock_reserved && o.payment_authorized);
        assert_eq!(o.status, Status::Rejected);
        assert_eq!(o.reason, Some(Reason::PaymentDeclined));
        assert_eq!(o.total_cents, 300);
        assert!(!o.lacks(&OrderEvent::StockReserved));
        assert!(o.lacks(&OrderEvent::PaymentCaptured));
    }

    #[test]
    fn events_are_stored_with_their_type_and_reasons_in_snake_case() {
        let v = serde_json::to_value(OrderEvent::OrderRejected {
            reason: Some(Reason::OutOfStock),
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "OrderRejected", "reason": "out_of_stock"})
        );
        let back: OrderEvent = serde_json::from_value(v).unwrap();
        assert_eq!(Order::event_type(&back), "OrderRejected");
        assert_eq!(
            Reason::found_in("step authorize failed: payment_unavailable: deadline"),
            Some(Reason::PaymentUnavailable)
        );
        assert_eq!(Reason::found_in("inventory answered 500"), None);
        assert_eq!(total_of(&[]), 0);
    }
}
