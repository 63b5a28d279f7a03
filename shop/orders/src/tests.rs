//! The orders service on its own: its participants (catalog, inventory, payments)
//! are stand-ins in this process that answer the way their contracts say and count
//! every effect per order, so a step applied twice shows. The whole shop with the
//! real services, processes killed on the way, is tested in tests/tests/it/shop.rs.

use super::*;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Value};
use shoal::testing::{self, contract::Contract, Answer, DataDir, TestBroker};
use shoal::{ApiError, RunningService};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::sync::Notify;

/// How the payments stand-in answers authorizations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PayMode {
    Normal,
    Unavailable,
    /// Hold each authorization until `release` is notified.
    Hold,
}

struct Fakes {
    out_of_stock: HashSet<String>,
    mode: Mutex<PayMode>,
    release: Notify,
    /// Effects per order: "reserve", "release", "commit", "authorize", "capture",
    /// "void". Like a real participant, a stand-in applies an effect once per
    /// `Idempotency-Key`; counting per order shows a saga that used a new key.
    effects: Mutex<HashMap<(String, &'static str), u32>>,
    keys: Mutex<HashSet<String>>,
    /// Calls per path kind, effective or not.
    calls: Mutex<HashMap<&'static str, u32>>,
    held: Mutex<HashSet<String>>,
    authorized: Mutex<HashSet<String>>,
}

impl Fakes {
    fn new(out_of_stock: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            out_of_stock: out_of_stock.iter().map(|s| s.to_string()).collect(),
            mode: Mutex::new(PayMode::Normal),
            release: Notify::new(),
            effects: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashSet::new()),
            calls: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            authorized: Mutex::new(HashSet::new()),
        })
    }

    fn call(&self, what: &'static str) {
        *self.calls.lock().unwrap().entry(what).or_default() += 1;
    }

    /// Apply `what` to `order` once per idempotency key.
    fn effect(&self, order: &str, what: &'static str, headers: &HeaderMap) {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            !key.is_empty(),
            "{what} of {order} came without an Idempotency-Key"
        );
        if self.keys.lock().unwrap().insert(key) {
            *self
                .effects
                .lock()
                .unwrap()
                .entry((order.to_string(), what))
                .or_default() += 1;
        }
    }

    fn count(&self, order: &str, what: &'static str) -> u32 {
        self.effects
            .lock()
            .unwrap()
            .get(&(order.to_string(), what))
            .copied()
            .unwrap_or(0)
    }

    fn calls(&self, what: &'static str) -> u32 {
        self.calls.lock().unwrap().get(what).copied().unwrap_or(0)
    }
}

fn refused(status: StatusCode, code: &str) -> Response {
    ApiError::new(status, code, code).into_response()
}

async fn product(Path(id): Path<String>) -> Response {
    match id.strip_prefix("p-").and_then(|n| n.parse::<i64>().ok()) {
        Some(n @ 1..=6) => Json(json!({"id": id, "name": format!("Product {n}"), "price_cents": n * 1000, "currency": "EUR"})).into_response(),
        _ => refused(StatusCode::NOT_FOUND, "not_found"),
    }
}

async fn reserve(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    f.call("reserve");
    let order = body["reservation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let items = body["items"].as_array().cloned().unwrap_or_default();
    if items.iter().any(|i| {
        f.out_of_stock
            .contains(i["product_id"].as_str().unwrap_or_default())
    }) {
        return refused(StatusCode::CONFLICT, "out_of_stock");
    }
    f.effect(&order, "reserve", &headers);
    Json(json!({"reservation_id": order, "status": "reserved"})).into_response()
}

async fn release(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Path(order): Path<String>,
) -> Response {
    f.call("release");
    if f.count(&order, "reserve") > 0 {
        f.effect(&order, "release", &headers);
    }
    Json(json!({"status": "released"})).into_response()
}

async fn commit(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Path(order): Path<String>,
) -> Response {
    f.call("commit");
    f.effect(&order, "commit", &headers);
    Json(json!({"status": "committed"})).into_response()
}

async fn authorize(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    f.call("authorize");
    let order = body["order_id"].as_str().unwrap_or_default().to_string();
    let mode = *f.mode.lock().unwrap();
    match mode {
        PayMode::Unavailable => {
            return refused(StatusCode::SERVICE_UNAVAILABLE, "payment_unavailable")
        }
        PayMode::Hold => {
            f.held.lock().unwrap().insert(order.clone());
            f.release.notified().await;
        }
        PayMode::Normal => {}
    }
    if body["card_number"]
        .as_str()
        .unwrap_or_default()
        .ends_with("0002")
    {
        return refused(StatusCode::PAYMENT_REQUIRED, "payment_declined");
    }
    f.effect(&order, "authorize", &headers);
    f.authorized.lock().unwrap().insert(order.clone());
    Json(json!({"order_id": order, "status": "authorized", "amount_cents": body["amount_cents"]}))
        .into_response()
}

async fn capture(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Path(order): Path<String>,
) -> Response {
    f.call("capture");
    f.effect(&order, "capture", &headers);
    Json(json!({"status": "captured"})).into_response()
}

async fn void(
    State(f): State<Arc<Fakes>>,
    headers: HeaderMap,
    Path(order): Path<String>,
) -> Response {
    f.call("void");
    if f.authorized.lock().unwrap().contains(&order) {
        f.effect(&order, "void", &headers);
    }
    Json(json!({"status": "voided"})).into_response()
}

/// One process standing in for catalog, inventory and payments.
async fn participants(dir: &DataDir, fakes: Arc<Fakes>) -> RunningService {
    let routes = axum::Router::new()
        .route("/api/products/{id}", get(product))
        .route("/internal/reservations", post(reserve))
        .route("/internal/reservations/{id}/release", post(release))
        .route("/internal/reservations/{id}/commit", post(commit))
        .route("/internal/payments", post(authorize))
        .route("/internal/payments/{id}/capture", post(capture))
        .route("/internal/payments/{id}/void", post(void))
        .with_state(fakes);
    testing::start_alone(Service::new("participants").routes(routes), &dir.join("p"))
        .await
        .unwrap()
}

struct Shop {
    orders: RunningService,
    participants: RunningService,
    broker: TestBroker,
    fakes: Arc<Fakes>,
    dir: DataDir,
}

async fn start_orders(
    dir: &DataDir,
    peer: SocketAddr,
    broker: &TestBroker,
    env: &[(&str, &str)],
) -> RunningService {
    let peers = format!("[\"{peer}\"]");
    let mut vars: Vec<(String, String)> = vec![
        broker.env(),
        ("SHOAL_PEERS__CATALOG".into(), peers.clone()),
        ("SHOAL_PEERS__INVENTORY".into(), peers.clone()),
        ("SHOAL_PEERS__PAYMENTS".into(), peers),
        ("SHOAL_SETTINGS__STEP_MAX_DELAY_MS".into(), "100".into()),
        ("SHOAL_SETTINGS__SWEEP_INTERVAL_MS".into(), "200".into()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    testing::start_alone(service().env(vars), &dir.join("orders"))
        .await
        .unwrap()
}

async fn shop(tag: &str, out_of_stock: &[&str], env: &[(&str, &str)]) -> Shop {
    let dir = DataDir::new(&format!("shop-orders-{tag}"));
    let fakes = Fakes::new(out_of_stock);
    let participants = participants(&dir, fakes.clone()).await;
    let broker = TestBroker::start().await.unwrap();
    let orders = start_orders(&dir, participants.addr(), &broker, env).await;
    Shop {
        orders,
        participants,
        broker,
        fakes,
        dir,
    }
}

impl Shop {
    async fn stop(self) {
        self.orders.shutdown().await.unwrap();
        self.participants.shutdown().await.unwrap();
    }
}

fn as_user(who: &str) -> Vec<(&'static str, String)> {
    let scopes = if who == "admin" { "admin" } else { "customer" };
    vec![
        ("x-shoal-subject", who.to_string()),
        ("x-shoal-scopes", scopes.to_string()),
    ]
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    who: Option<&str>,
    extra: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut headers: Vec<(&str, String)> = who.map(as_user).unwrap_or_default();
    headers.push(("content-type", "application/json".into()));
    headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    testing::request(addr, method, path, &headers, body.to_string())
        .await
        .unwrap()
}

fn order_body(items: &[(&str, u32)], card: &str) -> String {
    let items: Vec<Value> = items
        .iter()
        .map(|(p, q)| json!({"product_id": p, "quantity": q}))
        .collect();
    json!({"items": items, "card_number": card}).to_string()
}

const GOOD_CARD: &str = "4242424242424242";

async fn place(addr: SocketAddr, who: &str, body: &str, key: Option<&str>) -> Answer {
    let extra: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    call(addr, Method::POST, "/api/orders", Some(who), &extra, body).await
}

/// Poll the order until it has ended (at most 30 s).
async fn ended(addr: SocketAddr, who: &str, id: &str) -> Value {
    for _ in 0..300 {
        let a = call(
            addr,
            Method::GET,
            &format!("/api/orders/{id}"),
            Some(who),
            &[],
            "",
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        if v["status"] != "PENDING" {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("order {id} still pending after 30 s");
}

fn contract(file: &str) -> Contract {
    Contract::load(format!(
        "{}/../contracts/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// The next message on `orders.events` of type `kind` for `order`.
async fn published(broker: &TestBroker, order: &str, kind: &str) -> shoal::bus::Message {
    let bus = broker.bus().await.unwrap();
    let mut consumer = bus
        .subscribe(
            view::TOPIC,
            &format!("test-{}", uuid::Uuid::new_v4().simple()),
            Default::default(),
        )
        .await
        .unwrap();
    let limit = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d = tokio::time::timeout_at(limit, consumer.next())
            .await
            .expect("no message in 20 s")
            .unwrap();
        consumer.ack(&d).await.unwrap();
        let m = d.message;
        if m.key.as_deref() == Some(order)
            && m.headers.get("type").map(String::as_str) == Some(kind)
        {
            return m;
        }
    }
}

#[tokio::test]
async fn an_order_goes_through_every_step_once_and_its_end_is_published() {
    let shop = shop("approve", &[], &[]).await;
    let addr = shop.orders.addr();
    let a = place(
        addr,
        "alice",
        &order_body(&[("p-1", 2), ("p-3", 1)], GOOD_CARD),
        None,
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text());
    let v = a.json();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "PENDING");
    assert_eq!(a.headers["location"], format!("/api/orders/{id}").as_str());

    let o = ended(addr, "alice", &id).await;
    assert_eq!(o["status"], "APPROVED", "{o}");
    assert_eq!(o["reason"], Value::Null);
    assert_eq!(o["customer_id"], "alice");
    assert_eq!(o["total_cents"], 2 * 1000 + 3000);
    assert_eq!(
        o["items"][0],
        json!({"product_id": "p-1", "quantity": 2, "price_cents": 1000})
    );
    for what in ["reserve", "authorize", "capture", "commit"] {
        assert_eq!(shop.fakes.count(&id, what), 1, "{what}");
    }
    assert_eq!(
        shop.fakes.count(&id, "release") + shop.fakes.count(&id, "void"),
        0
    );

    let h = call(
        addr,
        Method::GET,
        &format!("/api/orders/{id}/history"),
        Some("alice"),
        &[],
        "",
    )
    .await;
    assert_eq!(h.status, 200, "{}", h.text());
    let h = h.json();
    let types: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "OrderPlaced",
            "StockReserved",
            "PaymentAuthorized",
            "PaymentCaptured",
            "StockCommitted",
            "OrderApproved"
        ]
    );
    for (i, e) in h.as_array().unwrap().iter().enumerate() {
        assert_eq!(e["version"], i as u64 + 1);
        assert!(e["recorded_at"].as_str().unwrap().ends_with('Z'));
        assert!(e["data"].get("type").is_none(), "{e}");
    }
    assert_eq!(h[0]["data"]["card_last4"], "4242");
    assert!(
        !h.to_string().contains(GOOD_CARD),
        "the card number is not kept"
    );

    // The read model follows (it may lag a little).
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = call(addr, Method::GET, "/api/orders", Some("alice"), &[], "")
            .await
            .json();
        if listed[0]["status"] == "APPROVED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["status"], "APPROVED");

    // Its end is on the bus, in the shape the consumers rely on.
    let m = published(&shop.broker, &id, "order.approved").await;
    let body: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body["total_cents"], 5000);
    assert_eq!(m.headers["correlation-id"], id.as_str());
    for file in ["shipping--orders.json", "notifications--orders.json"] {
        contract(file)
            .message("an approved order")
            .check(&m.topic, &m.headers, &body)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let saga = call(
        addr,
        Method::GET,
        &format!("/internal/orders/{id}/saga"),
        None,
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(saga["status"], "completed", "{saga}");
    shop.stop().await;
}

#[tokio::test]
async fn refusals_reject_the_order_with_its_reason_and_undo_what_was_done() {
    let shop = shop("reject", &["p-6"], &[]).await;
    let addr = shop.orders.addr();

    // Out of stock: nothing reserved, nothing charged.
    let id = place(
        addr,
        "alice",
        &order_body(&[("p-1", 1), ("p-6", 1)], GOOD_CARD),
        None,
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = ended(addr, "alice", &id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("REJECTED"), Some("out_of_stock"))
    );
    assert_eq!(shop.fakes.count(&id, "authorize"), 0);

    // Declined card: the stock it held is released, nothing captured.
    let id = place(
        addr,
        "alice",
        &order_body(&[("p-2", 1)], "4000000000000002"),
        None,
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = ended(addr, "alice", &id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("REJECTED"), Some("payment_declined"))
    );
    assert_eq!(shop.fakes.count(&id, "reserve"), 1);
    assert_eq!(shop.fakes.count(&id, "release"), 1);
    assert_eq!(shop.fakes.count(&id, "capture"), 0);
    let m = published(&shop.broker, &id, "order.rejected").await;
    let body: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body["reason"], "payment_declined");
    contract("notifications--orders.json")
        .message("a rejected order")
        .check(&m.topic, &m.headers, &body)
        .unwrap();

    // An unknown product: rejected at once, no saga, no participant called.
    let before = shop.fakes.calls("reserve");
    let a = place(addr, "alice", &order_body(&[("p-99", 1)], GOOD_CARD), None).await;
    assert_eq!(a.status, 202, "{}", a.text());
    let id = a.json()["id"].as_str().unwrap().to_string();
    let o = ended(addr, "alice", &id).await;
    assert_eq!(o["reason"], "unknown_product");
    assert_eq!(shop.fakes.calls("reserve"), before);
    shop.stop().await;
}

#[tokio::test]
async fn an_unreachable_payment_service_rejects_at_the_deadline_and_takes_no_money() {
    let shop = shop(
        "unavailable",
        &[],
        &[("SHOAL_SETTINGS__PAYMENT_DEADLINE_MS", "1500")],
    )
    .await;
    *shop.fakes.mode.lock().unwrap() = PayMode::Unavailable;
    let addr = shop.orders.addr();
    let id = place(addr, "bob", &order_body(&[("p-1", 3)], GOOD_CARD), None)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = ended(addr, "bob", &id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("REJECTED"), Some("payment_unavailable"))
    );
    assert!(shop.fakes.calls("authorize") >= 2, "retried with backoff");
    assert_eq!(shop.fakes.count(&id, "release"), 1);
    assert_eq!(shop.fakes.count(&id, "capture"), 0);
    // The payment step is undone too: an authorization whose answer was lost is voided.
    assert!(shop.fakes.calls("void") >= 1);
    shop.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_places_one_order_and_refuses_another_body() {
    let shop = shop("idempotency", &[], &[]).await;
    let addr = shop.orders.addr();
    let body = order_body(&[("p-4", 1)], GOOD_CARD);
    let first = place(addr, "alice", &body, Some("key-1")).await;
    assert_eq!(first.status, 202, "{}", first.text());
    let id = first.json()["id"].as_str().unwrap().to_string();
    // The same request, spelled differently, is the same order.
    let respelled = format!("  {}", body.replace(':', ": "));
    for b in [&body, &respelled] {
        let again = place(addr, "alice", b, Some("key-1")).await;
        assert_eq!(again.status, 202, "{}", again.text());
        assert_eq!(again.json()["id"], id.as_str());
    }
    let other = place(
        addr,
        "alice",
        &order_body(&[("p-4", 2)], GOOD_CARD),
        Some("key-1"),
    )
    .await;
    assert_eq!(other.status, 422, "{}", other.text());
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
    // Keys are per customer.
    let bobs = place(addr, "bob", &body, Some("key-1")).await;
    assert_ne!(bobs.json()["id"], id.as_str());

    ended(addr, "alice", &id).await;
    assert_eq!(shop.fakes.count(&id, "capture"), 1);
    let list = call(addr, Method::GET, "/api/orders", Some("alice"), &[], "")
        .await
        .json();
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|o| o["id"] == id.as_str())
            .count(),
        1
    );
    shop.stop().await;
}

#[tokio::test]
async fn only_the_owner_or_an_admin_sees_an_order() {
    let shop = shop("owner", &[], &[]).await;
    let addr = shop.orders.addr();
    let id = place(addr, "alice", &order_body(&[("p-1", 1)], GOOD_CARD), None)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let one = format!("/api/orders/{id}");
    let history = format!("/api/orders/{id}/history");
    let bob = call(addr, Method::GET, &one, Some("bob"), &[], "").await;
    assert_eq!(bob.status, 404, "{}", bob.text());
    let missing = call(addr, Method::GET, "/api/orders/0000", Some("bob"), &[], "").await;
    assert_eq!(bob.json()["error"]["code"], missing.json()["error"]["code"]);
    assert_eq!(
        call(addr, Method::GET, &history, Some("bob"), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        call(addr, Method::GET, &one, Some("admin"), &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        call(addr, Method::GET, &one, None, &[], "").await.status,
        401
    );
    assert_eq!(
        call(addr, Method::GET, "/api/orders", None, &[], "")
            .await
            .status,
        401
    );
    let bobs = call(addr, Method::GET, "/api/orders", Some("bob"), &[], "")
        .await
        .json();
    assert_eq!(bobs, json!([]));
    // Path tricks are just unknown orders.
    for p in ["/api/orders/..%2F..", "/api/orders/a%00b"] {
        let a = call(addr, Method::GET, p, Some("alice"), &[], "").await;
        assert_eq!(a.status, 404, "{p}: {}", a.text());
    }
    shop.stop().await;
}

#[tokio::test]
async fn bad_orders_are_refused_naming_the_field() {
    let shop = shop("bad", &[], &[]).await;
    let addr = shop.orders.addr();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, ""),
        ("[]".into(), 400, "body"),
        (json!({"items": [], "card_number": GOOD_CARD}).to_string(), 400, "items"),
        (order_body(&[("p-1", 0)], GOOD_CARD), 400, "items[0].quantity"),
        (order_body(&[("p-1", 101)], GOOD_CARD), 400, "items[0].quantity"),
        (order_body(&[("p 1", 1)], GOOD_CARD), 400, "items[0].product_id"),
        (order_body(&[("p-1", 1)], "4242"), 400, "card_number"),
        (json!({"items": [{"product_id": "p-1", "quantity": "2"}], "card_number": GOOD_CARD}).to_string(), 400, "body"),
        (json!({"items": [{"product_id": "p-1", "quantity": 1}], "card_number": GOOD_CARD, "admin": true}).to_string(), 400, "admin"),
        (format!("{{\"items\":[],\"card_number\":\"{}\",\"pad\":\"{}\"}}", GOOD_CARD, "x".repeat(70_000)), 413, ""),
    ];
    for (body, status, field) in cases {
        let a = place(addr, "alice", &body, None).await;
        assert_eq!(
            a.status.as_u16(),
            status,
            "{}: {}",
            &body[..body.len().min(80)],
            a.text()
        );
        let v = a.json();
        assert!(v["error"]["code"].is_string(), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    let many: Vec<(&str, u32)> = (0..51).map(|_| ("p-1", 1)).collect();
    assert_eq!(
        place(addr, "alice", &order_body(&many, GOOD_CARD), None)
            .await
            .status,
        400
    );
    assert_eq!(
        shop.fakes.calls("reserve"),
        0,
        "nothing reached a participant"
    );
    shop.stop().await;
}

#[tokio::test]
async fn a_restarted_orders_service_finishes_the_orders_it_had_in_flight() {
    let shop = shop("restart", &[], &[]).await;
    *shop.fakes.mode.lock().unwrap() = PayMode::Hold;
    let addr = shop.orders.addr();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let a = place(addr, "alice", &order_body(&[("p-2", 1)], GOOD_CARD), None).await;
        ids.push(a.json()["id"].as_str().unwrap().to_string());
    }
    // Every saga is inside its payment step when the service stops.
    for _ in 0..200 {
        if shop.fakes.held.lock().unwrap().len() == ids.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(shop.fakes.held.lock().unwrap().len(), ids.len());
    let Shop {
        orders,
        participants,
        broker,
        fakes,
        dir,
    } = shop;
    let stopping = tokio::spawn(orders.shutdown());
    // Let the held calls answer so the stop completes; their sagas may or may not
    // have recorded the step: the restart must cope with either.
    *fakes.mode.lock().unwrap() = PayMode::Normal;
    for _ in 0..20 {
        fakes.release.notify_waiters();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stopping.await.unwrap().unwrap();

    let orders = start_orders(&dir, participants.addr(), &broker, &[]).await;
    for id in &ids {
        let o = ended(orders.addr(), "alice", id).await;
        assert_eq!(o["status"], "APPROVED", "{o}");
        for what in ["reserve", "authorize", "capture", "commit"] {
            assert_eq!(fakes.count(id, what), 1, "{id} {what}");
        }
    }
    let by_kind: BTreeMap<&str, u32> = ["reserve", "authorize"]
        .iter()
        .map(|k| (*k, fakes.calls(k)))
        .collect();
    assert!(by_kind["authorize"] >= 3, "{by_kind:?}");
    orders.shutdown().await.unwrap();
    participants.shutdown().await.unwrap();
}
