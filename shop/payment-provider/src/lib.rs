//! The reference shop's payment provider: a stand-in for an external card
//! processor, so the shop's payments service has a real remote party to fail.
//!
//! It runs as its own process with its own database and is reached by name (in
//! production it would be a URL of somebody else's). It does no more than a
//! processor's API needs to be realistic for the saga around it:
//!
//! - `POST /v1/authorizations` `{"reference","amount_cents","currency","card_number"}`
//!   with an `Idempotency-Key` header: 201 `{"authorization_id","status":"authorized",
//!   "reference","amount_cents"}`. A card ending in `0002` is declined: 402
//!   `card_declined`. The work is done once per key, declines included (they are
//!   recorded), and a repeat of the key answers from the record (201 with the
//!   authorization's current status, or the same 402). The same key with another
//!   body is 409 `idempotency_key_reused`. Input is checked: the key 1 to 200
//!   printable ASCII characters, `card_number` exactly 16 ASCII digits,
//!   `amount_cents` 1 to 10^9, `currency` `EUR`, `reference` 1 to 128 letters, digits
//!   and `-_.:`; else 400 `validation_failed`.
//! - `POST /v1/authorizations/{id}/capture`: 200 `{"authorization_id","status":"captured"}`,
//!   once: a repeat answers the same and takes no money again (one capture row per
//!   authorization). 409 `conflict` for a voided or declined authorization.
//! - `POST /v1/authorizations/{id}/void`: 200 `{"authorization_id","status":"voided"}`
//!   (a repeat too, and a declined authorization, which holds nothing); 409
//!   `conflict` when captured.
//! - `GET /v1/authorizations/{id}`: `{"authorization_id","reference","amount_cents",
//!   "currency","card_last4","status"}` or 404.
//! - `GET /v1/authorizations?reference=…`: the authorizations made for one
//!   reference (an order), oldest first, at most 1000: how a caller whose answer
//!   was lost finds what was done for it.
//! - `GET /v1/captures`: every capture `[{"authorization_id","reference","amount_cents"}]`,
//!   oldest first (at most 10000), for audits and tests.
//!
//! The whole card number is never stored or logged: only its last four digits.
//! It has no failure switch of its own: the platform's fault injection (`shoal
//! chaos`) makes it slow or unreachable like any service.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal::{ApiError, Backend, Ctx, Db, Migration, Service};
use sqlx::{Any, Transaction};

#[cfg(test)]
mod tests;

/// The schema, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// Cards ending in these digits are declined (the test card of the shop's docs).
const DECLINED_SUFFIX: &str = "0002";
/// The largest amount authorized at once: 10 million EUR in cents.
const MAX_AMOUNT_CENTS: i64 = 1_000_000_000;
/// The only currency the shop takes.
const CURRENCY: &str = "EUR";
/// Longest reference or authorization id.
const MAX_ID_LEN: usize = 128;
/// Longest idempotency key.
const MAX_KEY_LEN: usize = 200;
/// Most rows a list answers.
const MAX_LIST: i64 = 1_000;
const MAX_CAPTURES: i64 = 10_000;

/// The payment provider, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("payment-provider")
        .version(env!("CARGO_PKG_VERSION"))
        .database(MIGRATIONS)
        .routes(router())
}

fn router() -> Router {
    Router::new()
        .route(
            "/v1/authorizations",
            post(authorize).get(list_authorizations),
        )
        .route("/v1/authorizations/{id}", get(get_authorization))
        .route("/v1/authorizations/{id}/capture", post(capture))
        .route("/v1/authorizations/{id}/void", post(void))
        .route("/v1/captures", get(list_captures))
}

/// Why a call was not done as asked.
#[derive(Debug, thiserror::Error)]
enum ProviderError {
    #[error("{0}")]
    Invalid(String),
    #[error("card declined (authorization {0})")]
    Declined(String),
    #[error("no authorization {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("Idempotency-Key {0:?} was used for another authorization")]
    KeyReused(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl IntoResponse for ProviderError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let api = match self {
            Self::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
            }
            Self::Declined(_) => {
                ApiError::new(StatusCode::PAYMENT_REQUIRED, "card_declined", message)
            }
            Self::NotFound(_) => ApiError::not_found(message),
            Self::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Self::KeyReused(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_key_reused", message)
            }
            Self::Db(e) => {
                tracing::error!(error = %e, "payment provider query failed");
                ApiError::internal("database error")
            }
        };
        api.into_response()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// No `Debug`: the card number must not end up in a log line by accident.
#[derive(Deserialize)]
struct AuthorizeRequest {
    reference: String,
    amount_cents: i64,
    currency: String,
    card_number: String,
}

/// A checked authorization request, the card reduced to what is kept of it.
struct Checked {
    reference: String,
    amount_cents: i64,
    currency: String,
    card_last4: String,
    declined: bool,
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ProviderError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let printable = key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if key.is_empty() || key.len() > MAX_KEY_LEN || !printable {
        return Err(ProviderError::Invalid(format!(
            "Idempotency-Key header: 1 to {MAX_KEY_LEN} printable ASCII characters, required"
        )));
    }
    Ok(key.to_string())
}

fn check(body: &[u8]) -> Result<Checked, ProviderError> {
    // serde's message never quotes a value it did not expect, only its type, so the
    // card number cannot leak through it.
    let req: AuthorizeRequest = serde_json::from_slice(body)
        .map_err(|e| ProviderError::Invalid(format!("invalid authorization: {e}")))?;
    if !valid_id(&req.reference) {
        return Err(ProviderError::Invalid(format!(
            "reference: 1 to {MAX_ID_LEN} letters, digits, '-', '_', '.' or ':'"
        )));
    }
    if !(1..=MAX_AMOUNT_CENTS).contains(&req.amount_cents) {
        return Err(ProviderError::Invalid(format!(
            "amount_cents: 1 to {MAX_AMOUNT_CENTS}"
        )));
    }
    if req.currency != CURRENCY {
        return Err(ProviderError::Invalid(format!("currency: only {CURRENCY}")));
    }
    let card = req.card_number.as_bytes();
    if card.len() != 16 || !card.iter().all(u8::is_ascii_digit) {
        return Err(ProviderError::Invalid(
            "card_number: exactly 16 digits".into(),
        ));
    }
    Ok(Checked {
        card_last4: req.card_number[12..].to_string(),
        declined: req.card_number.ends_with(DECLINED_SUFFIX),
        reference: req.reference,
        amount_cents: req.amount_cents,
        currency: req.currency,
    })
}

/// An authorization as stored.
struct Row {
    authorization_id: String,
    reference: String,
    amount_cents: i64,
    currency: String,
    card_last4: String,
    status: String,
}

type RowTuple = (String, String, i64, String, String, String);

impl From<RowTuple> for Row {
    fn from(
        (authorization_id, reference, amount_cents, currency, card_last4, status): RowTuple,
    ) -> Self {
        Self {
            authorization_id,
            reference,
            amount_cents,
            currency,
            card_last4,
            status,
        }
    }
}

impl Row {
    fn to_json(&self) -> Value {
        json!({
            "authorization_id": self.authorization_id,
            "reference": self.reference,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "card_last4": self.card_last4,
            "status": self.status,
        })
    }
}

const COLUMNS: &str = "authorization_id, reference, amount_cents, currency, card_last4, status";

async fn by_key(db: &Db, key: &str) -> Result<Option<Row>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM authorizations WHERE idempotency_key = $1");
    let row = sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
        .bind(key)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.map(Row::from))
}

/// The answer to an authorization, first or repeated: from what is stored.
fn authorization_answer(row: Row) -> Result<(StatusCode, Json<Value>), ProviderError> {
    match row.status.as_str() {
        "declined" => Err(ProviderError::Declined(row.authorization_id)),
        _ => Ok((
            StatusCode::CREATED,
            Json(json!({
                "authorization_id": row.authorization_id,
                "status": row.status,
                "reference": row.reference,
                "amount_cents": row.amount_cents,
            })),
        )),
    }
}

/// A repeat of a key answers the first answer, if it asks the same thing.
fn replay(
    key: &str,
    row: Row,
    asked: &Checked,
) -> Result<(StatusCode, Json<Value>), ProviderError> {
    let same = row.reference == asked.reference
        && row.amount_cents == asked.amount_cents
        && row.currency == asked.currency
        && row.card_last4 == asked.card_last4;
    if !same {
        return Err(ProviderError::KeyReused(key.to_string()));
    }
    authorization_answer(row)
}

async fn authorize(
    ctx: Ctx,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ProviderError> {
    let key = idempotency_key(&headers)?;
    let asked = check(&body)?;
    let db = ctx.db();
    if let Some(row) = by_key(db, &key).await? {
        return replay(&key, row, &asked);
    }
    let id = format!("auth_{}", uuid::Uuid::now_v7().simple());
    let status = if asked.declined {
        "declined"
    } else {
        "authorized"
    };
    let now = now_ms();
    // The unique key decides between two first calls racing with one key: one row
    // wins, the other call answers from it.
    let inserted = sqlx::query(
        "INSERT INTO authorizations (authorization_id, idempotency_key, reference, amount_cents, \
         currency, card_last4, status, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&id)
    .bind(&key)
    .bind(&asked.reference)
    .bind(asked.amount_cents)
    .bind(&asked.currency)
    .bind(&asked.card_last4)
    .bind(status)
    .bind(now)
    .execute(db.pool())
    .await?
    .rows_affected();
    if inserted == 0 {
        let row = by_key(db, &key).await?.ok_or(sqlx::Error::RowNotFound)?;
        return replay(&key, row, &asked);
    }
    tracing::info!(
        authorization = %id,
        reference = %asked.reference,
        amount_cents = asked.amount_cents,
        card_last4 = %asked.card_last4,
        status,
        "authorization"
    );
    authorization_answer(Row {
        authorization_id: id,
        reference: asked.reference,
        amount_cents: asked.amount_cents,
        currency: asked.currency,
        card_last4: asked.card_last4,
        status: status.into(),
    })
}

/// A write transaction: SQLite takes its write lock at once (a read-then-write
/// deferred transaction would fail when another writer got in between);
/// PostgreSQL locks the row with `FOR UPDATE`.
async fn locked(db: &Db, id: &str) -> Result<(Transaction<'static, Any>, Row), ProviderError> {
    let (mut tx, lock) = match db.backend() {
        Backend::Sqlite => (db.pool().begin_with("BEGIN IMMEDIATE").await?, ""),
        Backend::Postgres => (db.pool().begin().await?, " FOR UPDATE"),
    };
    let sql = format!("SELECT {COLUMNS} FROM authorizations WHERE authorization_id = $1{lock}");
    let row = sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match row {
        Some(row) => Ok((tx, Row::from(row))),
        None => Err(ProviderError::NotFound(id.to_string())),
    }
}

fn status_answer(id: &str, status: &str) -> Json<Value> {
    Json(json!({"authorization_id": id, "status": status}))
}

fn check_path_id(id: &str) -> Result<(), ProviderError> {
    match valid_id(id) {
        true => Ok(()),
        false => Err(ProviderError::NotFound(
            id.chars().take(MAX_ID_LEN).collect(),
        )),
    }
}

async fn set_status(
    tx: &mut Transaction<'static, Any>,
    id: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE authorizations SET status = $2, updated_ms = $3 WHERE authorization_id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn capture(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Value>, ProviderError> {
    check_path_id(&id)?;
    let (mut tx, row) = locked(ctx.db(), &id).await?;
    match row.status.as_str() {
        "captured" => return Ok(status_answer(&id, "captured")),
        "voided" | "declined" => {
            return Err(ProviderError::Conflict(format!(
                "authorization {id} is {}; nothing to capture",
                row.status
            )))
        }
        _ => {}
    }
    // One capture row per authorization: even a bug above could not take twice.
    sqlx::query(
        "INSERT INTO captures (authorization_id, reference, amount_cents, captured_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (authorization_id) DO NOTHING",
    )
    .bind(&id)
    .bind(&row.reference)
    .bind(row.amount_cents)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    set_status(&mut tx, &id, "captured").await?;
    tx.commit().await?;
    tracing::info!(authorization = %id, amount_cents = row.amount_cents, "captured");
    Ok(status_answer(&id, "captured"))
}

async fn void(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Value>, ProviderError> {
    check_path_id(&id)?;
    let (mut tx, row) = locked(ctx.db(), &id).await?;
    match row.status.as_str() {
        // A declined authorization holds nothing: voiding it is done already.
        "voided" | "declined" => return Ok(status_answer(&id, "voided")),
        "captured" => {
            return Err(ProviderError::Conflict(format!(
                "authorization {id} is captured; refund it instead"
            )))
        }
        _ => {}
    }
    set_status(&mut tx, &id, "voided").await?;
    tx.commit().await?;
    tracing::info!(authorization = %id, "voided");
    Ok(status_answer(&id, "voided"))
}

async fn get_authorization(ctx: Ctx, Path(id): Path<String>) -> Result<Json<Value>, ProviderError> {
    check_path_id(&id)?;
    let sql = format!("SELECT {COLUMNS} FROM authorizations WHERE authorization_id = $1");
    let row = sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
        .bind(&id)
        .fetch_optional(ctx.db().pool())
        .await?;
    match row {
        Some(row) => Ok(Json(Row::from(row).to_json())),
        None => Err(ProviderError::NotFound(id)),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    reference: Option<String>,
}

async fn list_authorizations(
    ctx: Ctx,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Value>>, ProviderError> {
    let rows = match q.reference {
        Some(reference) => {
            if !valid_id(&reference) {
                return Err(ProviderError::Invalid("reference: not a reference".into()));
            }
            let sql = format!(
                "SELECT {COLUMNS} FROM authorizations WHERE reference = $1 \
                 ORDER BY created_ms, authorization_id LIMIT {MAX_LIST}"
            );
            sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
                .bind(reference)
                .fetch_all(ctx.db().pool())
                .await?
        }
        None => {
            let sql = format!(
                "SELECT {COLUMNS} FROM authorizations ORDER BY created_ms, authorization_id LIMIT {MAX_LIST}"
            );
            sqlx::query_as::<_, RowTuple>(sqlx::AssertSqlSafe(sql))
                .fetch_all(ctx.db().pool())
                .await?
        }
    };
    Ok(Json(
        rows.into_iter().map(|r| Row::from(r).to_json()).collect(),
    ))
}

async fn list_captures(ctx: Ctx) -> Result<Json<Vec<Value>>, ProviderError> {
    let sql = format!(
        "SELECT authorization_id, reference, amount_cents FROM captures \
         ORDER BY captured_ms, authorization_id LIMIT {MAX_CAPTURES}"
    );
    let rows = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(sql))
        .fetch_all(ctx.db().pool())
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|(authorization_id, reference, amount_cents)| {
                json!({"authorization_id": authorization_id, "reference": reference, "amount_cents": amount_cents})
            })
            .collect(),
    ))
}
