//! The reference shop's payments service: one payment per order, taken through the
//! card processor (the `payment-provider` service, reached by name).
//!
//! The orders saga calls it for its `authorize` (undo: `void`) and `capture` steps,
//! and the gateway's order details read it:
//!
//! - `POST /internal/payments` `{"order_id","customer_id","amount_cents","currency",
//!   "card_number"}`: 200 `{"order_id","status":"authorized","amount_cents"}`; 402
//!   `payment_declined`; 503 `payment_unavailable` when the provider did not answer
//!   (unreachable, timed out, 5xx: the saga retries until its deadline); 409
//!   `conflict` when the order's payment was voided (a late authorize after the
//!   saga's compensation) or exists with other details; 400 `validation_failed`
//!   (ids 1 to 128 letters, digits, `-_.:`; amount 1 to 10^9 cents; `EUR`; a card
//!   number of exactly 16 digits).
//! - `POST /internal/payments/{order_id}/capture`: 200 `{"order_id","status":"captured"}`,
//!   repeatable; 404 for an unknown order; 409 `conflict` unless authorized (or
//!   captured); 503 `payment_unavailable`.
//! - `POST /internal/payments/{order_id}/void`: 200 `{"order_id","status":"voided"}`,
//!   also when nothing was authorized (or the card was declined); 200
//!   `{"order_id","status":"voided","pending":true}` when the void is promised but
//!   not yet done at the provider (see below); 409 `conflict` when captured; 503
//!   `payment_unavailable` for an authorized payment the provider could not be
//!   asked to void (its authorization is known: nothing is decided yet).
//! - `GET /internal/payments/by-order/{order_id}`: `{"order_id","status","amount_cents",
//!   "currency","card_last4"}`, or 404 (also for an order whose payment was voided
//!   before it was ever asked for: there is none).
//!
//! Idempotency, and the calls that cross in flight:
//!
//! - The payment's row is written (`authorizing`) before the provider is called,
//!   and the call carries `Idempotency-Key: payments:<order_id>:authorize`: a retry,
//!   or a resume after a crash between the provider's answer and our write, gets
//!   the same authorization back, never a second one. A repeated authorize of an
//!   authorized (or declined, captured) payment answers from the row without
//!   calling the provider.
//! - A void of a payment never asked for leaves a `voided` tombstone, so a late
//!   authorize is refused (409) instead of holding money for a rejected order.
//! - Capture and void are repeatable at the provider too, and carry keys of their own.
//!
//! The void of a payment still `authorizing` is a promise, kept by payments. The
//! provider's answer to that authorize is not known here (lost, or the provider is
//! unreachable), and the saga retries a compensation until it succeeds: a void that
//! waited for the provider would hold the order open for as long as the provider is
//! away, where the shop promises an order whose provider stays unreachable past its
//! deadline ends `REJECTED` `payment_unavailable`, its stock released, no money
//! taken. So the void decides, and answers, without the provider:
//!
//! - One guarded write marks the payment `voided` with `void_pending = 1`: from its
//!   commit on, an authorize answering later sees it (409, and voids the
//!   authorization it got itself), and the promise outlives crashes and restarts.
//! - The void then tries once to finish at the provider: it finds what the provider
//!   authorized for the order (`GET /v1/authorizations?reference=`, as the
//!   authorization id may never have reached us), voids each authorization still
//!   `authorized` and clears `void_pending`. Done or not, it answers 200 `voided`,
//!   with `"pending": true` while the provider is still owed the void. A repeat
//!   answers from the row.
//! - A background task (every `void_retry_ms` of `[settings]`, default 1000, at
//!   most 100 payments a round) does the same for every payment still
//!   `void_pending`, until the provider holds nothing for it. The state is only in
//!   the database and a void at the provider is idempotent, so any number of
//!   replicas may retry the same payment, and a restart resumes. `void_pending` is
//!   cleared only if no one set it again since it was read, so an authorization
//!   that appears meanwhile (a late authorize that could not void it) is not
//!   forgotten. Failures are logged and retried next round; an unreachable
//!   provider ends the round.
//! - An authorization the provider captured for a voided payment (only a capture
//!   racing the void can do it) cannot be voided: it is logged as an error, for a
//!   refund.
//!
//! The whole card number only passes through: it is sent to the provider and
//! never stored or logged (the last four digits are).

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal::{ApiError, ClientResponse, Ctx, Db, Migration, Service, ServiceClient};
use std::time::Duration;

#[cfg(test)]
mod tests;

/// The schema, applied once per database at start.
static MIGRATIONS: &[Migration] = &[
    Migration::new(1, "init", include_str!("../migrations/001_init.sql")),
    Migration::new(
        2,
        "void_pending_index",
        include_str!("../migrations/002_void_pending_index.sql"),
    ),
];

/// The card processor, by its service name.
const PROVIDER: &str = "payment-provider";
/// The largest amount taken at once: 10 million EUR in cents.
const MAX_AMOUNT_CENTS: i64 = 1_000_000_000;
/// The only currency the shop takes.
const CURRENCY: &str = "EUR";
/// Longest order or customer id.
const MAX_ID_LEN: usize = 128;
/// Most pending voids one round of the retrier takes on.
const VOID_BATCH: i64 = 100;

/// The service's `[settings]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How often (ms) the voids promised but not yet done at the provider are
    /// retried (`void_pending`).
    pub void_retry_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            void_retry_ms: 1_000,
        }
    }
}

impl Settings {
    fn validate(&self) -> Result<(), shoal::Error> {
        if !(1..=3_600_000).contains(&self.void_retry_ms) {
            return Err(shoal::Error::config(
                "settings.void_retry_ms: must be 1 to 3600000",
            ));
        }
        Ok(())
    }
}

/// The payments service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("payments")
        .version(env!("CARGO_PKG_VERSION"))
        .settings::<Settings>()
        .database(MIGRATIONS)
        .routes(router())
        .setup(setup)
}

/// Start the retrier of pending voids; it ends when the service stops.
async fn setup(ctx: Ctx) -> Result<Router, shoal::Error> {
    let settings = ctx.settings::<Settings>();
    settings.validate()?;
    let every = Duration::from_millis(settings.void_retry_ms);
    ctx.spawn(retry_voids(ctx.clone(), every));
    Ok(Router::new())
}

fn router() -> Router {
    Router::new()
        .route("/internal/payments", post(authorize))
        .route("/internal/payments/{order_id}/capture", post(capture))
        .route("/internal/payments/{order_id}/void", post(void))
        .route("/internal/payments/by-order/{order_id}", get(by_order))
}

/// Why a payment call was not done as asked.
#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("{0}")]
    Invalid(String),
    #[error("the card was declined for order {0}")]
    Declined(String),
    #[error("no payment for order {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the payment provider did not answer: {0}")]
    Unavailable(String),
    #[error("the payment provider answered unexpectedly: {0}")]
    Provider(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl IntoResponse for PaymentError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let api = match self {
            Self::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
            }
            Self::Declined(_) => {
                ApiError::new(StatusCode::PAYMENT_REQUIRED, "payment_declined", message)
            }
            Self::NotFound(_) => ApiError::not_found(message),
            Self::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            Self::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "payment_unavailable",
                message,
            ),
            Self::Provider(_) => ApiError::new(StatusCode::BAD_GATEWAY, "provider_error", message),
            Self::Db(e) => {
                tracing::error!(error = %e, "payments query failed");
                match e {
                    sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                        ApiError::unavailable("database busy, try again")
                    }
                    _ => ApiError::internal("database error"),
                }
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

fn check_id(what: &str, id: &str) -> Result<(), PaymentError> {
    match valid_id(id) {
        true => Ok(()),
        false => Err(PaymentError::Invalid(format!(
            "{what}: 1 to {MAX_ID_LEN} letters, digits, '-', '_', '.' or ':'"
        ))),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `updated_ms` of a write that touches `void_pending`: now, but always later than
/// before, so the value read with `void_pending = 1` tells whether the row was
/// written since (see [`sweep`]). Binds `$2` and `$3`, both [`now_ms`].
const BUMP_UPDATED: &str =
    "updated_ms = CASE WHEN updated_ms >= $2 THEN updated_ms + 1 ELSE $3 END";

/// No `Debug`: the card number must not end up in a log line by accident.
#[derive(Deserialize)]
struct AuthorizeRequest {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    currency: String,
    card_number: String,
}

impl AuthorizeRequest {
    fn parse(body: &[u8]) -> Result<Self, PaymentError> {
        // serde names the type it did not expect, never the value: no card leaks.
        let req: Self = serde_json::from_slice(body)
            .map_err(|e| PaymentError::Invalid(format!("invalid payment: {e}")))?;
        check_id("order_id", &req.order_id)?;
        check_id("customer_id", &req.customer_id)?;
        if !(1..=MAX_AMOUNT_CENTS).contains(&req.amount_cents) {
            return Err(PaymentError::Invalid(format!(
                "amount_cents: 1 to {MAX_AMOUNT_CENTS}"
            )));
        }
        if req.currency != CURRENCY {
            return Err(PaymentError::Invalid(format!("currency: only {CURRENCY}")));
        }
        let card = req.card_number.as_bytes();
        if card.len() != 16 || !card.iter().all(u8::is_ascii_digit) {
            return Err(PaymentError::Invalid(
                "card_number: exactly 16 digits".into(),
            ));
        }
        Ok(req)
    }

    fn card_last4(&self) -> &str {
        // Checked: 16 ASCII digits.
        &self.card_number[12..]
    }
}

/// A payment as stored. A tombstone (voided before any authorize) has no details.
struct Payment {
    customer_id: Option<String>,
    amount_cents: Option<i64>,
    currency: Option<String>,
    card_last4: Option<String>,
    authorization_id: Option<String>,
    status: String,
    void_pending: bool,
}

type PaymentRow = (
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
);

async fn load(db: &Db, order_id: &str) -> Result<Option<Payment>, sqlx::Error> {
    let row = sqlx::query_as::<_, PaymentRow>(
        "SELECT customer_id, amount_cents, currency, card_last4, authorization_id, status, void_pending \
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(
        |(customer_id, amount_cents, currency, card_last4, authorization_id, status, pending)| {
            Payment {
                customer_id,
                amount_cents,
                currency,
                card_last4,
                authorization_id,
                status,
                void_pending: pending != 0,
            }
        },
    ))
}

/// Move a payment from `from` to `to`; false when it was no longer in `from` (a
/// concurrent call moved it first).
async fn transition(db: &Db, order_id: &str, from: &str, to: &str) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE payments SET status = $3, updated_ms = $4 WHERE order_id = $1 AND status = $2",
    )
    .bind(order_id)
    .bind(from)
    .bind(to)
    .bind(now_ms())
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(n == 1)
}

fn provider(ctx: &Ctx) -> ServiceClient {
    ctx.client(PROVIDER)
}

/// Send a call to the provider; no answer (no instance, refused, timed out, an
/// open breaker) and 5xx/429 answers are "unavailable": worth retrying later.
async fn send(
    call: impl std::future::Future<Output = Result<ClientResponse, shoal::Error>>,
    what: &str,
) -> Result<ClientResponse, PaymentError> {
    let answer = call.await.map_err(|e| {
        tracing::warn!(error = %e, what, "payment provider unreachable");
        PaymentError::Unavailable(format!("{what}: {}", e.message()))
    })?;
    if answer.status.is_server_error() || answer.status == StatusCode::TOO_MANY_REQUESTS {
        tracing::warn!(
            status = answer.status.as_u16(),
            what,
            "payment provider failing"
        );
        return Err(PaymentError::Unavailable(format!(
            "{what}: {}",
            answer.status
        )));
    }
    Ok(answer)
}

fn body_json(answer: &ClientResponse, what: &str) -> Result<Value, PaymentError> {
    serde_json::from_slice(&answer.body)
        .map_err(|_| PaymentError::Provider(format!("{what}: not JSON ({})", answer.status)))
}

fn unexpected(answer: &ClientResponse, what: &str) -> PaymentError {
    tracing::error!(status = answer.status.as_u16(), body = %answer.text(), what, "unexpected provider answer");
    PaymentError::Provider(format!("{what}: {}", answer.status))
}

/// What the provider said to an authorization.
enum Authorized {
    Yes(String),
    Declined,
}

async fn provider_authorize(ctx: &Ctx, req: &AuthorizeRequest) -> Result<Authorized, PaymentError> {
    let call = provider(ctx)
        .post("/v1/authorizations")
        .header(
            "idempotency-key",
            &format!("payments:{}:authorize", req.order_id),
        )
        .json(&json!({
            "reference": req.order_id,
            "amount_cents": req.amount_cents,
            "currency": req.currency,
            "card_number": req.card_number,
        }));
    let answer = send(call.send(), "authorize").await?;
    match answer.status.as_u16() {
        200 | 201 => {
            let v = body_json(&answer, "authorize")?;
            match (v["authorization_id"].as_str(), v["status"].as_str()) {
                (Some(id), Some("authorized" | "captured")) => Ok(Authorized::Yes(id.to_string())),
                (Some(id), Some(status)) => Err(PaymentError::Conflict(format!(
                    "the provider's authorization {id} for order {} is {status}",
                    req.order_id
                ))),
                _ => Err(unexpected(&answer, "authorize")),
            }
        }
        402 => Ok(Authorized::Declined),
        _ => Err(unexpected(&answer, "authorize")),
    }
}

async fn provider_void(
    ctx: &Ctx,
    order_id: &str,
    authorization_id: &str,
) -> Result<(), PaymentError> {
    let call = provider(ctx)
        .post(&format!("/v1/authorizations/{authorization_id}/void"))
        .header("idempotency-key", &format!("payments:{order_id}:void"));
    let answer = send(call.send(), "void").await?;
    match answer.status.as_u16() {
        200 => Ok(()),
        409 => Err(PaymentError::Conflict(format!(
            "the payment of order {order_id} is captured at the provider"
        ))),
        _ => Err(unexpected(&answer, "void")),
    }
}

/// Mark the payment's void as still owed at the provider.
async fn set_void_pending(db: &Db, order_id: &str) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let sql = format!("UPDATE payments SET void_pending = 1, {BUMP_UPDATED} WHERE order_id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(order_id)
        .bind(now)
        .bind(now)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// The payment's `updated_ms` if its void is pending, else `None`.
async fn pending_token(db: &Db, order_id: &str) -> Result<Option<i64>, sqlx::Error> {
    let row: Option<(i64,)> =
        sqlx::query_as("SELECT updated_ms FROM payments WHERE order_id = $1 AND void_pending = 1")
            .bind(order_id)
            .fetch_optional(db.pool())
            .await?;
    Ok(row.map(|(t,)| t))
}

fn captured_for_voided(order_id: &str, authorization_id: &str) {
    tracing::error!(
        order = order_id,
        authorization = authorization_id,
        "the provider captured an authorization of a voided payment: refund it"
    );
}

/// Void whatever the provider authorized for the order (the authorize's answer
/// may have been lost, so its authorization id may not be known here), then clear
/// `void_pending` unless the row was written since `token` (its `updated_ms`, read
/// with `void_pending = 1` before the provider was asked): an authorization that
/// appeared meanwhile is then looked for again. True when cleared.
async fn sweep(ctx: &Ctx, order_id: &str, token: i64) -> Result<bool, PaymentError> {
    let call = provider(ctx).get(&format!("/v1/authorizations?reference={order_id}"));
    let answer = send(call.send(), "find authorizations").await?;
    if answer.status != StatusCode::OK {
        return Err(unexpected(&answer, "find authorizations"));
    }
    let list = body_json(&answer, "find authorizations")?;
    for a in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(id) = a["authorization_id"].as_str() else {
            continue;
        };
        match a["status"].as_str() {
            Some("authorized") => match provider_void(ctx, order_id, id).await {
                Ok(()) => {
                    tracing::info!(order = order_id, authorization = id, "authorization voided")
                }
                // Captured between the list and the void.
                Err(PaymentError::Conflict(_)) => captured_for_voided(order_id, id),
                Err(e) => return Err(e),
            },
            Some("captured") => captured_for_voided(order_id, id),
            _ => {}
        }
    }
    let now = now_ms();
    let sql = format!(
        "UPDATE payments SET void_pending = 0, {BUMP_UPDATED} \
         WHERE order_id = $1 AND void_pending = 1 AND updated_ms = $4"
    );
    let n = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(order_id)
        .bind(now)
        .bind(now)
        .bind(token)
        .execute(ctx.db().pool())
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Try once to finish a pending void at the provider; true while it is still owed
/// (the retrier finishes it).
async fn finish_void(ctx: &Ctx, order_id: &str) -> bool {
    let attempt = async {
        match pending_token(ctx.db(), order_id).await? {
            Some(token) => sweep(ctx, order_id, token).await,
            None => Ok(true),
        }
    };
    match attempt.await {
        Ok(done) => !done,
        Err(e) => {
            tracing::warn!(order = order_id, error = %e, "void not done at the provider yet; it is retried in the background");
            true
        }
    }
}

/// Now and then, finish every void still owed at the provider. Ends at shutdown,
/// also in the middle of a round (what a round did is in the database, and what
/// it did not is done again next round).
async fn retry_voids(ctx: Ctx, every: Duration) {
    let stopping = ctx.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            () = &mut stopping => return,
            () = tokio::time::sleep(every) => {}
        }
        tokio::select! {
            () = &mut stopping => return,
            () = retry_round(&ctx) => {}
        }
    }
}

/// One round: the longest-waiting pending voids, at most [`VOID_BATCH`].
async fn retry_round(ctx: &Ctx) {
    let db = ctx.db();
    let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT order_id, updated_ms FROM payments WHERE void_pending = 1 \
         ORDER BY updated_ms, order_id LIMIT $1",
    )
    .bind(VOID_BATCH)
    .fetch_all(db.pool())
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "reading pending voids failed");
            return;
        }
    };
    for (order, token) in rows {
        match sweep(ctx, &order, token).await {
            Ok(true) => tracing::info!(order = %order, "pending void done at the provider"),
            // Written meanwhile: looked at again next round.
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(order = %order, error = %e, "pending void not done; retried next round");
                // To the back of the queue, so a payment that keeps failing does
                // not hold up the others.
                if let Err(e) = set_void_pending(db, &order).await {
                    tracing::warn!(order = %order, error = %e, "postponing a pending void failed");
                }
                if matches!(e, PaymentError::Unavailable(_)) {
                    // The provider is away: the others would fail the same way.
                    break;
                }
            }
        }
    }
}

/// A void's answer: `pending` while the provider is still owed the void.
fn voided(order_id: &str, pending: bool) -> Json<Value> {
    match pending {
        true => Json(json!({"order_id": order_id, "status": "voided", "pending": true})),
        false => answer(order_id, "voided", None),
    }
}

fn answer(order_id: &str, status: &str, amount_cents: Option<i64>) -> Json<Value> {
    match amount_cents {
        Some(amount) => {
            Json(json!({"order_id": order_id, "status": status, "amount_cents": amount}))
        }
        None => Json(json!({"order_id": order_id, "status": status})),
    }
}

async fn authorize(ctx: Ctx, body: Bytes) -> Result<Json<Value>, PaymentError> {
    let req = AuthorizeRequest::parse(&body)?;
    let order = req.order_id.as_str();
    let db = ctx.db();
    // Written before the call: whatever happens next, a repeat finds the payment.
    sqlx::query(
        "INSERT INTO payments (order_id, customer_id, amount_cents, currency, card_last4, status, updated_ms) \
         VALUES ($1, $2, $3, $4, $5, 'authorizing', $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order)
    .bind(&req.customer_id)
    .bind(req.amount_cents)
    .bind(&req.currency)
    .bind(req.card_last4())
    .bind(now_ms())
    .execute(db.pool())
    .await?;
    let payment = load(db, order).await?.ok_or(sqlx::Error::RowNotFound)?;
    if payment.customer_id.is_none() {
        return Err(PaymentError::Conflict(format!(
            "the payment of order {order} was voided before it was authorized"
        )));
    }
    let same = payment.customer_id.as_deref() == Some(req.customer_id.as_str())
        && payment.amount_cents == Some(req.amount_cents)
        && payment.currency.as_deref() == Some(req.currency.as_str())
        && payment.card_last4.as_deref() == Some(req.card_last4());
    if !same {
        return Err(PaymentError::Conflict(format!(
            "order {order} has a payment with other details"
        )));
    }
    match payment.status.as_str() {
        "authorized" | "captured" => {
            return Ok(answer(order, &payment.status, Some(req.amount_cents)))
        }
        "declined" => return Err(PaymentError::Declined(order.to_string())),
        "voided" => {
            return Err(PaymentError::Conflict(format!(
                "the payment of order {order} was voided"
            )))
        }
        _ => {}
    }
    match provider_authorize(&ctx, &req).await? {
        Authorized::Declined => {
            transition(db, order, "authorizing", "declined").await?;
            tracing::info!(order, card_last4 = req.card_last4(), "payment declined");
            Err(PaymentError::Declined(order.to_string()))
        }
        Authorized::Yes(authorization_id) => {
            let n = sqlx::query(
                "UPDATE payments SET status = 'authorized', authorization_id = $2, updated_ms = $3 \
                 WHERE order_id = $1 AND status = 'authorizing'",
            )
            .bind(order)
            .bind(&authorization_id)
            .bind(now_ms())
            .execute(db.pool())
            .await?
            .rows_affected();
            if n == 1 {
                tracing::info!(order, authorization = %authorization_id, amount_cents = req.amount_cents, "payment authorized");
                return Ok(answer(order, "authorized", Some(req.amount_cents)));
            }
            // Something else moved it while the provider answered.
            let now = load(db, order).await?.ok_or(sqlx::Error::RowNotFound)?;
            match now.status.as_str() {
                "authorized" | "captured" => Ok(answer(order, &now.status, Some(req.amount_cents))),
                _ => {
                    // Voided meanwhile (the saga gave up on this call): the
                    // authorization just made must not hold the money.
                    if let Err(e) = provider_void(&ctx, order, &authorization_id).await {
                        tracing::warn!(order, error = %e, "late authorization not voided; it is retried in the background");
                        set_void_pending(db, order).await?;
                    }
                    Err(PaymentError::Conflict(format!(
                        "the payment of order {order} was voided"
                    )))
                }
            }
        }
    }
}

async fn capture(ctx: Ctx, Path(order_id): Path<String>) -> Result<Json<Value>, PaymentError> {
    check_id("order_id", &order_id)?;
    let order = order_id.as_str();
    let db = ctx.db();
    let payment = load(db, order)
        .await?
        .ok_or_else(|| PaymentError::NotFound(order_id.clone()))?;
    match (payment.status.as_str(), &payment.authorization_id) {
        ("captured", _) => return Ok(answer(order, "captured", None)),
        ("authorized", Some(_)) => {}
        (status, _) => {
            return Err(PaymentError::Conflict(format!(
                "the payment of order {order} is {status}; only an authorized payment is captured"
            )))
        }
    }
    let authorization_id = payment.authorization_id.unwrap_or_default();
    let call = provider(&ctx)
        .post(&format!("/v1/authorizations/{authorization_id}/capture"))
        .header("idempotency-key", &format!("payments:{order}:capture"));
    let reply = send(call.send(), "capture").await?;
    match reply.status.as_u16() {
        200 => {}
        409 => {
            return Err(PaymentError::Conflict(format!(
                "the provider refused to capture the payment of order {order}"
            )))
        }
        _ => return Err(unexpected(&reply, "capture")),
    }
    if !transition(db, order, "authorized", "captured").await? {
        let now = load(db, order).await?.ok_or(sqlx::Error::RowNotFound)?;
        if now.status != "captured" {
            return Err(PaymentError::Conflict(format!(
                "the payment of order {order} is {}",
                now.status
            )));
        }
    }
    tracing::info!(order, authorization = %authorization_id, "payment captured");
    Ok(answer(order, "captured", None))
}

async fn void(ctx: Ctx, Path(order_id): Path<String>) -> Result<Json<Value>, PaymentError> {
    check_id("order_id", &order_id)?;
    let order = order_id.as_str();
    let db = ctx.db();
    // Nothing asked for yet: a tombstone, so a late authorize is refused.
    let tombstone = sqlx::query(
        "INSERT INTO payments (order_id, status, updated_ms) VALUES ($1, 'voided', $2) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order)
    .bind(now_ms())
    .execute(db.pool())
    .await?
    .rows_affected();
    if tombstone == 1 {
        tracing::info!(order, "void before authorize: tombstone kept");
        return Ok(answer(order, "voided", None));
    }
    // A concurrent authorize may move the payment between the read and the write:
    // every write is guarded by the status read, and a lost race reads again.
    for _ in 0..3 {
        let payment = load(db, order).await?.ok_or(sqlx::Error::RowNotFound)?;
        match (payment.status.as_str(), &payment.authorization_id) {
            // A repeat: the retrier keeps a pending void's promise.
            ("voided", _) => return Ok(voided(order, payment.void_pending)),
            // Declined: nothing is held.
            ("declined", _) => return Ok(answer(order, "voided", None)),
            ("captured", _) => {
                return Err(PaymentError::Conflict(format!(
                    "the payment of order {order} is captured"
                )))
            }
            ("authorized", Some(authorization_id)) => {
                provider_void(&ctx, order, authorization_id).await?;
                if transition(db, order, "authorized", "voided").await? {
                    tracing::info!(order, authorization = %authorization_id, "payment voided");
                    return Ok(answer(order, "voided", None));
                }
            }
            _ => {
                // Authorizing: the provider's answer is not known here (in flight,
                // lost in a crash, or the provider is away). Decide and promise in
                // one write (the authorize is refused from here on, and the void
                // at the provider is owed), then try to keep the promise now; the
                // retrier keeps it otherwise. Never 503: the saga's compensation
                // must not wait for the provider.
                let now = now_ms();
                let sql = format!(
                    "UPDATE payments SET status = 'voided', void_pending = 1, {BUMP_UPDATED} \
                     WHERE order_id = $1 AND status = 'authorizing'"
                );
                let n = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(order)
                    .bind(now)
                    .bind(now)
                    .execute(db.pool())
                    .await?
                    .rows_affected();
                if n == 1 {
                    let pending = finish_void(&ctx, order).await;
                    tracing::info!(order, pending, "payment voided while authorizing");
                    return Ok(voided(order, pending));
                }
            }
        }
    }
    Err(PaymentError::Unavailable(format!(
        "the payment of order {order} keeps changing; try again"
    )))
}

async fn by_order(ctx: Ctx, Path(order_id): Path<String>) -> Result<Json<Value>, PaymentError> {
    check_id("order_id", &order_id)?;
    let payment = load(ctx.db(), &order_id).await?;
    match payment {
        Some(Payment {
            amount_cents: Some(amount),
            currency,
            card_last4,
            status,
            ..
        }) => Ok(Json(json!({
            "order_id": order_id,
            "status": status,
            "amount_cents": amount,
            "currency": currency,
            "card_last4": card_last4,
        }))),
        _ => Err(PaymentError::NotFound(order_id)),
    }
}
