//! The reference shop's inventory service: how much of each product is in stock,
//! and the stock held for orders in flight.
//!
//! For each product it keeps what is `available` (can still be reserved) and what
//! is `reserved` (held for orders in flight); both are never negative, enforced by
//! the database (`CHECK`). Routes:
//!
//! - `GET /api/inventory/{product_id}` answers `{"product_id","available","reserved"}`,
//!   or 404 for a product it holds no stock record of.
//! - `POST /internal/reservations` `{"reservation_id","items":[{"product_id","quantity"}]}`
//!   holds stock for one order (the `place-order` saga's `reserve` step): for every
//!   item available −q and reserved +q, all or nothing, in one transaction. 200
//!   `{"reservation_id","status":"reserved"}`; 409 `out_of_stock` or 404
//!   `unknown_product` (naming the product) with nothing held; 400
//!   `validation_failed` for a bad body (1 to 50 items, quantities 1 to 100000, ids
//!   of 1 to 128 letters, digits, `-_.:`). A product listed twice is summed.
//! - `POST /internal/reservations/{id}/commit`: the held units leave (reserved −q).
//!   200 `{"reservation_id","status":"committed"}`; 404 `not_found` for an unknown
//!   reservation; 409 `conflict` if it was released or refused.
//! - `POST /internal/reservations/{id}/release`: the held units come back (reserved
//!   −q, available +q). 200 `{"reservation_id","status":"released"}`, also for a
//!   reservation never made or refused; 409 `conflict` if it was committed.
//!
//! Every call is idempotent on the reservation id, because the saga repeats them
//! with the same key after a timeout or a crash. A reservation's row is never
//! deleted, and a repeat answers from it:
//!
//! - a repeated reserve answers 200 with the current status (`reserved`, or
//!   `committed` when the order went on), and a refused one the same refusal (it is
//!   stored, so a repeat never retries the reserve and never holds stock the first
//!   answer said it could not); a repeat with other items is 409 `conflict`;
//! - a release that comes before its reserve (the reserve's answer was lost, the
//!   saga compensated) leaves a `released` tombstone, and the late reserve is 409
//!   `conflict` instead of holding stock for an order already given up; a reserve
//!   repeated after a release is 409 `conflict` too.
//!
//! Concurrent reservations never oversell: each product is taken with
//! `UPDATE … SET available = available - q WHERE product_id = … AND available >= q`
//! (its rows-affected says whether it could), under SQLite's write lock (`BEGIN
//! IMMEDIATE`) or PostgreSQL's row locks, rows taken in product-id order.
//!
//! Stock transfers move units between this warehouse and the depot (the `depot`
//! service, its own database) with two-phase commit, this service coordinating
//! (module `transfers`, docs/twophase.md):
//!
//! - `POST /api/stock-transfers` `{"product_id","quantity","from":"inventory"|"depot","to":…}`
//!   (+ optional `Idempotency-Key`, which becomes the transfer id and the two-phase
//!   commit transaction id), scope `admin` (401 `unauthenticated` without a caller,
//!   403 `forbidden` without the scope). 200 `{"transfer_id","status":"committed",…}`
//!   once the decision to commit is logged; 409 `transfer_refused` when a warehouse
//!   voted no (not enough units, unknown product), nothing moved; 503 `unavailable`
//!   when the depot is not registered or a warehouse could not be reached in time
//!   (aborted, nothing moved); 400 `validation_failed` (quantity 1 to 10000, ids as
//!   for reservations, `from` ≠ `to`). A repeat with the same key answers how the
//!   first call ended (409 `conflict` while it runs, or for a key reused with
//!   another body).
//! - `GET /api/stock-transfers/{id}` (scope `admin`): the transfer, its status and
//!   the coordinator's view of its transaction.
//! - `/2pc/inventory/…` (this warehouse's participant) and `/2pc/coordinator/…` (the
//!   coordinator's decision and status routes), for the protocol only.
//!
//! - `POST /internal/stock/{product_id}/receipts` `{"quantity"}` + `Idempotency-Key`
//!   (required): goods received become available, once per key (module `receipts`).
//!
//! Units a prepared transfer holds are in neither `available` nor gone (`outgoing`
//! and `incoming` columns, not shown by `GET /api/inventory`), so an order can never
//! reserve units that may leave.
//!
//! Stock lives in the service's own database (SQLite by default, PostgreSQL by
//! config); the first migration creates the table and the development seed stock
//! for the catalog's seed products (`p-1` … `p-6`, with `p-6` out of stock), the
//! second the reservations, the third the transfers.

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use shoal::{ApiError, Ctx, Migration, Service};

mod receipts;
mod reservations;
mod transfers;

/// The schema and seed data, applied once per database at start.
static MIGRATIONS: &[Migration] = &[
    Migration::new(1, "init", include_str!("../migrations/001_init.sql")),
    Migration::new(
        2,
        "reservations",
        include_str!("../migrations/002_reservations.sql"),
    ),
    Migration::new(
        3,
        "transfers",
        include_str!("../migrations/003_transfers.sql"),
    ),
    Migration::new(
        4,
        "receipts",
        include_str!("../migrations/004_receipts.sql"),
    ),
];

/// The inventory service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("inventory")
        .version(env!("CARGO_PKG_VERSION"))
        .settings::<transfers::Settings>()
        .database(MIGRATIONS)
        .routes(router())
        .setup(transfers::setup)
}

fn router() -> Router {
    // The gateway asks a token for `/api/inventory`. `/internal/` routes are for
    // other services and operators only: no gateway route leads there.
    Router::new()
        .route("/api/inventory/{product_id}", get(get_stock))
        .merge(reservations::router())
        .merge(receipts::router())
}

/// One product's stock as the API shows it.
#[derive(Debug, Serialize)]
struct Stock {
    product_id: String,
    available: i64,
    reserved: i64,
}

async fn get_stock(ctx: Ctx, Path(product_id): Path<String>) -> Result<Json<Stock>, ApiError> {
    let row = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT product_id, available, reserved FROM stock WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(reservations::db_error)?;
    match row {
        Some((product_id, available, reserved)) => Ok(Json(Stock {
            product_id,
            available,
            reserved,
        })),
        None => Err(ApiError::not_found(format!(
            "no stock record for product {product_id}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal::testing::{self, DataDir};

    fn data_dir(test: &str) -> DataDir {
        DataDir::new(&format!("shop-inventory-{test}"))
    }

    async fn start(dir: &std::path::Path) -> shoal::RunningService {
        testing::start_alone(service(), dir).await.unwrap()
    }

    #[tokio::test]
    async fn reads_seed_stock() {
        let dir = data_dir("read");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/inventory/p-1")
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(
            a.json(),
            serde_json::json!({"product_id": "p-1", "available": 100, "reserved": 0})
        );
        // Every seed product has a stock record; one is out of stock.
        let mut out_of_stock = 0;
        for i in 1..=6 {
            let a = testing::get(running.addr(), &format!("/api/inventory/p-{i}"))
                .await
                .unwrap();
            assert_eq!(a.status, 200, "p-{i}: {}", a.text());
            let v = a.json();
            assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
            assert!(v["available"].as_i64().unwrap() >= 0);
            assert_eq!(v["reserved"], 0);
            if v["available"] == 0 {
                out_of_stock += 1;
            }
        }
        assert_eq!(out_of_stock, 1);
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_product_is_a_json_404() {
        let dir = data_dir("unknown");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/inventory/p-99")
            .await
            .unwrap();
        assert_eq!(a.status, 404, "{}", a.text());
        let v = a.json();
        assert_eq!(v["error"]["code"], "not_found", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("p-99"));
        let a = testing::request(
            running.addr(),
            axum::http::Method::POST,
            "/api/inventory/p-1",
            &[("content-type", "application/json")],
            "{}",
        )
        .await
        .unwrap();
        assert_eq!(a.status, 405);
        assert!(a.json()["error"]["code"].is_string());
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn served_by_header_and_readiness() {
        let dir = data_dir("headers");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/inventory/p-2")
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(
            a.headers["x-shoal-served-by"],
            format!("inventory@{}", env!("CARGO_PKG_VERSION")).as_str()
        );
        assert!(a.headers.contains_key("x-request-id"));
        let a = testing::get(running.addr(), "/health/ready").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["checks"]["database"], "ok");
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_database_refuses_negative_stock() {
        let dir = data_dir("check");
        let running = start(&dir).await;
        let pool = running.ctx().db().pool();
        let r = sqlx::query("UPDATE stock SET available = -1 WHERE product_id = 'p-1'")
            .execute(pool)
            .await;
        assert!(r.is_err());
        let r = sqlx::query("UPDATE stock SET reserved = -1 WHERE product_id = 'p-1'")
            .execute(pool)
            .await;
        assert!(r.is_err());
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_restart_keeps_the_seed_rows_single() {
        let dir = data_dir("restart");
        let count = |running: &shoal::RunningService| {
            let pool = running.ctx().db().pool().clone();
            async move {
                let (n,) = sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM stock")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                n
            }
        };
        let running = start(&dir).await;
        let first = count(&running).await;
        assert_eq!(first, 6);
        running.shutdown().await.unwrap();

        let running = start(&dir).await;
        assert_eq!(count(&running).await, first);
        let a = testing::get(running.addr(), "/api/inventory/p-3")
            .await
            .unwrap();
        assert_eq!(a.json()["available"], 25);
        running.shutdown().await.unwrap();
    }
}
