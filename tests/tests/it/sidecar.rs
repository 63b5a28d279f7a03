//! A service in another language behind `shoal sidecar`, under `shoal up`: the
//! shop's Python recommendations service (standard library only) is discovered,
//! health-checked through its sidecar, called over mTLS by the gateway (a Rust
//! service), refused in plain text, its calls to the catalog retried and broken by
//! its sidecar's policy, and its hops spans of one trace.

use crate::system::{signal, Up, ONE_SYSTEM_AT_A_TIME};
use http::Method;
use serde_json::{json, Value};
use shoal::testing::{request, TlsClient};
use shoal_tests::{bin_dir, build_binaries, eventually, temp_dir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Control plane, gateway, one catalog and the recommendations app with its
/// sidecar (the shop's own `sidecar.toml` policy), on mutual TLS (the default).
fn write_system_file(dir: &Path) -> PathBuf {
    let text = format!(
        r#"name = "sidecar under test"

[control_plane]
listen = "127.0.0.1:0"
[control_plane.registry.health]
interval_ms = 200
[control_plane.broker]
listen = "127.0.0.1:0"

[gateway]
listen = "127.0.0.1:0"
rate_limit = {{ anonymous = {{ per_second = 100000, burst = 100000 }} }}
[[gateway.routes]]
prefix = "/api/products"
service = "catalog"
[[gateway.routes]]
prefix = "/api/recommendations"
methods = ["GET"]
service = "recommendations"

[supervisor]
restart_backoff_initial_ms = 100
stop_timeout_ms = 10000
ready_timeout_ms = 60000

[services.catalog]
command = ["{bins}/shop-catalog"]
env = {{ SHOAL_DEREGISTER_GRACE_MS = "100" }}

[services.recommendations]
command = ["python3", "{repo}/shop/recommendations/app.py"]
config = "{repo}/shop/recommendations/sidecar.toml"
sidecar = {{ health_path = "/health" }}
env = {{ SHOAL_DEREGISTER_GRACE_MS = "100" }}
"#,
        bins = bin_dir().display(),
        repo = repo().display(),
    );
    let path = dir.join("shoal.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// The registry's view of `recommendations-1`: (address, healthy).
async fn instance(cp: SocketAddr) -> Option<(SocketAddr, bool)> {
    let a = request(cp, Method::GET, "/v1/services/recommendations", &[], "")
        .await
        .ok()?;
    let v = a.json();
    let i = v["instances"]
        .as_array()?
        .iter()
        .find(|i| i["id"] == "recommendations-1")?
        .clone();
    Some((i["addr"].as_str()?.parse().ok()?, i["healthy"] == true))
}

fn counter(metrics: &str, series_prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn add_fault(cp: SocketAddr, percent: f64) {
    let rule = json!({"service": "catalog", "kind": "error", "status": 503,
        "route": "/api/products", "percent": percent});
    let a = request(cp, Method::POST, "/v1/faults", &[], rule.to_string())
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.text());
}

async fn clear_faults(cp: SocketAddr) {
    let a = request(cp, Method::DELETE, "/v1/faults?service=catalog", &[], "")
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_works_through_its_sidecar() {
    let _one = ONE_SYSTEM_AT_A_TIME.lock().await;
    build_binaries();
    let dir = temp_dir("sidecar");
    let system = write_system_file(&dir);
    let child = Command::new(bin_dir().join("shoal"))
        .args(["up", "--no-build", "--system"])
        .arg(&system)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal up");
    let up = Up {
        child,
        state: dir.join(".shoal/up.json"),
    };
    assert!(
        eventually(Duration::from_secs(30), || async { up.state().is_some() }).await,
        "no up.json"
    );
    let state = up.state().unwrap();
    let (gw, cp) = (addr_of(&state.gateway), addr_of(&state.control_plane));

    // Discovered and healthy: the sidecar registered the app's service, and the
    // registry's mTLS probes of its /health/ready (the app's /health) pass. (A new
    // instance counts as healthy until its first probe, so the app's own answer
    // through the gateway is awaited too: the interpreter takes a moment to start.)
    let healthy = eventually(Duration::from_secs(90), || async {
        instance(cp).await.is_some_and(|(_, h)| h)
            && request(gw, Method::GET, "/health/ready", &[], "")
                .await
                .is_ok_and(|a| a.status == 200)
            && request(
                gw,
                Method::GET,
                "/api/recommendations?product_id=p-1",
                &[],
                "",
            )
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await;
    assert!(
        healthy,
        "not healthy: {:?} {:?}",
        instance(cp).await,
        up.state()
    );
    let (addr, _) = instance(cp).await.unwrap();

    // Called by the gateway over mTLS, answered by the Python app, which read the
    // catalog through its sidecar.
    let a = request(
        gw,
        Method::GET,
        "/api/recommendations?product_id=p-1",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let served_by = a.headers["x-shoal-served-by"].to_str().unwrap().to_string();
    assert!(served_by.starts_with("recommendations@"), "{served_by}");
    let body = a.json();
    let others = body["often_bought_with"].as_array().unwrap();
    assert_eq!(others.len(), 3, "{body}");
    assert!(others
        .iter()
        .all(|p| p["id"] != "p-1" && p["name"].is_string()));
    let a = request(
        gw,
        Method::GET,
        "/api/recommendations?product_id=nope",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 404, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "not_found");

    // Plain text to the sidecar is refused at the handshake; a certificate of the
    // system's CA is served.
    let plain = request(addr, Method::GET, "/health/live", &[], "").await;
    assert!(plain.is_err(), "{plain:?}");
    let operator = TlsClient::issue(&format!("http://{cp}"), "operator")
        .await
        .unwrap();
    let a = operator
        .get("recommendations", addr, "/health/ready")
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let rec = |path: &'static str| {
        let operator = operator.clone();
        async move { operator.get("recommendations", addr, path).await }
    };

    // One trace: gateway, the sidecar's server and client spans, the catalog.
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let a = request(
        gw,
        Method::GET,
        "/api/recommendations?product_id=p-2",
        &[("traceparent", &traceparent)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let has = |spans: &[Value], service: &str, kind: &str, name: &str| {
        spans.iter().any(|s| {
            s["service"] == service
                && s["kind"] == kind
                && s["name"].as_str().unwrap_or("").contains(name)
        })
    };
    let found = std::sync::Mutex::new(Vec::<Value>::new());
    let complete = eventually(Duration::from_secs(30), || async {
        let path = format!("/v1/traces/{trace_id}");
        let Ok(a) = request(cp, Method::GET, &path, &[], "").await else {
            return false;
        };
        let s = a.json()["spans"].as_array().cloned().unwrap_or_default();
        let done = has(&s, "gateway", "server", "GET")
            && has(&s, "gateway", "client", "recommendations")
            && has(&s, "recommendations", "server", "GET")
            && has(&s, "recommendations", "client", "catalog")
            && has(&s, "catalog", "server", "/api/products");
        *found.lock().unwrap() = s;
        done
    })
    .await;
    let spans = found.into_inner().unwrap();
    let names: Vec<String> = spans
        .iter()
        .map(|s| format!("{}:{}:{}", s["service"], s["kind"], s["name"]))
        .collect();
    assert!(complete, "trace {trace_id} is missing hops: {names:#?}");
    // One tree: the sidecar's client span hangs from its server span, through the
    // app's copy of `traceparent`.
    let ids: Vec<&str> = spans.iter().filter_map(|s| s["span_id"].as_str()).collect();
    let outside = spans
        .iter()
        .filter(|s| {
            !s["parent_span_id"]
                .as_str()
                .is_some_and(|p| ids.contains(&p))
        })
        .count();
    assert_eq!(outside, 1, "{names:#?}");

    // Retried: with half the catalog's reads failing, the sidecar retries (its
    // policy: 3 attempts on 503) and most recommendations still succeed.
    let metrics = |a: shoal::testing::Answer| a.text();
    let retries_before = counter(
        &metrics(rec("/metrics").await.unwrap()),
        "shoal_resilience_retries_total",
    );
    add_fault(cp, 50.0).await;
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let retried = eventually(Duration::from_secs(30), || async {
        for _ in 0..5 {
            if rec("/api/recommendations?product_id=p-1")
                .await
                .is_ok_and(|a| a.status == 200)
            {
                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let m = metrics(rec("/metrics").await.unwrap());
        counter(&m, "shoal_resilience_retries_total") > retries_before
    })
    .await;
    assert!(retried, "no retry counted");
    assert!(
        ok.into_inner() > 0,
        "no recommendation succeeded under 50 % failures"
    );
    clear_faults(cp).await;

    // Broken: with every read failing, the sidecar's breaker for catalog opens and
    // the app's calls fail fast (503 circuit_open, passed on by the app).
    add_fault(cp, 100.0).await;
    let opened = eventually(Duration::from_secs(30), || async {
        let _ = rec("/api/recommendations?product_id=p-1").await;
        rec("/ops/breakers").await.is_ok_and(|a| {
            a.json()["breakers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["dependency"] == "catalog" && b["state"] == "open")
        })
    })
    .await;
    assert!(opened, "{:?}", rec("/ops/breakers").await.map(|a| a.text()));
    let a = rec("/api/recommendations?product_id=p-1").await.unwrap();
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "circuit_open", "{}", a.text());
    clear_faults(cp).await;
    // It closes again once the catalog heals (after its open time).
    let healed = eventually(Duration::from_secs(30), || async {
        rec("/api/recommendations?product_id=p-1")
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await;
    assert!(healed, "the breaker did not close");

    // Health-checked: a stopped app makes the instance unhealthy in the registry
    // (its sidecar's readiness asks the app), and healthy again once it runs.
    let app = up.pid("recommendations-app#1");
    signal(app, 19); // SIGSTOP
    let down = eventually(Duration::from_secs(30), || async {
        instance(cp).await.is_some_and(|(_, h)| !h)
    })
    .await;
    signal(app, 18); // SIGCONT
    assert!(down, "a stopped app stayed healthy");
    let back = eventually(Duration::from_secs(30), || async {
        instance(cp).await.is_some_and(|(_, h)| h)
    })
    .await;
    assert!(back, "the app did not come back");

    // Supervised: a killed app is restarted beside its sidecar.
    signal(app, 9);
    let restarted = eventually(Duration::from_secs(30), || async {
        up.process("recommendations-app#1")
            .is_some_and(|p| p.pid.is_some_and(|p| p != app) && p.restarts >= 1)
            && rec("/api/recommendations?product_id=p-3")
                .await
                .is_ok_and(|a| a.status == 200)
    })
    .await;
    assert!(restarted, "{:?}", up.process("recommendations-app#1"));
}
