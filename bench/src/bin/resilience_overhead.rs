//! Cost per call of the full resilience stack (breaker + retry + timeout +
//! bulkhead, with the per-call scope lookup the service client does) against the
//! bare service it wraps, single-threaded and under contention; and how fast an open
//! breaker fails a call, against the loopback HTTP call it saves.
//!
//! Usage: `resilience-overhead [calls] [full|contended]` (default 200000 calls, every
//! figure). `full` runs only the single-threaded stack (for a profiler), `contended`
//! only the contended pair. Run by `bench/resilience.sh`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use shoal_bench::{interleaved, median, ns_per, report};
use shoal_core::Error;
use shoal_resilience::{
    BreakerConfig, BulkheadConfig, PolicyConfig, Resilience, ResilienceConfig, RetryConfig,
};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Service, ServiceExt};

type Req = Request<Full<Bytes>>;

fn request() -> Req {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = http::Uri::from_static("/api/products/p-1");
    req.headers_mut().insert(
        "x-request-id",
        http::HeaderValue::from_static("0b7c4e0e-1a2b-4c3d-9e8f-001122334455"),
    );
    req
}

/// The bare service: answers on its second poll, as a real call (which always
/// waits at least once) would, so timers and wake-ups are paid for as in real use.
/// It takes the request as the caller gives it: owned for the bare arm, shared
/// (`Arc`) under the stack, which shares it so a retry need not copy it.
fn bare<Q: Send + 'static>(
    status: u16,
) -> impl Service<Q, Response = Response<()>, Error = Error, Future: Send> + Clone + Send + 'static
{
    tower::service_fn(move |_req: Q| async move {
        tokio::task::yield_now().await;
        let mut res = Response::new(());
        *res.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        Ok::<_, Error>(res)
    })
}

fn full_policy() -> Resilience {
    let mut cfg = ResilienceConfig::default();
    cfg.policies.insert(
        "full".into(),
        PolicyConfig {
            timeout_ms: Some(1_000),
            deadline_ms: None,
            retry: Some(RetryConfig::default()),
            circuit_breaker: Some(BreakerConfig {
                minimum_calls: 20,
                window_size: 100,
                open_ms: 3_600_000,
                ..BreakerConfig::default()
            }),
            bulkhead: Some(BulkheadConfig {
                max_concurrent: 4_096,
                max_queue: 4_096,
                max_queue_wait_ms: 1_000,
            }),
            rate_limit: None,
        },
    );
    cfg.default_policy = "full".into();
    Resilience::new(cfg, "bench", Duration::from_secs(1), None).expect("valid policy")
}

async fn call_bare(n: u64) -> Duration {
    let svc = bare::<Req>(200);
    let start = Instant::now();
    for _ in 0..n {
        let res = svc.clone().oneshot(request()).await;
        assert!(res.is_ok());
    }
    start.elapsed()
}

async fn call_full(r: &Resilience, n: u64) -> Duration {
    let svc = bare(200);
    let start = Instant::now();
    for _ in 0..n {
        let req = request();
        let scope = r.scope("catalog", req.uri().path());
        let res = scope.stack(svc.clone()).oneshot(Arc::new(req)).await;
        assert!(res.is_ok());
    }
    start.elapsed()
}

/// A runtime with one timer pending for its whole life. A service process always has
/// some (the registry watch, lease heartbeats, pooled connections' idle timers), so
/// its time driver is already at work; both arms of the comparison run like that,
/// and the stack pays only for its own per-attempt timer.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_time()
            .build()
    }
    .expect("runtime");
    rt.spawn(async { tokio::time::sleep(Duration::from_secs(24 * 3600)).await });
    rt
}

fn single_threaded(n: u64) -> (f64, f64) {
    let rt = runtime(1);
    let r = full_policy();
    rt.block_on(async {
        // Warm up allocator and caches.
        call_bare(n / 10).await;
        call_full(&r, n / 10).await;
    });
    interleaved(
        || ns_per(rt.block_on(call_full(&r, n)), n),
        || ns_per(rt.block_on(call_bare(n)), n),
    )
}

/// Wall time per call with `tasks` tasks on a two-thread runtime all calling through
/// the same scope (one breaker, one bulkhead, one budget).
fn contended(n: u64, tasks: u64) -> (f64, f64) {
    let rt = runtime(2);
    let r = full_policy();
    let run = |full: bool| {
        let r = r.clone();
        rt.block_on(async move {
            let start = Instant::now();
            let mut handles = Vec::new();
            for _ in 0..tasks {
                let r = r.clone();
                handles.push(tokio::spawn(async move {
                    if full {
                        call_full(&r, n / tasks).await;
                    } else {
                        call_bare(n / tasks).await;
                    }
                }));
            }
            for h in handles {
                h.await.expect("task");
            }
            ns_per(start.elapsed(), n)
        })
    };
    run(false);
    run(true);
    interleaved(|| run(true), || run(false))
}

/// ns per call failed by an open breaker, and ns per loopback HTTP call to a server
/// that answers at once (what each rejected call saves at the very least).
fn fail_fast(n: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let r = full_policy();
        let failing = bare(500);
        while r.breakers().first().map(|b| b.state)
            != Some(shoal_core::resilience::BreakerState::Open)
        {
            let scope = r.scope("catalog", "/");
            let _ = scope
                .stack(failing.clone())
                .oneshot(Arc::new(request()))
                .await;
        }
        let mut open_runs = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..n {
                let req = request();
                let scope = r.scope("catalog", req.uri().path());
                let res = scope.stack(failing.clone()).oneshot(Arc::new(req)).await;
                assert!(res.is_err());
            }
            open_runs.push(ns_per(start.elapsed(), n));
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let uri: http::Uri = format!("http://{addr}/api/products/p-1")
            .parse()
            .expect("uri");
        let calls = 5_000u64;
        let mut http_runs = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..calls {
                let mut req = request();
                *req.uri_mut() = uri.clone();
                let res = client.request(req).await.expect("loopback call");
                assert!(res.status().is_success());
            }
            http_runs.push(ns_per(start.elapsed(), calls));
        }
        (median(open_runs), median(http_runs))
    })
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    // `resilience-overhead <calls> contended`: only the contended arms.
    if std::env::args().nth(2).as_deref() == Some("contended") {
        let (full_c, bare_c) = contended(n, 64);
        report(
            "full stack per call, 64 tasks on 2 threads",
            full_c,
            bare_c,
            "ns",
        );
        return;
    }
    // `resilience-overhead <calls> full`: only the single-threaded full stack, for a
    // profiler.
    if std::env::args().nth(2).as_deref() == Some("full") {
        let rt = runtime(1);
        let r = full_policy();
        let t = rt.block_on(call_full(&r, n));
        println!("{:.1} ns per call", ns_per(t, n));
        return;
    }
    let (full, bare) = single_threaded(n);
    report("full stack per call, single-threaded", full, bare, "ns");
    report(
        "added per call, single-threaded (reference: the 1 us target)",
        full - bare,
        1_000.0,
        "ns",
    );
    let (full_c, bare_c) = contended(n, 64);
    report(
        "full stack per call, 64 tasks on 2 threads, one shared scope",
        full_c,
        bare_c,
        "ns",
    );
    report(
        "added per call, 64 tasks on 2 threads (reference: the 1 us target)",
        full_c - bare_c,
        1_000.0,
        "ns",
    );
    let (open, http) = fail_fast(n / 4);
    report(
        "call failed fast by an open breaker (reference: a loopback HTTP call)",
        open,
        http,
        "ns",
    );
}
