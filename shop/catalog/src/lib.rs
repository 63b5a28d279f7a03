//! The reference shop's catalog service: the products on sale and their prices.
//!
//! It is public (no token needed) and read-only for now:
//!
//! - `GET /api/products` lists every product, ordered by id (cacheable for a few seconds);
//! - `GET /api/products/{id}` answers one product, or 404.
//!
//! Products live in the service's own SQLite database; the first migration creates
//! the table and the development seed products (`p-1` … `p-6`, prices in EUR cents).

use axum::extract::Path;
use axum::http::header::CACHE_CONTROL;
use axum::response::IntoResponse;
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

/// How long a client or cache may reuse the product list.
const LIST_CACHE_CONTROL: &str = "public, max-age=5";

/// The catalog service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("catalog")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .routes(router())
}

fn router() -> Router {
    Router::new()
        .route("/api/products", get(list_products))
        .route("/api/products/{id}", get(get_product))
}

/// A product as the API shows it.
#[derive(Debug, Serialize)]
struct Product {
    id: String,
    name: String,
    price_cents: i64,
    currency: String,
}

type ProductRow = (String, String, i64, String);

impl From<ProductRow> for Product {
    fn from((id, name, price_cents, currency): ProductRow) -> Self {
        Self {
            id,
            name,
            price_cents,
            currency,
        }
    }
}

fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "catalog query failed");
    ApiError::internal("database error")
}

async fn list_products(ctx: Ctx) -> Result<impl IntoResponse, ApiError> {
    let rows = sqlx::query_as::<_, ProductRow>(
        "SELECT id, name, price_cents, currency FROM products ORDER BY id",
    )
    .fetch_all(ctx.db().pool())
    .await
    .map_err(db_error)?;
    let products: Vec<Product> = rows.into_iter().map(Product::from).collect();
    Ok(([(CACHE_CONTROL, LIST_CACHE_CONTROL)], Json(products)))
}

async fn get_product(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Product>, ApiError> {
    let row = sqlx::query_as::<_, ProductRow>(
        "SELECT id, name, price_cents, currency FROM products WHERE id = $1",
    )
    .bind(&id)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(db_error)?;
    match row {
        Some(row) => Ok(Json(Product::from(row))),
        None => Err(ApiError::not_found(format!("no product {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal::testing::{self, DataDir};

    fn data_dir(test: &str) -> DataDir {
        DataDir::new(&format!("shop-catalog-{test}"))
    }

    async fn start(dir: &std::path::Path) -> shoal::RunningService {
        testing::start_alone(service(), dir).await.unwrap()
    }

    fn assert_product(p: &serde_json::Value) {
        let obj = p.as_object().unwrap();
        assert_eq!(obj.len(), 4, "{p}");
        assert!(obj["id"].as_str().is_some_and(|s| !s.is_empty()), "{p}");
        assert!(obj["name"].as_str().is_some_and(|s| !s.is_empty()), "{p}");
        assert!(obj["price_cents"].as_i64().is_some_and(|n| n > 0), "{p}");
        assert_eq!(obj["currency"], "EUR", "{p}");
    }

    #[tokio::test]
    async fn lists_products_in_id_order_and_cacheable() {
        let dir = data_dir("list");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/products").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.headers["cache-control"], "public, max-age=5");
        assert!(a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let v = a.json();
        let list = v.as_array().unwrap();
        assert!(list.len() >= 5, "{v}");
        list.iter().for_each(assert_product);
        let ids: Vec<&str> = list.iter().map(|p| p["id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted);
        assert_eq!(ids[0], "p-1");
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn one_product_by_id() {
        let dir = data_dir("one");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/products/p-1")
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        assert_product(&v);
        assert_eq!(v["id"], "p-1");
        assert_eq!(v["name"], "Trail running shoes");
        assert_eq!(v["price_cents"], 12999);
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_product_is_a_json_404() {
        let dir = data_dir("unknown");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/api/products/p-99")
            .await
            .unwrap();
        assert_eq!(a.status, 404, "{}", a.text());
        let v = a.json();
        assert_eq!(v["error"]["code"], "not_found", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("p-99"));
        // An unknown path and a wrong method are JSON errors too.
        let a = testing::get(running.addr(), "/api/nope").await.unwrap();
        assert_eq!(a.status, 404);
        assert_eq!(a.json()["error"]["code"], "not_found");
        let a = testing::request(
            running.addr(),
            axum::http::Method::DELETE,
            "/api/products/p-1",
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 405);
        assert!(a.json()["error"]["code"].is_string());
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn served_by_header_request_id_and_readiness() {
        let dir = data_dir("headers");
        let running = start(&dir).await;
        let a = testing::request(
            running.addr(),
            axum::http::Method::GET,
            "/api/products",
            &[("x-request-id", "catalog-test-1")],
            Vec::new(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(
            a.headers["x-shoal-served-by"],
            format!("catalog@{}", env!("CARGO_PKG_VERSION")).as_str()
        );
        assert_eq!(a.headers["x-request-id"], "catalog-test-1");
        let a = testing::get(running.addr(), "/api/products/p-99")
            .await
            .unwrap();
        assert!(a.headers.contains_key("x-shoal-served-by"));
        let a = testing::get(running.addr(), "/health/ready").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["checks"]["database"], "ok");
        running.shutdown().await.unwrap();
    }

    /// The same service on its own PostgreSQL database: one setting, no code.
    #[tokio::test]
    async fn runs_unchanged_on_postgres() {
        let dir = data_dir("postgres");
        let url = shoal_testkit::postgres::fresh_database().await;
        let running = testing::start_alone(service().env([("SHOAL_DATABASE__URL", url)]), &dir)
            .await
            .unwrap();
        assert_eq!(running.ctx().db().backend(), shoal::Backend::Postgres);
        let a = testing::get(running.addr(), "/api/products").await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        v.as_array().unwrap().iter().for_each(assert_product);
        let a = testing::get(running.addr(), "/api/products/p-1")
            .await
            .unwrap();
        assert_eq!(a.json()["price_cents"], 12999);
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_restart_keeps_the_seed_rows_single() {
        let dir = data_dir("restart");
        let count = |running: &shoal::RunningService| {
            let pool = running.ctx().db().pool().clone();
            async move {
                let (n,) = sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM products")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                n
            }
        };
        let running = start(&dir).await;
        let first = count(&running).await;
        assert!(first >= 5);
        running.shutdown().await.unwrap();

        let running = start(&dir).await;
        assert_eq!(count(&running).await, first);
        let a = testing::get(running.addr(), "/api/products").await.unwrap();
        assert_eq!(a.json().as_array().unwrap().len() as i64, first);
        running.shutdown().await.unwrap();
    }
}
