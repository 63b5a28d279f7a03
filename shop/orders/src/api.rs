//! The orders API (docs/shop.md): place, read, list, history, and the saga's
//! status for operators.

use crate::order::{self, Item, Order, Status};
use crate::saga::{Orchestrator, PlaceOrder};
use crate::Settings;
use axum::extract::{Extension, Path};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal::events::Direction;
use shoal::{ApiError, Ctx, Identity};
use std::collections::BTreeMap;

/// Largest order body accepted (the gateway refuses larger ones first).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Lines per order.
const MAX_ITEMS: usize = 50;
/// Units per line.
const MAX_QUANTITY: u32 = 100;
/// Longest `Idempotency-Key`.
const MAX_KEY_LEN: usize = 200;

pub(crate) fn router(orchestrator: Orchestrator) -> Router {
    Router::new()
        .route("/api/orders", get(list).post(place))
        .route("/api/orders/{id}", get(one))
        .route("/api/orders/{id}/history", get(history))
        .route("/internal/orders/{id}/saga", get(saga_status))
        .layer(Extension(orchestrator))
}

fn validation(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
}

fn internal(e: shoal::Error) -> ApiError {
    tracing::error!(error = %e, "orders failed");
    ApiError::internal("the order could not be handled")
}

/// A line of a request.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RequestedItem {
    product_id: String,
    quantity: u32,
}

/// `POST /api/orders`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PlaceRequest {
    items: Vec<RequestedItem>,
    card_number: String,
}

impl PlaceRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            return Err(validation(format!(
                "items: must hold 1 to {MAX_ITEMS} lines"
            )));
        }
        for (i, item) in self.items.iter().enumerate() {
            let id = &item.product_id;
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(validation(format!(
                    "items[{i}].product_id: 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(validation(format!(
                    "items[{i}].quantity: must be 1 to {MAX_QUANTITY}"
                )));
            }
        }
        let card = &self.card_number;
        if card.len() != 16 || !card.bytes().all(|b| b.is_ascii_digit()) {
            return Err(validation("card_number: must be 16 digits"));
        }
        Ok(())
    }
}

fn parse(body: &[u8]) -> Result<PlaceRequest, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("an order is at most {MAX_BODY_BYTES} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let req: PlaceRequest =
        serde_json::from_value(value).map_err(|e| validation(format!("body: {e}")))?;
    req.validate()?;
    Ok(req)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    hex(ctx.finish().as_ref())
}

/// The order an `Idempotency-Key` stands for: made from the customer and the key,
/// so a repeat finds the same order even if the first attempt died half-way.
fn order_id_for_key(customer: &str, key: &str) -> String {
    sha256(&[customer.as_bytes(), key.as_bytes()])[..32].to_string()
}

/// Claim `key` for `digest`, or find what it was claimed for. `Err(422)` when the
/// key already placed an order with another body.
async fn claim_key(
    ctx: &Ctx,
    customer: &str,
    key: &str,
    digest: &str,
    order_id: &str,
) -> Result<(), ApiError> {
    let pool = ctx.db().pool();
    shoal::sqlx::query(
        "INSERT INTO idempotency_keys (customer_id, key, body_sha256, order_id, created_ms)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id, key) DO NOTHING",
    )
    .bind(customer)
    .bind(key)
    .bind(digest)
    .bind(order_id)
    .bind(shoal::time::unix_ms() as i64)
    .execute(pool)
    .await
    .map_err(|e| internal(shoal::Error::internal("idempotency").with_source(e)))?;
    let (stored,): (String,) = shoal::sqlx::query_as(
        "SELECT body_sha256 FROM idempotency_keys WHERE customer_id = $1 AND key = $2",
    )
    .bind(customer)
    .bind(key)
    .fetch_one(pool)
    .await
    .map_err(|e| internal(shoal::Error::internal("idempotency").with_source(e)))?;
    if stored != digest {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for another order",
        ));
    }
    Ok(())
}

/// Today's price of each product, `None` for products the catalog does not know.
async fn prices(ctx: &Ctx, ids: Vec<String>) -> Result<BTreeMap<String, Option<i64>>, ApiError> {
    let catalog = ctx.client("catalog");
    let lookups = ids.into_iter().map(|id| {
        let catalog = catalog.clone();
        async move {
            let res = catalog
                .get(&format!("/api/products/{id}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match res.status.as_u16() {
                404 => Ok((id, None)),
                200 => {
                    let v: Value = serde_json::from_slice(&res.body).map_err(|e| e.to_string())?;
                    match v["price_cents"].as_i64() {
                        Some(p) if p >= 0 => Ok((id, Some(p))),
                        _ => Err(format!("catalog sent no price for {id}")),
                    }
                }
                s => Err(format!("catalog answered {s}")),
            }
        }
    });
    let mut out = BTreeMap::new();
    for r in futures_util::future::join_all(lookups).await {
        match r {
            Ok((id, price)) => {
                out.insert(id, price);
            }
            Err(e) => {
                tracing::warn!(error = %e, "pricing an order failed");
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "catalog_unavailable",
                    "prices cannot be read right now; try again",
                ));
            }
        }
    }
    Ok(out)
}

fn accepted(id: &str, status: Status) -> Response {
    let mut res = (
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": status.as_str()})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/orders/{id}")) {
        res.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    res
}

async fn place(
    ctx: Ctx,
    who: Identity,
    Extension(orchestrator): Extension<Orchestrator>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req = parse(&body)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= MAX_KEY_LEN => Some(k.to_string()),
            _ => {
                return Err(validation(format!(
                    "Idempotency-Key: 1 to {MAX_KEY_LEN} visible ASCII characters"
                )))
            }
        },
    };
    let id = match &key {
        Some(key) => {
            let id = order_id_for_key(&who.subject, key);
            // The digest of the parsed request, so a repeat spelled differently
            // (spacing, key order) is still the same order.
            let canonical = serde_json::to_vec(&req)
                .map_err(|e| internal(shoal::Error::internal("encoding").with_source(e)))?;
            claim_key(&ctx, &who.subject, key, &sha256(&[&canonical]), &id).await?;
            id
        }
        None => uuid::Uuid::now_v7().simple().to_string(),
    };

    // A repeat of an order that exists answers what it is now.
    let existing = ctx.events().load::<Order>(&id).await.map_err(internal)?;
    if existing.state.placed {
        return Ok(accepted(&id, existing.state.status));
    }

    let mut distinct: Vec<String> = req.items.iter().map(|i| i.product_id.clone()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let prices = prices(&ctx, distinct).await?;
    let unknown = prices.values().any(Option::is_none);
    let items: Vec<Item> = req
        .items
        .iter()
        .map(|i| Item {
            product_id: i.product_id.clone(),
            quantity: i.quantity,
            price_cents: prices.get(&i.product_id).copied().flatten().unwrap_or(0),
        })
        .collect();
    let settings = ctx.settings::<Settings>();
    let now = shoal::time::unix_ms();
    let data = PlaceOrder {
        order_id: id.clone(),
        customer_id: who.subject.clone(),
        total_cents: order::total_of(&items),
        items,
        card_last4: req.card_number[12..].to_string(),
        card_number: Some(req.card_number.clone()),
        payment_deadline_ms: now + settings.payment_deadline_ms,
        placed_at_ms: now,
    };

    if unknown {
        // Nothing to reserve or charge: the order is placed and rejected at once.
        let state = order::place(ctx.events(), &id, data.placed(), true)
            .await
            .map_err(internal)?;
        return Ok(accepted(&id, state.status));
    }
    // The saga first: once it is durable, the order will end one way or the other
    // even if this process dies before the next line.
    orchestrator
        .start(&id, data.clone())
        .await
        .map_err(|e| match e.kind() {
            shoal::ErrorKind::Overloaded => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many orders in flight; try again",
            ),
            _ => internal(e),
        })?;
    let state = order::place(ctx.events(), &id, data.placed(), false)
        .await
        .map_err(internal)?;
    crate::settle_when_done(ctx.clone(), orchestrator, id.clone());
    Ok(accepted(&id, state.status))
}

/// An order as the API shows it.
fn view(id: &str, o: &Order) -> Value {
    json!({
        "id": id,
        "customer_id": o.customer_id,
        "status": o.status.as_str(),
        "reason": o.reason.map(|r| r.as_str()),
        "items": o.items,
        "total_cents": o.total_cents,
    })
}

/// Load order `id` for `who`: somebody else's order is 404, like a missing one
/// (an id says nothing about whether it exists); `admin` reads any when allowed.
async fn load_for(
    ctx: &Ctx,
    who: &Identity,
    id: &str,
    admin_reads: bool,
) -> Result<Order, ApiError> {
    let not_found = || ApiError::not_found(format!("no order {id}"));
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(not_found());
    }
    let o = ctx
        .events()
        .load::<Order>(id)
        .await
        .map_err(internal)?
        .state;
    let allowed = o.customer_id == who.subject || (admin_reads && who.has_scope("admin"));
    match o.placed && allowed {
        true => Ok(o),
        false => Err(not_found()),
    }
}

async fn one(ctx: Ctx, who: Identity, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let o = load_for(&ctx, &who, &id, true).await?;
    Ok(Json(view(&id, &o)))
}

type ViewRow = (String, String, String, Option<String>, i64, String, i64);

async fn list(ctx: Ctx, who: Identity) -> Result<Json<Vec<Value>>, ApiError> {
    let limit = ctx.settings::<Settings>().list_limit;
    let rows: Vec<ViewRow> = shoal::sqlx::query_as(
        "SELECT id, customer_id, status, reason, total_cents, items, placed_at_ms
         FROM orders_view WHERE customer_id = $1
         ORDER BY placed_at_ms DESC, id DESC LIMIT $2",
    )
    .bind(&who.subject)
    .bind(i64::from(limit))
    .fetch_all(ctx.db().pool())
    .await
    .map_err(|e| internal(shoal::Error::internal("listing orders").with_source(e)))?;
    let list = rows
        .into_iter()
        .map(
            |(id, customer_id, status, reason, total_cents, items, placed_at_ms)| {
                let items: Value = serde_json::from_str(&items).unwrap_or(Value::Null);
                json!({
                    "id": id,
                    "customer_id": customer_id,
                    "status": status,
                    "reason": reason,
                    "items": items,
                    "total_cents": total_cents,
                    "placed_at": shoal::time::rfc3339(placed_at_ms as u64),
                })
            },
        )
        .collect();
    Ok(Json(list))
}

async fn history(
    ctx: Ctx,
    who: Identity,
    Path(id): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    load_for(&ctx, &who, &id, false).await?;
    let events = ctx
        .events()
        .read_stream(&format!("order-{id}"), 1, Direction::Forwards, 1_000)
        .await
        .map_err(internal)?;
    let out = events
        .into_iter()
        .map(|e| {
            let mut data = e.data;
            if let Some(obj) = data.as_object_mut() {
                obj.remove("type");
            }
            json!({
                "type": e.event_type,
                "version": e.version,
                "recorded_at": shoal::time::rfc3339(e.recorded_at_ms),
                "data": data,
            })
        })
        .collect();
    Ok(Json(out))
}

async fn saga_status(
    Extension(orchestrator): Extension<Orchestrator>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match orchestrator.status(&id).await.map_err(internal)? {
        Some(mut status) => {
            // The card number is dropped after authorization; before, not shown.
            if let Some(d) = status.data.as_object_mut() {
                d.remove("card_number");
            }
            Ok(Json(serde_json::to_value(status).unwrap_or(Value::Null)))
        }
        None => Err(ApiError::not_found(format!("no saga for order {id}"))),
    }
}
