//! Tests against a real broker served on 127.0.0.1:0 in a temporary folder: the
//! bus conformance suite, bad input over raw TCP, restarts, retention, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::protocol::{encode_publish, encode_request, kind, Code, Enc, Request};
use crate::{serve, Broker, BrokerConfig, EmbeddedBus};
use shoal_bus::{
    publish_one, Bus, OutgoingMessage, SharedBus, StartAt, SubscribeOptions, TopicSpec,
};
use shoal_core::ErrorKind;
use shoal_telemetry::Metrics;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("shoal-broker-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A broker served in this process.
struct Served {
    broker: Broker,
    addr: SocketAddr,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Served {
    async fn start(dir: &Path, cfg: BrokerConfig) -> Served {
        Self::start_at(dir, cfg, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(dir: &Path, cfg: BrokerConfig, addr: SocketAddr) -> Served {
        let metrics = Metrics::new("test");
        let broker = Broker::open(dir, cfg, &metrics).await.expect("open broker");
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let b = broker.clone();
        let server = tokio::spawn(async move {
            serve(listener, b, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        Served {
            broker,
            addr,
            metrics,
            stop: Some(tx),
            server: Some(server),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
        self.broker.close().await;
    }

    async fn bus(&self) -> EmbeddedBus {
        EmbeddedBus::connect(self.addr).await.expect("connect")
    }
}

async fn fresh_bus() -> SharedBus {
    let served = Served::start(&temp_dir("conf"), BrokerConfig::default()).await;
    let bus = served.bus().await;
    // The server lives as long as the test's runtime.
    std::mem::forget(served);
    Arc::new(bus)
}

mod conformance {
    use super::fresh_bus;
    shoal_testkit::bus_conformance!(fresh_bus());
}

fn msg(body: &str) -> OutgoingMessage {
    OutgoingMessage::new(body.as_bytes().to_vec())
}

/// Reads one answer frame: (kind, id, body).
async fn read_answer(s: &mut TcpStream) -> (u8, u64, Vec<u8>) {
    let mut len = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut len))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    let id = u64::from_be_bytes(buf[1..9].try_into().unwrap());
    (buf[0], id, buf[9..].to_vec())
}

fn error_code(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// The connection is closed by the broker: a read sees the end.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Publishes `before`, runs `attack` on a raw connection, then checks the log:
/// `before` still readable, nothing else added, publishing still works.
async fn log_survives(attack: impl AsyncFnOnce(&mut TcpStream)) {
    let served = Served::start(&temp_dir("bad"), BrokerConfig::default()).await;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    let p = publish_one(&bus, "t", msg("before")).await.unwrap();
    assert_eq!(p.offset, 0);

    let mut raw = TcpStream::connect(served.addr).await.unwrap();
    attack(&mut raw).await;

    let log_next = served.broker.topic("t").unwrap().next_offsets();
    assert_eq!(log_next, vec![1], "something reached the log");
    let p = publish_one(&bus, "t", msg("after")).await.unwrap();
    assert_eq!(p.offset, 1);
    let mut c = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for want in ["before", "after"] {
        let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
        assert_eq!(&d.message.payload[..], want.as_bytes());
        c.ack(&d).await.unwrap();
    }
    served.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_gets_an_error_with_its_id_and_the_connection_closes() {
    log_survives(async |raw: &mut TcpStream| {
        let max = BrokerConfig::default().max_frame_bytes;
        let mut head = Vec::new();
        head.extend_from_slice(&(max + 1).to_be_bytes());
        head.push(kind::PUBLISH);
        head.extend_from_slice(&77u64.to_be_bytes());
        raw.write_all(&head).await.unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 77));
        assert_eq!(error_code(&body), Code::FrameTooLarge as u16);
        assert!(String::from_utf8_lossy(&body).contains("max_frame_bytes"));
        assert!(closed(raw).await);
    })
    .await;
}

#[tokio::test]
async fn a_malformed_publish_gets_an_error_and_writes_nothing() {
    log_survives(async |raw: &mut TcpStream| {
        let good = encode_publish(5, "t", &[msg("never stored")]);
        // Cut the payload short but keep the length prefix consistent.
        let mut bad = good[..good.len() - 3].to_vec();
        let len = (bad.len() - 4) as u32;
        bad[..4].copy_from_slice(&len.to_be_bytes());
        raw.write_all(&bad).await.unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 5));
        assert_eq!(error_code(&body), Code::Malformed as u16);
        assert!(closed(raw).await);
    })
    .await;
}

#[tokio::test]
async fn an_unknown_request_and_a_short_frame_close_the_connection() {
    log_survives(async |raw: &mut TcpStream| {
        let f = Enc::new(0x42, 9).finish();
        raw.write_all(&f).await.unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 9));
        assert_eq!(error_code(&body), Code::UnknownRequest as u16);
        assert!(closed(raw).await);
    })
    .await;
    log_survives(async |raw: &mut TcpStream| {
        raw.write_all(&[0, 0, 0, 2, 1, 2]).await.unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 0));
        assert_eq!(error_code(&body), Code::Malformed as u16);
        assert!(closed(raw).await);
    })
    .await;
}

#[tokio::test]
async fn an_oversized_message_and_an_unknown_topic_are_refused_on_an_open_connection() {
    log_survives(async |raw: &mut TcpStream| {
        // Past the client's own check: the broker checks again.
        let big = OutgoingMessage::new(vec![0u8; shoal_bus::limits::MAX_MESSAGE_BYTES + 1]);
        raw.write_all(&encode_publish(1, "t", &[msg("small"), big]))
            .await
            .unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 1));
        assert_eq!(error_code(&body), Code::InvalidInput as u16);
        assert!(String::from_utf8_lossy(&body).contains("limit"));
        raw.write_all(&encode_publish(2, "nope", &[msg("x")]))
            .await
            .unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 2));
        assert_eq!(error_code(&body), Code::NotFound as u16);
        assert!(String::from_utf8_lossy(&body).contains("topic nope does not exist"));
        // Still open: a valid request is answered.
        raw.write_all(&encode_request(
            3,
            &Request::Lag {
                topic: "t".into(),
                group: "g".into(),
            },
        ))
        .await
        .unwrap();
        let (k, id, body) = read_answer(raw).await;
        assert_eq!((k, id), (kind::ERROR, 3), "no group yet");
        assert_eq!(error_code(&body), Code::NotFound as u16);
    })
    .await;
}

#[tokio::test]
async fn pipelined_publishes_on_one_connection_keep_their_order_and_share_fsyncs() {
    let served = Served::start(&temp_dir("pipe"), BrokerConfig::default()).await;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    let fsyncs_before = fsyncs(&served.metrics);
    let n = 300u64;
    let mut raw = TcpStream::connect(served.addr).await.unwrap();
    let mut all = Vec::new();
    for i in 1..=n {
        all.extend(encode_publish(i, "t", &[msg(&format!("m{i}"))]));
    }
    // Every request in one write, before any answer.
    raw.write_all(&all).await.unwrap();
    let mut offsets = vec![0u64; n as usize + 1];
    for _ in 0..n {
        let (k, id, body) = read_answer(&mut raw).await;
        assert_eq!(k, kind::PUBLISH | kind::ANSWER);
        assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), 1);
        offsets[id as usize] = u64::from_be_bytes(body[8..16].try_into().unwrap());
    }
    for i in 1..=n {
        assert_eq!(
            offsets[i as usize],
            i - 1,
            "request {i} was stored out of order"
        );
    }
    let used = fsyncs(&served.metrics) - fsyncs_before;
    assert!(
        used < n,
        "{n} publishes took {used} fsyncs: none were shared"
    );
    served.stop().await;
}

fn fsyncs(m: &Metrics) -> u64 {
    value(&m.render(), "shoal_broker_fsyncs_total", &[]).unwrap_or(0)
}

/// The value of the series `name` whose labels include `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_restart_keeps_messages_topics_and_committed_offsets() {
    let dir = temp_dir("restart");
    let served = Served::start(&dir, BrokerConfig::default()).await;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 2)).await.unwrap();
    let batch = (0..10)
        .map(|i| msg(&format!("m{i}")).with_key(format!("k{i}")))
        .collect();
    bus.publish("t", batch).await.unwrap();
    let opts = SubscribeOptions {
        max_in_flight: 1,
        ..SubscribeOptions::default()
    };
    let mut c = bus.subscribe("t", "g", opts.clone()).await.unwrap();
    for _ in 0..4 {
        let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
        c.ack(&d).await.unwrap();
    }
    // Acks are not waited for; the broker carries them out before the next
    // request on the same connection.
    assert_eq!(bus.lag("t", "g").await.unwrap(), 6);
    let committed = served.broker.committed("t", "g").unwrap();
    assert_eq!(committed.iter().sum::<u64>(), 4);
    drop(c);
    drop(bus);
    served.stop().await;

    let served = Served::start(&dir, BrokerConfig::default()).await;
    let bus = served.bus().await;
    assert_eq!(bus.lag("t", "g").await.unwrap(), 6);
    // Idempotent after a restart too.
    bus.create_topic(&TopicSpec::new("t", 2)).await.unwrap();
    let mut c = bus.subscribe("t", "g", opts).await.unwrap();
    let mut seen = 0;
    while seen < 6 {
        let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
        let p = d.message.partition as usize;
        assert!(
            d.message.offset >= committed[p],
            "offset {} of partition {p} was acked before the restart",
            d.message.offset
        );
        c.ack(&d).await.unwrap();
        seen += 1;
    }
    assert_eq!(bus.lag("t", "g").await.unwrap(), 0);
    served.stop().await;
}

#[tokio::test]
async fn a_consumer_reconnects_and_rejoins_after_the_broker_restarts() {
    let dir = temp_dir("rejoin");
    let served = Served::start(&dir, BrokerConfig::default()).await;
    let addr = served.addr;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    publish_one(&bus, "t", msg("one")).await.unwrap();
    let mut c = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    c.ack(&d).await.unwrap();
    assert_eq!(bus.lag("t", "g").await.unwrap(), 0);
    served.stop().await;

    // Calls while the broker is down fail as retryable.
    let e = publish_one(&bus, "t", msg("lost")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());

    let served = Served::start_at(&dir, BrokerConfig::default(), addr).await;
    publish_one(&bus, "t", msg("two")).await.unwrap();
    // The consumer's first fetch may fail with the old connection; then it joins
    // again under a new id and carries on.
    let mut got = None;
    for _ in 0..3 {
        match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
            Ok(d) => {
                got = Some(d);
                break;
            }
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    let d = got.expect("a delivery after the restart");
    assert_eq!(&d.message.payload[..], b"two");
    c.ack(&d).await.unwrap();
    served.stop().await;
}

#[tokio::test]
async fn one_directory_holds_one_broker() {
    let dir = temp_dir("lock");
    let metrics = Metrics::new("test");
    let a = Broker::open(&dir, BrokerConfig::default(), &metrics)
        .await
        .unwrap();
    let e = Broker::open(&dir, BrokerConfig::default(), &metrics)
        .await
        .err()
        .expect("a second broker on the same folder");
    assert!(e.to_string().contains("in use"), "{e}");
    a.close().await;
    let b = Broker::open(&dir, BrokerConfig::default(), &metrics)
        .await
        .unwrap();
    b.close().await;
}

#[tokio::test]
async fn retention_moves_a_group_past_deleted_messages() {
    let cfg = BrokerConfig {
        segment_bytes: 1 << 20,
        ..BrokerConfig::default()
    };
    let served = Served::start(&temp_dir("retention"), cfg).await;
    let bus = served.bus().await;
    let spec = TopicSpec {
        retention_bytes: Some(1),
        ..TopicSpec::new("t", 1)
    };
    bus.create_topic(&spec).await.unwrap();
    // The group exists (at offset 0) before anything is published.
    let c = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    drop(c);
    for i in 0..30 {
        let m = OutgoingMessage::new(vec![i as u8; 100 << 10]);
        publish_one(&bus, "t", m).await.unwrap();
    }
    served.broker.enforce_retention_now(crate::util::now_ms());
    let t = served.broker.topic("t").unwrap();
    let first = t.first_offsets()[0];
    assert!(first > 0, "nothing was deleted");
    assert_eq!(bus.lag("t", "g").await.unwrap(), 30 - first);
    let mut c = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    assert_eq!(d.message.offset, first);
    c.ack(&d).await.unwrap();
    assert_eq!(bus.lag("t", "g").await.unwrap(), 30 - first - 1);
    assert_eq!(served.broker.committed("t", "g").unwrap(), vec![first + 1]);
    served.stop().await;
}

#[tokio::test]
async fn the_connection_limit_refuses_with_an_error() {
    let cfg = BrokerConfig {
        max_connections: 1,
        ..BrokerConfig::default()
    };
    let served = Served::start(&temp_dir("conns"), cfg).await;
    let _first = served.bus().await;
    let e = EmbeddedBus::connect(served.addr)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
    assert!(e.to_string().contains("connections"), "{e}");
    served.stop().await;
}

#[tokio::test]
async fn metrics_count_publishes_deliveries_acks_and_lag() {
    let served = Served::start(&temp_dir("metrics"), BrokerConfig::default()).await;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    bus.publish("t", vec![msg("a"), msg("b")]).await.unwrap();
    let opts = SubscribeOptions {
        max_deliveries: 1,
        ..SubscribeOptions::default()
    };
    let mut c = bus.subscribe("t", "g", opts).await.unwrap();
    // The lag gauge is refreshed about every second.
    let lag_becomes = async |want: u64| {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = served.metrics.render();
            let lag = value(
                &text,
                "shoal_broker_consumer_lag",
                &["topic=\"t\"", "group=\"g\""],
            );
            if lag == Some(want) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lag never {want}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    lag_becomes(2).await;
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    c.ack(&d).await.unwrap();
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    c.nack(&d, None).await.unwrap();
    let text = lag_becomes(0).await;
    for (name, labels, want) in [
        ("shoal_broker_published_total", &["topic=\"t\""][..], 2),
        ("shoal_broker_published_total", &["topic=\"t.dead\""][..], 1),
        (
            "shoal_broker_delivered_total",
            &["topic=\"t\"", "group=\"g\""][..],
            2,
        ),
        (
            "shoal_broker_dead_letters_total",
            &["topic=\"t\"", "group=\"g\""][..],
            1,
        ),
        (
            "shoal_broker_redelivered_total",
            &["topic=\"t\"", "group=\"g\""][..],
            0,
        ),
        ("shoal_broker_acked_total", &[][..], 1),
    ] {
        assert_eq!(
            value(&text, name, labels),
            Some(want),
            "{name} {labels:?} in\n{text}"
        );
    }
    assert!(fsyncs(&served.metrics) >= 2);
    served.stop().await;
}

#[tokio::test]
async fn seek_to_latest_skips_what_is_stored_and_a_replay_sees_it_again() {
    let served = Served::start(&temp_dir("seek"), BrokerConfig::default()).await;
    let bus = served.bus().await;
    bus.create_topic(&TopicSpec::new("t", 3)).await.unwrap();
    let batch = (0..9)
        .map(|i| msg("old").with_key(format!("k{i}")))
        .collect();
    bus.publish("t", batch).await.unwrap();
    bus.seek("t", "g", StartAt::Latest).await.unwrap();
    assert_eq!(bus.lag("t", "g").await.unwrap(), 0);
    publish_one(&bus, "t", msg("new")).await.unwrap();
    let mut c = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.message.payload[..], b"new");
    c.ack(&d).await.unwrap();
    c.close().await.unwrap();
    bus.seek("t", "g", StartAt::Earliest).await.unwrap();
    assert_eq!(bus.lag("t", "g").await.unwrap(), 10);
    served.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_an_idle_member_and_dropping_it_leaves_at_once() {
    let served = Served::start(&temp_dir("heartbeat"), BrokerConfig::default()).await;
    let short = crate::ClientOptions {
        lease_ms: 2_000,
        ..crate::ClientOptions::default()
    };
    let bus = EmbeddedBus::connect_with(served.addr, short).await.unwrap();
    bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
    publish_one(&bus, "t", msg("first")).await.unwrap();
    let mut a = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, a.next()).await.unwrap().unwrap();
    // Idle for more than two leases: only the heartbeats keep the member, and an
    // ack from a member the broker forgot is refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.ack(&d).await.expect("still a member");
    a.close().await.unwrap();

    // Leases and ack timeouts far longer than the wait below: only the leave sent
    // when a consumer is dropped can hand its delivery on in time.
    let long = crate::ClientOptions {
        lease_ms: 120_000,
        ..crate::ClientOptions::default()
    };
    let bus = EmbeddedBus::connect_with(served.addr, long).await.unwrap();
    publish_one(&bus, "t", msg("held")).await.unwrap();
    let opts = SubscribeOptions {
        ack_timeout_ms: 120_000,
        ..SubscribeOptions::default()
    };
    let mut c = bus.subscribe("t", "g", opts.clone()).await.unwrap();
    let d = tokio::time::timeout(WAIT, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.message.payload[..], b"held");
    drop(c);
    let mut b = bus.subscribe("t", "g", opts).await.unwrap();
    let d = tokio::time::timeout(WAIT, b.next()).await.unwrap().unwrap();
    assert_eq!((&d.message.payload[..], d.attempt), (&b"held"[..], 2));
    b.ack(&d).await.unwrap();
    served.stop().await;
}
