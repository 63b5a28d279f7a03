//! Service-to-service calls over mTLS against the same calls over plain HTTP, in
//! one run: a control plane (registry and certificate authority) in this process,
//! an `echo` service and a `caller` service built on the SDK, the caller's
//! `ctx.client("echo")` called by concurrent tasks over pooled keep-alive
//! connections. Rounds alternate plain and mTLS; each figure is the median of its
//! rounds. The target (the security issue): mTLS costs at most 10 % of the
//! throughput.
//!
//!   mtls-calls [seconds per round] [concurrency] [rounds]

use axum::routing::get;
use shoal::testing::{ControlPlane, DataDir};
use shoal::{RunningService, Service};
use std::time::{Duration, Instant};

async fn start(cp: &ControlPlane, name: &str, mutual: bool, dir: &DataDir) -> RunningService {
    let mut env = cp.env(&dir.join(name));
    if mutual {
        env.push(("SHOAL_TLS__MODE".into(), "mutual".into()));
    }
    Service::new(name)
        .routes(axum::Router::new().route("/echo", get(|| async { "ok" })))
        .env(env)
        .start()
        .await
        .expect("service starts")
}

/// Calls per second and p99 latency (ms) of one round.
async fn round(cp: &ControlPlane, mutual: bool, secs: u64, concurrency: usize) -> (f64, f64) {
    let dir = DataDir::new("bench-mtls");
    let echo = start(cp, "echo", mutual, &dir).await;
    let caller = start(cp, "caller", mutual, &dir).await;
    let client = caller.ctx().client("echo");
    // Ready: the caller has found echo and a call goes through (certificates issued).
    let ready = Instant::now();
    while !client
        .get("/echo")
        .send()
        .await
        .is_ok_and(|r| r.status.as_u16() == 200)
    {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "echo not reachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = caller.ctx().client("echo");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                match client.get("/echo").send().await {
                    Ok(r) if r.status.as_u16() == 200 => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.expect("task");
        lat.extend(l);
        failed += f;
    }
    let took = started.elapsed().as_secs_f64();
    assert_eq!(failed, 0, "calls failed during the round");
    lat.sort_by(f64::total_cmp);
    let p99 = lat[((lat.len() as f64 - 1.0) * 0.99) as usize];
    let _ = caller.shutdown().await;
    let _ = echo.shutdown().await;
    (lat.len() as f64 / took, p99)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let concurrency: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cp = ControlPlane::start().await.expect("control plane");
    let (mut plain, mut mutual) = (Vec::new(), Vec::new());
    let (mut plain_p99, mut mutual_p99) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (rate, p99) = round(&cp, false, secs, concurrency).await;
        eprintln!("round {}: plain {rate:.0} calls/s, p99 {p99:.2} ms", r + 1);
        plain.push(rate);
        plain_p99.push(p99);
        let (rate, p99) = round(&cp, true, secs, concurrency).await;
        eprintln!("round {}: mTLS  {rate:.0} calls/s, p99 {p99:.2} ms", r + 1);
        mutual.push(rate);
        mutual_p99.push(p99);
    }
    let (ours, reference) = (median(mutual), median(plain));
    println!(
        "service-to-service calls, keep-alive: ours {ours:.0} calls/s (mTLS), reference {reference:.0} calls/s (plain HTTP), ratio {:.2}",
        ours / reference
    );
    let (ours, reference) = (median(mutual_p99), median(plain_p99));
    println!(
        "service-to-service p99: ours {ours:.2} ms (mTLS), reference {reference:.2} ms (plain HTTP), ratio {:.2}",
        ours / reference
    );
    cp.stop().await;
}
