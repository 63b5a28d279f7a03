//! The reference shop's reviews service: the anti-corruption layer in front of the
//! legacy monolith, which is still the home of product reviews (strangler fig).
//!
//! - `GET /api/reviews?product_id=p-1` answers
//!   `[{"product_id":"p-1","rating":4,"text":"…","author":"…"}]`.
//!
//! It calls the monolith (`GET /legacy/ReviewService/GetReviews?sku=P1`, through
//! `ctx.client("legacy")`, by name) and translates its answer into the shop's
//! language, so nothing of the old model leaks past it and the monolith can be
//! replaced behind it without the gateway or any client noticing:
//!
//! - **ids**: the catalog's `p-<n>` is the monolith's `P<n>` and back. A product id
//!   of another form has no legacy SKU, so it has no reviews (`[]`, without a
//!   call); a review whose SKU is not the one asked for is dropped.
//! - **ratings**: the monolith's `Stars` is text as typed into its old form. It is
//!   read as a number (a JSON number is accepted too), rounded to the nearest whole
//!   star (`"4.5"` → 5, half up) and kept only if it is 1 to 5. Anything else
//!   (`"N/A"`, `""`, `"0"`, `"9"`) drops the review: clamping would invent an
//!   opinion (a 0 may mean "not rated", a 9 is spam), and a review without a
//!   believable rating is worth less than none.
//! - **names**: `Comment` → `text` (trimmed), `Reviewer.DisplayName` → `author`
//!   (trimmed; blank or missing is `"Anonymous"`).
//! - at most [`MAX_REVIEWS`] reviews are answered, in the monolith's order.
//!
//! Errors: a missing or blank `product_id`, or one longer than 64 characters, is
//! 400 `validation_failed`. The monolith not answering (no instance, refused,
//! timed out, or a 5xx) is 503 `legacy_unavailable`; an answer it cannot read
//! (another status, not JSON, no `ReviewList`) is 502 `legacy_bad_answer`.

use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal::{ApiError, Ctx, Service};

/// The service the reviews live in.
const LEGACY: &str = "legacy";
/// Most reviews one answer holds.
pub const MAX_REVIEWS: usize = 100;
/// Longest product id accepted.
const MAX_PRODUCT_ID_LEN: usize = 64;
/// The author of a review whose reviewer left no name.
const ANONYMOUS: &str = "Anonymous";

/// The reviews service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("reviews")
        .version(env!("CARGO_PKG_VERSION"))
        .routes(router())
}

fn router() -> Router {
    Router::new().route("/api/reviews", get(list_reviews))
}

#[derive(Debug, Deserialize)]
struct ReviewsQuery {
    product_id: Option<String>,
}

/// A review in the shop's language.
#[derive(Debug, PartialEq, Serialize)]
struct Review {
    product_id: String,
    rating: u8,
    text: String,
    author: String,
}

/// The monolith's SKU for a catalog product id: `p-12` → `P12`; `None` for an id
/// the monolith cannot have (not `p-` and a number without leading zeros).
fn sku_for(product_id: &str) -> Option<String> {
    let n = product_id.strip_prefix("p-")?;
    let numeric = !n.is_empty()
        && n.len() <= 9
        && n.bytes().all(|b| b.is_ascii_digit())
        && !n.starts_with('0');
    numeric.then(|| format!("P{n}"))
}

/// The catalog product id for a monolith SKU: `P12` → `p-12`.
fn product_id_for(sku: &str) -> Option<String> {
    let n = sku.trim().strip_prefix('P')?;
    let id = format!("p-{n}");
    (sku_for(&id).is_some()).then_some(id)
}

/// A rating of 1 to 5 from the monolith's `Stars`, or `None` to drop the review.
fn rating(stars: &Value) -> Option<u8> {
    let value = match stars {
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        Value::Number(n) => n.as_f64()?,
        _ => return None,
    };
    if !value.is_finite() {
        return None;
    }
    // Half up: 4.5 → 5 (`f64::round` rounds halves away from zero; ratings are positive).
    let rounded = value.round();
    (1.0..=5.0).contains(&rounded).then_some(rounded as u8)
}

fn text_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("")
        .to_string()
}

/// One legacy review translated, or `None` when it cannot honestly be shown.
fn translate(product_id: &str, legacy: &Value) -> Option<Review> {
    let sku = legacy.get("SKU")?.as_str()?;
    if product_id_for(sku).as_deref() != Some(product_id) {
        return None;
    }
    let rating = rating(legacy.get("Stars")?)?;
    let author = text_of(legacy.get("Reviewer").and_then(|r| r.get("DisplayName")));
    Some(Review {
        product_id: product_id.to_string(),
        rating,
        text: text_of(legacy.get("Comment")),
        author: if author.is_empty() {
            ANONYMOUS.to_string()
        } else {
            author
        },
    })
}

/// The shop's reviews from the monolith's `GetReviews` answer.
fn translate_all(product_id: &str, answer: &Value) -> Option<Vec<Review>> {
    let list = answer.get("ReviewList")?.as_array()?;
    let reviews: Vec<Review> = list
        .iter()
        .filter_map(|r| {
            let t = translate(product_id, r);
            if t.is_none() {
                tracing::debug!(review = %r, "legacy review dropped");
            }
            t
        })
        .take(MAX_REVIEWS)
        .collect();
    Some(reviews)
}

fn validation_failed(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
}

fn legacy_unavailable(why: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %why, "legacy unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "legacy_unavailable",
        "reviews are temporarily unavailable: the legacy system does not answer",
    )
}

fn legacy_bad_answer(why: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %why, "legacy answered something unreadable");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "legacy_bad_answer",
        "reviews are temporarily unavailable: the legacy system's answer cannot be read",
    )
}

async fn list_reviews(
    ctx: Ctx,
    Query(q): Query<ReviewsQuery>,
) -> Result<Json<Vec<Review>>, ApiError> {
    let product_id = q.product_id.as_deref().map(str::trim).unwrap_or("");
    if product_id.is_empty() {
        return Err(validation_failed("product_id is required"));
    }
    if product_id.len() > MAX_PRODUCT_ID_LEN {
        return Err(validation_failed(&format!(
            "product_id is longer than {MAX_PRODUCT_ID_LEN} characters"
        )));
    }
    let Some(sku) = sku_for(product_id) else {
        // Not a catalog id the monolith can know: it has no reviews.
        return Ok(Json(Vec::new()));
    };
    let answer = ctx
        .client(LEGACY)
        .get(&format!("/legacy/ReviewService/GetReviews?sku={sku}"))
        .send()
        .await
        .map_err(legacy_unavailable)?;
    if answer.status.is_server_error() {
        return Err(legacy_unavailable(format!("status {}", answer.status)));
    }
    if answer.status != StatusCode::OK {
        return Err(legacy_bad_answer(format!(
            "status {}: {}",
            answer.status,
            answer.text()
        )));
    }
    let body: Value = serde_json::from_slice(&answer.body).map_err(legacy_bad_answer)?;
    let reviews = translate_all(product_id, &body)
        .ok_or_else(|| legacy_bad_answer("no ReviewList in the answer"))?;
    Ok(Json(reviews))
}

#[cfg(test)]
mod tests;
