//! The bus conformance suite: what every backend of `shoal_bus::Bus` must do. Each
//! case takes a bus on a fresh or shared server and uses topics and groups of its
//! own, so cases run in parallel. A backend's tests run them all with
//! [`crate::bus_conformance!`]:
//!
//! ```ignore
//! shoal_testkit::bus_conformance!(fresh_bus());
//! ```
//!
//! Every wait is bounded ([`WAIT`]); a case that waits longer fails.

use bytes::Bytes;
pub use shoal_bus::SharedBus;
use shoal_bus::{
    headers, Consumer, Delivery, OutgoingMessage, Published, StartAt, SubscribeOptions, TopicSpec,
};
use shoal_core::ErrorKind;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// The longest any case waits for a delivery it expects.
pub const WAIT: Duration = Duration::from_secs(20);

/// One test per case, each on the bus the async expression `$make` gives.
#[macro_export]
macro_rules! bus_conformance {
    ($make:expr) => {
        $crate::__bus_cases!($make;
            keys_keep_their_order,
            every_published_message_is_delivered_at_least_once,
            a_member_that_dies_without_acking_has_its_messages_redelivered,
            an_unacked_delivery_comes_back_after_its_ack_timeout,
            nacked_messages_come_back_then_go_to_the_dead_letter_topic,
            partitions_are_shared_between_members_and_move_when_one_leaves,
            a_group_replays_from_an_offset_and_from_a_time,
            bad_publishes_are_refused_and_lose_nothing,
            topics_are_created_once,
            lag_counts_what_is_not_acked,
            ids_keys_and_headers_arrive_as_sent,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __bus_cases {
    ($make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let bus: $crate::bus::SharedBus = $make.await;
                $crate::bus::$case(bus).await;
            }
        )*
    };
}

/// A topic name no other case uses.
pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

async fn topic(bus: &SharedBus, tag: &str, partitions: u32) -> String {
    let name = unique(tag);
    bus.create_topic(&TopicSpec::new(&name, partitions))
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
    name
}

fn msg(key: &str, body: String) -> OutgoingMessage {
    OutgoingMessage::new(Bytes::from(body)).with_key(key)
}

/// Options for quick tests: short timeouts and backoff.
pub fn quick() -> SubscribeOptions {
    SubscribeOptions {
        ack_timeout_ms: 1_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 200,
        ..SubscribeOptions::default()
    }
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("next delivery: {e}"))
}

/// The next delivery if one comes within `wait`.
async fn maybe_next(c: &mut Box<dyn Consumer>, wait: Duration) -> Option<Delivery> {
    match tokio::time::timeout(wait, c.next()).await {
        Ok(d) => Some(d.unwrap_or_else(|e| panic!("next delivery: {e}"))),
        Err(_) => None,
    }
}

async fn publish(bus: &SharedBus, topic: &str, batch: Vec<OutgoingMessage>) -> Vec<Published> {
    bus.publish(topic, batch)
        .await
        .unwrap_or_else(|e| panic!("publish to {topic}: {e}"))
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.payload).into_owned()
}

/// Messages with one key arrive in the order they were published, across batches
/// and partitions.
pub async fn keys_keep_their_order(bus: SharedBus) {
    let t = topic(&bus, "order", 4).await;
    let keys = 12;
    let per_key = 20;
    for round in 0..per_key {
        let batch = (0..keys)
            .map(|k| msg(&format!("k{k}"), format!("k{k}:{round}")))
            .collect();
        publish(&bus, &t, batch).await;
    }
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let mut last: HashMap<String, i64> = HashMap::new();
    for _ in 0..keys * per_key {
        let d = next(&mut c).await;
        let body = text(&d);
        let (key, n) = body.split_once(':').expect("key:n");
        let n: i64 = n.parse().expect("n");
        let before = last.insert(key.to_string(), n).unwrap_or(-1);
        assert_eq!(n, before + 1, "key {key}: {n} came after {before}");
        assert_eq!(d.message.key.as_deref(), Some(key));
        c.ack(&d).await.expect("ack");
    }
    assert!(last.values().all(|&n| n == per_key - 1), "{last:?}");
}

/// Two members of a group share a topic; every message published is delivered
/// (duplicates are allowed, losses are not).
pub async fn every_published_message_is_delivered_at_least_once(bus: SharedBus) {
    let t = topic(&bus, "alo", 4).await;
    let mut sent = HashSet::new();
    for b in 0..10 {
        let batch: Vec<OutgoingMessage> = (0..30)
            .map(|i| msg(&format!("k{}", (b * 30 + i) % 17), format!("m{b}-{i}")))
            .collect();
        sent.extend(batch.iter().map(|m| m.id.clone()));
        publish(&bus, &t, batch).await;
    }
    let mut members = Vec::new();
    for _ in 0..2 {
        members.push(bus.subscribe(&t, "g", quick()).await.expect("subscribe"));
    }
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            let got_tx = got_tx.clone();
            tokio::spawn(async move {
                while let Some(d) = maybe_next(&mut c, Duration::from_secs(3)).await {
                    c.ack(&d).await.expect("ack");
                    if got_tx.send(d.message.id.clone()).is_err() {
                        break;
                    }
                }
                c
            })
        })
        .collect();
    drop(got_tx);
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < sent.len() {
        match tokio::time::timeout_at(deadline, got_rx.recv()).await {
            Ok(Some(id)) => {
                got.insert(id);
            }
            _ => break,
        }
    }
    for t in tasks {
        t.abort();
    }
    let missing: Vec<_> = sent.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {} never delivered, e.g. {missing:?}",
        sent.len() - got.len().min(sent.len()),
        sent.len()
    );
}

/// A member takes deliveries and goes away without acking: the group's other
/// member gets them.
pub async fn a_member_that_dies_without_acking_has_its_messages_redelivered(bus: SharedBus) {
    let t = topic(&bus, "dies", 1).await;
    let sent: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    publish(&bus, &t, sent.iter().map(|s| msg("k", s.clone())).collect()).await;
    let mut a = bus.subscribe(&t, "g", quick()).await.expect("subscribe a");
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(text(&next(&mut a).await));
    }
    a.close().await.expect("leave");
    let mut b = bus.subscribe(&t, "g", quick()).await.expect("subscribe b");
    let mut seen = HashSet::new();
    while !sent.iter().all(|s| seen.contains(s)) {
        let d = next(&mut b).await;
        seen.insert(text(&d));
        b.ack(&d).await.expect("ack");
    }
    for s in taken {
        assert!(
            seen.contains(&s),
            "{s} taken by the dead member never came back"
        );
    }
}

/// Neither acked nor nacked: delivered again once the ack timeout passes, as the
/// next attempt.
pub async fn an_unacked_delivery_comes_back_after_its_ack_timeout(bus: SharedBus) {
    let t = topic(&bus, "timeout", 1).await;
    publish(&bus, &t, vec![msg("k", "once".into())]).await;
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let first = next(&mut c).await;
    assert_eq!(first.attempt, 1);
    let again = next(&mut c).await;
    assert_eq!(again.message.id, first.message.id);
    assert_eq!(again.attempt, 2);
    c.ack(&again).await.expect("ack");
    assert!(
        maybe_next(&mut c, Duration::from_millis(1_500))
            .await
            .is_none(),
        "an acked message came back"
    );
}

/// Nacked: delivered again (attempt 2, 3, …); nacked on its last attempt, it goes
/// to the dead-letter topic with headers saying why, and no longer blocks.
pub async fn nacked_messages_come_back_then_go_to_the_dead_letter_topic(bus: SharedBus) {
    let t = topic(&bus, "nack", 1).await;
    publish(&bus, &t, vec![msg("k", "poison".into())]).await;
    let opts = SubscribeOptions {
        max_deliveries: 3,
        ..quick()
    };
    let mut c = bus
        .subscribe(&t, "g", opts.clone())
        .await
        .expect("subscribe");
    let mut id = String::new();
    for attempt in 1..=3 {
        let d = next(&mut c).await;
        assert_eq!(text(&d), "poison");
        assert_eq!(d.attempt, attempt);
        id = d.message.id.clone();
        c.nack(&d, None).await.expect("nack");
    }
    publish(&bus, &t, vec![msg("k", "fine".into())]).await;
    let d = next(&mut c).await;
    assert_eq!(text(&d), "fine", "the dead-lettered message came back");
    c.ack(&d).await.expect("ack");

    let dead = opts.dead_letter_topic_for(&t);
    let mut dc = bus
        .subscribe(&dead, "inspect", quick())
        .await
        .expect("subscribe to the dead-letter topic");
    let d = next(&mut dc).await;
    assert_eq!(text(&d), "poison");
    assert_eq!(d.message.id, id, "a dead letter keeps its id");
    let h = &d.message.headers;
    assert_eq!(h.get(headers::DEAD_TOPIC), Some(&t), "{h:?}");
    assert_eq!(h.get(headers::DEAD_ATTEMPTS).map(String::as_str), Some("3"));
    assert_eq!(h.get(headers::DEAD_GROUP).map(String::as_str), Some("g"));
    dc.ack(&d).await.expect("ack");
}

/// With two members each gets part of the partitions; when one leaves, the other
/// gets all of them.
pub async fn partitions_are_shared_between_members_and_move_when_one_leaves(bus: SharedBus) {
    let t = topic(&bus, "rebalance", 4).await;
    let mut a = bus.subscribe(&t, "g", quick()).await.expect("subscribe a");
    let mut b = bus.subscribe(&t, "g", quick()).await.expect("subscribe b");
    // Publish in rounds until both members have had messages (rebalancing may take
    // a moment), acking as we go.
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    let (mut by_a, mut by_b) = (HashSet::new(), HashSet::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while by_a.is_empty() || by_b.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a got {by_a:?}, b got {by_b:?}"
        );
        publish(&bus, &t, keys.iter().map(|k| msg(k, "x".into())).collect()).await;
        while let Some(d) = maybe_next(&mut a, Duration::from_millis(300)).await {
            by_a.insert(d.message.partition);
            a.ack(&d).await.expect("ack");
        }
        while let Some(d) = maybe_next(&mut b, Duration::from_millis(300)).await {
            by_b.insert(d.message.partition);
            b.ack(&d).await.expect("ack");
        }
    }
    b.close().await.expect("leave");
    // Once b is gone, a receives from every partition.
    let mut all = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while all.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after b left, a got only partitions {all:?}"
        );
        publish(&bus, &t, keys.iter().map(|k| msg(k, "y".into())).collect()).await;
        while let Some(d) = maybe_next(&mut a, Duration::from_millis(300)).await {
            if text(&d) == "y" {
                all.insert(d.message.partition);
            }
            a.ack(&d).await.expect("ack");
        }
    }
}

/// A group that consumed everything is moved back to an offset, then to a time,
/// and gets the messages from there again.
pub async fn a_group_replays_from_an_offset_and_from_a_time(bus: SharedBus) {
    let t = topic(&bus, "replay", 1).await;
    let first = publish(
        &bus,
        &t,
        (0..5).map(|i| msg("k", format!("a{i}"))).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = shoal_core::unix_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish(
        &bus,
        &t,
        (0..5).map(|i| msg("k", format!("b{i}"))).collect(),
    )
    .await;
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    for _ in 0..10 {
        let d = next(&mut c).await;
        c.ack(&d).await.expect("ack");
    }
    c.close().await.expect("leave");

    bus.seek(&t, "g", StartAt::Offset(first[3].offset))
        .await
        .expect("seek to an offset");
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let d = next(&mut c).await;
    assert_eq!(text(&d), "a3");
    assert_eq!(d.message.offset, first[3].offset);
    c.ack(&d).await.expect("ack");
    c.close().await.expect("leave");

    bus.seek(&t, "g", StartAt::TimeMs(between))
        .await
        .expect("seek to a time");
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let d = next(&mut c).await;
    assert_eq!(text(&d), "b0");
    c.ack(&d).await.expect("ack");
    c.close().await.expect("leave");

    bus.seek(&t, "g", StartAt::Earliest)
        .await
        .expect("seek to the start");
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    assert_eq!(text(&next(&mut c).await), "a0");
}

/// An unknown topic and an oversized message are refused with clear errors; what
/// was published before is still there and publishing goes on.
pub async fn bad_publishes_are_refused_and_lose_nothing(bus: SharedBus) {
    let t = topic(&bus, "bad", 1).await;
    publish(&bus, &t, vec![msg("k", "before".into())]).await;
    let missing = unique("missing");
    let e = bus
        .publish(&missing, vec![msg("k", "x".into())])
        .await
        .expect_err("publish to a topic that does not exist");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    let big = OutgoingMessage::new(vec![b'x'; shoal_bus::limits::MAX_MESSAGE_BYTES + 1]);
    let e = bus
        .publish(&t, vec![msg("k", "with a big one".into()), big])
        .await
        .expect_err("an oversized message");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    publish(&bus, &t, vec![msg("k", "after".into())]).await;
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let got: Vec<String> = [next(&mut c).await, next(&mut c).await]
        .iter()
        .map(text)
        .collect();
    assert_eq!(
        got,
        ["before", "after"],
        "a refused batch left something behind"
    );
}

/// Creating a topic again with the same partitions is fine; with others, a
/// conflict.
pub async fn topics_are_created_once(bus: SharedBus) {
    let t = topic(&bus, "create", 2).await;
    bus.create_topic(&TopicSpec::new(&t, 2))
        .await
        .expect("the same topic again");
    let e = bus
        .create_topic(&TopicSpec::new(&t, 3))
        .await
        .expect_err("other partitions");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let e = bus
        .create_topic(&TopicSpec::new("no spaces allowed", 1))
        .await
        .expect_err("a bad name");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// Lag is what is stored and not yet acked by the group.
pub async fn lag_counts_what_is_not_acked(bus: SharedBus) {
    let t = topic(&bus, "lag", 2).await;
    publish(
        &bus,
        &t,
        (0..10).map(|i| msg(&format!("k{i}"), "x".into())).collect(),
    )
    .await;
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    assert_eq!(bus.lag(&t, "g").await.expect("lag"), 10);
    for _ in 0..4 {
        let d = next(&mut c).await;
        c.ack(&d).await.expect("ack");
    }
    // Acks may reach the backend's accounting a moment later.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lag = bus.lag(&t, "g").await.expect("lag");
        if lag == 6 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag {lag}, expected 6"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What is published is what is delivered: id, key, headers, payload bytes.
pub async fn ids_keys_and_headers_arrive_as_sent(bus: SharedBus) {
    let t = topic(&bus, "shape", 1).await;
    let payload: Vec<u8> = (0..=255u8).collect();
    let m = OutgoingMessage::new(payload.clone())
        .with_key("order-7")
        .with_id("order-7-placed")
        .with_header(headers::CORRELATION_ID, "c-1")
        .with_header(headers::CAUSATION_ID, "m-0")
        .with_header(
            headers::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
    let before = shoal_core::unix_ms();
    let p = publish(&bus, &t, vec![m.clone()]).await;
    let mut c = bus.subscribe(&t, "g", quick()).await.expect("subscribe");
    let d = next(&mut c).await;
    assert_eq!(d.message.topic, t);
    assert_eq!(d.message.id, "order-7-placed");
    assert_eq!(d.message.key.as_deref(), Some("order-7"));
    assert_eq!(d.message.payload.as_ref(), payload.as_slice());
    assert_eq!(
        (d.message.partition, d.message.offset),
        (p[0].partition, p[0].offset)
    );
    let expected: BTreeMap<String, String> = m.headers.clone();
    for (k, v) in &expected {
        assert_eq!(d.message.headers.get(k), Some(v), "header {k}");
    }
    assert!(
        d.message.timestamp_ms + 1_000 >= before
            && d.message.timestamp_ms <= shoal_core::unix_ms() + 1_000,
        "timestamp {} not near {before}",
        d.message.timestamp_ms
    );
    c.ack(&d).await.expect("ack");
}
