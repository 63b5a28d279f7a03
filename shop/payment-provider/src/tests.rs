use super::service;
use axum::http::Method;
use serde_json::{json, Value};
use shoal::testing::{self, Answer, DataDir};
use shoal::RunningService;
use std::net::SocketAddr;

const CARD: &str = "4242424242424242";
const DECLINED: &str = "4000000000000002";

async fn start(tag: &str) -> (DataDir, RunningService) {
    let dir = DataDir::new(&format!("shop-payment-provider-{tag}"));
    let running = testing::start_alone(service(), &dir).await.unwrap();
    (dir, running)
}

async fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: Option<Value>) -> Answer {
    let mut headers = Vec::new();
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    let body = match body {
        Some(b) => {
            headers.push(("content-type", "application/json"));
            serde_json::to_vec(&b).unwrap()
        }
        None => Vec::new(),
    };
    testing::request(addr, Method::POST, path, &headers, body)
        .await
        .unwrap()
}

async fn authorize(
    addr: SocketAddr,
    key: &str,
    reference: &str,
    amount: i64,
    card: &str,
) -> Answer {
    post(
        addr,
        "/v1/authorizations",
        Some(key),
        Some(json!({"reference": reference, "amount_cents": amount, "currency": "EUR", "card_number": card})),
    )
    .await
}

fn code(a: &Answer) -> String {
    a.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

async fn captures(addr: SocketAddr) -> Vec<Value> {
    let a = testing::get(addr, "/v1/captures").await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    a.json().as_array().unwrap().clone()
}

#[tokio::test]
async fn authorize_capture_and_void() {
    let (_dir, running) = start("happy").await;
    let addr = running.addr();
    let a = authorize(addr, "k-1", "o-1", 2599, CARD).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    assert_eq!(v["status"], "authorized");
    assert_eq!(v["amount_cents"], 2599);
    let id = v["authorization_id"].as_str().unwrap().to_string();

    let a = testing::get(addr, &format!("/v1/authorizations/{id}"))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json(),
        json!({"authorization_id": id, "reference": "o-1", "amount_cents": 2599,
               "currency": "EUR", "card_last4": "4242", "status": "authorized"})
    );

    let a = post(
        addr,
        &format!("/v1/authorizations/{id}/capture"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["status"], "captured");
    assert_eq!(
        captures(addr).await,
        vec![json!({"authorization_id": id, "reference": "o-1", "amount_cents": 2599})]
    );
    // Captured: void is refused.
    let a = post(addr, &format!("/v1/authorizations/{id}/void"), None, None).await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(code(&a), "conflict");

    // Another one, voided: then capture is refused, and a void repeat answers the same.
    let a = authorize(addr, "k-2", "o-2", 100, CARD).await;
    let id2 = a.json()["authorization_id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let a = post(addr, &format!("/v1/authorizations/{id2}/void"), None, None).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["status"], "voided");
    }
    let a = post(
        addr,
        &format!("/v1/authorizations/{id2}/capture"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 409);
    assert_eq!(code(&a), "conflict");
    assert_eq!(captures(addr).await.len(), 1);

    // Unknown authorizations.
    for path in [
        "/v1/authorizations/auth_x/capture",
        "/v1/authorizations/auth_x/void",
    ] {
        let a = post(addr, path, None, None).await;
        assert_eq!(a.status, 404, "{path}");
    }
    assert_eq!(
        testing::get(addr, "/v1/authorizations/auth_x")
            .await
            .unwrap()
            .status,
        404
    );
    // Listed by reference.
    let a = testing::get(addr, "/v1/authorizations?reference=o-2")
        .await
        .unwrap();
    let list = a.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["status"], "voided");
    let a = testing::get(addr, "/v1/authorizations").await.unwrap();
    assert_eq!(a.json().as_array().unwrap().len(), 2);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn cards_ending_in_0002_are_declined_and_stay_declined() {
    let (_dir, running) = start("decline").await;
    let addr = running.addr();
    for _ in 0..2 {
        let a = authorize(addr, "k-d", "o-d", 500, DECLINED).await;
        assert_eq!(a.status, 402, "{}", a.text());
        assert_eq!(code(&a), "card_declined");
    }
    // Recorded once, with the last four digits only.
    let list = testing::get(addr, "/v1/authorizations?reference=o-d")
        .await
        .unwrap()
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["status"], "declined");
    assert_eq!(list[0]["card_last4"], "0002");
    let id = list[0]["authorization_id"].as_str().unwrap();
    let a = post(
        addr,
        &format!("/v1/authorizations/{id}/capture"),
        None,
        None,
    )
    .await;
    assert_eq!(a.status, 409);
    // Nothing to void: done.
    let a = post(addr, &format!("/v1/authorizations/{id}/void"), None, None).await;
    assert_eq!(a.status, 200);
    assert!(captures(addr).await.is_empty());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_authorization_per_idempotency_key() {
    let (_dir, running) = start("idem").await;
    let addr = running.addr();
    let first = authorize(addr, "k-1", "o-1", 2599, CARD).await;
    assert_eq!(first.status, 201);
    let id = first.json()["authorization_id"].clone();
    for _ in 0..3 {
        let a = authorize(addr, "k-1", "o-1", 2599, CARD).await;
        assert_eq!(a.status, 201);
        assert_eq!(a.json()["authorization_id"], id);
    }
    // Racing first calls with one key: still one.
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { authorize(addr, "k-race", "o-r", 10, CARD).await }))
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 201, "{}", a.text());
        ids.insert(a.json()["authorization_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    // Another key is another authorization, even for the same reference.
    let other = authorize(addr, "k-2", "o-1", 2599, CARD).await;
    assert_ne!(other.json()["authorization_id"], id);
    // The same key asking for something else is refused.
    let a = authorize(addr, "k-1", "o-1", 2600, CARD).await;
    assert_eq!(a.status, 409);
    assert_eq!(code(&a), "idempotency_key_reused");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM authorizations")
        .fetch_one(running.ctx().db().pool())
        .await
        .unwrap();
    assert_eq!(n, 3);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_repeated_capture_is_counted_once() {
    let (_dir, running) = start("capture").await;
    let addr = running.addr();
    let a = authorize(addr, "k-1", "o-1", 4200, CARD).await;
    let id = a.json()["authorization_id"].as_str().unwrap().to_string();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let path = format!("/v1/authorizations/{id}/capture");
            tokio::spawn(async move { post(addr, &path, None, None).await })
        })
        .collect();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["status"], "captured");
    }
    let list = captures(addr).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["amount_cents"], 4200);
    // A repeat of the authorization says it is captured now.
    let a = authorize(addr, "k-1", "o-1", 4200, CARD).await;
    assert_eq!(a.status, 201);
    assert_eq!(a.json()["status"], "captured");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_with_400() {
    let (_dir, running) = start("bad").await;
    let addr = running.addr();
    let body = |reference: &str, amount: i64, currency: &str, card: &str| json!({"reference": reference, "amount_cents": amount, "currency": currency, "card_number": card});
    let long_key = "k".repeat(201);
    let cases = vec![
        (None, Some(body("o-1", 1, "EUR", CARD))),
        (Some(""), Some(body("o-1", 1, "EUR", CARD))),
        (Some(long_key.as_str()), Some(body("o-1", 1, "EUR", CARD))),
        (Some("k"), Some(body("o-1", 0, "EUR", CARD))),
        (Some("k"), Some(body("o-1", -5, "EUR", CARD))),
        (Some("k"), Some(body("o-1", 1_000_000_001, "EUR", CARD))),
        (Some("k"), Some(body("o-1", 1, "USD", CARD))),
        (Some("k"), Some(body("o-1", 1, "EUR", "424242424242424"))),
        (Some("k"), Some(body("o-1", 1, "EUR", "42424242424242424"))),
        (Some("k"), Some(body("o-1", 1, "EUR", "4242 4242 4242 42"))),
        (
            Some("k"),
            Some(body("o-1", 1, "EUR", "４２４２４２４２４２４２４２４２")),
        ),
        (Some("k"), Some(body("", 1, "EUR", CARD))),
        (Some("k"), Some(body("o 1", 1, "EUR", CARD))),
        (
            Some("k"),
            Some(json!({"reference": "o-1", "amount_cents": 1, "currency": "EUR"})),
        ),
        (Some("k"), None),
    ];
    for (i, (key, b)) in cases.into_iter().enumerate() {
        let a = post(addr, "/v1/authorizations", key, b).await;
        assert_eq!(a.status, 400, "case {i}: {}", a.text());
        assert_eq!(code(&a), "validation_failed", "case {i}");
        assert!(!a.text().contains("4242424242"), "case {i}: {}", a.text());
    }
    // The limits themselves are fine.
    let a = authorize(addr, "k-max", "o-1", 1_000_000_000, CARD).await;
    assert_eq!(a.status, 201, "{}", a.text());
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM authorizations")
        .fetch_one(running.ctx().db().pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_card_number_is_never_stored() {
    let (_dir, running) = start("pan").await;
    let addr = running.addr();
    authorize(addr, "k-1", "o-1", 100, CARD).await;
    authorize(addr, "k-2", "o-2", 100, DECLINED).await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT authorization_id, reference, card_last4 FROM authorizations")
            .fetch_all(running.ctx().db().pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    for (id, reference, last4) in rows {
        assert_eq!(last4.len(), 4);
        for v in [id, reference, last4] {
            assert!(
                !v.contains(&CARD[..8]) && !v.contains(&DECLINED[..8]),
                "{v}"
            );
        }
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn keeps_the_payments_contract() {
    let (_dir, running) = start("contract").await;
    let pool = running.ctx().db().pool().clone();
    let contract = testing::contract::Contract::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/payments--payment-provider.json"
    ));
    contract
        .verify(running.addr(), |state| {
            let pool = pool.clone();
            async move {
                let id = match state.as_str() {
                    "authorization auth_c is authorized" => "auth_c",
                    "authorization auth_v is authorized" => "auth_v",
                    other => panic!("unknown state {other:?}"),
                };
                sqlx::query(
                    "INSERT INTO authorizations (authorization_id, idempotency_key, reference, amount_cents, \
                     currency, card_last4, status, created_ms, updated_ms) \
                     VALUES ($1, $2, $3, 1000, 'EUR', '4242', 'authorized', 0, 0)",
                )
                .bind(id)
                .bind(format!("key-{id}"))
                .bind(format!("ref-{id}"))
                .execute(&pool)
                .await
                .unwrap();
            }
        })
        .await
        .unwrap();
    running.shutdown().await.unwrap();
}
