//! The cost of the sidecar hop, in one run: an open-loop client sends a constant
//! rate (1,000 requests/s by default) to a small echo server, first directly, then
//! through two `shoal sidecar` processes, as an app in another language would call
//! another: client → the caller's sidecar (its outbound listener, plain HTTP on
//! loopback) → mTLS → the callee's sidecar → the echo server. A control plane
//! (registry and certificate authority) runs in this process. Both sidecars run as
//! they do under `shoal up`: mutual TLS, the default resilience policy, spans sent
//! to the control plane, metrics.
//!
//! Latency is measured from each request's scheduled send time, so a stall counts
//! against every request it delays (no coordinated omission). The sidecars' CPU is
//! their utime + stime from /proc/PID/stat over the measured phase, in vCPU.
//!
//! The reference is Dapr's published figure for its sidecars at 1,000 requests/s
//! (two sidecars in the path, mTLS on): about 0.48 vCPU and 1.4 ms of added p90
//! latency (docs.dapr.io, "Service invocation performance").
//!
//!   sidecar-hop <shoal executable> [seconds] [requests per second]

use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use shoal::testing::{ControlPlane, DataDir};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Dapr's published figures (docs.dapr.io, service invocation performance, two
/// sidecars at 1,000 requests/s).
const DAPR_ADDED_P90_MS: f64 = 1.4;
const DAPR_CPU_VCPU: f64 = 0.48;
/// Unmeasured requests before each phase (connections, pools, certificates).
const WARMUP: Duration = Duration::from_secs(2);
/// Longest wait for one answer; a request that takes longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A sidecar process, killed when dropped.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn sidecar(
    shoal: &str,
    cp: &ControlPlane,
    dir: &DataDir,
    name: &str,
    app: SocketAddr,
    out: SocketAddr,
) -> Sidecar {
    let mut env = cp.env(&dir.join(name));
    env.extend([
        ("SHOAL_TLS__MODE".into(), "mutual".into()),
        ("SHOAL_SETTINGS__APP_ADDR".into(), app.to_string()),
        ("SHOAL_SETTINGS__OUTBOUND_LISTEN".into(), out.to_string()),
    ]);
    let child = Command::new(shoal)
        .args(["sidecar", name])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start shoal sidecar");
    Sidecar(child)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `) `.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f
        .get(11..13)
        .map(|v| v.iter().filter_map(|x| x.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // USER_HZ is 100 on every Linux this runs on.
    ticks / 100.0
}

type Http = Client<HttpConnector, Empty<Bytes>>;

/// Set once the first failure has been reported (the rest are counted only).
static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn report(what: String) {
    if !REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("sidecar-hop: first failure: {what}");
    }
}

async fn get_ok(http: &Http, url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, http.get(uri)).await {
        Ok(Ok(res)) => {
            let status = res.status();
            let body = res.into_body().collect().await.map(|b| b.to_bytes());
            match body {
                Ok(_) if status.is_success() => true,
                Ok(b) => {
                    report(format!("{url}: {status} {}", String::from_utf8_lossy(&b)));
                    false
                }
                Err(e) => {
                    report(format!("{url}: body: {e}"));
                    false
                }
            }
        }
        Ok(Err(e)) => {
            report(format!("{url}: {e:?}"));
            false
        }
        Err(_) => {
            report(format!("{url}: no answer within {REQUEST_TIMEOUT:?}"));
            false
        }
    }
}

/// Send `rate` requests a second to `url` for `secs`, open loop; returns the
/// latencies (ms, sorted) and the number of failed requests.
async fn phase(http: &Http, url: &str, rate: u64, secs: f64) -> (Vec<f64>, u64) {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let n = (secs * rate as f64) as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at).await;
        let http = http.clone();
        let url = url.to_string();
        tasks.spawn(async move {
            let ok = get_ok(&http, &url).await;
            (ok, at.elapsed().as_secs_f64() * 1e3)
        });
    }
    let mut lat = Vec::with_capacity(n as usize);
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((true, ms)) => lat.push(ms),
            _ => failed += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    (lat, failed)
}

fn pct(lat: &[f64], p: f64) -> f64 {
    if lat.is_empty() {
        return f64::NAN;
    }
    lat[((lat.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shoal = args
        .get(1)
        .cloned()
        .expect("usage: sidecar-hop <shoal executable> [seconds] [rps]");
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let rate: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);

    // The upstream: the smallest echo server (an app in any language stands here).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // `/health` is what both sidecars' readiness checks ask.
        let app = axum::Router::new()
            .route("/echo", get(|| async { "ok" }))
            .route("/health", get(|| async { "ok" }));
        let _ = axum::serve(listener, app).await;
    });

    let cp = ControlPlane::start().await.expect("control plane");
    let dir = DataDir::new("bench-sidecar");
    // The client stands for the caller's app: it calls the caller's sidecar's
    // outbound listener. (That sidecar's own app address is the echo server too,
    // so its readiness checks pass as they would beside a real app.)
    let caller_out = free_port();
    let callee = sidecar(&shoal, &cp, &dir, "echo", upstream, free_port());
    let caller = sidecar(&shoal, &cp, &dir, "caller", upstream, caller_out);

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build(connector);
    let direct_url = format!("http://{upstream}/echo");
    let sidecar_url = format!("http://{caller_out}/echo/echo");
    let ready = Instant::now();
    while !get_ok(&http, &sidecar_url).await {
        REPORTED.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(
            ready.elapsed() < Duration::from_secs(60),
            "the sidecars did not pass a call within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    REPORTED.store(false, std::sync::atomic::Ordering::Relaxed);
    let warm = WARMUP.as_secs_f64();
    let _ = phase(&http, &direct_url, rate, warm).await;
    let (direct, direct_failed) = phase(&http, &direct_url, rate, secs).await;
    let _ = phase(&http, &sidecar_url, rate, warm).await;
    let pids = [callee.0.id(), caller.0.id()];
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let t0 = Instant::now();
    let (hop, hop_failed) = phase(&http, &sidecar_url, rate, secs).await;
    let cpu =
        (pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0) / t0.elapsed().as_secs_f64();

    drop(caller);
    drop(callee);
    cp.stop().await;

    let row = |name: &str, lat: &[f64], failed: u64| {
        println!(
            "{name:<22} n={:<6} failed={failed:<4} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            lat.len(),
            pct(lat, 0.50),
            pct(lat, 0.90),
            pct(lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
        );
    };
    println!("open loop at {rate} requests/s for {secs} s per phase, one run");
    row("direct", &direct, direct_failed);
    row("through two sidecars", &hop, hop_failed);
    let added = |p: f64| pct(&hop, p) - pct(&direct, p);
    println!(
        "added by the sidecar hop: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms; two sidecars' CPU {:.3} vCPU ({:.3} vCPU per 1,000 requests/s)",
        added(0.5),
        added(0.9),
        added(0.99),
        cpu,
        cpu * 1000.0 / rate as f64,
    );
    let line = |metric: &str, ours: f64, reference: f64, unit: &str| {
        println!(
            "{metric}: ours {ours:.3} {unit}, reference {reference:.3} {unit}, ratio {:.3}",
            ours / reference
        );
    };
    line(
        "sidecar added p90 latency",
        added(0.9),
        DAPR_ADDED_P90_MS,
        "ms",
    );
    line(
        &format!("sidecar CPU at {rate} rps (two sidecars)"),
        cpu,
        DAPR_CPU_VCPU,
        "vCPU",
    );
    line(
        "p50 latency through two sidecars vs direct",
        pct(&hop, 0.5),
        pct(&direct, 0.5),
        "ms",
    );
    line(
        "p99 latency through two sidecars vs direct",
        pct(&hop, 0.99),
        pct(&direct, 0.99),
        "ms",
    );
    if direct_failed + hop_failed > 0 {
        eprintln!(
            "sidecar-hop: {} requests failed",
            direct_failed + hop_failed
        );
        std::process::exit(1);
    }
}
