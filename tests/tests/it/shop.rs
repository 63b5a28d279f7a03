//! The reference shop as a client sees it: the real `shoal.toml` (its routes, its
//! services) under `shoal up`, every service its own process, driven only through
//! the gateway, with processes killed and frozen on the way. After each test the
//! contract's invariants are checked once the system is quiet.
//!
//! The shop's `shoal.toml` runs on mutual TLS (the default of `shoal up`): every
//! instance refuses plain HTTP, so what a test reads straight from an instance (the
//! invariants' captures, shipments, notifications) it reads over mTLS as
//! `spiffe://shoal.local/service/operator`, a certificate of the system's own CA.

use super::system::{signal, Up, ONE_SYSTEM_AT_A_TIME};
use http::Method;
use serde_json::{json, Value};
use shoal::testing::{request, Answer, TlsClient};
use shoal_tests::{bin_dir, build_binaries, eventually, temp_dir};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The repository's root (the tests crate sits one below it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shop's own system file, changed only where a test must: free ports, fast
/// health checks, the debug binaries, absolute paths, limits out of the way,
/// `extra_env` for some services, and the `[backends]` table, if any.
fn system_file(dir: &Path, extra_env: &[(&str, &str, &str)], backends: &Backends) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("shoal.toml")).unwrap();
    let mut sys: toml::Table = toml::from_str(&text).unwrap();
    sys.remove("build");
    if let Some(b) = &backends.table {
        sys.insert("backends".into(), toml::Value::Table(b.clone()));
    }
    let table = |v: &mut toml::Table, k: &str| -> toml::Table {
        v.get(k)
            .and_then(|t| t.as_table())
            .cloned()
            .unwrap_or_default()
    };
    let mut cp = table(&mut sys, "control_plane");
    let listen = backends
        .control_plane
        .map_or("127.0.0.1:0".to_string(), |a| a.to_string());
    cp.insert("listen".into(), listen.into());
    cp.insert(
        "registry".into(),
        toml::Value::Table(toml::from_str("[health]\ninterval_ms = 200").unwrap()),
    );
    cp.insert(
        "broker".into(),
        toml::Value::Table(toml::from_str("listen = \"127.0.0.1:0\"").unwrap()),
    );
    sys.insert("control_plane".into(), toml::Value::Table(cp));

    let abs = |p: &toml::Value| {
        toml::Value::String(repo().join(p.as_str().unwrap()).display().to_string())
    };
    let mut gw = table(&mut sys, "gateway");
    gw.insert("listen".into(), "127.0.0.1:0".into());
    let openapi = abs(&gw["openapi_file"]);
    gw.insert("openapi_file".into(), openapi);
    // These tests poll through the gateway; limits are tested in gateway.rs.
    gw.insert(
        "rate_limit".into(),
        toml::Value::Table(
            toml::from_str(
                "anonymous = { per_second = 100000, burst = 100000 }\n\
                 authenticated = { per_second = 100000, burst = 100000 }",
            )
            .unwrap(),
        ),
    );
    if let Some(routes) = gw.get_mut("routes").and_then(|r| r.as_array_mut()) {
        for r in routes {
            let r = r.as_table_mut().unwrap();
            if let Some(f) = r.get("schema_file").cloned() {
                r.insert("schema_file".into(), abs(&f));
            }
            r.remove("rate_limit");
        }
    }
    sys.insert("gateway".into(), toml::Value::Table(gw));
    sys.insert(
        "supervisor".into(),
        toml::Value::Table(
            toml::from_str(
                "restart_backoff_initial_ms = 100\nstop_timeout_ms = 10000\nready_timeout_ms = 90000",
            )
            .unwrap(),
        ),
    );
    let bins = bin_dir();
    let services = sys
        .get_mut("services")
        .and_then(|s| s.as_table_mut())
        .unwrap();
    for (key, spec) in services.iter_mut() {
        let spec = spec.as_table_mut().unwrap();
        let program = spec["command"].as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .to_string();
        if program.contains('/') {
            let file = Path::new(&program).file_name().unwrap().to_owned();
            spec.insert(
                "command".into(),
                toml::Value::Array(vec![bins.join(file).display().to_string().into()]),
            );
        } else {
            // An interpreter on the PATH (the Python service behind its sidecar):
            // its script, like a config file, is the repository's.
            let mut argv = spec["command"].as_array().unwrap().clone();
            for arg in argv.iter_mut().skip(1) {
                *arg = abs(arg);
            }
            spec.insert("command".into(), toml::Value::Array(argv));
        }
        if let Some(c) = spec.get("config").cloned() {
            spec.insert("config".into(), abs(&c));
        }
        let mut env = toml::Table::new();
        env.insert("SHOAL_DEREGISTER_GRACE_MS".into(), "100".into());
        for (svc, k, v) in extra_env {
            if svc == key {
                env.insert(k.to_string(), v.to_string().into());
            }
        }
        spec.insert("env".into(), toml::Value::Table(env));
    }
    let path = dir.join("shoal.toml");
    std::fs::write(&path, toml::to_string(&sys).unwrap()).unwrap();
    path
}

struct Shop {
    up: Up,
    _one: tokio::sync::MutexGuard<'static, ()>,
    gw: SocketAddr,
    cp: SocketAddr,
    system: PathBuf,
    dir: PathBuf,
    /// The test's own identity from the system's CA, for calls straight to
    /// instances (the shop's services have no `[authorization]` policy, so any
    /// certificate of the CA is served).
    operator: TlsClient,
}

/// Distributed engines for the shop instead of the embedded ones.
#[derive(Default)]
struct Backends {
    /// The `[backends]` table.
    table: Option<toml::Table>,
    /// A fixed control-plane address (the OTLP endpoint names it).
    control_plane: Option<SocketAddr>,
}

async fn up(tag: &str, extra_env: &[(&str, &str, &str)]) -> Shop {
    up_on(tag, extra_env, &Backends::default()).await
}

async fn up_on(tag: &str, extra_env: &[(&str, &str, &str)], backends: &Backends) -> Shop {
    let one = ONE_SYSTEM_AT_A_TIME.lock().await;
    build_binaries();
    let dir = temp_dir(tag);
    let system = system_file(&dir, extra_env, backends);
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
    let addr = |url: String| -> SocketAddr { url.trim_start_matches("http://").parse().unwrap() };
    let state = up.state().unwrap();
    let (gw, cp) = (addr(state.gateway), addr(state.control_plane));
    let ready = eventually(Duration::from_secs(120), || async {
        request(gw, Method::GET, "/health/ready", &[], "")
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await;
    if !ready {
        let why = request(gw, Method::GET, "/health/ready", &[], "").await;
        let registry = request(cp, Method::GET, "/v1/services", &[], "").await;
        panic!(
            "the shop was not ready in 120 s: {:?}\ngateway: {:?}\nregistry: {:?}",
            up.state(),
            why.map(|a| a.text()),
            registry.map(|a| a.text())
        );
    }
    let operator = TlsClient::issue(&format!("http://{cp}"), "operator")
        .await
        .unwrap();
    Shop {
        up,
        _one: one,
        gw,
        cp,
        system,
        dir,
        operator,
    }
}

impl Shop {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        headers.extend_from_slice(extra);
        request(self.gw, method, path, &headers, body.to_string())
            .await
            .unwrap()
    }

    async fn token(&self, user: &str, password: &str) -> String {
        let body =
            json!({"grant_type": "password", "username": user, "password": password}).to_string();
        let a = self
            .call(Method::POST, "/auth/token", None, &[], &body)
            .await;
        assert_eq!(a.status, 200, "{user}: {}", a.text());
        let v = a.json();
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["expires_in"].as_u64().unwrap() > 0);
        v["access_token"].as_str().unwrap().to_string()
    }

    /// The address of one instance of `service`, from the registry.
    async fn instance(&self, service: &str) -> SocketAddr {
        let a = request(self.cp, Method::GET, "/v1/services", &[], "")
            .await
            .unwrap();
        let v = a.json();
        let s = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service)
            .unwrap_or_else(|| panic!("{service} not registered: {v}"));
        s["instances"][0]["addr"].as_str().unwrap().parse().unwrap()
    }

    async fn place(
        &self,
        token: &str,
        items: &[(&str, u32)],
        card: &str,
        key: Option<&str>,
    ) -> Answer {
        let items: Vec<Value> = items
            .iter()
            .map(|(p, q)| json!({"product_id": p, "quantity": q}))
            .collect();
        let body = json!({"items": items, "card_number": card}).to_string();
        let extra: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        self.call(Method::POST, "/api/orders", Some(token), &extra, &body)
            .await
    }

    /// Wait until the order has ended; its final state.
    async fn ended(&self, token: &str, id: &str, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            let a = self
                .call(
                    Method::GET,
                    &format!("/api/orders/{id}"),
                    Some(token),
                    &[],
                    "",
                )
                .await;
            if a.status == 200 {
                last = a.json();
                if last["status"] == "APPROVED" || last["status"] == "REJECTED" {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("order {id} did not end in {limit:?}: {last}");
    }

    async fn stock(&self, token: &str, product: &str) -> (i64, i64) {
        let a = self
            .call(
                Method::GET,
                &format!("/api/inventory/{product}"),
                Some(token),
                &[],
                "",
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        (
            v["available"].as_i64().unwrap(),
            v["reserved"].as_i64().unwrap(),
        )
    }

    async fn stop(self) {
        let mut up = self.up;
        signal(up.child.id(), 15);
        for _ in 0..300 {
            if up.child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("shoal up did not stop within 30 s");
    }
}

/// Place an order under a trace id of our own, then find that trace in the
/// control plane's collector with every hop in it, print it with `shoal trace`,
/// and find its log lines with `shoal logs --trace`. Answers the order and its
/// final state, for the invariants.
async fn one_order_is_one_trace(shop: &Shop, token: &str) -> (String, Value) {
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let body = json!({"items": [{"product_id": "p-2", "quantity": 1}], "card_number": CARD});
    let a = shop
        .call(
            Method::POST,
            "/api/orders",
            Some(token),
            &[("traceparent", &traceparent)],
            &body.to_string(),
        )
        .await;
    assert!(a.status == 201 || a.status == 202, "{}", a.text());
    let id = a.json()["id"].as_str().unwrap().to_string();
    let order = shop.ended(token, &id, Duration::from_secs(30)).await;
    assert_eq!(order["status"], "APPROVED", "{order}");

    // Spans arrive from every process within a flush interval or two.
    let has = |spans: &[Value], service: &str, kind: &str, name: &str| {
        spans.iter().any(|s| {
            s["service"] == service
                && s["kind"] == kind
                && s["name"].as_str().unwrap_or("").contains(name)
        })
    };
    let found = std::sync::Mutex::new(Vec::<Value>::new());
    let complete = eventually(Duration::from_secs(30), || async {
        let Ok(a) = request(
            shop.cp,
            Method::GET,
            &format!("/v1/traces/{trace_id}"),
            &[],
            "",
        )
        .await
        else {
            return false;
        };
        if a.status != 200 {
            return false;
        }
        let s = a.json()["spans"].as_array().cloned().unwrap_or_default();
        let done = has(&s, "gateway", "server", "POST")
            && has(&s, "gateway", "client", "orders")
            && has(&s, "orders", "server", "/api/orders")
            && has(&s, "orders", "internal", "saga place-order step")
            && has(&s, "inventory", "server", "")
            && has(&s, "payments", "server", "")
            && has(&s, "orders", "producer", "orders.events publish")
            && has(&s, "shipping", "consumer", "orders.events process")
            && has(&s, "notifications", "consumer", "process");
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
    // One tree: only the gateway's span hangs from outside it (from our caller).
    let ids: Vec<&str> = spans.iter().filter_map(|s| s["span_id"].as_str()).collect();
    let outside: Vec<&Value> = spans
        .iter()
        .filter(|s| {
            !s["parent_span_id"]
                .as_str()
                .is_some_and(|p| ids.contains(&p))
        })
        .collect();
    assert_eq!(outside.len(), 1, "{names:#?}");
    assert_eq!(outside[0]["service"], "gateway");
    assert_eq!(outside[0]["parent_span_id"], caller_span);

    // `shoal trace` prints it as a waterfall.
    let out = Command::new(bin_dir().join("shoal"))
        .args(["trace", &trace_id, "--system"])
        .arg(&shop.system)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with(&format!("trace {trace_id}: ")), "{text}");
    assert!(text.contains("saga place-order step"), "{text}");
    assert!(text.contains("orders.events publish (producer)"), "{text}");

    // `shoal logs --trace`: the request's lines from every process it touched.
    let services = || {
        let out = Command::new(bin_dir().join("shoal"))
            .args(["logs", "--json", "--trace", &trace_id, "--system"])
            .arg(&shop.system)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .inspect(|l| assert_eq!(l["trace_id"], trace_id.as_str(), "{l}"))
            .filter_map(|l| l["service"].as_str().map(str::to_string))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let want = [
        "gateway",
        "inventory",
        "notifications",
        "orders",
        "payments",
        "shipping",
    ];
    assert!(
        eventually(Duration::from_secs(10), || async {
            let seen = services();
            want.iter().all(|w| seen.iter().any(|s| s == w))
        })
        .await,
        "logs of trace {trace_id} came from {:?}, not from all of {want:?}",
        services()
    );
    (id, order)
}

/// What a test order is, its lines and card, and how it must end.
type Case<'a> = (
    &'a str,
    &'a [(&'a str, u32)],
    &'a str,
    &'a str,
    Option<&'a str>,
);

/// `n` uncached product reads over `clients` connections at once: how many each
/// version served (`x-shoal-served-by`), and how many `failed`.
async fn catalog_load(gw: SocketAddr, n: u32, clients: u32) -> BTreeMap<String, u32> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let share = n / clients + u32::from(c < n % clients);
        tasks.push(tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            for _ in 0..share {
                count(&mut seen, catalog_read(gw).await);
            }
            seen
        }));
    }
    merge(tasks).await
}

/// Product reads on `clients` connections until `stop`; counted like [`catalog_load`].
async fn catalog_until(
    gw: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: u32,
) -> BTreeMap<String, u32> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            // Bounded, whatever happens to `stop`.
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                count(&mut seen, catalog_read(gw).await);
            }
            seen
        }));
    }
    merge(tasks).await
}

async fn merge(
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<String, u32>>>,
) -> BTreeMap<String, u32> {
    let mut total = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

/// Who served one uncached product read, or `None` if it failed.
async fn catalog_read(gw: SocketAddr) -> Option<String> {
    let a = request(
        gw,
        Method::GET,
        "/api/products/p-1",
        &[("cache-control", "no-cache")],
        "",
    )
    .await
    .ok()?;
    if a.status != 200 {
        return None;
    }
    a.headers
        .get("x-shoal-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn count(seen: &mut BTreeMap<String, u32>, served: Option<String>) {
    *seen
        .entry(served.unwrap_or_else(|| "failed".into()))
        .or_insert(0) += 1;
}

const CARD: &str = "4242424242424242";
const DECLINED: &str = "4000000000000002";
const PRODUCTS: [&str; 6] = ["p-1", "p-2", "p-3", "p-4", "p-5", "p-6"];

/// The contract's invariants, once the system is quiet: per product the initial
/// stock is what is available plus what APPROVED orders took, nothing stays
/// reserved; exactly the APPROVED orders have one capture for their total; each has
/// exactly one shipment.
async fn check_invariants(
    shop: &Shop,
    admin: &str,
    initial: &BTreeMap<String, i64>,
    orders: &[(String, Value)],
) {
    let approved: Vec<&Value> = orders
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["status"] == "APPROVED")
        .collect();
    for p in PRODUCTS {
        let taken: i64 = approved
            .iter()
            .flat_map(|o| o["items"].as_array().unwrap().iter())
            .filter(|i| i["product_id"] == p)
            .map(|i| i["quantity"].as_i64().unwrap())
            .sum();
        let (available, reserved) = shop.stock(admin, p).await;
        assert_eq!(reserved, 0, "{p}: stock still reserved");
        assert_eq!(
            initial[p],
            available + taken,
            "{p}: initial {} ≠ available {available} + approved {taken}",
            initial[p]
        );
    }
    let provider = shop.instance("payment-provider").await;
    let captures = shop
        .operator
        .get("payment-provider", provider, "/v1/captures")
        .await
        .unwrap()
        .json();
    let mut captured: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for c in captures.as_array().unwrap() {
        captured
            .entry(c["reference"].as_str().unwrap().to_string())
            .or_default()
            .push(c["amount_cents"].as_i64().unwrap());
    }
    let shipping = shop.instance("shipping").await;
    for (id, o) in orders {
        let charges = captured.remove(id.as_str()).unwrap_or_default();
        let shipment = shop
            .operator
            .get(
                "shipping",
                shipping,
                &format!("/internal/shipments/by-order/{id}"),
            )
            .await
            .unwrap();
        if o["status"] == "APPROVED" {
            assert_eq!(
                charges,
                vec![o["total_cents"].as_i64().unwrap()],
                "{id}: one capture of its total"
            );
            assert_eq!(
                shipment.status,
                200,
                "{id}: a shipment: {}",
                shipment.text()
            );
        } else {
            assert!(
                charges.is_empty(),
                "{id} is {} but was charged {charges:?}",
                o["status"]
            );
            assert_eq!(shipment.status, 404, "{id}: no shipment");
        }
    }
    assert!(
        captured.is_empty(),
        "captures of no known order: {captured:?}"
    );
}

async fn initial_stock(shop: &Shop, token: &str) -> BTreeMap<String, i64> {
    let mut initial = BTreeMap::new();
    for p in PRODUCTS {
        let (available, reserved) = shop.stock(token, p).await;
        assert_eq!(reserved, 0);
        initial.insert(p.to_string(), available);
    }
    initial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_keeps_its_contract_end_to_end() {
    contract_end_to_end(up("shop", &[]).await).await;
}

/// The same contract with every embedded engine replaced by configuration alone
/// (`[backends]`): the registry in etcd, every service's bus on NATS JetStream,
/// every service's database a schema of its own in PostgreSQL, and spans sent to
/// an OTLP/HTTP endpoint (the control plane's collector, named as any other
/// receiver would be). The servers are the real ones, started by the scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_keeps_its_contract_on_etcd_nats_and_postgres() {
    let cp = free_local_addr();
    let database = shoal_testkit::postgres::fresh_database().await;
    let prefix = shoal_testkit::etcd::unique_prefix();
    let table: toml::Table = toml::from_str(&format!(
        r#"
        etcd = {{ endpoints = ["{etcd}"], prefix = "{prefix}" }}
        jetstream = {{ url = "{nats}" }}
        postgres = {{ url = "{database}" }}
        otlp = {{ endpoint = "http://{cp}/v1/traces" }}
        "#,
        etcd = shoal_testkit::etcd::url(),
        nats = shoal_testkit::nats::url(),
    ))
    .unwrap();
    let backends = Backends {
        table: Some(table),
        control_plane: Some(cp),
    };
    let shop = up_on("shop-backends", &[], &backends).await;
    // The engines really are in use: the registry's instances are in etcd, the
    // services' tables in their own schemas, the control plane runs no broker.
    let broker = request(shop.cp, Method::GET, "/v1/broker", &[], "")
        .await
        .unwrap();
    assert_ne!(broker.status, 200, "{}", broker.text());
    let in_etcd = etcd_keys(&format!("{prefix}/instances/")).await;
    for s in ["orders", "inventory", "payments", "identity", "catalog"] {
        assert!(
            in_etcd
                .iter()
                .any(|k| k.contains(&format!("/instances/{s}-"))),
            "{s} not registered in etcd: {in_etcd:?}"
        );
    }
    contract_end_to_end(shop).await;
    let schemas = shoal_testkit::postgres::query_strings(
        &database,
        "SELECT schema_name FROM information_schema.schemata",
    )
    .await;
    for s in [
        "orders",
        "inventory",
        "payments",
        "payment_provider",
        "catalog",
        "shipping",
    ] {
        assert!(schemas.iter().any(|x| x == s), "no schema {s}: {schemas:?}");
    }
}

/// The keys under `prefix` in the test etcd (through its JSON gateway).
async fn etcd_keys(prefix: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let url = shoal_testkit::etcd::url();
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let body =
        json!({ "key": b64.encode(prefix), "range_end": b64.encode(end), "keys_only": true });
    let a = request(addr, Method::POST, "/v3/kv/range", &[], body.to_string())
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let v: Value = serde_json::from_str(&a.text()).unwrap();
    v["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| String::from_utf8(b64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap())
        .collect()
}

/// A free port on loopback, for a part whose address must be known beforehand.
fn free_local_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn contract_end_to_end(shop: Shop) {
    // `shoal status --json`: every service, catalog in two versions.
    let out = Command::new(bin_dir().join("shoal"))
        .args(["status", "--json", "--system"])
        .arg(&shop.system)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let versions: Vec<(&str, &str)> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["version"].as_str().unwrap()))
        .collect();
    for name in [
        "identity",
        "customers",
        "inventory",
        "payments",
        "payment-provider",
        "orders",
        "shipping",
        "notifications",
        "legacy",
        "reviews",
    ] {
        assert!(
            versions.iter().any(|(n, _)| *n == name),
            "{name} missing: {versions:?}"
        );
    }
    assert!(
        versions.contains(&("catalog", "1.0.0")) && versions.contains(&("catalog", "2.0.0")),
        "{versions:?}"
    );

    // Tokens.
    let alice = shop.token("alice", "alice-pass").await;
    let bob = shop.token("bob", "bob-pass").await;
    let admin = shop.token("admin", "admin-pass").await;
    let wrong =
        json!({"grant_type": "password", "username": "alice", "password": "nope"}).to_string();
    let a = shop
        .call(Method::POST, "/auth/token", None, &[], &wrong)
        .await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert!(a.json()["error"]["code"].is_string());
    let jwks = shop
        .call(Method::GET, "/.well-known/jwks.json", None, &[], "")
        .await;
    assert_eq!(jwks.status, 200);
    assert!(!jwks.json()["keys"].as_array().unwrap().is_empty());
    assert_eq!(
        shop.call(Method::GET, "/api/orders", None, &[], "")
            .await
            .status,
        401
    );
    assert_eq!(
        shop.call(Method::GET, "/api/orders", Some("not.a.token"), &[], "")
            .await
            .status,
        401
    );

    // Catalog, public.
    let products = shop.call(Method::GET, "/api/products", None, &[], "").await;
    assert_eq!(products.status, 200);
    let prices: BTreeMap<String, i64> = products
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["price_cents"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(prices.len() >= 5);
    assert_eq!(
        shop.call(Method::GET, "/api/products/p-99", None, &[], "")
            .await
            .status,
        404
    );
    let mut initial = initial_stock(&shop, &alice).await;

    // Two-phase commit across the two warehouses: 5 units of p-5 from the depot.
    let transfer = |body: &'static str, token: &str| {
        let token = token.to_string();
        let shop = &shop;
        async move {
            shop.call(
                Method::POST,
                "/api/stock-transfers",
                Some(&token),
                &[],
                body,
            )
            .await
        }
    };
    let moved = transfer(
        r#"{"product_id":"p-5","quantity":5,"from":"depot","to":"inventory"}"#,
        &admin,
    )
    .await;
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert_eq!(moved.json()["status"], "committed");
    // Both warehouses were reached over mTLS (the endpoints are https://).
    let id = moved.json()["transfer_id"].as_str().unwrap().to_string();
    let shown = shop
        .call(
            Method::GET,
            &format!("/api/stock-transfers/{id}"),
            Some(&admin),
            &[],
            "",
        )
        .await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    let parts = shown.json()["transaction"]["participants"].clone();
    assert_eq!(parts.as_array().map(Vec::len), Some(2), "{parts}");
    for p in parts.as_array().unwrap() {
        assert!(
            p["endpoint"].as_str().unwrap().starts_with("https://"),
            "{p}"
        );
    }
    *initial.get_mut("p-5").unwrap() += 5;
    assert_eq!(shop.stock(&alice, "p-5").await.0, initial["p-5"]);
    let refused = transfer(
        r#"{"product_id":"p-5","quantity":5000,"from":"depot","to":"inventory"}"#,
        &admin,
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(
        shop.stock(&alice, "p-5").await.0,
        initial["p-5"],
        "a refused transfer moves nothing"
    );
    assert_eq!(
        transfer(
            r#"{"product_id":"p-5","quantity":1,"from":"depot","to":"inventory"}"#,
            &bob
        )
        .await
        .status,
        403
    );

    // Orders: one of each ending.
    let mut placed = Vec::new();
    let cases: [Case; 4] = [
        (
            "approved",
            &[("p-1", 2), ("p-2", 1)],
            CARD,
            "APPROVED",
            None,
        ),
        (
            "out of stock",
            &[("p-1", 1), ("p-6", 1)],
            CARD,
            "REJECTED",
            Some("out_of_stock"),
        ),
        (
            "declined",
            &[("p-3", 1)],
            DECLINED,
            "REJECTED",
            Some("payment_declined"),
        ),
        (
            "unknown",
            &[("p-404", 1)],
            CARD,
            "REJECTED",
            Some("unknown_product"),
        ),
    ];
    for (what, items, card, _, _) in &cases {
        let a = shop.place(&alice, items, card, None).await;
        assert_eq!(a.status, 202, "{what}: {}", a.text());
        let id = a.json()["id"].as_str().unwrap().to_string();
        assert_eq!(a.headers["location"], format!("/api/orders/{id}").as_str());
        placed.push(id);
    }
    let mut ended = Vec::new();
    for ((what, items, _, status, reason), id) in cases.iter().zip(&placed) {
        let o = shop.ended(&alice, id, Duration::from_secs(60)).await;
        assert_eq!(o["status"], *status, "{what}: {o}");
        assert_eq!(o["reason"].as_str(), *reason, "{what}: {o}");
        if *status == "APPROVED" {
            let total: i64 = items.iter().map(|(p, q)| prices[*p] * i64::from(*q)).sum();
            assert_eq!(o["total_cents"], total, "{o}");
        }
        ended.push((id.clone(), o));
    }
    let approved = &placed[0];

    // Idempotency-Key: one order per key and body; another body is refused.
    let first = shop.place(&bob, &[("p-4", 1)], CARD, Some("bob-1")).await;
    assert_eq!(first.status, 202, "{}", first.text());
    let again = shop.place(&bob, &[("p-4", 1)], CARD, Some("bob-1")).await;
    assert_eq!(again.json()["id"], first.json()["id"]);
    assert_eq!(
        shop.place(&bob, &[("p-4", 2)], CARD, Some("bob-1"))
            .await
            .status,
        422
    );
    let bobs = first.json()["id"].as_str().unwrap().to_string();
    ended.push((
        bobs.clone(),
        shop.ended(&bob, &bobs, Duration::from_secs(60)).await,
    ));

    // The gateway checks the body before orders sees it.
    let bad = shop.place(&alice, &[("p-1", 0)], CARD, None).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.json()["error"]["code"], "validation_failed");
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quantity"),
        "{}",
        bad.text()
    );
    assert_eq!(
        shop.call(Method::POST, "/api/orders", Some(&alice), &[], "{nope")
            .await
            .status,
        400
    );
    let big = format!(
        "{{\"items\":[],\"card_number\":\"{}\"}}",
        "1".repeat(70_000)
    );
    assert_eq!(
        shop.call(Method::POST, "/api/orders", Some(&alice), &[], &big)
            .await
            .status,
        413
    );

    // Object-level rules: bob cannot see alice's order, an admin can.
    let path = format!("/api/orders/{approved}");
    assert_eq!(
        shop.call(Method::GET, &path, Some(&bob), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        shop.call(Method::GET, &path, Some(&admin), &[], "")
            .await
            .status,
        200
    );
    for sub in ["history", "details"] {
        let p = format!("{path}/{sub}");
        assert_eq!(
            shop.call(Method::GET, &p, Some(&bob), &[], "").await.status,
            404,
            "{p}"
        );
    }

    // History: versions 1, 2, 3… without gaps.
    let h = shop
        .call(
            Method::GET,
            &format!("{path}/history"),
            Some(&alice),
            &[],
            "",
        )
        .await
        .json();
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    assert_eq!(h[0]["type"], "OrderPlaced");

    // The list is a read model: it catches up.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let l = shop
                .call(Method::GET, "/api/orders", Some(&alice), &[], "")
                .await
                .json();
            l.as_array().is_some_and(|l| {
                l.len() == placed.len() && l.iter().all(|o| o["status"] != "PENDING")
            })
        })
        .await,
        "alice's list did not catch up"
    );

    // Details: composed from orders, customers, payments and shipping.
    let mut details = Value::Null;
    for _ in 0..100 {
        details = shop
            .call(
                Method::GET,
                &format!("{path}/details"),
                Some(&alice),
                &[],
                "",
            )
            .await
            .json();
        if !details["shipment"].is_null() && !details["payment"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let complete = !details["shipment"].is_null() && !details["payment"].is_null();
    assert!(complete, "{details}");
    assert_eq!(details["order"]["id"], approved.as_str());
    assert_eq!(details["customer"]["id"], "alice");
    assert_eq!(details["payment"]["status"], "captured");
    assert_eq!(details["degraded"], json!([]));

    // Choreography: orders' event made shipping schedule a shipment, and both events
    // reached notifications, with no orchestrator between them.
    let notifications = shop.instance("notifications").await;
    let kinds = || async {
        let a = shop
            .operator
            .get(
                "notifications",
                notifications,
                "/internal/notifications?customer_id=alice",
            )
            .await
            .unwrap();
        a.json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["order_id"] == approved.as_str())
            .map(|n| n["kind"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            let k = kinds().await;
            k.iter().any(|k| k == "order.approved") && k.iter().any(|k| k == "shipment.scheduled")
        })
        .await,
        "notifications for {approved}: {:?}",
        kinds().await
    );

    // Mutual TLS is on under the real shoal.toml: every instance registered as
    // serving mTLS only (so the control plane probes and scrapes it over mTLS), a
    // plain-HTTP request straight to one is refused before anything is read, and
    // the same request with a certificate of the system's CA is served.
    let registry = request(shop.cp, Method::GET, "/v1/services", &[], "")
        .await
        .unwrap()
        .json();
    for s in registry["services"].as_array().unwrap() {
        for i in s["instances"].as_array().unwrap() {
            assert_eq!(i["metadata"]["tls"], "mutual", "{}: {i}", s["name"]);
        }
    }
    let path = "/internal/notifications?customer_id=alice";
    let plain = request(notifications, Method::GET, path, &[], "").await;
    assert!(plain.is_err(), "plain HTTP was served: {plain:?}");
    let provider = shop.instance("payment-provider").await;
    let plain = request(provider, Method::GET, "/v1/captures", &[], "").await;
    assert!(plain.is_err(), "plain HTTP was served: {plain:?}");
    let served = shop
        .operator
        .get("notifications", notifications, path)
        .await
        .unwrap();
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(served.json().as_array().is_some_and(|a| !a.is_empty()));
    // The identity is checked both ways: a server that is not the service the
    // client meant (notifications answering as payment-provider) is refused.
    let wrong = shop
        .operator
        .get("payment-provider", notifications, "/health/live")
        .await;
    assert!(
        wrong.is_err(),
        "a server of another identity was trusted: {wrong:?}"
    );

    // One order is one trace, from the gateway to the shipment, and its logs are
    // found by its trace id in every process it touched.
    ended.push(one_order_is_one_trace(&shop, &alice).await);

    // Reviews come from the legacy system through the anti-corruption layer.
    let r = shop
        .call(Method::GET, "/api/reviews?product_id=p-1", None, &[], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let reviews = r.json();
    assert!(!reviews.as_array().unwrap().is_empty());
    for review in reviews.as_array().unwrap() {
        assert_eq!(review["product_id"], "p-1");
        assert!(
            (1..=5).contains(&review["rating"].as_i64().unwrap()),
            "{review}"
        );
        assert!(review["text"].is_string() && review["author"].is_string());
    }

    // The operator's view and the canary: routes show what is legacy; weights move
    // traffic at once.
    let routes = shop
        .call(Method::GET, "/admin/routes", Some(&admin), &[], "")
        .await;
    assert_eq!(routes.status, 200, "{}", routes.text());
    let routes = routes.json();
    let reviews_route = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "reviews")
        .unwrap();
    assert_eq!(reviews_route["upstream"], "legacy");
    assert_eq!(
        shop.call(Method::GET, "/admin/routes", Some(&alice), &[], "")
            .await
            .status,
        403
    );
    // The canary at its configured 90/10: over 2,000 requests the new version's
    // share is within 5 points of 10 % (a 7-sigma band: this cannot flake).
    let served = catalog_load(shop.gw, 2_000, 8).await;
    assert_eq!(served.get("failed").copied().unwrap_or(0), 0, "{served:?}");
    let v2 = served.get("catalog@2.0.0").copied().unwrap_or(0);
    assert!((100..=300).contains(&v2), "v2 got {v2} of 2000: {served:?}");

    // Blue-green under load: all traffic to 2.0.0, then back to 1.0.0, while
    // clients keep asking. Not one request may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(catalog_until(shop.gw, stop.clone(), 4));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (weights, only) in [
        (r#"{"1.0.0":0,"2.0.0":100}"#, "catalog@2.0.0"),
        (r#"{"1.0.0":100,"2.0.0":0}"#, "catalog@1.0.0"),
    ] {
        let w = shop
            .call(
                Method::PUT,
                "/admin/routes/products/weights",
                Some(&admin),
                &[],
                weights,
            )
            .await;
        assert_eq!(w.status, 200, "{}", w.text());
        // The switch is at once: the next requests all go to the new colour.
        let after = catalog_load(shop.gw, 40, 4).await;
        assert_eq!(after.get(only).copied(), Some(40), "{weights}: {after:?}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = load.await.unwrap();
    assert!(during.values().sum::<u32>() > 100, "{during:?}");
    assert_eq!(
        during.get("failed").copied().unwrap_or(0),
        0,
        "failed during the switch: {during:?}"
    );
    let breakers = shop
        .call(Method::GET, "/admin/breakers", Some(&admin), &[], "")
        .await;
    assert_eq!(breakers.status, 200, "{}", breakers.text());

    check_invariants(&shop, &admin, &initial, &ended).await;
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_end_and_the_invariants_hold_when_services_are_killed_mid_flight() {
    // A short payment deadline, so the provider being unreachable ends in time.
    let shop = up(
        "shop-faults",
        &[("orders", "SHOAL_SETTINGS__PAYMENT_DEADLINE_MS", "4000")],
    )
    .await;
    let alice = shop.token("alice", "alice-pass").await;
    let admin = shop.token("admin", "admin-pass").await;
    let initial = initial_stock(&shop, &admin).await;
    let mut placed: Vec<String> = Vec::new();

    // A burst of orders, with kill -9 of orders, then payments, then inventory while
    // they are in flight. The supervisor restarts each; the sagas resume.
    for (round, victim) in ["orders#1", "payments#1", "inventory#1"].iter().enumerate() {
        for i in 0..8u32 {
            let card = if i % 4 == 3 { DECLINED } else { CARD };
            let product = PRODUCTS[(i as usize + round) % 5];
            let key = format!("r{round}-{i}");
            // While orders restarts the gateway may answer 5xx; the client retries
            // with the same key, which must be harmless.
            let mut id = None;
            for _ in 0..60 {
                let a = shop
                    .place(&alice, &[(product, 1 + i % 3)], card, Some(&key))
                    .await;
                if a.status == 202 {
                    id = Some(a.json()["id"].as_str().unwrap().to_string());
                    break;
                }
                assert!(a.status.is_server_error(), "{}", a.text());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            placed.push(id.expect("order accepted within 30 s"));
        }
        let pid = shop.up.pid(victim);
        signal(pid, 9);
        assert!(
            eventually(Duration::from_secs(30), || async {
                shop.up
                    .process(victim)
                    .is_some_and(|p| p.pid.is_some_and(|p| p != pid))
            })
            .await,
            "{victim} not restarted"
        );
    }
    assert!(placed.len() >= 16, "{placed:?}");

    // The payment provider frozen: orders placed now are rejected at the deadline,
    // with their stock released and no money taken.
    let provider = shop.up.pid("payment-provider#1");
    signal(provider, 19);
    let frozen = shop
        .place(&alice, &[("p-2", 1)], CARD, Some("frozen"))
        .await;
    assert_eq!(frozen.status, 202, "{}", frozen.text());
    let frozen = frozen.json()["id"].as_str().unwrap().to_string();
    // Past the deadline the payment step is given up; the provider comes back later
    // (its stand-in's void of a lost authorization is the payments service's job).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let o = shop.ended(&alice, &frozen, Duration::from_secs(60)).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("REJECTED"), Some("payment_unavailable")),
        "{o}"
    );
    signal(provider, 18);
    placed.push(frozen);

    // Shipping frozen: details still answer, shipment null and named degraded.
    let any_order = &placed[0];
    let shipping = shop.up.pid("shipping#1");
    signal(shipping, 19);
    let d = shop
        .call(
            Method::GET,
            &format!("/api/orders/{any_order}/details"),
            Some(&alice),
            &[],
            "",
        )
        .await;
    assert_eq!(d.status, 200, "{}", d.text());
    let d = d.json();
    assert_eq!(d["shipment"], Value::Null, "{d}");
    assert_eq!(d["degraded"], json!(["shipment"]), "{d}");
    signal(shipping, 18);

    // Quiet: every order ends, within the contract's minute.
    let mut ended = Vec::new();
    for id in &placed {
        ended.push((
            id.clone(),
            shop.ended(&alice, id, Duration::from_secs(60)).await,
        ));
    }
    assert!(
        ended.iter().any(|(_, o)| o["status"] == "APPROVED"),
        "{ended:?}"
    );
    // Shipments are scheduled from events: give the choreography a moment.
    let shipping_addr = shop.instance("shipping").await;
    for (id, o) in &ended {
        if o["status"] == "APPROVED" {
            let path = format!("/internal/shipments/by-order/{id}");
            assert!(
                eventually(Duration::from_secs(30), || async {
                    shop.operator
                        .get("shipping", shipping_addr, &path)
                        .await
                        .is_ok_and(|a| a.status == 200)
                })
                .await,
                "{id}: no shipment"
            );
        }
    }
    check_invariants(&shop, &admin, &initial, &ended).await;
    let _ = &shop.dir;
    shop.stop().await;
}

/// Place one order, retrying with the same key while the system answers 5xx (a
/// restart on the way); its id.
async fn place_retrying(
    gw: SocketAddr,
    token: &str,
    items: Value,
    card: &str,
    key: &str,
) -> String {
    let body = json!({"items": items, "card_number": card}).to_string();
    let bearer = format!("Bearer {token}");
    for _ in 0..120 {
        let headers = [
            ("content-type", "application/json"),
            ("authorization", bearer.as_str()),
            ("idempotency-key", key),
        ];
        if let Ok(a) = request(gw, Method::POST, "/api/orders", &headers, body.clone()).await {
            if a.status == 202 {
                return a.json()["id"].as_str().unwrap().to_string();
            }
            assert!(a.status.is_server_error(), "{key}: {}", a.text());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{key}: not accepted in 30 s");
}

/// A short chaos run, bounded and seeded (`SHOAL_CHAOS_SEED` picks another run; the
/// seed is printed): while two clients place orders, random services are killed
/// with SIGKILL, frozen with SIGSTOP for a while, or made to fail a share of their
/// requests through `shoal chaos`. Once it is quiet every order has ended and every
/// invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_run_keeps_every_invariant() {
    let seed: u64 = std::env::var("SHOAL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_202);
    eprintln!("chaos seed {seed} (SHOAL_CHAOS_SEED={seed} repeats this run)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let shop = up(
        "shop-chaos",
        &[("orders", "SHOAL_SETTINGS__PAYMENT_DEADLINE_MS", "5000")],
    )
    .await;
    let alice = shop.token("alice", "alice-pass").await;
    let bob = shop.token("bob", "bob-pass").await;
    let admin = shop.token("admin", "admin-pass").await;
    let initial = initial_stock(&shop, &admin).await;

    // Two clients, each a bounded list of orders drawn from the seed.
    let mut clients = Vec::new();
    for (who, token) in [("alice", alice.clone()), ("bob", bob.clone())] {
        let plan: Vec<(Value, &str)> = (0..12)
            .map(|_| {
                let lines = 1 + rng.usize(0..2);
                let items: Vec<Value> = (0..lines)
                    .map(|_| json!({"product_id": PRODUCTS[rng.usize(0..6)], "quantity": 1 + rng.u32(0..4)}))
                    .collect();
                let card = if rng.u8(0..5) == 0 { DECLINED } else { CARD };
                (Value::Array(items), card)
            })
            .collect();
        let gw = shop.gw;
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for (i, (items, card)) in plan.into_iter().enumerate() {
                let key = format!("{who}-{seed}-{i}");
                ids.push((
                    token.clone(),
                    place_retrying(gw, &token, items, card, &key).await,
                ));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ids
        }));
    }

    // The chaos: eight events, a second or two apart.
    let victims = [
        "orders#1",
        "payments#1",
        "inventory#1",
        "shipping#1",
        "notifications#1",
        "payment-provider#1",
        "catalog#1",
    ];
    let mut frozen: Vec<u32> = Vec::new();
    for _ in 0..8 {
        let victim = victims[rng.usize(0..victims.len())];
        let pid = shop.up.pid(victim);
        match rng.u8(0..3) {
            0 => {
                eprintln!("chaos: kill -9 {victim}");
                signal(pid, 9);
            }
            1 => {
                eprintln!("chaos: freeze {victim}");
                signal(pid, 19);
                frozen.push(pid);
            }
            _ => {
                let service = victim.trim_end_matches("#1");
                eprintln!("chaos: {service} fails 30 % of its requests for 3 s");
                let out = Command::new(bin_dir().join("shoal"))
                    .args([
                        "chaos",
                        "add",
                        service,
                        "--error",
                        "503",
                        "--percent",
                        "30",
                        "--for",
                        "3s",
                        "--system",
                    ])
                    .arg(&shop.system)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(1_000 + rng.u64(0..1_000))).await;
        for pid in frozen.drain(..) {
            signal(pid, 18);
        }
    }

    let mut placed = Vec::new();
    for c in clients {
        placed.extend(c.await.unwrap());
    }
    let mut ended = Vec::new();
    for (token, id) in &placed {
        ended.push((
            id.clone(),
            shop.ended(token, id, Duration::from_secs(60)).await,
        ));
    }
    let shipping = shop.instance("shipping").await;
    for (id, o) in &ended {
        if o["status"] == "APPROVED" {
            let path = format!("/internal/shipments/by-order/{id}");
            assert!(
                eventually(Duration::from_secs(30), || async {
                    shop.operator
                        .get("shipping", shipping, &path)
                        .await
                        .is_ok_and(|a| a.status == 200)
                })
                .await,
                "{id}: no shipment"
            );
        }
    }
    check_invariants(&shop, &admin, &initial, &ended).await;
    shop.stop().await;
}
