//! Notifications against a real embedded broker (in this process, on 127.0.0.1).

use super::*;
use shoal::bus::{headers, Consumer, Delivery, OutgoingMessage, SharedBus};
use shoal::testing::contract::{Contract, MessageExample};
use shoal::testing::{self, DataDir};
use std::time::Duration;

/// How long a test waits for something that should happen within a second or two.
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

    async fn publish(&self, topic: &str, message: OutgoingMessage) -> String {
        let id = message.id.clone();
        shoal::bus::publish_one(&*self.bus, topic, message)
            .await
            .unwrap();
        id
    }

    /// Publish a contract's example event (its topic and headers) with `changes`
    /// made to its body; keyed by its order id, as the producers do.
    async fn publish_example(&self, example: &MessageExample, changes: &[(&str, &str)]) -> String {
        let mut body = example.body.clone();
        for (k, v) in changes {
            body[*k] = (*v).into();
        }
        let key = body["order_id"].as_str().unwrap().to_string();
        let mut m = OutgoingMessage::new(serde_json::to_vec(&body).unwrap()).with_key(key);
        for (k, v) in &example.headers {
            m = m.with_header(k, v);
        }
        self.publish(&example.topic, m).await
    }
}

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("no delivery in time")
        .expect("delivery")
}

async fn start(bus: &TestBus, dir: &std::path::Path) -> shoal::RunningService {
    testing::start_alone(service().bus(bus.bus.clone()), dir)
        .await
        .unwrap()
}

async fn list(addr: std::net::SocketAddr, customer_id: &str) -> Vec<serde_json::Value> {
    let a = testing::get(
        addr,
        &format!("/internal/notifications?customer_id={customer_id}"),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    a.json().as_array().unwrap().clone()
}

/// The customer's notifications once there are `n` of them.
async fn wait_for(
    addr: std::net::SocketAddr,
    customer_id: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = list(addr, customer_id).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{customer_id} has {} notifications, not {n}: {got:?}",
            got.len()
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

async fn wait_handled(addr: std::net::SocketAddr, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(addr, "shoal_inbox_processed_total").await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} messages handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_and_shipping_events_become_notifications_newest_first() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-notifications-events");
    let running = start(&bus, &dir).await;
    let addr = running.addr();
    let orders = contract("notifications--orders.json");
    let shipping = contract("notifications--shipping.json");
    assert_eq!(orders.provider, "orders");
    assert_eq!(shipping.provider, "shipping");

    // One at a time, so "newest first" has an order to show.
    bus.publish_example(orders.message("an approved order"), &[])
        .await;
    wait_for(addr, "alice", 1).await;
    bus.publish_example(shipping.message("a scheduled shipment"), &[])
        .await;
    wait_for(addr, "alice", 2).await;
    bus.publish_example(orders.message("a rejected order"), &[])
        .await;
    let got = wait_for(addr, "alice", 3).await;

    let summary: Vec<(&str, &str)> = got
        .iter()
        .map(|n| (n["kind"].as_str().unwrap(), n["order_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("order.rejected", "o-2"),
            ("shipment.scheduled", "o-1"),
            ("order.approved", "o-1")
        ]
    );
    assert_eq!(
        got[0]["text"],
        "Your order o-2 was rejected: out of stock: p-3."
    );
    assert_eq!(
        got[1]["text"],
        "Your order o-1 is scheduled for shipping (shipment shp-o-1)."
    );
    assert_eq!(
        got[2]["text"],
        "Your order o-1 was approved (total EUR 259.98)."
    );
    for n in &got {
        assert_eq!(n["customer_id"], "alice");
        let created = n["created_at"].as_str().unwrap();
        assert!(created.ends_with('Z') && created.len() == 24, "{created}");
    }

    // The same event under another message id tells nobody twice; another
    // customer's orders are theirs.
    bus.publish_example(orders.message("an approved order"), &[])
        .await;
    bus.publish_example(
        orders.message("an approved order"),
        &[("order_id", "o-3"), ("customer_id", "bob")],
    )
    .await;
    let bobs = wait_for(addr, "bob", 1).await;
    assert_eq!(bobs[0]["order_id"], "o-3");
    wait_handled(addr, 5.0).await;
    assert_eq!(list(addr, "alice").await.len(), 3);
    assert!(list(addr, "carol").await.is_empty());
    running.shutdown().await.unwrap();
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_ones_behind_it_still_go_through() {
    let bus = TestBus::start().await;
    let dir = DataDir::new("shop-notifications-poison");
    let running = start(&bus, &dir).await;
    let addr = running.addr();
    let orders = contract("notifications--orders.json");

    // Not JSON, on the same key (so the same partition) as the good event after it.
    let poison = bus
        .publish(
            ORDERS_TOPIC,
            OutgoingMessage::new(&b"<order id=\"o-10\"/>"[..])
                .with_key("o-10")
                .with_header(TYPE_HEADER, ORDER_APPROVED)
                .with_header(headers::CORRELATION_ID, "checkout-10"),
        )
        .await;
    // JSON, but without the fields a rejection has.
    let incomplete = bus
        .publish(
            ORDERS_TOPIC,
            OutgoingMessage::new(&b"{\"order_id\": \"o-10\"}"[..])
                .with_key("o-10")
                .with_header(TYPE_HEADER, ORDER_REJECTED),
        )
        .await;
    // A type notifications does not know, whatever its body: ignored, not dead.
    bus.publish(
        ORDERS_TOPIC,
        OutgoingMessage::new(&b"\xff\xfe"[..])
            .with_key("o-10")
            .with_header(TYPE_HEADER, "order.archived"),
    )
    .await;
    bus.publish_example(orders.message("an approved order"), &[("order_id", "o-10")])
        .await;

    // The good one is handled without waiting for the bad ones' retries.
    let got = wait_for(addr, "alice", 1).await;
    assert_eq!(got[0]["order_id"], "o-10");
    assert_eq!(got[0]["kind"], "order.approved");

    let mut dead = bus.reader(&format!("{ORDERS_TOPIC}.dead")).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dead).await;
        let h = &d.message.headers;
        assert_eq!(h[headers::DEAD_TOPIC], ORDERS_TOPIC, "{h:?}");
        assert_eq!(h[headers::DEAD_GROUP], "notifications", "{h:?}");
        assert_eq!(
            h[headers::DEAD_ATTEMPTS],
            MAX_DELIVERIES.to_string(),
            "{h:?}"
        );
        assert!(h[headers::DEAD_POSITION].contains('/'), "{h:?}");
        assert_eq!(d.message.key.as_deref(), Some("o-10"));
        if d.message.id == poison {
            assert_eq!(h[TYPE_HEADER], ORDER_APPROVED);
            assert_eq!(h[headers::CORRELATION_ID], "checkout-10");
            assert_eq!(&d.message.payload[..], b"<order id=\"o-10\"/>");
        }
        seen.push(d.message.id.clone());
        dead.ack(&d).await.unwrap();
    }
    seen.sort();
    let mut want = vec![poison, incomplete];
    want.sort();
    assert_eq!(seen, want);
    // Nothing else went there (the unknown type was acked, not dead-lettered).
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(1_500), dead.next()).await {
        panic!("unexpected dead letter: {:?}", d.unwrap().message.headers);
    }
    assert_eq!(list(addr, "alice").await.len(), 1);
    running.shutdown().await.unwrap();
    bus.close().await;
}

#[tokio::test]
async fn the_list_needs_a_customer_id() {
    let dir = DataDir::new("shop-notifications-query");
    // No bus needed to answer queries; without one, no consumers either.
    let running = testing::start_alone(
        Service::new("notifications")
            .database(MIGRATIONS)
            .routes(router()),
        &dir,
    )
    .await
    .unwrap();
    let long = format!("/internal/notifications?customer_id={}", "x".repeat(500));
    for path in [
        "/internal/notifications",
        "/internal/notifications?customer_id=",
        "/internal/notifications?customer_id=%20",
        long.as_str(),
    ] {
        let a = testing::get(running.addr(), path).await.unwrap();
        assert_eq!(a.status, 400, "{path}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "validation_failed");
    }
    let a = testing::get(running.addr(), "/internal/notifications?customer_id=alice")
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.json(), serde_json::json!([]));
    running.shutdown().await.unwrap();
}

#[test]
fn money_reads_as_euros() {
    assert_eq!(euros(25998), "EUR 259.98");
    assert_eq!(euros(5), "EUR 0.05");
    assert_eq!(euros(0), "EUR 0.00");
    assert_eq!(euros(-150), "EUR -1.50");
}
