use crate::service;
use axum::http::Method;
use serde_json::{json, Value};
use shoal::testing::{self, Answer, DataDir};
use shoal::RunningService;
use std::net::SocketAddr;

async fn start(tag: &str) -> (DataDir, RunningService) {
    let dir = DataDir::new(&format!("shop-inventory-res-{tag}"));
    let running = testing::start_alone(service(), &dir).await.unwrap();
    (dir, running)
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

async fn reserve(addr: SocketAddr, id: &str, items: &[(&str, i64)]) -> Answer {
    let items: Vec<Value> = items
        .iter()
        .map(|(p, q)| json!({"product_id": p, "quantity": q}))
        .collect();
    post(
        addr,
        "/internal/reservations",
        Some(json!({"reservation_id": id, "items": items})),
    )
    .await
}

async fn commit(addr: SocketAddr, id: &str) -> Answer {
    post(addr, &format!("/internal/reservations/{id}/commit"), None).await
}

async fn release(addr: SocketAddr, id: &str) -> Answer {
    post(addr, &format!("/internal/reservations/{id}/release"), None).await
}

/// `(available, reserved)` of a product, through the public API.
async fn stock(addr: SocketAddr, product: &str) -> (i64, i64) {
    let a = testing::get(addr, &format!("/api/inventory/{product}"))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    (
        v["available"].as_i64().unwrap(),
        v["reserved"].as_i64().unwrap(),
    )
}

fn assert_ok(a: &Answer, id: &str, status: &str) {
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json(), json!({"reservation_id": id, "status": status}));
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], code, "{}", a.text());
}

#[tokio::test]
async fn reserve_commit_and_release_move_the_stock() {
    let (_dir, running) = start("happy").await;
    let addr = running.addr();
    assert_ok(
        &reserve(addr, "r-1", &[("p-1", 3), ("p-2", 2)]).await,
        "r-1",
        "reserved",
    );
    assert_eq!(stock(addr, "p-1").await, (97, 3));
    assert_eq!(stock(addr, "p-2").await, (48, 2));

    // Commit: the units leave the shop.
    assert_ok(&commit(addr, "r-1").await, "r-1", "committed");
    assert_eq!(stock(addr, "p-1").await, (97, 0));
    assert_eq!(stock(addr, "p-2").await, (48, 0));

    // Release: the units come back.
    assert_ok(
        &reserve(addr, "r-2", &[("p-1", 5)]).await,
        "r-2",
        "reserved",
    );
    assert_eq!(stock(addr, "p-1").await, (92, 5));
    assert_ok(&release(addr, "r-2").await, "r-2", "released");
    assert_eq!(stock(addr, "p-1").await, (97, 0));

    // The last units of a product can be reserved.
    assert_ok(
        &reserve(addr, "r-3", &[("p-5", 5)]).await,
        "r-3",
        "reserved",
    );
    assert_eq!(stock(addr, "p-5").await, (0, 5));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn out_of_stock_holds_nothing_and_is_answered_again() {
    let (_dir, running) = start("oos").await;
    let addr = running.addr();
    // p-1 could be held, p-5 (5 available) cannot: neither is.
    let a = reserve(addr, "r-oos", &[("p-1", 1), ("p-5", 6)]).await;
    assert_error(&a, 409, "out_of_stock");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("p-5"));
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    assert_eq!(stock(addr, "p-5").await, (5, 0));
    assert_error(
        &reserve(addr, "r-p6", &[("p-6", 1)]).await,
        409,
        "out_of_stock",
    );
    assert_eq!(stock(addr, "p-6").await, (0, 0));

    // Stock arrives; the repeat still answers what the first call answered and
    // holds nothing (the saga already took the refusal as final).
    sqlx::query("UPDATE stock SET available = 100 WHERE product_id = 'p-5'")
        .execute(running.ctx().db().pool())
        .await
        .unwrap();
    assert_error(
        &reserve(addr, "r-oos", &[("p-1", 1), ("p-5", 6)]).await,
        409,
        "out_of_stock",
    );
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    assert_eq!(stock(addr, "p-5").await, (100, 0));
    // A refused reservation holds nothing: commit is refused, release succeeds.
    assert_error(&commit(addr, "r-oos").await, 409, "conflict");
    assert_ok(&release(addr, "r-oos").await, "r-oos", "released");
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_product_is_404_and_holds_nothing() {
    let (_dir, running) = start("unknown").await;
    let addr = running.addr();
    let a = reserve(addr, "r-u", &[("p-1", 1), ("p-99", 1)]).await;
    assert_error(&a, 404, "unknown_product");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("p-99"));
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    // Unknown wins over short, whatever the order.
    assert_error(
        &reserve(addr, "r-u2", &[("p-6", 1), ("p-99", 1)]).await,
        404,
        "unknown_product",
    );
    // And is answered again.
    assert_error(
        &reserve(addr, "r-u", &[("p-1", 1), ("p-99", 1)]).await,
        404,
        "unknown_product",
    );
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn repeats_answer_the_first_answer_and_change_nothing() {
    let (_dir, running) = start("repeat").await;
    let addr = running.addr();
    for _ in 0..3 {
        assert_ok(
            &reserve(addr, "r-1", &[("p-2", 4)]).await,
            "r-1",
            "reserved",
        );
    }
    assert_eq!(stock(addr, "p-2").await, (46, 4));
    // The same id with other items is not a repeat.
    assert_error(&reserve(addr, "r-1", &[("p-2", 5)]).await, 409, "conflict");
    for _ in 0..3 {
        assert_ok(&commit(addr, "r-1").await, "r-1", "committed");
    }
    assert_eq!(stock(addr, "p-2").await, (46, 0));
    // A reserve repeated after the commit says where it went.
    assert_ok(
        &reserve(addr, "r-1", &[("p-2", 4)]).await,
        "r-1",
        "committed",
    );
    assert_eq!(stock(addr, "p-2").await, (46, 0));

    assert_ok(
        &reserve(addr, "r-2", &[("p-3", 5)]).await,
        "r-2",
        "reserved",
    );
    for _ in 0..3 {
        assert_ok(&release(addr, "r-2").await, "r-2", "released");
    }
    assert_eq!(stock(addr, "p-3").await, (25, 0));
    // A reserve repeated after the release does not hold the stock again.
    assert_error(&reserve(addr, "r-2", &[("p-3", 5)]).await, 409, "conflict");
    assert_eq!(stock(addr, "p-3").await, (25, 0));

    // Rows: one per reservation, items once.
    let pool = running.ctx().db().pool();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM reservation_items")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn transitions_out_of_order_are_conflicts() {
    let (_dir, running) = start("conflict").await;
    let addr = running.addr();
    assert_ok(
        &reserve(addr, "r-c", &[("p-1", 2)]).await,
        "r-c",
        "reserved",
    );
    assert_ok(&commit(addr, "r-c").await, "r-c", "committed");
    let a = release(addr, "r-c").await;
    assert_error(&a, 409, "conflict");
    assert_eq!(stock(addr, "p-1").await, (98, 0));

    assert_ok(
        &reserve(addr, "r-r", &[("p-1", 2)]).await,
        "r-r",
        "reserved",
    );
    assert_ok(&release(addr, "r-r").await, "r-r", "released");
    assert_error(&commit(addr, "r-r").await, 409, "conflict");
    assert_eq!(stock(addr, "p-1").await, (98, 0));

    // Commit of a reservation never made: 404.
    assert_error(&commit(addr, "r-none").await, 404, "not_found");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_late_reserve_after_its_release_is_refused() {
    let (_dir, running) = start("late").await;
    let addr = running.addr();
    // The saga's reserve timed out, it compensated: the release comes first.
    assert_ok(&release(addr, "r-late").await, "r-late", "released");
    assert_ok(&release(addr, "r-late").await, "r-late", "released");
    // Then the reserve arrives (it was stuck in a queue, or retried by a proxy).
    let a = reserve(addr, "r-late", &[("p-1", 1)]).await;
    assert_error(&a, 409, "conflict");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("released"));
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    assert_error(&commit(addr, "r-late").await, 409, "conflict");
    // The tombstone survives a restart.
    let dir = _dir;
    running.shutdown().await.unwrap();
    let running = testing::start_alone(service(), &dir).await.unwrap();
    assert_error(
        &reserve(running.addr(), "r-late", &[("p-1", 1)]).await,
        409,
        "conflict",
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_product_listed_twice_is_summed() {
    let (_dir, running) = start("twice").await;
    let addr = running.addr();
    assert_ok(
        &reserve(addr, "r-t", &[("p-2", 2), ("p-2", 3)]).await,
        "r-t",
        "reserved",
    );
    assert_eq!(stock(addr, "p-2").await, (45, 5));
    // The repeat is recognised in either spelling.
    assert_ok(
        &reserve(addr, "r-t", &[("p-2", 5)]).await,
        "r-t",
        "reserved",
    );
    assert_ok(&release(addr, "r-t").await, "r-t", "released");
    assert_eq!(stock(addr, "p-2").await, (50, 0));
    // Summed beyond what is there: refused as a whole.
    assert_error(
        &reserve(addr, "r-t2", &[("p-5", 3), ("p-5", 3)]).await,
        409,
        "out_of_stock",
    );
    assert_eq!(stock(addr, "p-5").await, (5, 0));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_with_400() {
    let (_dir, running) = start("bad").await;
    let addr = running.addr();
    let many: Vec<(String, i64)> = (0..51).map(|i| (format!("p-{i}"), 1)).collect();
    let many: Vec<(&str, i64)> = many.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    let long = "x".repeat(129);
    let cases: Vec<Answer> = vec![
        reserve(addr, "r-1", &[]).await,
        reserve(addr, "r-1", &many).await,
        reserve(addr, "r-1", &[("p-1", 0)]).await,
        reserve(addr, "r-1", &[("p-1", -3)]).await,
        reserve(addr, "r-1", &[("p-1", 100_001)]).await,
        reserve(addr, "", &[("p-1", 1)]).await,
        reserve(addr, "r 1", &[("p-1", 1)]).await,
        reserve(addr, &long, &[("p-1", 1)]).await,
        reserve(addr, "r-1", &[(&long, 1)]).await,
        reserve(addr, "r-1", &[("p/1", 1)]).await,
        post(addr, "/internal/reservations", Some(json!({"items": []}))).await,
        post(
            addr,
            "/internal/reservations",
            Some(
                json!({"reservation_id": "r-1", "items": [{"product_id": "p-1", "quantity": 1.5}]}),
            ),
        )
        .await,
        testing::request(
            addr,
            Method::POST,
            "/internal/reservations",
            &[("content-type", "application/json")],
            "not json",
        )
        .await
        .unwrap(),
        post(addr, "/internal/reservations/r%201/release", None).await,
        post(addr, &format!("/internal/reservations/{long}/commit"), None).await,
    ];
    for (i, a) in cases.iter().enumerate() {
        assert_eq!(a.status, 400, "case {i}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "validation_failed", "case {i}");
    }
    // 50 items is the limit, and 100000 units.
    let fifty: Vec<(String, i64)> = (0..50).map(|i| (format!("q-{i}"), 1)).collect();
    let fifty: Vec<(&str, i64)> = fifty.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    assert_error(&reserve(addr, "r-50", &fifty).await, 404, "unknown_product");
    assert_error(
        &reserve(addr, "r-max", &[("p-1", 100_000)]).await,
        409,
        "out_of_stock",
    );
    // Nothing was held or recorded by the refused requests.
    assert_eq!(stock(addr, "p-1").await, (100, 0));
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM reservations WHERE reservation_id = 'r-1'")
            .fetch_one(running.ctx().db().pool())
            .await
            .unwrap();
    assert_eq!(n, 0);
    running.shutdown().await.unwrap();
}

/// Race `n` reservations of `[p-3 × 2, p-4 × 3]` (p-4 has 10: three fit) and
/// check that stock is never oversold and every unit is accounted for.
async fn race(addr: SocketAddr, pool: &sqlx::AnyPool, n: usize) {
    let before3 = stock(addr, "p-3").await;
    let before4 = stock(addr, "p-4").await;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("race-{i}");
                let a = reserve(addr, &id, &[("p-3", 2), ("p-4", 3)]).await;
                (id, a)
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in tasks {
        let (id, a) = t.await.unwrap();
        match a.status.as_u16() {
            200 => won.push(id),
            409 => assert_eq!(a.json()["error"]["code"], "out_of_stock", "{}", a.text()),
            _ => panic!("{id}: {} {}", a.status, a.text()),
        }
    }
    let fit = usize::try_from(before4.0 / 3).unwrap();
    assert_eq!(won.len(), fit.min(n), "{won:?}");
    let won_units = i64::try_from(won.len()).unwrap();
    let (a3, r3) = stock(addr, "p-3").await;
    let (a4, r4) = stock(addr, "p-4").await;
    assert!(a3 >= 0 && a4 >= 0);
    assert_eq!(
        (a3, r3),
        (before3.0 - 2 * won_units, before3.1 + 2 * won_units)
    );
    assert_eq!(
        (a4, r4),
        (before4.0 - 3 * won_units, before4.1 + 3 * won_units)
    );
    assert_eq!(a4 + r4, before4.0 + before4.1);
    // What is reserved is exactly what the winning reservations hold.
    let (held,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(i.quantity), 0) AS BIGINT) FROM reservation_items i \
         JOIN reservations r ON r.reservation_id = i.reservation_id \
         WHERE r.status = 'reserved' AND i.product_id = 'p-4'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(held, r4);
    // Releasing the winners, all at once, gives everything back.
    let tasks: Vec<_> = won
        .into_iter()
        .map(|id| tokio::spawn(async move { release(addr, &id).await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(stock(addr, "p-3").await, before3);
    assert_eq!(stock(addr, "p-4").await, before4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_oversell() {
    let (_dir, running) = start("race").await;
    race(running.addr(), running.ctx().db().pool(), 16).await;
    // And the last single units of a product.
    let addr = running.addr();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(async move { reserve(addr, &format!("last-{i}"), &[("p-5", 1)]).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let a = t.await.unwrap();
        match a.status.as_u16() {
            200 => ok += 1,
            409 => assert_eq!(a.json()["error"]["code"], "out_of_stock"),
            s => panic!("{s}: {}", a.text()),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(stock(addr, "p-5").await, (0, 5));
    running.shutdown().await.unwrap();
}

/// The same reservations on PostgreSQL: one setting, no code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_run_unchanged_on_postgres() {
    let dir = DataDir::new("shop-inventory-res-postgres");
    let url = shoal_testkit::postgres::fresh_database().await;
    let running = testing::start_alone(service().env([("SHOAL_DATABASE__URL", url)]), &dir)
        .await
        .unwrap();
    assert_eq!(running.ctx().db().backend(), shoal::Backend::Postgres);
    let addr = running.addr();
    assert_ok(
        &reserve(addr, "r-1", &[("p-1", 3), ("p-1", 1)]).await,
        "r-1",
        "reserved",
    );
    assert_ok(
        &reserve(addr, "r-1", &[("p-1", 4)]).await,
        "r-1",
        "reserved",
    );
    assert_eq!(stock(addr, "p-1").await, (96, 4));
    assert_ok(&commit(addr, "r-1").await, "r-1", "committed");
    assert_error(&release(addr, "r-1").await, 409, "conflict");
    assert_eq!(stock(addr, "p-1").await, (96, 0));
    assert_error(
        &reserve(addr, "r-2", &[("p-1", 1), ("p-6", 1)]).await,
        409,
        "out_of_stock",
    );
    assert_error(
        &reserve(addr, "r-3", &[("p-99", 1)]).await,
        404,
        "unknown_product",
    );
    assert_eq!(stock(addr, "p-1").await, (96, 0));
    assert_ok(&release(addr, "r-late").await, "r-late", "released");
    assert_error(
        &reserve(addr, "r-late", &[("p-1", 1)]).await,
        409,
        "conflict",
    );
    race(addr, running.ctx().db().pool(), 16).await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn keeps_the_orders_contract() {
    let (_dir, running) = start("contract").await;
    let pool = running.ctx().db().pool().clone();
    let contract = testing::contract::Contract::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/orders--inventory.json"
    ));
    contract
        .verify(running.addr(), |state| {
            let pool = pool.clone();
            async move {
                let sql = match state.as_str() {
                    "stock of p-1 is 100" => {
                        "UPDATE stock SET available = 100, reserved = 0 WHERE product_id = 'p-1'"
                    }
                    "p-6 is out of stock" => {
                        "UPDATE stock SET available = 0 WHERE product_id = 'p-6'"
                    }
                    other => panic!("unknown state {other:?}"),
                };
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
        })
        .await
        .unwrap();
    running.shutdown().await.unwrap();
}
