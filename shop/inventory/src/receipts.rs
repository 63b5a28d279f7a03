//! Goods received: an operator (or a supplier's system) books a delivery, and its
//! units become available. `POST /internal/stock/{product_id}/receipts`
//! `{"quantity"}` with a required `Idempotency-Key` (the delivery's reference): the
//! receipt row and the stock change commit together, and a repeat of the key
//! changes nothing, so a retried booking never counts a delivery twice.

use crate::reservations::{db_error, now_ms, valid_id, MAX_ID_LEN};
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal::{ApiError, Ctx};

/// Most units one delivery may book.
const MAX_RECEIPT: i64 = 10_000_000;

pub(crate) fn router() -> Router {
    Router::new().route("/internal/stock/{product_id}/receipts", post(receive))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Receipt {
    quantity: i64,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
}

async fn receive(
    ctx: Ctx,
    Path(product_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| valid_id(k))
        .ok_or_else(|| {
            invalid(format!(
                "Idempotency-Key: required, 1 to {MAX_ID_LEN} letters, digits or -_.:"
            ))
        })?
        .to_string();
    let receipt: Receipt =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body: {e}")))?;
    if !(1..=MAX_RECEIPT).contains(&receipt.quantity) {
        return Err(invalid(format!("quantity: must be 1 to {MAX_RECEIPT}")));
    }
    let mut tx = ctx.db().pool().begin().await.map_err(db_error)?;
    let booked = sqlx::query(
        "INSERT INTO stock_receipts (receipt_key, product_id, quantity, received_ms)
         VALUES ($1, $2, $3, $4) ON CONFLICT (receipt_key) DO NOTHING",
    )
    .bind(&key)
    .bind(&product_id)
    .bind(receipt.quantity)
    .bind(now_ms())
    .execute(&mut *tx)
    .await
    .map_err(db_error)?
    .rows_affected()
        == 1;
    if booked {
        let updated =
            sqlx::query("UPDATE stock SET available = available + $1 WHERE product_id = $2")
                .bind(receipt.quantity)
                .bind(&product_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
        if updated == 0 {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_product",
                format!("no stock record for product {product_id}"),
            ));
        }
    } else {
        // A repeat: answer what the first booking was, whatever this body says.
        let (first,): (String,) =
            sqlx::query_as("SELECT product_id FROM stock_receipts WHERE receipt_key = $1")
                .bind(&key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
        if first != product_id {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("receipt {key} was booked for {first}"),
            ));
        }
    }
    tx.commit().await.map_err(db_error)?;
    Ok(Json(
        json!({"receipt": key, "product_id": product_id, "booked": booked}),
    ))
}

#[cfg(test)]
mod tests {
    use shoal::testing::{self, DataDir};

    #[tokio::test]
    async fn a_delivery_counts_once_per_key() {
        let dir = DataDir::new("shop-inventory-receipts");
        let running = testing::start_alone(crate::service(), &dir).await.unwrap();
        let addr = running.addr();
        let book = |key: &'static str, product: &'static str, body: &'static str| async move {
            let mut headers = vec![("content-type", "application/json")];
            if !key.is_empty() {
                headers.push(("idempotency-key", key));
            }
            testing::request(
                addr,
                axum::http::Method::POST,
                &format!("/internal/stock/{product}/receipts"),
                &headers,
                body,
            )
            .await
            .unwrap()
        };
        let available = || async move {
            testing::get(addr, "/api/inventory/p-6")
                .await
                .unwrap()
                .json()["available"]
                .as_i64()
                .unwrap()
        };
        assert_eq!(available().await, 0);
        let a = book("d-1", "p-6", r#"{"quantity": 7}"#).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["booked"], true);
        let again = book("d-1", "p-6", r#"{"quantity": 7}"#).await;
        assert_eq!(again.json()["booked"], false);
        assert_eq!(available().await, 7);
        assert_eq!(book("d-1", "p-5", r#"{"quantity": 7}"#).await.status, 409);
        assert_eq!(book("d-2", "p-99", r#"{"quantity": 1}"#).await.status, 404);
        for (key, body) in [
            ("", r#"{"quantity": 1}"#),
            ("d-3", r#"{"quantity": 0}"#),
            ("d-4", "{no"),
        ] {
            assert_eq!(book(key, "p-6", body).await.status, 400, "{key} {body}");
        }
        assert_eq!(available().await, 7, "refusals change nothing");
        running.shutdown().await.unwrap();
    }
}
