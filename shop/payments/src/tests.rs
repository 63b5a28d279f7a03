//! Payments against a real payment provider: both registered with a real control
//! plane (registry only, no broker) in the test process, so `ctx.client(..)` finds
//! the provider by name as it does under `shoal up`.

use super::service;
use axum::http::Method;
use serde_json::{json, Value};
use shoal::testing::{self, Answer, ControlPlane, DataDir};
use shoal::RunningService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

const CARD: &str = "4242424242424242";
const DECLINED: &str = "4000000000000002";

/// The environment of a service registered with `cp`, its data in `dir`.
fn env(cp: &ControlPlane, dir: &std::path::Path) -> Vec<(String, String)> {
    let mut env = cp.env(dir);
    env.push(("SHOAL_CLIENT__TIMEOUT_MS".into(), "2000".into()));
    env
}

/// A payments instance registered with `cp`, its data in `dir` (instances given
/// the same `dir` share the database: replicas). Its retrier of pending voids runs
/// every 100 ms.
async fn start_payments(cp: &ControlPlane, dir: &std::path::Path) -> RunningService {
    service()
        .env(env(cp, dir))
        .env([("SHOAL_SETTINGS__VOID_RETRY_MS", "100")])
        .start()
        .await
        .unwrap()
}

/// Payments and a provider, both registered.
struct World {
    payments: RunningService,
    provider: Option<RunningService>,
    provider_dir: DataDir,
    cp: ControlPlane,
    payments_dir: DataDir,
}

impl World {
    async fn start(tag: &str) -> Self {
        let cp = ControlPlane::start().await.unwrap();
        let provider_dir = DataDir::new(&format!("shop-payments-{tag}-provider"));
        let payments_dir = DataDir::new(&format!("shop-payments-{tag}"));
        let payments = start_payments(&cp, &payments_dir).await;
        let mut world = Self {
            payments,
            provider: None,
            provider_dir,
            cp,
            payments_dir,
        };
        world.start_provider().await;
        world
    }

    /// Stop payments and start it again on the same database.
    async fn restart_payments(&mut self) {
        let fresh = start_payments(&self.cp, &self.payments_dir).await;
        let old = std::mem::replace(&mut self.payments, fresh);
        old.shutdown().await.unwrap();
    }

    /// Another payments instance on the same database.
    async fn start_replica(&self) -> RunningService {
        start_payments(&self.cp, &self.payments_dir).await
    }

    /// The payment's `void_pending`, as stored.
    async fn void_pending(&self, order: &str) -> bool {
        let (pending,): (i64,) =
            sqlx::query_as("SELECT void_pending FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_one(self.payments.ctx().db().pool())
                .await
                .unwrap();
        pending != 0
    }

    /// Wait (bounded) until payments no longer owes the provider the order's void.
    async fn wait_void_done(&self, order: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.void_pending(order).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pending void of {order} was never done"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_provider(&mut self) {
        let provider = shop_payment_provider::service()
            .env(env(&self.cp, &self.provider_dir))
            .start()
            .await
            .unwrap();
        let id = provider.ctx().instance_id().to_string();
        self.provider = Some(provider);
        let found = self
            .payments
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(10), |c| {
                c.instances("payment-provider")
                    .iter()
                    .any(|i| i.healthy && i.id == id)
            })
            .await;
        assert!(found, "payments never saw the provider");
    }

    async fn stop_provider(&mut self) {
        if let Some(p) = self.provider.take() {
            p.shutdown().await.unwrap();
        }
        let gone = self
            .payments
            .ctx()
            .discovery()
            .wait_until(Duration::from_secs(10), |c| {
                c.instances("payment-provider").is_empty()
            })
            .await;
        assert!(gone, "payments still sees the provider");
    }

    fn addr(&self) -> SocketAddr {
        self.payments.addr()
    }

    fn provider_addr(&self) -> SocketAddr {
        self.provider.as_ref().expect("provider running").addr()
    }

    /// The provider's authorizations for one order.
    async fn provider_authorizations(&self, order: &str) -> Vec<Value> {
        let a = testing::get(
            self.provider_addr(),
            &format!("/v1/authorizations?reference={order}"),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        a.json().as_array().unwrap().clone()
    }

    async fn provider_captures(&self) -> Vec<Value> {
        let a = testing::get(self.provider_addr(), "/v1/captures")
            .await
            .unwrap();
        a.json().as_array().unwrap().clone()
    }

    async fn stop(mut self) {
        self.payments.shutdown().await.unwrap();
        if let Some(p) = self.provider.take() {
            p.shutdown().await.unwrap();
        }
        self.cp.stop().await;
    }
}

async fn post(addr: SocketAddr, path: &str, body: Option<Value>) -> Answer {
    let (headers, body): (&[(&str, &str)], Vec<u8>) = match body {
        Some(b) => (
            &[("content-type", "application/json")],
            serde_json::to_vec(&b).unwrap(),
        ),
        None => (&[], Vec::new()),
    };
    testing::request(addr, Method::POST, path, headers, body)
        .await
        .unwrap()
}

fn payment(order: &str, amount: i64, card: &str) -> Value {
    json!({"order_id": order, "customer_id": "alice", "amount_cents": amount, "currency": "EUR", "card_number": card})
}

async fn authorize(addr: SocketAddr, order: &str, amount: i64, card: &str) -> Answer {
    post(
        addr,
        "/internal/payments",
        Some(payment(order, amount, card)),
    )
    .await
}

async fn capture(addr: SocketAddr, order: &str) -> Answer {
    post(addr, &format!("/internal/payments/{order}/capture"), None).await
}

async fn void(addr: SocketAddr, order: &str) -> Answer {
    post(addr, &format!("/internal/payments/{order}/void"), None).await
}

async fn by_order(addr: SocketAddr, order: &str) -> Answer {
    testing::get(addr, &format!("/internal/payments/by-order/{order}"))
        .await
        .unwrap()
}

fn assert_status(a: &Answer, status: u16, payment_status: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    assert_eq!(a.json()["status"], payment_status, "{}", a.text());
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], code, "{}", a.text());
}

#[tokio::test]
async fn authorize_then_capture() {
    let world = World::start("capture").await;
    let addr = world.addr();
    let a = authorize(addr, "o-1", 2599, CARD).await;
    assert_status(&a, 200, "authorized");
    assert_eq!(
        a.json(),
        json!({"order_id": "o-1", "status": "authorized", "amount_cents": 2599})
    );
    let at_provider = world.provider_authorizations("o-1").await;
    assert_eq!(at_provider.len(), 1);
    assert_eq!(at_provider[0]["status"], "authorized");
    assert_eq!(at_provider[0]["amount_cents"], 2599);

    for _ in 0..2 {
        assert_status(&capture(addr, "o-1").await, 200, "captured");
    }
    let captures = world.provider_captures().await;
    assert_eq!(captures.len(), 1, "{captures:?}");
    assert_eq!(captures[0]["reference"], "o-1");
    assert_eq!(
        by_order(addr, "o-1").await.json(),
        json!({"order_id": "o-1", "status": "captured", "amount_cents": 2599,
               "currency": "EUR", "card_last4": "4242"})
    );
    // Captured: the void is refused, here and at the provider.
    assert_error(&void(addr, "o-1").await, 409, "conflict");
    assert_eq!(
        world.provider_authorizations("o-1").await[0]["status"],
        "captured"
    );
    // Unknown orders.
    assert_error(&capture(addr, "o-none").await, 404, "not_found");
    assert_error(&by_order(addr, "o-none").await, 404, "not_found");
    world.stop().await;
}

#[tokio::test]
async fn a_declined_card_is_402_payment_declined() {
    let world = World::start("decline").await;
    let addr = world.addr();
    for _ in 0..2 {
        assert_error(
            &authorize(addr, "o-d", 1899, DECLINED).await,
            402,
            "payment_declined",
        );
    }
    assert_eq!(world.provider_authorizations("o-d").await.len(), 1);
    assert_eq!(by_order(addr, "o-d").await.json()["status"], "declined");
    assert_eq!(by_order(addr, "o-d").await.json()["card_last4"], "0002");
    assert_error(&capture(addr, "o-d").await, 409, "conflict");
    // Nothing is held: a void succeeds.
    assert_status(&void(addr, "o-d").await, 200, "voided");
    world.stop().await;
}

#[tokio::test]
async fn provider_down_is_503_payment_unavailable_and_a_retry_succeeds() {
    let mut world = World::start("down").await;
    let addr = world.addr();
    assert_status(&authorize(addr, "o-a", 700, CARD).await, 200, "authorized");
    world.stop_provider().await;
    assert_error(
        &authorize(addr, "o-1", 500, CARD).await,
        503,
        "payment_unavailable",
    );
    assert_eq!(by_order(addr, "o-1").await.json()["status"], "authorizing");
    assert_error(&capture(addr, "o-a").await, 503, "payment_unavailable");
    assert_error(&void(addr, "o-a").await, 503, "payment_unavailable");
    assert_eq!(by_order(addr, "o-a").await.json()["status"], "authorized");

    // The provider comes back (same data): the saga's retry goes through, with one
    // authorization at the provider.
    world.start_provider().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = authorize(addr, "o-1", 500, CARD).await;
        if a.status == 200 {
            assert_eq!(a.json()["status"], "authorized");
            break;
        }
        assert_error(&a, 503, "payment_unavailable");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(world.provider_authorizations("o-1").await.len(), 1);
    assert_status(&capture(addr, "o-a").await, 200, "captured");
    world.stop().await;
}

#[tokio::test]
async fn authorize_is_idempotent_on_the_order() {
    let world = World::start("idem").await;
    let addr = world.addr();
    let first = authorize(addr, "o-2", 1000, CARD).await;
    assert_status(&first, 200, "authorized");
    for _ in 0..3 {
        assert_status(&authorize(addr, "o-2", 1000, CARD).await, 200, "authorized");
    }
    // Concurrent first calls for one order.
    let tasks: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { authorize(addr, "o-race", 300, CARD).await }))
        .collect();
    for t in tasks {
        assert_status(&t.await.unwrap(), 200, "authorized");
    }
    // A crash after the provider answered and before our write: the row still says
    // authorizing; the resumed saga's repeat gets the same authorization back.
    let pool = world.payments.ctx().db().pool().clone();
    let (before,): (String,) =
        sqlx::query_as("SELECT authorization_id FROM payments WHERE order_id = 'o-2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query(
        "UPDATE payments SET status = 'authorizing', authorization_id = NULL WHERE order_id = 'o-2'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_status(&authorize(addr, "o-2", 1000, CARD).await, 200, "authorized");
    let (after,): (String,) =
        sqlx::query_as("SELECT authorization_id FROM payments WHERE order_id = 'o-2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(world.provider_authorizations("o-2").await.len(), 1);
    assert_eq!(world.provider_authorizations("o-race").await.len(), 1);
    // The same order with other details is not a repeat.
    assert_error(&authorize(addr, "o-2", 1001, CARD).await, 409, "conflict");
    world.stop().await;
}

#[tokio::test]
async fn void_before_authorize_refuses_the_late_authorize() {
    let world = World::start("late").await;
    let addr = world.addr();
    for _ in 0..2 {
        assert_status(&void(addr, "o-4").await, 200, "voided");
    }
    assert_error(&authorize(addr, "o-4", 500, CARD).await, 409, "conflict");
    // The provider never saw it, and there is no payment to show.
    assert!(world.provider_authorizations("o-4").await.is_empty());
    assert_error(&by_order(addr, "o-4").await, 404, "not_found");
    assert_error(&capture(addr, "o-4").await, 409, "conflict");
    world.stop().await;
}

#[tokio::test]
async fn capture_after_void_is_refused() {
    let world = World::start("void").await;
    let addr = world.addr();
    assert_status(&authorize(addr, "o-5", 800, CARD).await, 200, "authorized");
    for _ in 0..2 {
        assert_status(&void(addr, "o-5").await, 200, "voided");
    }
    assert_eq!(
        world.provider_authorizations("o-5").await[0]["status"],
        "voided"
    );
    assert_error(&capture(addr, "o-5").await, 409, "conflict");
    assert_error(&authorize(addr, "o-5", 800, CARD).await, 409, "conflict");
    assert!(world.provider_captures().await.is_empty());
    assert_eq!(by_order(addr, "o-5").await.json()["status"], "voided");
    world.stop().await;
}

#[tokio::test]
async fn a_void_while_authorizing_voids_at_the_provider() {
    let world = World::start("sweep").await;
    let addr = world.addr();
    // The authorize went through at the provider but its answer was lost here.
    assert_status(&authorize(addr, "o-6", 900, CARD).await, 200, "authorized");
    sqlx::query(
        "UPDATE payments SET status = 'authorizing', authorization_id = NULL WHERE order_id = 'o-6'",
    )
    .execute(world.payments.ctx().db().pool())
    .await
    .unwrap();
    // The saga gives up and compensates.
    assert_status(&void(addr, "o-6").await, 200, "voided");
    let at_provider = world.provider_authorizations("o-6").await;
    assert_eq!(at_provider.len(), 1);
    assert_eq!(at_provider[0]["status"], "voided");
    assert_error(&authorize(addr, "o-6", 900, CARD).await, 409, "conflict");
    world.stop().await;
}

#[tokio::test]
async fn a_void_while_the_provider_is_away_is_a_promise_kept_later() {
    let mut world = World::start("promise").await;
    let addr = world.addr();
    world.stop_provider().await;
    assert_error(
        &authorize(addr, "o-p", 600, CARD).await,
        503,
        "payment_unavailable",
    );
    // The saga's deadline passed: its compensation is done at once, not when the
    // provider comes back; a repeat answers the same.
    for _ in 0..2 {
        let a = void(addr, "o-p").await;
        assert_status(&a, 200, "voided");
        assert_eq!(
            a.json(),
            json!({"order_id": "o-p", "status": "voided", "pending": true})
        );
    }
    assert!(world.void_pending("o-p").await);
    assert_eq!(by_order(addr, "o-p").await.json()["status"], "voided");
    assert_error(&authorize(addr, "o-p", 600, CARD).await, 409, "conflict");
    assert_error(&capture(addr, "o-p").await, 409, "conflict");

    // The promise is in the database: a restart keeps it.
    world.restart_payments().await;
    let addr = world.addr();
    assert!(world.void_pending("o-p").await);

    // The provider comes back: the retrier finds nothing held for the order and
    // lets go of the promise.
    world.start_provider().await;
    world.wait_void_done("o-p").await;
    assert!(world
        .provider_authorizations("o-p")
        .await
        .iter()
        .all(|a| a["status"] != "authorized"));
    assert!(world.provider_captures().await.is_empty());
    assert_eq!(
        void(addr, "o-p").await.json(),
        json!({"order_id": "o-p", "status": "voided"})
    );
    world.stop().await;
}

#[tokio::test]
async fn a_lost_authorization_is_voided_once_the_provider_is_back() {
    let mut world = World::start("lost").await;
    let addr = world.addr();
    // The provider authorized, but its answer never reached us.
    assert_status(&authorize(addr, "o-l", 1200, CARD).await, 200, "authorized");
    sqlx::query(
        "UPDATE payments SET status = 'authorizing', authorization_id = NULL WHERE order_id = 'o-l'",
    )
    .execute(world.payments.ctx().db().pool())
    .await
    .unwrap();
    // And now the provider is away: the void is promised.
    world.stop_provider().await;
    let a = void(addr, "o-l").await;
    assert_status(&a, 200, "voided");
    assert_eq!(a.json()["pending"], true, "{}", a.text());

    // Two replicas share the database: both retry the same void, harmlessly.
    let replica = world.start_replica().await;
    world.start_provider().await;
    world.wait_void_done("o-l").await;
    let at_provider = world.provider_authorizations("o-l").await;
    assert_eq!(at_provider.len(), 1, "{at_provider:?}");
    assert_eq!(at_provider[0]["status"], "voided");
    assert!(world.provider_captures().await.is_empty());
    assert_error(&capture(addr, "o-l").await, 409, "conflict");
    assert_error(&authorize(addr, "o-l", 1200, CARD).await, 409, "conflict");
    assert_eq!(
        world.provider_authorizations("o-l").await[0]["status"],
        "voided"
    );
    replica.shutdown().await.unwrap();
    world.stop().await;
}

#[tokio::test]
async fn bad_settings_stop_the_start() {
    let dir = DataDir::new("shop-payments-settings");
    for (key, value) in [
        ("SHOAL_SETTINGS__VOID_RETRY_MS", "0"),
        ("SHOAL_SETTINGS__NO_SUCH_KEY", "1"),
    ] {
        let started = testing::start_alone(service().env([(key, value)]), &dir).await;
        let e = started.err().expect("refused");
        assert!(e.to_string().contains("settings"), "{e}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_400_and_the_card_is_not_kept() {
    let world = World::start("bad").await;
    let addr = world.addr();
    let mut cases = vec![
        payment("o-1", 0, CARD),
        payment("o-1", 1_000_000_001, CARD),
        payment("o-1", 1, "42424242"),
        payment("o-1", 1, "4242-4242-4242-42"),
        payment("", 1, CARD),
        payment("o 1", 1, CARD),
        payment(&"o".repeat(129), 1, CARD),
        json!({"order_id": "o-1", "amount_cents": 1, "currency": "EUR", "card_number": CARD}),
    ];
    let mut usd = payment("o-1", 1, CARD);
    usd["currency"] = json!("USD");
    cases.push(usd);
    let mut customer = payment("o-1", 1, CARD);
    customer["customer_id"] = json!("");
    cases.push(customer);
    for (i, body) in cases.into_iter().enumerate() {
        let a = post(addr, "/internal/payments", Some(body)).await;
        assert_error(&a, 400, "validation_failed");
        assert!(!a.text().contains(CARD), "case {i}");
    }
    assert!(world.provider_authorizations("o-1").await.is_empty());
    assert_error(&void(addr, "o%201").await, 400, "validation_failed");

    // What is stored of a card: its last four digits.
    assert_status(&authorize(addr, "o-k", 100, CARD).await, 200, "authorized");
    let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT card_last4, authorization_id, customer_id FROM payments")
            .fetch_all(world.payments.ctx().db().pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    for v in [&rows[0].0, &rows[0].1, &rows[0].2].into_iter().flatten() {
        assert!(!v.contains(&CARD[..8]), "{v}");
    }
    assert_eq!(rows[0].0.as_deref(), Some("4242"));
    world.stop().await;
}

#[tokio::test]
async fn keeps_the_orders_contract() {
    let world = Arc::new(Mutex::new(World::start("orders-contract").await));
    let addr = world.lock().await.addr();
    let contract = testing::contract::Contract::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/orders--payments.json"
    ));
    let w = world.clone();
    contract
        .verify(addr, |state| {
            let w = w.clone();
            async move {
                match state.as_str() {
                    "the payment provider is unreachable" => w.lock().await.stop_provider().await,
                    other => panic!("unknown state {other:?}"),
                }
            }
        })
        .await
        .unwrap();
    drop(w);
    let world = Arc::try_unwrap(world).ok().expect("one owner").into_inner();
    world.stop().await;
}

#[tokio::test]
async fn keeps_the_gateway_contract() {
    // The gateway reads what is stored: no provider needed.
    let dir = DataDir::new("shop-payments-gateway-contract");
    let running = testing::start_alone(service(), &dir).await.unwrap();
    let pool = running.ctx().db().pool().clone();
    let contract = testing::contract::Contract::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/gateway--payments.json"
    ));
    contract
        .verify(running.addr(), |state| {
            let pool = pool.clone();
            async move {
                assert_eq!(state, "order o-1 is paid");
                sqlx::query(
                    "INSERT INTO payments (order_id, customer_id, amount_cents, currency, card_last4, \
                     authorization_id, status, updated_ms) \
                     VALUES ('o-1', 'alice', 2599, 'EUR', '4242', 'auth_1', 'captured', 0)",
                )
                .execute(&pool)
                .await
                .unwrap();
            }
        })
        .await
        .unwrap();
    running.shutdown().await.unwrap();
}
