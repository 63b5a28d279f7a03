//! Reservations: stock held for one order by the `place-order` saga (reserve, then
//! commit or release). See the crate docs for the rules; this module keeps them.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal::{ApiError, Backend, Ctx, Db};
use sqlx::{Any, Transaction};
use std::collections::BTreeMap;

#[cfg(test)]
mod tests;

/// Most items one reservation may hold (distinct products after summing).
pub(crate) const MAX_ITEMS: usize = 50;
/// Most units of one product one request may ask for.
pub(crate) const MAX_QUANTITY: i64 = 100_000;
/// Longest reservation or product id.
pub(crate) const MAX_ID_LEN: usize = 128;

pub(crate) fn router() -> Router {
    Router::new()
        .route("/internal/reservations", post(reserve))
        .route("/internal/reservations/{id}/commit", post(commit))
        .route("/internal/reservations/{id}/release", post(release))
}

/// Why a reservation call did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReservationError {
    #[error("{0}")]
    Invalid(String),
    #[error("not enough stock of {0}")]
    OutOfStock(String),
    #[error("no stock record for product {0}")]
    UnknownProduct(String),
    #[error("no reservation {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl IntoResponse for ReservationError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let api = match self {
            Self::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
            }
            Self::OutOfStock(_) => ApiError::new(StatusCode::CONFLICT, "out_of_stock", message),
            Self::UnknownProduct(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_product", message)
            }
            Self::NotFound(_) => ApiError::not_found(message),
            Self::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Self::Db(e) => db_error(e),
        };
        api.into_response()
    }
}

/// A database failure as an answer: a busy database or an exhausted pool is worth a
/// retry (503, which the saga retries), anything else is ours (500, no details).
pub(crate) fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "inventory query failed");
    let busy = matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    ) || e
        .as_database_error()
        .is_some_and(|d| d.message().contains("database is locked"));
    if busy {
        ApiError::unavailable("database busy, try again")
    } else {
        ApiError::internal("database error")
    }
}

#[derive(Deserialize)]
struct ReserveRequest {
    reservation_id: String,
    items: Vec<ItemRequest>,
}

#[derive(Deserialize)]
struct ItemRequest {
    product_id: String,
    quantity: i64,
}

/// Ids are short printable tokens: they go into SQL parameters, logs and paths.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn check_id(what: &str, id: &str) -> Result<(), ReservationError> {
    match valid_id(id) {
        true => Ok(()),
        false => Err(ReservationError::Invalid(format!(
            "{what} must be 1 to {MAX_ID_LEN} letters, digits, '-', '_', '.' or ':'"
        ))),
    }
}

/// The request checked, with a product listed twice summed into one item (a saga
/// that lists a product per order line should not be refused for it). Sorted by
/// product id: every transaction takes stock rows in the same order, so two
/// reservations never wait on each other's rows (PostgreSQL deadlocks).
fn validate(body: &[u8]) -> Result<(String, BTreeMap<String, i64>), ReservationError> {
    let req: ReserveRequest = serde_json::from_slice(body)
        .map_err(|e| ReservationError::Invalid(format!("invalid reservation: {e}")))?;
    check_id("reservation_id", &req.reservation_id)?;
    if req.items.is_empty() || req.items.len() > MAX_ITEMS {
        return Err(ReservationError::Invalid(format!(
            "items: 1 to {MAX_ITEMS} items"
        )));
    }
    let mut items = BTreeMap::new();
    for item in req.items {
        check_id("product_id", &item.product_id)?;
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(ReservationError::Invalid(format!(
                "quantity of {}: 1 to {MAX_QUANTITY}",
                item.product_id
            )));
        }
        // At most 50 × 100000: no overflow.
        *items.entry(item.product_id).or_insert(0) += item.quantity;
    }
    Ok((req.reservation_id, items))
}

/// A write transaction. On SQLite it takes the write lock at once (`BEGIN
/// IMMEDIATE`): a deferred transaction that reads first and writes later fails with
/// "database is locked" when another writer got in between, instead of waiting.
/// On PostgreSQL row locks (`FOR UPDATE`, the guarded `UPDATE`s) do that work.
async fn begin_write(db: &Db) -> Result<Transaction<'static, Any>, sqlx::Error> {
    match db.backend() {
        Backend::Sqlite => db.pool().begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => db.pool().begin().await,
    }
}

/// What is stored of a reservation.
struct Stored {
    status: String,
    refusal: Option<String>,
    refused_product: Option<String>,
}

/// The reservation's row, locked until the transaction ends.
async fn load(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    id: &str,
) -> Result<Option<Stored>, sqlx::Error> {
    let sql = match backend {
        // The immediate transaction already holds the database's write lock.
        Backend::Sqlite => {
            "SELECT status, refusal, refused_product FROM reservations WHERE reservation_id = $1"
        }
        Backend::Postgres => {
            "SELECT status, refusal, refused_product FROM reservations WHERE reservation_id = $1 FOR UPDATE"
        }
    };
    let row = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(sql)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.map(|(status, refusal, refused_product)| Stored {
        status,
        refusal,
        refused_product,
    }))
}

async fn load_items(
    tx: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query_as::<_, (String, i64)>(
        "SELECT product_id, quantity FROM reservation_items WHERE reservation_id = $1",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

fn answer(id: &str, status: &str) -> Json<Value> {
    Json(json!({"reservation_id": id, "status": status}))
}

/// Milliseconds since the Unix epoch, for `created_ms`.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn reserve(ctx: Ctx, body: Bytes) -> Result<Json<Value>, ReservationError> {
    let (id, items) = validate(&body)?;
    let db = ctx.db();
    let mut tx = begin_write(db).await?;
    // Claim the id first: a concurrent reserve (or release) of the same id waits
    // here on PostgreSQL's unique index, and then finds this one's outcome.
    let claimed = sqlx::query(
        "INSERT INTO reservations (reservation_id, status, created_ms) VALUES ($1, 'reserved', $2) \
         ON CONFLICT (reservation_id) DO NOTHING",
    )
    .bind(&id)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        let stored = load(&mut tx, db.backend(), &id).await?;
        let held = load_items(&mut tx, &id).await?;
        tx.rollback().await?;
        return repeat(&id, &items, stored, held);
    }
    for (product, quantity) in &items {
        sqlx::query(
            "INSERT INTO reservation_items (reservation_id, product_id, quantity) VALUES ($1, $2, $3)",
        )
        .bind(&id)
        .bind(product)
        .bind(quantity)
        .execute(&mut *tx)
        .await?;
    }
    // Take each product's units only where enough are available: the guard in the
    // WHERE clause (re-checked under the row lock on PostgreSQL, under the write lock
    // on SQLite) is what keeps racing reservations from overselling; the CHECK
    // (available >= 0) is the last line.
    let mut taken: Vec<(&String, i64)> = Vec::new();
    let mut short: Option<&String> = None;
    for (product, quantity) in &items {
        let n = sqlx::query(
            "UPDATE stock SET available = available - $1, reserved = reserved + $1 \
             WHERE product_id = $2 AND available >= $1",
        )
        .bind(quantity)
        .bind(product)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            short = Some(product);
            break;
        }
        taken.push((product, *quantity));
    }
    let Some(short) = short else {
        tx.commit().await?;
        tracing::info!(reservation = %id, items = items.len(), "stock reserved");
        return Ok(answer(&id, "reserved"));
    };
    // All or nothing: give back what this transaction took, then record the refusal
    // (in the same transaction) so a repeat answers it again instead of retrying.
    for (product, quantity) in taken {
        sqlx::query(
            "UPDATE stock SET available = available + $1, reserved = reserved - $1 WHERE product_id = $2",
        )
        .bind(quantity)
        .bind(product)
        .execute(&mut *tx)
        .await?;
    }
    // An unknown product is the more basic mistake: it wins over a shortage.
    let mut unknown = None;
    for product in items.keys() {
        let known = sqlx::query_scalar::<_, i64>("SELECT 1 FROM stock WHERE product_id = $1")
            .bind(product)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            unknown = Some(product.clone());
            break;
        }
    }
    let (refusal, product, error) = match unknown {
        Some(p) => (
            "unknown_product",
            p.clone(),
            ReservationError::UnknownProduct(p),
        ),
        None => (
            "out_of_stock",
            short.clone(),
            ReservationError::OutOfStock(short.clone()),
        ),
    };
    sqlx::query(
        "UPDATE reservations SET status = 'refused', refusal = $2, refused_product = $3 WHERE reservation_id = $1",
    )
    .bind(&id)
    .bind(refusal)
    .bind(&product)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(reservation = %id, refusal, product = %product, "reservation refused");
    Err(error)
}

/// The answer to a reserve whose id was seen before: what the first call answered,
/// as far as it still holds.
fn repeat(
    id: &str,
    asked: &BTreeMap<String, i64>,
    stored: Option<Stored>,
    held: BTreeMap<String, i64>,
) -> Result<Json<Value>, ReservationError> {
    let Some(stored) = stored else {
        // The claim conflicted, so the row exists; not finding it is a bug.
        return Err(ReservationError::Db(sqlx::Error::RowNotFound));
    };
    if stored.status == "released" && held.is_empty() {
        return Err(ReservationError::Conflict(format!(
            "reservation {id} was released before it was made; it cannot be made now"
        )));
    }
    if &held != asked {
        return Err(ReservationError::Conflict(format!(
            "reservation {id} exists with other items"
        )));
    }
    match stored.status.as_str() {
        "reserved" | "committed" => Ok(answer(id, &stored.status)),
        "released" => Err(ReservationError::Conflict(format!(
            "reservation {id} was released"
        ))),
        _ => {
            let product = stored.refused_product.unwrap_or_default();
            match stored.refusal.as_deref() {
                Some("unknown_product") => Err(ReservationError::UnknownProduct(product)),
                _ => Err(ReservationError::OutOfStock(product)),
            }
        }
    }
}

async fn commit(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Value>, ReservationError> {
    check_id("reservation id", &id)?;
    let db = ctx.db();
    let mut tx = begin_write(db).await?;
    let Some(stored) = load(&mut tx, db.backend(), &id).await? else {
        return Err(ReservationError::NotFound(id));
    };
    match stored.status.as_str() {
        "committed" => return Ok(answer(&id, "committed")),
        "released" => {
            return Err(ReservationError::Conflict(format!(
                "reservation {id} was released"
            )))
        }
        "refused" => {
            return Err(ReservationError::Conflict(format!(
                "reservation {id} was refused; nothing is held"
            )))
        }
        _ => {}
    }
    // The held units leave the shop: reserved -q, available unchanged.
    for (product, quantity) in load_items(&mut tx, &id).await? {
        sqlx::query("UPDATE stock SET reserved = reserved - $1 WHERE product_id = $2")
            .bind(quantity)
            .bind(&product)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE reservations SET status = 'committed' WHERE reservation_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(reservation = %id, "reservation committed");
    Ok(answer(&id, "committed"))
}

async fn release(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Value>, ReservationError> {
    check_id("reservation id", &id)?;
    let db = ctx.db();
    let mut tx = begin_write(db).await?;
    // A release of a reservation never made succeeds (the compensation of an
    // action that never took effect) and leaves a tombstone, so a reserve that
    // arrives late with this id is refused rather than holding stock for an order
    // that is already given up.
    let tombstone = sqlx::query(
        "INSERT INTO reservations (reservation_id, status, created_ms) VALUES ($1, 'released', $2) \
         ON CONFLICT (reservation_id) DO NOTHING",
    )
    .bind(&id)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if tombstone == 1 {
        tx.commit().await?;
        tracing::info!(reservation = %id, "release before reserve: tombstone kept");
        return Ok(answer(&id, "released"));
    }
    let Some(stored) = load(&mut tx, db.backend(), &id).await? else {
        return Err(ReservationError::Db(sqlx::Error::RowNotFound));
    };
    match stored.status.as_str() {
        // A refused reserve held nothing: there is nothing to give back.
        "released" | "refused" => return Ok(answer(&id, "released")),
        "committed" => {
            return Err(ReservationError::Conflict(format!(
                "reservation {id} was committed"
            )))
        }
        _ => {}
    }
    for (product, quantity) in load_items(&mut tx, &id).await? {
        sqlx::query(
            "UPDATE stock SET reserved = reserved - $1, available = available + $1 WHERE product_id = $2",
        )
        .bind(quantity)
        .bind(&product)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE reservations SET status = 'released' WHERE reservation_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(reservation = %id, "reservation released");
    Ok(answer(&id, "released"))
}
