//! The reference shop's legacy service: the old monolith, still the home of product
//! reviews, kept running while the new services take over its parts (the strangler
//! fig). Nothing new calls it directly: the reviews service is the
//! anti-corruption layer in front of it.
//!
//! Its API has the shape it always had, and that shape is the point: it is what
//! the new services must not take on.
//!
//! - `GET /legacy/ReviewService/GetReviews?sku=P1` answers
//!   `{"ReviewList":[{"ReviewID":"R1001","SKU":"P1","Stars":"4","Comment":"…",
//!   "Reviewer":{"DisplayName":"…"},"PostedOn":"2019-03-02"}],"Count":1}`, in
//!   `ReviewID` order. PascalCase names; SKUs `P<n>` where the catalog says `p-<n>`;
//!   everything a string, stars included, and stars as typed into the old form
//!   (`"4"`, `" 3 "`, `"4.5"`, `"N/A"`, `"9"`); a blank `DisplayName` for
//!   anonymous reviews. An unknown SKU is not an error: `{"ReviewList":[],"Count":0}`.
//!   Without `sku`: 400 `{"Fault":{"Code":"MissingParameter","Message":"…"}}`, its
//!   own error shape, not the platform's.
//! - `GET /legacy/ProductService/List` answers the old product listing,
//!   `{"ProductList":[{"SKU","Title","PriceEUR":"129.99","Discontinued":"N"}],
//!   "Count":7}`: what the catalog (`/api/products`, integer cents) replaced. P1..P6
//!   were migrated as `p-1`..`p-6`; P7 was discontinued and stayed behind.
//!
//! The data is the monolith's own SQLite database; the first migration holds the
//! development seeds, bad ratings included (see `migrations/001_init.sql`).

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal::{ApiError, Ctx, Migration, Service};

/// The schema and seed data, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// Longest SKU looked up; the monolith's are a letter and a few digits.
const MAX_SKU_LEN: usize = 32;

/// The legacy service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("legacy")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .routes(router())
}

fn router() -> Router {
    Router::new()
        .route("/legacy/ReviewService/GetReviews", get(get_reviews))
        .route("/legacy/ProductService/List", get(list_products))
}

#[derive(Debug, Deserialize)]
struct ReviewsQuery {
    sku: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ReviewList {
    review_list: Vec<Review>,
    count: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Review {
    #[serde(rename = "ReviewID")]
    review_id: String,
    #[serde(rename = "SKU")]
    sku: String,
    stars: String,
    comment: String,
    reviewer: Reviewer,
    posted_on: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Reviewer {
    display_name: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProductList {
    product_list: Vec<Product>,
    count: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Product {
    #[serde(rename = "SKU")]
    sku: String,
    title: String,
    #[serde(rename = "PriceEUR")]
    price_eur: String,
    discontinued: String,
}

/// The monolith's own error answer.
fn fault(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"Fault": {"Code": code, "Message": message}})),
    )
        .into_response()
}

fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "legacy query failed");
    ApiError::internal("database error")
}

async fn get_reviews(ctx: Ctx, Query(q): Query<ReviewsQuery>) -> Result<Response, ApiError> {
    let Some(sku) = q.sku.filter(|s| !s.trim().is_empty()) else {
        return Ok(fault(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            "sku is required",
        ));
    };
    if sku.len() > MAX_SKU_LEN {
        return Ok(Json(ReviewList {
            review_list: Vec::new(),
            count: 0,
        })
        .into_response());
    }
    let rows = sqlx::query_as::<_, (String, String, String, String, String, String)>(
        "SELECT ReviewID, SKU, Stars, Comment, DisplayName, PostedOn FROM Reviews
         WHERE SKU = $1 ORDER BY ReviewID",
    )
    .bind(sku.trim())
    .fetch_all(ctx.db().pool())
    .await
    .map_err(db_error)?;
    let review_list: Vec<Review> = rows
        .into_iter()
        .map(
            |(review_id, sku, stars, comment, display_name, posted_on)| Review {
                review_id,
                sku,
                stars,
                comment,
                reviewer: Reviewer { display_name },
                posted_on,
            },
        )
        .collect();
    let count = review_list.len();
    Ok(Json(ReviewList { review_list, count }).into_response())
}

async fn list_products(ctx: Ctx) -> Result<Json<ProductList>, ApiError> {
    let rows = sqlx::query_as::<_, (String, String, String, String)>(
        "SELECT SKU, Title, PriceEUR, Discontinued FROM Products ORDER BY SKU",
    )
    .fetch_all(ctx.db().pool())
    .await
    .map_err(db_error)?;
    let product_list: Vec<Product> = rows
        .into_iter()
        .map(|(sku, title, price_eur, discontinued)| Product {
            sku,
            title,
            price_eur,
            discontinued,
        })
        .collect();
    let count = product_list.len();
    Ok(Json(ProductList {
        product_list,
        count,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal::testing::contract::Contract;
    use shoal::testing::{self, DataDir};

    async fn start(dir: &std::path::Path) -> shoal::RunningService {
        testing::start_alone(service(), dir).await.unwrap()
    }

    #[tokio::test]
    async fn reviews_come_in_the_old_shape() {
        let dir = DataDir::new("shop-legacy-reviews");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/legacy/ReviewService/GetReviews?sku=P1")
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        assert_eq!(v["Count"], 2, "{v}");
        let first = &v["ReviewList"][0];
        assert_eq!(
            first,
            &serde_json::json!({
                "ReviewID": "R1001", "SKU": "P1", "Stars": "4",
                "Comment": "Good grip on wet rock.",
                "Reviewer": {"DisplayName": "Hiker42"}, "PostedOn": "2019-03-02"
            })
        );
        // The bad data is served as it is: translating it is the reviews service's job.
        let a = testing::get(running.addr(), "/legacy/ReviewService/GetReviews?sku=P3")
            .await
            .unwrap();
        let v = a.json();
        let stars: Vec<&str> = v["ReviewList"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["Stars"].as_str().unwrap())
            .collect();
        assert_eq!(stars, ["4.5", "N/A", "9", "0"]);
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn an_unknown_sku_is_an_empty_list_and_no_sku_a_fault() {
        let dir = DataDir::new("shop-legacy-unknown");
        let running = start(&dir).await;
        let long = format!("/legacy/ReviewService/GetReviews?sku={}", "P".repeat(100));
        for path in ["/legacy/ReviewService/GetReviews?sku=P99", long.as_str()] {
            let a = testing::get(running.addr(), path).await.unwrap();
            assert_eq!(a.status, 200, "{}", a.text());
            assert_eq!(a.json(), serde_json::json!({"ReviewList": [], "Count": 0}));
        }
        for path in [
            "/legacy/ReviewService/GetReviews",
            "/legacy/ReviewService/GetReviews?sku=",
        ] {
            let a = testing::get(running.addr(), path).await.unwrap();
            assert_eq!(a.status, 400, "{}", a.text());
            assert_eq!(a.json()["Fault"]["Code"], "MissingParameter");
        }
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_old_product_listing_shows_what_the_catalog_took_over() {
        let dir = DataDir::new("shop-legacy-products");
        let running = start(&dir).await;
        let a = testing::get(running.addr(), "/legacy/ProductService/List")
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        assert_eq!(v["Count"], 7);
        let list = v["ProductList"].as_array().unwrap();
        assert_eq!(
            list[0],
            serde_json::json!({"SKU": "P1", "Title": "Trail running shoes", "PriceEUR": "129.99", "Discontinued": "N"})
        );
        let migrated = list.iter().filter(|p| p["Discontinued"] == "N").count();
        assert_eq!(migrated, 6);
        running.shutdown().await.unwrap();
    }

    /// What the reviews service (the anti-corruption layer) relies on.
    #[tokio::test]
    async fn keeps_its_contract_with_the_reviews_service() {
        let dir = DataDir::new("shop-legacy-contract");
        let running = start(&dir).await;
        let contract = Contract::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../contracts/reviews--legacy.json"
        ));
        assert_eq!(contract.provider, "legacy");
        // The seed data holds P1's reviews.
        contract
            .verify(running.addr(), |_state| async {})
            .await
            .unwrap();
        running.shutdown().await.unwrap();
    }
}
