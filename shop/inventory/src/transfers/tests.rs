//! Stock transfers between the inventory and a real depot, both registered with a
//! control plane in the test process (registry only), so the inventory finds the
//! depot and its own address through discovery as it does under `shoal up`.

use crate::service;
use axum::http::Method;
use serde_json::{json, Value};
use shoal::testing::{self, Answer, ControlPlane, DataDir};
use shoal::RunningService;
use std::net::SocketAddr;
use std::time::Duration;

/// The environment of a service registered with `cp`, its data in `dir`.
fn env(cp: &ControlPlane, dir: &std::path::Path) -> Vec<(String, String)> {
    cp.env(dir)
}

async fn start_depot(cp: &ControlPlane, dir: &std::path::Path) -> RunningService {
    shop_depot::service()
        .env(env(cp, dir))
        .start()
        .await
        .unwrap()
}

/// The inventory and the depot, both registered.
struct World {
    inventory: RunningService,
    depot: Option<RunningService>,
    depot_dir: DataDir,
    cp: ControlPlane,
    _inventory_dir: DataDir,
}

const ADMIN: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("x-shoal-subject", "admin"),
    ("x-shoal-scopes", "admin"),
];

impl World {
    async fn start(tag: &str) -> Self {
        let cp = ControlPlane::start().await.unwrap();
        let depot_dir = DataDir::new(&format!("shop-inventory-{tag}-depot"));
        let inventory_dir = DataDir::new(&format!("shop-inventory-{tag}"));
        let depot = start_depot(&cp, &depot_dir).await;
        let inventory = service()
            .env(env(&cp, &inventory_dir))
            .env([
                ("SHOAL_SETTINGS__COORDINATOR__DELIVERY_WAIT_MS", "1000"),
                ("SHOAL_SETTINGS__COORDINATOR__PREPARE_TIMEOUT_MS", "2000"),
                ("SHOAL_SETTINGS__COORDINATOR__RETRY__MAX_MS", "200"),
            ])
            .start()
            .await
            .unwrap();
        let world = Self {
            inventory,
            depot: Some(depot),
            depot_dir,
            cp,
            _inventory_dir: inventory_dir,
        };
        world.wait_ready().await;
        world
    }

    /// Until the inventory's coordinator is open (it knows its own address) and the
    /// depot is in its catalog.
    async fn wait_ready(&self) {
        let ctx = self.inventory.ctx().clone();
        let depot_seen = ctx
            .discovery()
            .wait_until(Duration::from_secs(10), |c| {
                c.instances("depot").iter().any(|i| i.healthy)
            })
            .await;
        assert!(depot_seen, "the depot never showed up in the catalog");
        for _ in 0..200 {
            // 503 until the coordinator is open, then 404 for an unknown transaction.
            let a = testing::get(self.inventory.addr(), "/2pc/coordinator/tx/none-yet")
                .await
                .unwrap();
            if a.status == 404 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the transfer coordinator never opened");
    }

    fn depot_addr(&self) -> SocketAddr {
        self.depot.as_ref().expect("the depot runs").addr()
    }

    async fn transfer(&self, body: Value, key: Option<&str>, headers: &[(&str, &str)]) -> Answer {
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if let Some(k) = key {
            h.push(("idempotency-key", k));
        }
        testing::request(
            self.inventory.addr(),
            Method::POST,
            "/api/stock-transfers",
            &h,
            body.to_string(),
        )
        .await
        .unwrap()
    }

    /// The inventory's `(available, outgoing, incoming)` of a product, as stored.
    async fn inventory_stock(&self, product: &str) -> (i64, i64, i64) {
        sqlx::query_as("SELECT available, outgoing, incoming FROM stock WHERE product_id = $1")
            .bind(product)
            .fetch_one(self.inventory.ctx().db().pool())
            .await
            .unwrap()
    }

    /// The depot's `(units, outgoing, incoming)` of a product, through its API.
    async fn depot_stock(&self, product: &str) -> (i64, i64, i64) {
        let a = testing::get(self.depot_addr(), &format!("/internal/depot/{product}"))
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

    /// Wait until neither side holds anything for `product` (every decision
    /// delivered); then `(inventory available, depot units)`.
    async fn settled(&self, product: &str) -> (i64, i64) {
        for _ in 0..100 {
            let (available, i_out, i_in) = self.inventory_stock(product).await;
            let (units, d_out, d_in) = self.depot_stock(product).await;
            if i_out == 0 && i_in == 0 && d_out == 0 && d_in == 0 {
                return (available, units);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("units of {product} are still held");
    }

    async fn stop(mut self) {
        self.inventory.shutdown().await.unwrap();
        if let Some(d) = self.depot.take() {
            d.shutdown().await.unwrap();
        }
        self.cp.stop().await;
    }
}

fn body(product: &str, quantity: i64, from: &str, to: &str) -> Value {
    json!({"product_id": product, "quantity": quantity, "from": from, "to": to})
}

#[tokio::test]
async fn a_transfer_there_and_back_moves_the_units_exactly() {
    let world = World::start("there-and-back").await;
    let before = world.settled("p-1").await;
    assert_eq!(before, (100, 20));

    let a = world
        .transfer(body("p-1", 30, "inventory", "depot"), None, ADMIN)
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["status"], "committed", "{v}");
    let id = v["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(world.settled("p-1").await, (70, 50));

    let a = world
        .transfer(body("p-1", 45, "depot", "inventory"), None, ADMIN)
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let (available, units) = world.settled("p-1").await;
    assert_eq!((available, units), (115, 5));
    assert_eq!(available + units, before.0 + before.1);

    // The coordinator's view: decided commit, and (soon) acknowledged by both.
    let mut shown = Value::Null;
    for _ in 0..100 {
        let a = testing::request(
            world.inventory.addr(),
            Method::GET,
            &format!("/api/stock-transfers/{id}"),
            ADMIN,
            "",
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        shown = a.json();
        if shown["transaction"]["done"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shown["status"], "committed", "{shown}");
    assert_eq!(shown["quantity"], 30);
    assert_eq!(shown["from"], "inventory");
    assert_eq!(shown["transaction"]["state"], "commit", "{shown}");
    assert_eq!(shown["transaction"]["done"], true, "{shown}");
    assert_eq!(
        shown["transaction"]["participants"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The public stock view is unchanged in shape.
    let a = testing::get(world.inventory.addr(), "/api/inventory/p-1")
        .await
        .unwrap();
    assert_eq!(
        a.json(),
        json!({"product_id": "p-1", "available": 115, "reserved": 0})
    );
    world.stop().await;
}

#[tokio::test]
async fn a_transfer_beyond_the_source_is_refused_and_moves_nothing() {
    let world = World::start("refused").await;
    // The inventory has 5 of p-5.
    let a = world
        .transfer(body("p-5", 6, "inventory", "depot"), None, ADMIN)
        .await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(
        a.json()["error"]["code"],
        "transfer_refused",
        "{}",
        a.text()
    );
    assert_eq!(world.settled("p-5").await, (5, 20));
    // The depot has 20 of p-2.
    let a = world
        .transfer(
            body("p-2", 21, "depot", "inventory"),
            Some("too-many"),
            ADMIN,
        )
        .await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "transfer_refused");
    assert_eq!(world.settled("p-2").await, (50, 20));
    // Refused for good: a repeat answers the same and moves nothing.
    let a = world
        .transfer(
            body("p-2", 21, "depot", "inventory"),
            Some("too-many"),
            ADMIN,
        )
        .await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "transfer_refused");
    // Units held by a reservation are not available to a transfer either.
    let a = testing::request(
        world.inventory.addr(),
        Method::POST,
        "/internal/reservations",
        &[("content-type", "application/json")],
        json!({"reservation_id": "o-1", "items": [{"product_id": "p-4", "quantity": 8}]})
            .to_string(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let a = world
        .transfer(body("p-4", 3, "inventory", "depot"), None, ADMIN)
        .await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(world.settled("p-4").await, (2, 20));
    world.stop().await;
}

#[tokio::test]
async fn the_depot_down_is_503_and_moves_nothing() {
    let mut world = World::start("depot-down").await;
    let depot = world.depot.take().unwrap();
    depot.shutdown().await.unwrap();
    let a = world
        .transfer(
            body("p-1", 10, "inventory", "depot"),
            Some("while-down"),
            ADMIN,
        )
        .await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "unavailable");
    // Nothing held or moved here (an abort, if a prepare got this far, is
    // delivered to the inventory's own participant at once).
    for _ in 0..100 {
        if world.inventory_stock("p-1").await == (100, 0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(world.inventory_stock("p-1").await, (100, 0, 0));
    // Nor there, once it is back.
    world.depot = Some(start_depot(&world.cp, &world.depot_dir).await);
    world.wait_ready().await;
    assert_eq!(world.settled("p-1").await, (100, 20));
    // And a transfer works again.
    let a = world
        .transfer(body("p-1", 10, "inventory", "depot"), Some("after"), ADMIN)
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(world.settled("p-1").await, (90, 30));
    world.stop().await;
}

#[tokio::test]
async fn a_repeat_with_the_same_key_moves_once() {
    let world = World::start("repeat").await;
    let request = body("p-3", 4, "inventory", "depot");
    let first = world
        .transfer(request.clone(), Some("move-p3-1"), ADMIN)
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["transfer_id"], "move-p3-1");
    let again = world
        .transfer(request.clone(), Some("move-p3-1"), ADMIN)
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["transfer_id"], "move-p3-1");
    assert_eq!(again.json()["status"], "committed");
    assert_eq!(world.settled("p-3").await, (21, 24));
    // The key names that transfer: another body with it is a conflict.
    let other = world
        .transfer(
            body("p-3", 5, "inventory", "depot"),
            Some("move-p3-1"),
            ADMIN,
        )
        .await;
    assert_eq!(other.status, 409, "{}", other.text());
    assert_eq!(other.json()["error"]["code"], "conflict");
    assert_eq!(world.settled("p-3").await, (21, 24));
    world.stop().await;
}

#[tokio::test]
async fn only_admins_move_stock() {
    let world = World::start("auth").await;
    let request = body("p-1", 1, "inventory", "depot");
    let a = world
        .transfer(
            request.clone(),
            None,
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "unauthenticated");
    let customer = [
        ("content-type", "application/json"),
        ("x-shoal-subject", "alice"),
        ("x-shoal-scopes", "customer"),
    ];
    let a = world.transfer(request, None, &customer).await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "forbidden");
    let a = testing::request(
        world.inventory.addr(),
        Method::GET,
        "/api/stock-transfers/x-1",
        &customer,
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(world.settled("p-1").await, (100, 20));
    world.stop().await;
}

#[tokio::test]
async fn bad_transfers_are_400_and_move_nothing() {
    let world = World::start("invalid").await;
    let bad = [
        body("p-1", 0, "inventory", "depot"),
        body("p-1", 10_001, "inventory", "depot"),
        body("p-1", 1, "depot", "depot"),
        body("p 1", 1, "inventory", "depot"),
        body("", 1, "inventory", "depot"),
        body("p-1", 1, "inventory", "warehouse-9"),
        json!({"product_id": "p-1", "quantity": 1, "from": "inventory"}),
        json!({"product_id": "p-1", "quantity": 1, "from": "inventory", "to": "depot", "x": 1}),
    ];
    for b in bad {
        let a = world.transfer(b.clone(), None, ADMIN).await;
        assert_eq!(a.status, 400, "{b}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "validation_failed", "{b}");
    }
    let a = world
        .transfer(
            body("p-1", 1, "inventory", "depot"),
            Some("bad key!"),
            ADMIN,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text());
    // A product neither warehouse knows: refused by both, nothing moved.
    let a = world
        .transfer(body("p-99", 1, "inventory", "depot"), None, ADMIN)
        .await;
    assert_eq!(a.status, 409, "{}", a.text());
    assert_eq!(world.settled("p-1").await, (100, 20));
    world.stop().await;
}
