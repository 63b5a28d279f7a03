//! End-to-end orders through the gateway: the whole reference shop under
//! `shoal up` (release binaries, every service its own process, the shop's own
//! `shoal.toml` with its rate limits raised out of the way), loaded by clients
//! that place orders as alice and bob. Measures what a client sees: accepted
//! orders per second and the latency of `POST /api/orders` (p50, p99), then how
//! fast the sagas behind them finished. The targets of the shop's issue (500
//! orders/s, p99 ≤ 100 ms) are the reference figures.
//!
//!   shop-load <repo root> [seconds] [clients]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Http = Client<HttpConnector, Full<Bytes>>;

/// The issue's targets, printed as the reference.
const TARGET_ORDERS_PER_S: f64 = 500.0;
const TARGET_P99_MS: f64 = 100.0;
/// Units given to every product before the run, so orders are approved (the
/// saga's long path) rather than refused for stock.
const RESTOCK: u32 = 1_000_000;

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM first: the services drain; then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..300 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn system_file(repo: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo.join("shoal.toml")).expect("shoal.toml");
    let mut sys: toml::Table = toml::from_str(&text).expect("shoal.toml parses");
    sys.remove("build");
    let gw = sys
        .get_mut("gateway")
        .and_then(|g| g.as_table_mut())
        .expect("[gateway]");
    let abs = |v: &toml::Value| {
        toml::Value::String(repo.join(v.as_str().unwrap_or("")).display().to_string())
    };
    if let Some(f) = gw.get("openapi_file").cloned() {
        gw.insert("openapi_file".into(), abs(&f));
    }
    // One machine, two clients: the per-client limits would measure themselves.
    gw.insert(
        "rate_limit".into(),
        toml::Value::Table(
            toml::from_str(
                "anonymous = { per_second = 1000000000, burst = 1000000000 }\n\
                 authenticated = { per_second = 1000000000, burst = 1000000000 }",
            )
            .expect("toml"),
        ),
    );
    gw.insert("access_log".into(), false.into());
    if let Some(routes) = gw.get_mut("routes").and_then(|r| r.as_array_mut()) {
        for r in routes.iter_mut().filter_map(|r| r.as_table_mut()) {
            if let Some(f) = r.get("schema_file").cloned() {
                r.insert("schema_file".into(), abs(&f));
            }
            r.remove("rate_limit");
        }
    }
    let services = sys
        .get_mut("services")
        .and_then(|s| s.as_table_mut())
        .expect("[services]");
    // The file is written elsewhere, so the repository's relative paths (a
    // program, a script it runs, a config file) are made absolute; a bare program
    // name such as `python3` is left to the PATH.
    let absolute = |v: &toml::Value| match v.as_str() {
        Some(p) if p.contains('/') && !p.starts_with('/') => abs(v),
        _ => v.clone(),
    };
    for (_, spec) in services.iter_mut() {
        let spec = spec.as_table_mut().expect("service table");
        let command: Vec<toml::Value> = spec["command"]
            .as_array()
            .expect("command")
            .iter()
            .map(absolute)
            .collect();
        spec.insert("command".into(), toml::Value::Array(command));
        if let Some(c) = spec.get("config").map(absolute) {
            spec.insert("config".into(), c);
        }
    }
    let mut sup = toml::Table::new();
    sup.insert(
        "state_dir".into(),
        dir.join(".shoal").display().to_string().into(),
    );
    sys.insert("supervisor".into(), toml::Value::Table(sup));
    let path = dir.join("shoal.toml");
    std::fs::write(&path, toml::to_string(&sys).expect("toml")).expect("write system file");
    path
}

async fn call(
    http: &Http,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    match http.request(req).await {
        Ok(res) => {
            let status = res.status().as_u16();
            let body = res
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn token(http: &Http, gw: SocketAddr, user: &str) -> String {
    let body =
        json!({"grant_type": "password", "username": user, "password": format!("{user}-pass")})
            .to_string();
    let (status, v) = call(
        http,
        gw,
        "POST",
        "/auth/token",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "login {user}: {v}");
    v["access_token"].as_str().expect("token").to_string()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let repo = PathBuf::from(
        args.get(1)
            .expect("usage: shop-load <repo> [seconds] [clients]"),
    );
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let clients: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);

    let dir = std::env::temp_dir().join(format!("shoal-bench-shop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let system = system_file(&repo, &dir);
    let child = Command::new(repo.join("target/release/shoal"))
        .args(["up", "--no-build", "--system"])
        .arg(&system)
        .current_dir(&repo)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal up");
    let _up = Up(child);
    let gw: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let mut http_connector = HttpConnector::new();
    http_connector.set_nodelay(true);
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients * 2)
        .build(http_connector);
    let started = Instant::now();
    loop {
        let (s, _) = call(&http, gw, "GET", "/health/ready", &[], "").await;
        if s == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the shop was not ready in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "shop up in {:.1} s; {clients} clients for {seconds} s",
        started.elapsed().as_secs_f64()
    );

    // Restock through the inventory's receipt route (an operator's operation).
    let cp: SocketAddr = "127.0.0.1:7070".parse().expect("addr");
    let (_, catalog) = call(&http, cp, "GET", "/v1/services", &[], "").await;
    let inventory: SocketAddr = catalog["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "inventory"))
        .and_then(|s| s["instances"][0]["addr"].as_str())
        .and_then(|a| a.parse().ok())
        .expect("inventory registered");
    // The shop runs on mutual TLS: the inventory serves only callers holding a
    // certificate of the system's CA, so the operator gets one.
    let operator = shoal::testing::TlsClient::issue(&format!("http://{cp}"), "operator")
        .await
        .expect("an operator certificate from the control plane's CA");
    for p in 1..=5 {
        let body = json!({"quantity": RESTOCK}).to_string();
        let key = format!("bench-restock-{p}");
        let a = operator
            .request(
                "inventory",
                inventory,
                http::Method::POST,
                &format!("/internal/stock/p-{p}/receipts"),
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", &key),
                ],
                body,
            )
            .await
            .unwrap_or_else(|e| panic!("restock p-{p}: {e}"));
        assert_eq!(a.status, 200, "restock p-{p}: {}", a.text());
    }
    let tokens = Arc::new([
        token(&http, gw, "alice").await,
        token(&http, gw, "bob").await,
    ]);

    let run = |secs: u64| {
        let http = http.clone();
        let tokens = tokens.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for c in 0..clients {
                let http = http.clone();
                let tokens = tokens.clone();
                tasks.push(tokio::spawn(async move {
                    let bearer = format!("Bearer {}", tokens[c % 2]);
                    let mut lat = Vec::new();
                    let mut ids = Vec::new();
                    let mut failed = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < until {
                        n += 1;
                        let body = json!({
                            "items": [{"product_id": format!("p-{}", 1 + (n + c as u64) % 5), "quantity": 1}],
                            "card_number": "4242424242424242"
                        })
                        .to_string();
                        let t = Instant::now();
                        let (s, v) = call(
                            &http,
                            gw,
                            "POST",
                            "/api/orders",
                            &[("content-type", "application/json"), ("authorization", &bearer)],
                            &body,
                        )
                        .await;
                        if s == 202 {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            ids.push((c % 2, v["id"].as_str().unwrap_or_default().to_string()));
                        } else {
                            failed += 1;
                        }
                    }
                    (lat, ids, failed)
                }));
            }
            let mut lat = Vec::new();
            let mut ids = Vec::new();
            let mut failed = 0;
            for t in tasks {
                let (l, i, f) = t.await.expect("client");
                lat.extend(l);
                ids.extend(i);
                failed += f;
            }
            (lat, ids, failed)
        }
    };
    // Warm-up (connections, pools, SQLite caches), not measured.
    let _ = run(3).await;
    let t0 = Instant::now();
    let (mut lat, ids, failed) = run(seconds).await;
    let load_s = t0.elapsed().as_secs_f64();

    // How fast the sagas behind the accepted orders finished.
    let mut pending: Vec<(usize, String)> = ids.clone();
    let mut approved = 0u64;
    let mut rejected = 0u64;
    let drain_deadline = Instant::now() + Duration::from_secs(300);
    while !pending.is_empty() && Instant::now() < drain_deadline {
        let mut still = Vec::new();
        for (who, id) in pending {
            let bearer = format!("Bearer {}", tokens[who]);
            let (s, v) = call(
                &http,
                gw,
                "GET",
                &format!("/api/orders/{id}"),
                &[("authorization", &bearer)],
                "",
            )
            .await;
            match (s, v["status"].as_str()) {
                (200, Some("APPROVED")) => approved += 1,
                (200, Some("REJECTED")) => rejected += 1,
                _ => still.push((who, id)),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let done_s = t0.elapsed().as_secs_f64();

    lat.sort_by(f64::total_cmp);
    let accepted = ids.len() as f64 / load_s;
    let completed = (approved + rejected) as f64 / done_s;
    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);
    eprintln!(
        "accepted {} orders in {load_s:.1} s ({failed} refused or failed); ended: {approved} approved, {rejected} rejected, {} still pending, {done_s:.1} s after the start",
        ids.len(),
        pending.len()
    );
    println!("orders accepted per second: ours {accepted:.0} orders/s, reference {TARGET_ORDERS_PER_S:.0} orders/s (target), ratio {:.2}", accepted / TARGET_ORDERS_PER_S);
    println!("orders completed per second: ours {completed:.0} orders/s, reference {TARGET_ORDERS_PER_S:.0} orders/s (target), ratio {:.2}", completed / TARGET_ORDERS_PER_S);
    println!("POST /api/orders p50: ours {p50:.1} ms, reference {TARGET_P99_MS:.0} ms (target for p99), ratio {:.2}", p50 / TARGET_P99_MS);
    println!("POST /api/orders p99: ours {p99:.1} ms, reference {TARGET_P99_MS:.0} ms (target), ratio {:.2}", p99 / TARGET_P99_MS);
}
