//! Durable publish throughput and publish-to-consume latency of the embedded broker
//! (which acknowledges only after fsync) against NATS JetStream (file storage, its
//! default acknowledgement, which 2.9 sends before it fsyncs), through the same
//! `shoal_bus::Bus` client pattern on both, in one run.
//!
//! Usage: `bus-throughput <embedded-addr> <nats-url> [scale] [figures]`. Run by
//! `bench/bus.sh`, which starts both servers. `figures` picks some of `lone`, `pipe`,
//! `fan` (16 publishers) and `latency`, comma-separated (all by default).

use bytes::Bytes;
use shoal_bench::{median, report};
use shoal_bus::{OutgoingMessage, SharedBus, SubscribeOptions, TopicSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// 256-byte messages.
fn message(i: u64) -> OutgoingMessage {
    let mut body = vec![b'x'; 256];
    body[..8].copy_from_slice(&i.to_le_bytes());
    OutgoingMessage::new(Bytes::from(body)).with_key(format!("k{}", i % 64))
}

fn topic(tag: &str) -> String {
    format!(
        "bench-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn fresh_topic(bus: &SharedBus, tag: &str) -> String {
    let t = topic(tag);
    bus.create_topic(&TopicSpec::new(&t, 1))
        .await
        .expect("create topic");
    t
}

/// Messages per second from one publisher awaiting each acknowledgement.
async fn lone(bus: &SharedBus, n: u64) -> f64 {
    let t = fresh_topic(bus, "lone").await;
    let start = Instant::now();
    for i in 0..n {
        shoal_bus::publish_one(bus.as_ref(), &t, message(i))
            .await
            .expect("publish");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second from `publishers` tasks, each keeping up to `window`
/// single-message publishes in flight.
async fn pipelined(bus: &SharedBus, publishers: u64, window: usize, n: u64) -> f64 {
    let t = fresh_topic(bus, "pipe").await;
    let per = n / publishers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let bus = bus.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let window = Arc::new(Semaphore::new(window));
                let mut set = tokio::task::JoinSet::new();
                for i in 0..per {
                    let permit = window.clone().acquire_owned().await.expect("window");
                    let bus = bus.clone();
                    let t = t.clone();
                    set.spawn(async move {
                        shoal_bus::publish_one(bus.as_ref(), &t, message(p * per + i))
                            .await
                            .expect("publish");
                        drop(permit);
                    });
                    while let Some(r) = set.try_join_next() {
                        r.expect("publish task");
                    }
                }
                while let Some(r) = set.join_next().await {
                    r.expect("publish task");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher");
    }
    (per * publishers) as f64 / start.elapsed().as_secs_f64()
}

/// p50 and p99 publish-to-consume latency in µs at a steady `rate` for `n`
/// messages, one publisher awaiting each ack, one consumer acking each.
async fn latency(bus: &SharedBus, n: u64, rate: u64) -> (f64, f64) {
    let t = fresh_topic(bus, "lat").await;
    let mut consumer = bus
        .subscribe(&t, "bench", SubscribeOptions::default())
        .await
        .expect("subscribe");
    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .expect("delivery within 30 s")
                .expect("delivery");
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&d.message.payload[..8]);
            let sent_us = u64::from_le_bytes(sent);
            let now_us = origin.elapsed().as_micros() as u64;
            lat.push(now_us.saturating_sub(sent_us) as f64);
            consumer.ack(&d).await.expect("ack");
        }
        lat
    });
    let gap = Duration::from_micros(1_000_000 / rate.max(1));
    let mut next = tokio::time::Instant::now();
    for _ in 0..n {
        tokio::time::sleep_until(next).await;
        next += gap;
        let mut body = vec![b'x'; 256];
        body[..8].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_le_bytes());
        shoal_bus::publish_one(bus.as_ref(), &t, OutgoingMessage::new(Bytes::from(body)))
            .await
            .expect("publish");
    }
    let mut lat = receiver.await.expect("receiver");
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    (p(0.50), p(0.99))
}

/// Median of three rounds, alternating the two backends so a noisy stretch of the
/// shared machine hits both.
async fn both<F, Fut>(ours: &SharedBus, reference: &SharedBus, f: F) -> (f64, f64)
where
    F: Fn(SharedBus) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        b.push(f(reference.clone()).await);
        a.push(f(ours.clone()).await);
    }
    (median(a), median(b))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let embedded = args
        .next()
        .expect("usage: bus-throughput <embedded-addr> <nats-url> [scale]");
    let nats = args
        .next()
        .expect("usage: bus-throughput <embedded-addr> <nats-url> [scale]");
    let scale: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let n = |x: f64| ((x * scale) as u64).max(64);
    let figures = args
        .next()
        .unwrap_or_else(|| "lone,pipe,fan,latency".into());
    let run = |f: &str| figures.split(',').any(|x| x == f);

    let ours: SharedBus = Arc::new(
        shoal_broker::EmbeddedBus::connect(&embedded)
            .await
            .expect("connect to the embedded broker"),
    );
    let reference: SharedBus = Arc::new(
        shoal_bus_nats::JetStreamBus::connect(&nats, Default::default())
            .await
            .expect("connect to nats-server"),
    );

    let lone_n = n(2_000.0);
    if run("lone") {
        let (a, b) = both(
            &ours,
            &reference,
            |bus| async move { lone(&bus, lone_n).await },
        )
        .await;
        report(
            "publish, one publisher awaiting each ack (embedded: fsync before ack, bounded by one fsync per message; reference: JetStream, acks before fsync)",
            a,
            b,
            "msgs/s",
        );
    }
    let pipe_n = n(100_000.0);
    if run("pipe") {
        let (a, b) = both(&ours, &reference, |bus| async move {
            pipelined(&bus, 1, 256, pipe_n).await
        })
        .await;
        report(
            "publish, one pipelined publisher, 256 in flight (reference: JetStream)",
            a,
            b,
            "msgs/s",
        );
    }
    if run("fan") {
        let (a, b) = both(&ours, &reference, |bus| async move {
            pipelined(&bus, 16, 1, n(20_000.0)).await
        })
        .await;
        report(
            "publish, 16 concurrent publishers awaiting each ack (reference: JetStream)",
            a,
            b,
            "msgs/s",
        );
    }
    if !run("latency") {
        return;
    }
    let lat_n = n(5_000.0);
    let (mut ours_lat, mut ref_lat) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ref_lat.push(latency(&reference, lat_n, 1_000).await);
        ours_lat.push(latency(&ours, lat_n, 1_000).await);
    }
    let pick = |v: &Vec<(f64, f64)>, i: usize| {
        median(v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect())
    };
    report(
        "publish-to-consume latency p50 at 1,000 msgs/s (reference: JetStream)",
        pick(&ours_lat, 0),
        pick(&ref_lat, 0),
        "us",
    );
    report(
        "publish-to-consume latency p99 at 1,000 msgs/s (reference: JetStream)",
        pick(&ours_lat, 1),
        pick(&ref_lat, 1),
        "us",
    );
}
