//! The reference shop's inventory service: how much of each product is in stock.
//!
//! For each product it keeps what is `available` (can still be reserved) and what
//! is `reserved` (held for orders in flight); both are never negative, enforced by
//! the database. For now it answers reads only:
//!
//! - `GET /api/inventory/{product_id}` answers `{"product_id","available","reserved"}`,
//!   or 404 for a product it holds no stock record of.
//!
//! Stock lives in the service's own SQLite database; the first migration creates the
//! table and the development seed stock for the catalog's seed products (`p-1` …
//! `p-6`, with `p-6` out of stock).

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use shoal::{ApiError, Ctx, Migration, Service};

/// The schema and seed data, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// The inventory service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("inventory")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .routes(router())
}

fn router() -> Router {
    // The contract puts this route behind a token. The gateway checks tokens once
    // the auth issue lands; until then the service itself answers any caller.
    Router::new().route("/api/inventory/{product_id}", get(get_stock))
}

/// One product's stock as the API shows it.
#[derive(Debug, Serialize)]
struct Stock {
    product_id: String,
    available: i64,
    reserved: i64,
}

fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "inventory query failed");
    ApiError::internal("database error")
}

async fn get_stock(ctx: Ctx, Path(product_id): Path<String>) -> Result<Json<Stock>, ApiError> {
    let row = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT product_id, available, reserved FROM stock WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(db_error)?;
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
