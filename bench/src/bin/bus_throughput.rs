//! Durable publish throughput and publish-to-consume latency of the embedded broker
//! (which acknowledges only after fsync) against NATS JetStream (file storage, its
//! default acknowledgement, which 2.9 sends before it fsyncs), through the same
//! `shoal_bus::Bus` client pattern on both, in one run.
//!
//! Usage: `bus-throughput <embedded-addr> <nats-url> [scale] [figures]`. Run by
//! `bench/bus.sh`, which starts both servers. `figures` picks some of `lone`, `pipe`,
//! `fan` (16 publishers), `consume` (the last two with a consumer) and `latency`, comma-separated (all by default).

use bytes::Bytes;
use shoal_bench::{median, report};
use shoal_bus::{OutgoingMessage, SharedBus, SubscribeOptions, TopicSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// 256-byte messages: `i`, then the µs since `origin` when it was made.
fn message(i: u64, origin: Instant) -> OutgoingMessage {
    let mut body = vec![b'x'; 256];
    body[..8].copy_from_slice(&i.to_le_bytes());
    body[8..16].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_le_bytes());
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

/// One throughput round: its rate and the p50 and p99 of its publishes' wait for
/// their acknowledgement, in µs (for the embedded broker that wait includes the
/// fsync); with a consumer, the p50 and p99 from publish to delivery too.
#[derive(Clone, Copy)]
struct Round {
    rate: f64,
    ack_p50: f64,
    ack_p99: f64,
    consume_p50: f64,
    consume_p99: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

/// `publishers` tasks, each keeping up to `window` single-message publishes in
/// flight; with `consume`, one group member takes every message meanwhile,
/// acking each.
async fn pipelined(
    bus: &SharedBus,
    publishers: u64,
    window: usize,
    n: u64,
    consume: bool,
) -> Round {
    let t = fresh_topic(bus, "pipe").await;
    let per = n / publishers;
    let origin = Instant::now();
    let consumer = if consume {
        let mut c = bus
            .subscribe(&t, "bench", SubscribeOptions::default())
            .await
            .expect("subscribe");
        Some(tokio::spawn(async move {
            let mut lat = Vec::with_capacity((per * publishers) as usize);
            for _ in 0..per * publishers {
                let d = tokio::time::timeout(Duration::from_secs(60), c.next())
                    .await
                    .expect("delivery within 60 s")
                    .expect("delivery");
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&d.message.payload[8..16]);
                let now_us = origin.elapsed().as_micros() as u64;
                lat.push(now_us.saturating_sub(u64::from_le_bytes(sent)) as f64);
                c.ack(&d).await.expect("ack");
            }
            lat
        }))
    } else {
        None
    };
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let bus = bus.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let window = Arc::new(Semaphore::new(window));
                let mut set = tokio::task::JoinSet::new();
                let mut waits = Vec::with_capacity(per as usize);
                for i in 0..per {
                    let permit = window.clone().acquire_owned().await.expect("window");
                    let bus = bus.clone();
                    let t = t.clone();
                    set.spawn(async move {
                        let sent = Instant::now();
                        shoal_bus::publish_one(bus.as_ref(), &t, message(p * per + i, origin))
                            .await
                            .expect("publish");
                        drop(permit);
                        sent.elapsed().as_secs_f64() * 1e6
                    });
                    while let Some(r) = set.try_join_next() {
                        waits.push(r.expect("publish task"));
                    }
                }
                while let Some(r) = set.join_next().await {
                    waits.push(r.expect("publish task"));
                }
                waits
            })
        })
        .collect();
    let mut waits = Vec::with_capacity(n as usize);
    for task in tasks {
        waits.extend(task.await.expect("publisher"));
    }
    let rate = (per * publishers) as f64 / start.elapsed().as_secs_f64();
    waits.sort_by(|a, b| a.total_cmp(b));
    let mut consumed = match consumer {
        Some(c) => c.await.expect("consumer"),
        None => Vec::new(),
    };
    consumed.sort_by(|a, b| a.total_cmp(b));
    Round {
        rate,
        ack_p50: quantile(&waits, 0.50),
        ack_p99: quantile(&waits, 0.99),
        consume_p50: quantile(&consumed, 0.50),
        consume_p99: quantile(&consumed, 0.99),
    }
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

/// Rounds of each load per backend. A 16-publisher round lasts about half a
/// second, and a noisy stretch of the shared machine can halve one: the median of
/// five rides out two such rounds, of three only one.
const ROUNDS: usize = 5;

/// `ROUNDS` rounds of each, alternating the two backends so a noisy stretch of
/// the shared machine hits both; each figure is the median of its rounds.
async fn both<F, Fut>(ours: &SharedBus, reference: &SharedBus, f: F) -> (Vec<Round>, Vec<Round>)
where
    F: Fn(SharedBus) -> Fut,
    Fut: std::future::Future<Output = Round>,
{
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        b.push(f(reference.clone()).await);
        a.push(f(ours.clone()).await);
    }
    (a, b)
}

/// Prints a load's throughput, its publishes' wait for their acks (p50, p99) and,
/// when it had a consumer, its publish-to-consume latency (p50, p99).
fn report_rounds(load: &str, ours: &[Round], reference: &[Round]) {
    type Figure = (&'static str, &'static str, fn(&Round) -> f64);
    let figures: [Figure; 5] = [
        ("publish", "msgs/s", |r| r.rate),
        ("publish-to-ack p50", "us", |r| r.ack_p50),
        ("publish-to-ack p99", "us", |r| r.ack_p99),
        ("publish-to-consume p50", "us", |r| r.consume_p50),
        ("publish-to-consume p99", "us", |r| r.consume_p99),
    ];
    let med = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    for (metric, unit, f) in figures {
        let (a, b) = (med(ours, f), med(reference, f));
        // Loads without a consumer have no publish-to-consume figures.
        if !a.is_nan() {
            report(&format!("{metric}, {load}"), a, b, unit);
        }
    }
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
        .unwrap_or_else(|| "lone,pipe,fan,consume,latency".into());
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

    println!(
        "# ours: the embedded broker, which acknowledges after fsync; reference: NATS JetStream 2.9, file storage, which acknowledges before fsync"
    );
    let (pipe_n, fan_n) = (n(100_000.0), n(20_000.0));
    // (figure, load, publishers, in flight per publisher, messages, with a consumer)
    let loads = [
        (
            "lone",
            "one publisher awaiting each ack (embedded: bounded by one fsync per message)",
            1,
            1,
            n(2_000.0),
            false,
        ),
        (
            "pipe",
            "one pipelined publisher, 256 in flight",
            1,
            256,
            pipe_n,
            false,
        ),
        (
            "consume",
            "one pipelined publisher, 256 in flight, one consumer acking each",
            1,
            256,
            pipe_n,
            true,
        ),
        (
            "consume",
            "16 concurrent publishers awaiting each ack, one consumer acking each",
            16,
            1,
            fan_n,
            true,
        ),
        (
            "fan",
            "16 concurrent publishers awaiting each ack",
            16,
            1,
            fan_n,
            false,
        ),
    ];
    for (figure, load, publishers, window, count, consume) in loads {
        if run(figure) {
            let (a, b) = both(&ours, &reference, |bus| async move {
                pipelined(&bus, publishers, window, count, consume).await
            })
            .await;
            report_rounds(load, &a, &b);
        }
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
        "publish-to-consume p50 at 1,000 msgs/s",
        pick(&ours_lat, 0),
        pick(&ref_lat, 0),
        "us",
    );
    report(
        "publish-to-consume p99 at 1,000 msgs/s",
        pick(&ours_lat, 1),
        pick(&ref_lat, 1),
        "us",
    );
}
