//! Resilience policies against real upstreams: a failing service process, a
//! dependency that fails every call, one that hangs, a deadline set at the edge,
//! and faults switched at run time through the control plane.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use shoal::testing::get as http_get;
use shoal::{Ctx, RunningService, Service};
use shoal_core::resilience::{BreakerList, BreakerState, FaultKind, FaultRule};
use shoal_core::{ApiError, ErrorKind};
use shoal_discovery::RegistryClient;
use shoal_tests::{
    answers_ok, bin_dir, build_binaries, control_plane, eventually, gateway_with, temp_dir,
    ChildGuard,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Start an in-process service with `config` (TOML) and the routes given.
async fn start(name: &str, registry: &str, config: &str, routes: Router) -> RunningService {
    let dir = temp_dir(&format!("resilience-{name}"));
    let file = dir.join("config.toml");
    std::fs::write(&file, config).unwrap();
    Service::new(name)
        .routes(routes)
        .config_file(&file)
        .env([
            ("SHOAL_REGISTRY_URL", registry),
            ("SHOAL_DEREGISTER_GRACE_MS", "0"),
            ("SHOAL_LOG_LEVEL", "warn"),
        ])
        .start()
        .await
        .expect("service starts")
}

/// `GET /via/{*path}` calls `dependency` at `/{path}` and answers with its status,
/// or with the typed error's JSON (503 `circuit_open`, 503 `overloaded`, …).
fn via(dependency: &'static str) -> Router {
    Router::new().route(
        "/via/{*path}",
        get(
            move |ctx: Ctx, axum::extract::Path(path): axum::extract::Path<String>| async move {
                match ctx.client(dependency).get(&format!("/{path}")).send().await {
                    Ok(r) => {
                        let ct = r.headers.get(http::header::CONTENT_TYPE).cloned();
                        let mut res = (r.status, r.body).into_response_parts();
                        if let Some(ct) = ct {
                            res.headers_mut().insert(http::header::CONTENT_TYPE, ct);
                        }
                        res
                    }
                    Err(e) => ApiError::from(e).into_response_parts(),
                }
            },
        ),
    )
}

trait IntoParts {
    fn into_response_parts(self) -> axum::response::Response;
}

impl<T: axum::response::IntoResponse> IntoParts for T {
    fn into_response_parts(self) -> axum::response::Response {
        self.into_response()
    }
}

async fn breakers(addr: SocketAddr, path: &str) -> BreakerList {
    let a = http_get(addr, path).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    serde_json::from_slice(&a.body).unwrap()
}

/// The value of a counter series in a Prometheus exposition (0 when absent).
fn counter(metrics: &str, series_prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn error_rule(service: &str, status: u16) -> FaultRule {
    FaultRule {
        id: String::new(),
        service: service.into(),
        route: None,
        kind: FaultKind::Error,
        delay_ms: None,
        status: Some(status),
        percent: 100.0,
        duration_ms: None,
        expires_at_ms: None,
    }
}

#[tokio::test]
async fn a_breaker_opens_on_a_failing_service_process_fails_fast_and_closes_when_it_heals() {
    build_binaries();
    let cp = control_plane().await;
    let registry = RegistryClient::new(&cp.url()).unwrap();
    // The upstream is a real process: the shop's catalog.
    let data = temp_dir("resilience-catalog");
    let _catalog = ChildGuard(
        std::process::Command::new(bin_dir().join("shop-catalog"))
            .env("SHOAL_REGISTRY_URL", cp.url())
            .env("SHOAL_DATA_DIR", &data)
            .env("SHOAL_INSTANCE_ID", "catalog-1")
            .env("SHOAL_LOG_LEVEL", "warn")
            .spawn()
            .unwrap(),
    );
    let front = start(
        "front",
        &cp.url(),
        r#"
        [resilience.policies.fast]
        timeout_ms = 2000
        circuit_breaker = { window_size = 10, minimum_calls = 5, failure_rate_percent = 50, open_ms = 1000, half_open_calls = 2 }
        [resilience.dependencies.catalog]
        policy = "fast"
        "#,
        via("catalog"),
    )
    .await;
    // Calls before the catalog is known would count as failures: wait for it.
    assert!(
        front
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(20), |c| {
                c.instances("catalog").iter().any(|i| i.healthy)
            })
            .await
    );
    let a = http_get(front.addr(), "/via/api/products").await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let catalog_addr = front.ctx().discovery().healthy("catalog")[0].addr;

    // The catalog fails every request from now on.
    registry
        .add_fault(&error_rule("catalog", 503))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(catalog_addr, "/api/products")
                .await
                .is_ok_and(|a| a.status == 503)
        })
        .await
    );
    let injected = || async {
        let m = http_get(catalog_addr, "/metrics").await.unwrap().text();
        counter(&m, "shoal_resilience_faults_injected_total")
    };
    let before = injected().await;

    // With the one success from start-up, four failures make the minimum of five
    // calls at 80% failed: the breaker opens.
    for _ in 0..4 {
        let a = http_get(front.addr(), "/via/api/products").await.unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.json()["error"]["code"], "injected_fault", "{}", a.text());
    }
    assert_eq!(injected().await - before, 4.0);
    let a = http_get(front.addr(), "/via/api/products").await.unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["code"], "circuit_open", "{}", a.text());

    // While open, calls fail fast and none reaches the catalog.
    let client = front.ctx().client("catalog");
    let n = 2_000;
    let start = Instant::now();
    for _ in 0..n {
        let e = client.get("/api/products").send().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CircuitOpen);
    }
    let per_call = start.elapsed() / n;
    eprintln!("open breaker: {n} calls failed fast, {per_call:?} per call");
    assert_eq!(
        injected().await - before,
        4.0,
        "no call passed the open breaker"
    );

    // The control plane lists the breaker as open, and so does the gateway.
    let list = breakers(cp.addr, "/v1/breakers").await;
    let b = list
        .breakers
        .iter()
        .find(|b| b.dependency == "catalog")
        .expect("front's breaker for catalog is listed");
    assert_eq!(b.state, BreakerState::Open);
    assert_eq!(b.policy, "fast");
    assert!(b.owner.starts_with("front-"), "{}", b.owner);
    let gw = gateway_with(&cp.url(), Default::default()).await;
    let list = breakers(gw.addr, "/admin/breakers").await;
    assert!(list
        .breakers
        .iter()
        .any(|b| b.dependency == "catalog" && b.state == BreakerState::Open));

    // The catalog heals; after the open duration two good probes close the breaker.
    assert_eq!(registry.clear_faults(Some("catalog")).await.unwrap(), 1);
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_get(catalog_addr, "/api/products")
                .await
                .is_ok_and(|a| a.status == 200)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for _ in 0..2 {
        let a = http_get(front.addr(), "/via/api/products").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let list = breakers(front.addr(), "/ops/breakers").await;
    assert_eq!(list.breakers[0].state, BreakerState::Closed);
    let m = http_get(front.addr(), "/metrics").await.unwrap().text();
    assert!(
        m.contains("shoal_resilience_breaker_transitions_total{"),
        "{m}"
    );
    assert!(counter(&m, "shoal_resilience_breaker_rejected_total") >= n as f64);
    gw.stop().await;
    front.shutdown().await.unwrap();
    cp.stop().await;
}

#[derive(Clone, Default)]
struct Counters {
    calls: Arc<AtomicU32>,
    in_flight: Arc<AtomicU32>,
    max_in_flight: Arc<AtomicU32>,
}

#[tokio::test]
async fn at_full_failure_the_retry_budget_bounds_the_extra_load() {
    let cp = control_plane().await;
    let seen = Counters::default();
    let failing = start(
        "failing",
        &cp.url(),
        "",
        Router::new()
            .route(
                "/x",
                get(|State(c): State<Counters>| async move {
                    c.calls.fetch_add(1, Ordering::SeqCst);
                    (http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }),
            )
            .with_state(seen.clone()),
    )
    .await;
    // Two callers, the same three attempts per call: one with a 10% budget, one whose
    // budget is effectively unlimited, to show what the budget prevents.
    let policy = |percent: u32| {
        format!(
            r#"
            [resilience.policies.p]
            retry = {{ max_attempts = 3, base_delay_ms = 1, max_delay_ms = 2, budget_percent = {percent}, budget_min_per_sec = 1, budget_window_ms = 10000 }}
            [resilience.dependencies.failing]
            policy = "p"
            "#
        )
    };
    let bounded = start("bounded", &cp.url(), &policy(10), Router::new()).await;
    let unbounded = start("unbounded", &cp.url(), &policy(1000), Router::new()).await;
    assert!(
        bounded
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(5), |c| !c
                .instances("failing")
                .is_empty())
            .await
    );

    let n: u32 = 500;
    let mut amplification = Vec::new();
    for caller in [&bounded, &unbounded] {
        let client = caller.ctx().client("failing");
        let before = seen.calls.load(Ordering::SeqCst);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..n / 10 {
                    let r = client.get("/x").send().await.unwrap();
                    assert_eq!(r.status, 503);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let made = seen.calls.load(Ordering::SeqCst) - before;
        amplification.push(made as f64 / n as f64);
    }
    eprintln!(
        "request amplification at 100% failure: {:.3} with a 10% budget, {:.3} without",
        amplification[0], amplification[1]
    );
    // Bound: every call once, 10% more, plus the reserve of 1 retry/s over 10 s.
    assert!(amplification[0] >= 1.0);
    assert!(
        amplification[0] <= 1.0 + 0.10 + 10.0 / n as f64,
        "{amplification:?}"
    );
    assert!(amplification[1] > 2.9, "{amplification:?}");
    for s in [bounded, unbounded, failing] {
        s.shutdown().await.unwrap();
    }
    cp.stop().await;
}

#[tokio::test]
async fn a_full_bulkhead_on_a_hanging_dependency_leaves_another_dependency_alone() {
    let cp = control_plane().await;
    let hang_seen = Counters::default();
    let hang = start(
        "hang",
        &cp.url(),
        "",
        Router::new()
            .route(
                "/x",
                get(|State(c): State<Counters>| async move {
                    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    c.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    c.in_flight.fetch_sub(1, Ordering::SeqCst);
                    "late"
                }),
            )
            .with_state(hang_seen.clone()),
    )
    .await;
    let quick = start(
        "quick",
        &cp.url(),
        "",
        Router::new().route("/x", get(|| async { "ok" })),
    )
    .await;
    let caller = start(
        "caller",
        &cp.url(),
        r#"
        [resilience.policies.tight]
        timeout_ms = 30000
        bulkhead = { max_concurrent = 4, max_queue = 4, max_queue_wait_ms = 30000 }
        [resilience.dependencies.hang]
        policy = "tight"
        "#,
        Router::new(),
    )
    .await;
    assert!(
        caller
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(5), |c| {
                !c.instances("hang").is_empty() && !c.instances("quick").is_empty()
            })
            .await
    );
    let quick_client = caller.ctx().client("quick");
    let latencies = |label: &'static str| {
        let quick_client = quick_client.clone();
        async move {
            let mut v = Vec::new();
            for _ in 0..200 {
                let t = Instant::now();
                let r = quick_client.get("/x").send().await.unwrap();
                assert_eq!(r.status, 200, "quick must keep answering ({label})");
                v.push(t.elapsed());
            }
            v.sort();
            (v[v.len() / 2], v[v.len() * 99 / 100])
        }
    };
    let calm = latencies("calm").await;

    // Forty calls at the hanging dependency: 4 run, 4 wait, 32 are refused at once.
    let hang_client = caller.ctx().client("hang");
    let mut waiting = Vec::new();
    let mut refused = 0;
    let mut pending = Vec::new();
    for _ in 0..40 {
        let c = hang_client.clone();
        pending.push(tokio::spawn(async move { c.get("/x").send().await }));
    }
    for t in pending {
        // A refused call ends at once; the others hang, so look without waiting.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if t.is_finished() {
            let e = t.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
            refused += 1;
        } else {
            waiting.push(t);
        }
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            hang_seen.in_flight.load(Ordering::SeqCst) == 4
        })
        .await
    );
    assert_eq!(refused, 32);
    assert_eq!(waiting.len(), 8);

    // Calls to the other dependency go on as before.
    let saturated = latencies("hang saturated").await;
    eprintln!(
        "quick dependency latency p50/p99: {:?}/{:?} calm, {:?}/{:?} with hang's bulkhead full",
        calm.0, calm.1, saturated.0, saturated.1
    );
    assert_eq!(hang_seen.max_in_flight.load(Ordering::SeqCst), 4);
    for t in waiting {
        t.abort();
    }
    caller.shutdown().await.unwrap();
    drop(hang);
    quick.shutdown().await.unwrap();
    cp.stop().await;
}

#[derive(Clone, Default)]
struct Work {
    started: Arc<AtomicU32>,
    completed: Arc<AtomicU32>,
    cancelled: Arc<AtomicU32>,
    deadline_ms: Arc<AtomicU32>,
}

/// Counts a cancellation when dropped before `done`.
struct CancelGuard(Arc<AtomicU32>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn a_deadline_set_at_the_edge_cancels_downstream_work() {
    let cp = control_plane().await;
    let work = Work::default();
    let back = start(
        "back",
        &cp.url(),
        "",
        Router::new()
            .route(
                "/work",
                get(
                    |State(w): State<Work>, headers: http::HeaderMap| async move {
                        w.started.fetch_add(1, Ordering::SeqCst);
                        let left: u32 = headers
                            .get(shoal_core::headers::X_SHOAL_DEADLINE_MS)
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(0);
                        w.deadline_ms.store(left, Ordering::SeqCst);
                        let mut guard = CancelGuard(w.cancelled.clone(), false);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        guard.1 = true;
                        w.completed.fetch_add(1, Ordering::SeqCst);
                        "done"
                    },
                ),
            )
            .with_state(work.clone()),
    )
    .await;
    let front = start("front", &cp.url(), "", via("back")).await;
    let gw = gateway_with(
        &cp.url(),
        shoal_gateway::GatewayConfig {
            request_timeout_ms: 400,
            routes: vec![shoal_gateway::RouteConfig::to("/via", "front")],
            ..Default::default()
        },
    )
    .await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(5)).await);
    assert!(
        front
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(5), |c| !c.instances("back").is_empty())
            .await
    );

    let a = http_get(gw.addr, "/via/work").await.unwrap();
    assert!(a.status.is_server_error(), "{}", a.text());
    // The work downstream was cut when the deadline passed, not left to finish.
    assert!(
        eventually(Duration::from_secs(2), || async {
            work.cancelled.load(Ordering::SeqCst) == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(
        work.started.load(Ordering::SeqCst),
        1,
        "no retry past the deadline"
    );
    assert_eq!(work.completed.load(Ordering::SeqCst), 0);
    let left = work.deadline_ms.load(Ordering::SeqCst);
    assert!(left > 0 && left <= 400, "back was told {left} ms were left");

    // A caller's deadline that has already passed is refused before any work.
    let a = shoal::testing::request(
        back.addr(),
        http::Method::GET,
        "/work",
        &[(shoal_core::headers::X_SHOAL_DEADLINE_MS, "0")],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"]["code"], "deadline_exceeded");
    assert_eq!(work.started.load(Ordering::SeqCst), 1);
    gw.stop().await;
    front.shutdown().await.unwrap();
    drop(back);
    cp.stop().await;
}

// Multi-threaded: the CLI runs as a blocking child process while the in-process
// control plane answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_switch_on_and_off_at_run_time_from_the_cli() {
    build_binaries();
    let cp = control_plane().await;
    let target = start(
        "target",
        &cp.url(),
        "",
        Router::new()
            .route("/a", get(|| async { "a" }))
            .route("/b", get(|| async { "b" })),
    )
    .await;
    let addr = target.addr();
    let chaos = |args: &[&str]| {
        let out = std::process::Command::new(bin_dir().join("shoal"))
            .arg("chaos")
            .args(args)
            .args(["--registry", &cp.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shoal chaos {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status_of =
        |path: &'static str| async move { http_get(addr, path).await.map(|a| a.status.as_u16()) };

    // An error on one route only.
    chaos(&["add", "target", "--error", "418", "--route", "/a"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of("/a").await == Ok(418)
        })
        .await
    );
    assert_eq!(status_of("/b").await, Ok(200));
    assert_eq!(
        status_of("/health/ready").await,
        Ok(200),
        "ops paths are exempt"
    );
    chaos(&["clear", "target"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of("/a").await == Ok(200)
        })
        .await
    );

    // A delay holds requests at least that long.
    chaos(&["add", "target", "--delay-ms", "300"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let t = Instant::now();
            status_of("/b").await == Ok(200) && t.elapsed() >= Duration::from_millis(300)
        })
        .await
    );
    chaos(&["clear"]);

    // An abort closes the connection without an answer.
    chaos(&["add", "target", "--abort"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of("/b").await.is_err()
        })
        .await
    );
    let listed = chaos(&["list", "--json"]);
    assert!(listed.contains("\"abort\""), "{listed}");
    chaos(&["clear"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of("/b").await == Ok(200)
        })
        .await
    );

    // Half the requests, for a limited time.
    chaos(&[
        "add",
        "target",
        "--error",
        "503",
        "--percent",
        "50",
        "--for",
        "3s",
    ]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of("/b").await == Ok(503)
        })
        .await
    );
    let mut failed = 0;
    for _ in 0..200 {
        if status_of("/b").await == Ok(503) {
            failed += 1;
        }
    }
    assert!((60..=140).contains(&failed), "{failed} of 200 hit at 50%");
    // The rule expires by itself.
    assert!(
        eventually(Duration::from_secs(6), || async {
            let mut all_ok = true;
            for _ in 0..20 {
                all_ok &= status_of("/b").await == Ok(200);
            }
            all_ok
        })
        .await
    );
    target.shutdown().await.unwrap();
    cp.stop().await;
}
