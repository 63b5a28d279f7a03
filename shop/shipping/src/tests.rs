//! Shipping against a real embedded broker (in this process, on 127.0.0.1).

use super::*;
use shoal::bus::{headers, Consumer, Delivery, SharedBus};
use shoal::testing::contract::Contract;
use shoal::testing::{self, DataDir};
use std::time::Duration;

/// How long a test waits for something that should happen within milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn contract(name: &str) -> Contract {
    Contract::load(format!(
        "{}/../contracts/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// A broker of the test's own, served on a free port, and a client of it.
struct TestBus {
    bus: SharedBus,
    broker: testing::TestBroker,
}

impl TestBus {
    async fn start() -> Self {
        let broker = testing::TestBroker::start().await.unwrap();
        let bus = broker.bus().await.unwrap();
        Self { bus, broker }
    }

    async fn close(self) {
        self.broker.broker().close().await;
    }

    /// A reader of `topic` from its start, in a group of its own.
    async fn reader(&self, topic: &str) -> Box<dyn Consumer> {
        self.broker.reader(topic, "test-reader").await.unwrap()
    }

    async fn publish(&self, message: OutgoingMessage) -> String {
        let id = message.id.clone();
        shoal::bus::publish_one(&*self.bus, ORDERS_TOPIC, message)
            .await
            .unwrap();
        id
    }
}

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("no delivery in time")
        .expect("delivery")
}

async fn nothing_more(c: &mut Box<dyn Consumer>) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(1_500), c.next()).await {
        let d = d.expect("delivery");
        panic!(
            "unexpected message: {:?} {}",
            d.message.headers,
            String::from_utf8_lossy(&d.message.payload)
        );
    }
}

/// An event as the orders service publishes it (key: the order id).
fn order_event(kind: &str, order_id: &str, body: &serde_json::Value) -> OutgoingMessage {
    OutgoingMessage::new(serde_json::to_vec(body).unwrap())
        .with_key(order_id)
        .with_header(TYPE_HEADER, kind)
}

/// The consumer contract's `order.approved`, for another order id.
fn approved(order_id: &str) -> OutgoingMessage {
    let c = contract("shipping--orders.json");
    let example = c.message("an approved order");
    let mut body = example.body.clone();
    body["order_id"] = order_id.into();
    let mut m = order_event(ORDER_APPROVED, order_id, &body);
    for (k, v) in &example.headers {
        m = m.with_header(k, v);
    }
    m
}

async fn start(bus: &TestBus, dir: &std::path::Path) -> shoal::RunningService {
    testing::start_alone(service().bus(bus.bus.clone()), dir)
        .await
        .unwrap()
}

async fn shipment(addr: std::net::SocketAddr, order_id: &str) -> testing::Answer {
    testing::get(addr, &format!("/internal/shipments/by-order/{order_id}"))
        .await
        .unwrap()
}

async fn wait_for_shipment(addr: std::net::SocketAddr, order_id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let a = shipment(addr, order_id).await;
        if a.status == 200 {
            return a.json();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no shipment for {order_id}: {}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of a metric's series in the service's `/metrics`.
async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = testing::get(addr, "/metrics").await.unwrap().text();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until the service has handled (committed, or skipped as duplicates) `n`
/// messages of `orders.events`.
async fn wait_handled(addr: std::net::SocketAddr, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(addr, "shoal_inbox_processed_total").await
        + metric(addr, "shoal_inbox_duplicates_total").await
        < n
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} messages handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shipment_count(running: &shoal::RunningService) -> i64 {
    let (n,) = sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM shipments")
        .fetch_one(running.ctx().db().pool())
        .await
        .unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_order_schedules_one_shipment_and_keeps_the_correlation() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-shipping-one");
    let running = start(&bus, &dir).await;
    let mut events = bus.reader(SHIPPING_TOPIC).await;

    let cause = approved("o-1").with_header(headers::CORRELATION_ID, "checkout-42");
    let cause_id = bus.publish(cause).await;

    let d = next(&mut events).await;
    let m = &d.message;
    let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"shipment_id": "shp-o-1", "order_id": "o-1", "customer_id": "alice"})
    );
    assert_eq!(m.key.as_deref(), Some("o-1"));
    assert_eq!(m.headers[TYPE_HEADER], SHIPMENT_SCHEDULED);
    assert_eq!(m.headers[headers::CORRELATION_ID], "checkout-42");
    assert_eq!(m.headers[headers::CAUSATION_ID], cause_id);
    // What notifications relies on, checked against the real event.
    contract("notifications--shipping.json")
        .message("a scheduled shipment")
        .check(&m.topic, &m.headers, &body)
        .unwrap();
    events.ack(&d).await.unwrap();

    let s = wait_for_shipment(running.addr(), "o-1").await;
    assert_eq!(s["shipment_id"], "shp-o-1");
    assert_eq!(s["order_id"], "o-1");
    assert_eq!(s["status"], "scheduled");
    let created = s["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "{created}");
    assert_eq!(shipment(running.addr(), "o-2").await.status, 404);
    nothing_more(&mut events).await;
    running.shutdown().await.unwrap();
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_approved_twice_is_still_one_shipment() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-shipping-twice");
    let running = start(&bus, &dir).await;
    let mut events = bus.reader(SHIPPING_TOPIC).await;

    // Two messages (two ids, so the inbox does not recognise the second) for one order.
    let first = bus.publish(approved("o-7")).await;
    let second = bus.publish(approved("o-7")).await;
    assert_ne!(first, second);
    wait_handled(running.addr(), 2.0).await;

    assert_eq!(
        metric(running.addr(), "shoal_inbox_processed_total").await,
        2.0
    );
    assert_eq!(shipment_count(&running).await, 1);
    let d = next(&mut events).await;
    assert_eq!(d.message.headers[headers::CAUSATION_ID], first);
    events.ack(&d).await.unwrap();
    nothing_more(&mut events).await;
    assert_eq!(
        wait_for_shipment(running.addr(), "o-7").await["shipment_id"],
        "shp-o-7"
    );

    // A restart changes nothing either: the shipment and the event stay single.
    running.shutdown().await.unwrap();
    let running = start(&bus, &dir).await;
    bus.publish(approved("o-7")).await;
    wait_handled(running.addr(), 1.0).await;
    assert_eq!(shipment_count(&running).await, 1);
    nothing_more(&mut events).await;
    running.shutdown().await.unwrap();
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_event_types_are_acked_and_ignored() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-shipping-others");
    let running = start(&bus, &dir).await;
    let mut events = bus.reader(SHIPPING_TOPIC).await;

    let rejected =
        serde_json::json!({"order_id": "o-3", "customer_id": "bob", "reason": "card declined"});
    bus.publish(order_event("order.rejected", "o-3", &rejected))
        .await;
    // A type added later, with a body shipping could not read anyway.
    bus.publish(
        OutgoingMessage::new(&b"\x00not json"[..])
            .with_key("o-4")
            .with_header(TYPE_HEADER, "order.archived"),
    )
    .await;
    // No type at all.
    bus.publish(OutgoingMessage::new(&b"{}"[..]).with_key("o-5"))
        .await;
    wait_handled(running.addr(), 3.0).await;

    assert_eq!(
        metric(running.addr(), "shoal_inbox_failed_total").await,
        0.0
    );
    assert_eq!(shipment_count(&running).await, 0);
    assert_eq!(shipment(running.addr(), "o-3").await.status, 404);
    nothing_more(&mut events).await;
    running.shutdown().await.unwrap();
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_approval_is_dead_lettered_not_dropped() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-shipping-poison");
    let running = start(&bus, &dir).await;

    let poison = bus
        .publish(
            OutgoingMessage::new(&b"{\"order_id\": 7}"[..])
                .with_key("o-8")
                .with_header(TYPE_HEADER, ORDER_APPROVED),
        )
        .await;
    bus.publish(approved("o-9")).await;
    // The good one behind it goes through while the bad one waits for its retries.
    wait_for_shipment(running.addr(), "o-9").await;

    let mut dead = bus.reader(&format!("{ORDERS_TOPIC}.dead")).await;
    let d = next(&mut dead).await;
    assert_eq!(d.message.id, poison);
    assert_eq!(d.message.headers[headers::DEAD_TOPIC], ORDERS_TOPIC);
    assert_eq!(d.message.headers[headers::DEAD_GROUP], "shipping");
    assert_eq!(shipment_count(&running).await, 1);
    running.shutdown().await.unwrap();
    bus.close().await;
}

/// The gateway's /details aggregate reads a shipment by order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_its_contract_with_the_gateway() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-shipping-contract");
    let running = start(&bus, &dir).await;
    let c = contract("gateway--shipping.json");
    assert_eq!(c.provider, "shipping");
    let addr = running.addr();
    let bus_ref = &bus;
    c.verify(addr, |state| async move {
        assert_eq!(state, "order o-1 was approved");
        bus_ref.publish(approved("o-1")).await;
        wait_for_shipment(addr, "o-1").await;
    })
    .await
    .unwrap();
    running.shutdown().await.unwrap();
    bus.close().await;
}
