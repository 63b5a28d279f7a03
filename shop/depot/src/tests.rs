//! The depot alone: its stock API and its participant's routes driven by hand, the
//! way the inventory's coordinator calls them.

use super::service;
use axum::http::Method;
use serde_json::{json, Value};
use shoal::testing::{self, DataDir};
use shoal::RunningService;
use std::net::SocketAddr;

fn data_dir(test: &str) -> DataDir {
    DataDir::new(&format!("shop-depot-{test}"))
}

async fn start(dir: &std::path::Path) -> RunningService {
    testing::start_alone(service(), dir).await.unwrap()
}

/// `(units, outgoing, incoming)` of a product.
async fn stock(addr: SocketAddr, product: &str) -> (i64, i64, i64) {
    let a = testing::get(addr, &format!("/internal/depot/{product}"))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    (
        v["units"].as_i64().unwrap(),
        v["outgoing"].as_i64().unwrap(),
        v["incoming"].as_i64().unwrap(),
    )
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> testing::Answer {
    testing::request(
        addr,
        Method::POST,
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
    .unwrap()
}

/// Prepare transaction `tx` with `payload`; the vote.
async fn prepare(addr: SocketAddr, tx: &str, payload: Value) -> String {
    // No coordinator listens there: these tests decide every transaction themselves
    // well before the participant would start asking.
    let deadline = shoal::time::unix_ms() + 10_000;
    let a = post(
        addr,
        "/2pc/depot/prepare",
        json!({"tx_id": tx, "coordinator": "http://127.0.0.1:9/2pc/coordinator",
               "deadline_ms": deadline, "payload": payload}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["vote"].as_str().unwrap().to_string()
}

async fn decide(addr: SocketAddr, tx: &str, outcome: &str) -> Value {
    let a = post(addr, &format!("/2pc/depot/{outcome}"), json!({"tx_id": tx})).await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

#[tokio::test]
async fn reads_seed_stock() {
    let dir = data_dir("read");
    let running = start(&dir).await;
    for i in 1..=6 {
        assert_eq!(stock(running.addr(), &format!("p-{i}")).await, (20, 0, 0));
    }
    let a = testing::get(running.addr(), "/internal/depot/p-1")
        .await
        .unwrap();
    assert_eq!(
        a.json(),
        json!({"product_id": "p-1", "units": 20, "outgoing": 0, "incoming": 0})
    );
    assert_eq!(
        a.headers["x-shoal-served-by"],
        format!("depot@{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    let a = testing::get(running.addr(), "/internal/depot/p-99")
        .await
        .unwrap();
    assert_eq!(a.status, 404, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "not_found");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_prepared_take_is_held_then_gone_on_commit() {
    let dir = data_dir("take-commit");
    let running = start(&dir).await;
    let addr = running.addr();
    let take = json!({"op": "take", "product_id": "p-1", "quantity": 5});
    assert_eq!(prepare(addr, "t-1", take.clone()).await, "yes");
    // Held: neither on the shelf nor gone.
    assert_eq!(stock(addr, "p-1").await, (15, 5, 0));
    // A repeated prepare answers the same vote and holds nothing more.
    assert_eq!(prepare(addr, "t-1", take).await, "yes");
    assert_eq!(stock(addr, "p-1").await, (15, 5, 0));
    assert_eq!(decide(addr, "t-1", "commit").await["state"], "committed");
    assert_eq!(stock(addr, "p-1").await, (15, 0, 0));
    // A repeated commit changes nothing.
    decide(addr, "t-1", "commit").await;
    assert_eq!(stock(addr, "p-1").await, (15, 0, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_aborted_take_puts_the_units_back() {
    let dir = data_dir("take-abort");
    let running = start(&dir).await;
    let addr = running.addr();
    let take = json!({"op": "take", "product_id": "p-2", "quantity": 20});
    assert_eq!(prepare(addr, "t-2", take).await, "yes");
    assert_eq!(stock(addr, "p-2").await, (0, 20, 0));
    // The held units cannot be taken again by another transfer.
    let again = json!({"op": "take", "product_id": "p-2", "quantity": 1});
    assert_eq!(prepare(addr, "t-3", again).await, "no");
    assert_eq!(decide(addr, "t-2", "abort").await["state"], "aborted");
    assert_eq!(stock(addr, "p-2").await, (20, 0, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_prepared_add_is_incoming_until_committed() {
    let dir = data_dir("add");
    let running = start(&dir).await;
    let addr = running.addr();
    let add = json!({"op": "add", "product_id": "p-3", "quantity": 7});
    assert_eq!(prepare(addr, "t-4", add.clone()).await, "yes");
    assert_eq!(stock(addr, "p-3").await, (20, 0, 7));
    decide(addr, "t-4", "commit").await;
    assert_eq!(stock(addr, "p-3").await, (27, 0, 0));
    assert_eq!(prepare(addr, "t-5", add).await, "yes");
    decide(addr, "t-5", "abort").await;
    assert_eq!(stock(addr, "p-3").await, (27, 0, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn votes_no_without_enough_units_and_holds_nothing() {
    let dir = data_dir("no");
    let running = start(&dir).await;
    let addr = running.addr();
    let too_many = json!({"op": "take", "product_id": "p-4", "quantity": 21});
    assert_eq!(prepare(addr, "t-6", too_many).await, "no");
    assert_eq!(stock(addr, "p-4").await, (20, 0, 0));
    let unknown = json!({"op": "add", "product_id": "p-99", "quantity": 1});
    assert_eq!(prepare(addr, "t-7", unknown).await, "no");
    let bad = json!({"op": "steal", "product_id": "p-4", "quantity": 1});
    assert_eq!(prepare(addr, "t-8", bad).await, "no");
    let zero = json!({"op": "take", "product_id": "p-4", "quantity": 0});
    assert_eq!(prepare(addr, "t-9", zero).await, "no");
    assert_eq!(stock(addr, "p-4").await, (20, 0, 0));
    // A refused transaction is recorded aborted: a commit for it is a conflict.
    let a = post(addr, "/2pc/depot/commit", json!({"tx_id": "t-6"})).await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(stock(addr, "p-4").await, (20, 0, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_database_refuses_negative_stock() {
    let dir = data_dir("check");
    let running = start(&dir).await;
    let pool = running.ctx().db().pool();
    for sql in [
        "UPDATE depot_stock SET units = -1 WHERE product_id = 'p-1'",
        "UPDATE depot_stock SET outgoing = -1 WHERE product_id = 'p-1'",
        "UPDATE depot_stock SET incoming = -1 WHERE product_id = 'p-1'",
    ] {
        let r = sqlx::query(sql).execute(pool).await;
        assert!(r.is_err(), "{sql}");
    }
    running.shutdown().await.unwrap();
}
