//! The JetStream backend against a real nats-server (`scripts/nats-server`): the bus
//! conformance suite (`shoal_testkit::bus`), then what this backend does beyond it:
//! crashed members, seeks under live members, strict order, dead letters after
//! timeouts, duplicates, limits and names. Every test has its own connection and
//! namespace, so they run in parallel on one server.

use bytes::Bytes;
use shoal_bus::{
    headers, limits, Bus, Delivery, OutgoingMessage, StartAt, SubscribeOptions, TopicSpec,
};
use shoal_bus_nats::{JetStreamBus, NatsOptions};
use shoal_core::ErrorKind;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn options(prefix: &str) -> NatsOptions {
    NatsOptions {
        prefix: Some(prefix.to_string()),
        lease_ttl_ms: 1_000,
        ..NatsOptions::default()
    }
}

async fn bus_in(prefix: &str) -> JetStreamBus {
    JetStreamBus::connect(shoal_testkit::nats::url(), options(prefix))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn fresh() -> JetStreamBus {
    bus_in(&shoal_testkit::nats::unique_prefix()).await
}

async fn fresh_shared() -> shoal_testkit::bus::SharedBus {
    let options = NatsOptions {
        prefix: Some(shoal_testkit::nats::unique_prefix()),
        ..NatsOptions::default()
    };
    let bus = JetStreamBus::connect(shoal_testkit::nats::url(), options)
        .await
        .unwrap_or_else(|e| panic!("connect to the test nats-server: {e}"));
    Arc::new(bus)
}

shoal_testkit::bus_conformance!(fresh_shared());

use shoal_testkit::bus::{next, quick};

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.payload).into_owned()
}

fn msg(key: &str, body: &str) -> OutgoingMessage {
    OutgoingMessage::new(Bytes::from(body.to_string())).with_key(key)
}

/// A member whose process dies (no close, no lease deletion, no nak) keeps its
/// partitions only until its lease runs out; what it took comes back after the ack
/// timeout, to the member left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_loses_its_partitions_and_its_deliveries_come_back() {
    let prefix = shoal_testkit::nats::unique_prefix();
    let bus = bus_in(&prefix).await;
    bus.create_topic(&TopicSpec::new("crash", 2))
        .await
        .expect("topic");
    let batch: Vec<_> = (0..20)
        .map(|i| msg(&format!("k{i}"), &format!("m{i}")))
        .collect();
    let sent: HashSet<String> = batch.iter().map(|m| m.id.clone()).collect();
    bus.publish("crash", batch).await.expect("publish");

    // The doomed member runs on a runtime of its own, which is then shut down with
    // the member still in it: its tasks and connection end as in a crash.
    let crash_prefix = prefix.clone();
    let taken = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let taken = rt.block_on(async {
            let bus = bus_in(&crash_prefix).await;
            let mut c = bus
                .subscribe("crash", "g", quick())
                .await
                .expect("subscribe");
            let d = next(&mut c).await;
            std::mem::forget(c);
            d.message.id
        });
        rt.shutdown_background();
        taken
    })
    .join()
    .expect("the doomed member");

    let mut c = bus
        .subscribe("crash", "g", quick())
        .await
        .expect("subscribe");
    let mut got = HashSet::new();
    let mut taken_again = None;
    while got.len() < sent.len() {
        let d = next(&mut c).await;
        if d.message.id == taken {
            taken_again = Some(d.attempt);
        }
        got.insert(d.message.id.clone());
        c.ack(&d).await.expect("ack");
    }
    assert_eq!(got, sent);
    let attempt = taken_again.expect("the crashed member's delivery came back");
    assert!(attempt >= 2, "attempt {attempt}");
}

/// A seek through the bus a live member belongs to: the member's next delivery is
/// from the new position, not what it had fetched before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_moves_a_live_member_at_once() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("seek", 1))
        .await
        .expect("topic");
    let first = bus
        .publish(
            "seek",
            (0..10).map(|i| msg("k", &format!("m{i}"))).collect(),
        )
        .await
        .expect("publish");
    let mut c = bus
        .subscribe("seek", "g", quick())
        .await
        .expect("subscribe");
    for i in 0..3 {
        let d = next(&mut c).await;
        assert_eq!(text(&d), format!("m{i}"));
        c.ack(&d).await.expect("ack");
    }
    // m3..m9 are fetched and buffered by now or soon; the seek drops them.
    bus.seek("seek", "g", StartAt::Offset(first[1].offset))
        .await
        .expect("seek");
    let d = next(&mut c).await;
    assert_eq!(text(&d), "m1");
    assert_eq!(d.message.offset, first[1].offset);
    c.ack(&d).await.expect("ack");
    assert_eq!(text(&next(&mut c).await), "m2");
    bus.seek("seek", "g", StartAt::Latest).await.expect("seek");
    bus.publish("seek", vec![msg("k", "new")])
        .await
        .expect("publish");
    assert_eq!(text(&next(&mut c).await), "new");
}

/// With one delivery in flight a partition is processed strictly in order: a nacked
/// message comes back before the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_in_flight_keeps_order_through_nacks() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("strict", 1))
        .await
        .expect("topic");
    bus.publish("strict", ["a", "b", "c"].map(|b| msg("k", b)).to_vec())
        .await
        .expect("publish");
    let opts = SubscribeOptions {
        max_in_flight: 1,
        ..quick()
    };
    let mut c = bus.subscribe("strict", "g", opts).await.expect("subscribe");
    let d = next(&mut c).await;
    assert_eq!((text(&d).as_str(), d.attempt), ("a", 1));
    c.nack(&d, Some(Duration::from_millis(20)))
        .await
        .expect("nack");
    let d = next(&mut c).await;
    assert_eq!((text(&d).as_str(), d.attempt), ("a", 2));
    c.ack(&d).await.expect("ack");
    for want in ["b", "c"] {
        let d = next(&mut c).await;
        assert_eq!(text(&d), want);
        c.ack(&d).await.expect("ack");
    }
}

/// A delivery whose last attempt times out goes to the dead-letter topic without
/// another attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_attempt_that_times_out_is_dead_lettered() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("slow", 1))
        .await
        .expect("topic");
    let p = bus
        .publish(
            "slow",
            vec![msg("k", "slow").with_header("correlation-id", "c-9")],
        )
        .await
        .expect("publish");
    let opts = SubscribeOptions {
        max_deliveries: 2,
        ack_timeout_ms: 300,
        ..quick()
    };
    let mut c = bus.subscribe("slow", "g", opts).await.expect("subscribe");
    assert_eq!(next(&mut c).await.attempt, 1);
    assert_eq!(next(&mut c).await.attempt, 2);
    // Made here so the test can subscribe before the dead-lettering happens; the
    // bus makes it when missing (the conformance suite covers that).
    bus.create_topic(&TopicSpec::new("slow.dead", 1))
        .await
        .expect("dead-letter topic");
    let mut dead = bus
        .subscribe("slow.dead", "inspect", quick())
        .await
        .expect("subscribe to the dead-letter topic");
    let d = next(&mut dead).await;
    assert_eq!(text(&d), "slow");
    let h = &d.message.headers;
    assert_eq!(h.get(headers::DEAD_ATTEMPTS).map(String::as_str), Some("2"));
    assert_eq!(h.get(headers::DEAD_TOPIC).map(String::as_str), Some("slow"));
    let position = format!("{}/{}", p[0].partition, p[0].offset);
    assert_eq!(h.get(headers::DEAD_POSITION), Some(&position));
    assert_eq!(h.get("correlation-id").map(String::as_str), Some("c-9"));
    assert_eq!(d.message.key.as_deref(), Some("k"));
    // No third attempt reaches the member.
    assert!(
        tokio::time::timeout(Duration::from_millis(1_000), c.next())
            .await
            .is_err(),
        "a dead-lettered message came back"
    );
}

/// The same id published twice is stored once (JetStream's duplicate window), and the
/// second publish answers the first one's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_id_is_stored_once() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("dup", 3))
        .await
        .expect("topic");
    let m = msg("k", "once").with_id("order-1-placed");
    let a = bus.publish("dup", vec![m.clone()]).await.expect("publish");
    let b = bus.publish("dup", vec![m]).await.expect("publish again");
    assert_eq!(a, b);
    let mut c = bus.subscribe("dup", "g", quick()).await.expect("subscribe");
    let d = next(&mut c).await;
    c.ack(&d).await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.next())
            .await
            .is_err(),
        "the duplicate was delivered"
    );
}

/// The largest message the contract allows fits through the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_message_fits() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("big", 1))
        .await
        .expect("topic");
    let mut m = msg("key", "").with_header(headers::TRACEPARENT, "00-x-y-01");
    let room = limits::MAX_MESSAGE_BYTES - m.size();
    m.payload = Bytes::from(vec![7u8; room]);
    assert_eq!(m.size(), limits::MAX_MESSAGE_BYTES);
    bus.publish("big", vec![m]).await.expect("publish");
    let mut c = bus.subscribe("big", "g", quick()).await.expect("subscribe");
    assert_eq!(next(&mut c).await.message.payload.len(), room);
}

/// Input NATS cannot carry, names that would share a stream or a consumer, and a
/// group with no position are refused with the right kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_colliding_names_are_refused() {
    let bus = fresh().await;
    bus.create_topic(&TopicSpec::new("a.b", 1))
        .await
        .expect("topic");
    let e = bus
        .create_topic(&TopicSpec::new("a_b", 1))
        .await
        .expect_err("shares a stream name");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let e = bus
        .publish("a_b", vec![msg("k", "x")])
        .await
        .expect_err("a_b does not exist");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    for m in [
        msg("k", "x").with_header("Nats-Expected-Stream", "x"),
        msg("k", "x").with_header("a", "line\nbreak"),
        msg("line\nbreak", "x"),
    ] {
        let e = bus.publish("a.b", vec![m]).await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }

    let _g = bus
        .subscribe("a.b", "g.x", quick())
        .await
        .expect("subscribe");
    let e = bus
        .subscribe("a.b", "g_x", quick())
        .await
        .err()
        .expect("shares a consumer name");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");

    let e = bus.lag("a.b", "never").await.expect_err("no such group");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = bus
        .subscribe("missing", "g", quick())
        .await
        .err()
        .expect("no such topic");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// No server: a retryable `Unavailable`, soon.
#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    // Port 9 (discard) on loopback: nothing listens there in our containers.
    let e = JetStreamBus::connect(
        "nats://127.0.0.1:9",
        NatsOptions {
            connect_timeout_ms: 500,
            ..NatsOptions::default()
        },
    )
    .await
    .expect_err("nothing listens there");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    let e = JetStreamBus::connect(
        "nats://127.0.0.1:9",
        NatsOptions {
            prefix: Some("no spaces".into()),
            ..NatsOptions::default()
        },
    )
    .await
    .expect_err("bad prefix");
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
}

/// Many publishers at once through a small window: all get through (a batch takes
/// its share of the window whole, so concurrent batches never wait on each other
/// forever), each batch in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_share_a_small_window() {
    let bus = Arc::new(
        JetStreamBus::connect(
            shoal_testkit::nats::url(),
            NatsOptions {
                prefix: Some(shoal_testkit::nats::unique_prefix()),
                max_pending_acks: 64,
                ..NatsOptions::default()
            },
        )
        .await
        .expect("connect"),
    );
    bus.create_topic(&TopicSpec::new("window", 4))
        .await
        .expect("topic");
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for b in 0..5 {
                    let batch = (0..100)
                        .map(|i| msg(&format!("t{t}"), &format!("{t}-{b}-{i}")))
                        .collect();
                    let got = bus.publish("window", batch).await.expect("publish");
                    assert!(got.windows(2).all(|w| w[0].offset < w[1].offset));
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("publishers finish")
            .expect("publisher");
    }
    let mut c = bus
        .subscribe("window", "g", quick())
        .await
        .expect("subscribe");
    assert_eq!(bus.lag("window", "g").await.expect("lag"), 8 * 5 * 100);
    let d = next(&mut c).await;
    c.ack(&d).await.expect("ack");
}

/// A member joining with other settings changes the group's consumers in place: the
/// group keeps its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_other_settings_keeps_the_group_position() {
    let prefix = shoal_testkit::nats::unique_prefix();
    let bus = bus_in(&prefix).await;
    bus.create_topic(&TopicSpec::new("settings", 2))
        .await
        .expect("topic");
    bus.publish("settings", vec![msg("k", "first")])
        .await
        .expect("publish");
    let mut c = bus
        .subscribe("settings", "g", quick())
        .await
        .expect("subscribe");
    let d = next(&mut c).await;
    c.ack(&d).await.expect("ack");
    c.close().await.expect("leave");
    let other = SubscribeOptions {
        ack_timeout_ms: 5_000,
        max_in_flight: 8,
        ..quick()
    };
    let mut c = bus
        .subscribe("settings", "g", other)
        .await
        .expect("subscribe with other settings");
    bus.publish("settings", vec![msg("k", "second")])
        .await
        .expect("publish");
    assert_eq!(text(&next(&mut c).await), "second");
    // The consumer itself says so (read with the plain client).
    let client = async_nats::connect(shoal_testkit::nats::url())
        .await
        .expect("connect");
    let info = async_nats::jetstream::new(client)
        .get_stream(format!("{prefix}_SHOAL_settings"))
        .await
        .expect("stream")
        .consumer_info("g_p1")
        .await
        .expect("consumer");
    assert_eq!(info.config.ack_wait, Duration::from_secs(5));
    assert_eq!(info.config.max_ack_pending, 8);
}
