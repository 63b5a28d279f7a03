//! The HTTP side of the protocol: the participant's routes (`/2pc/{name}/...`) and
//! the coordinator's (`/2pc/coordinator/...`), JSON in and out, every error as the
//! platform's JSON error body.

use crate::coordinator::Coordinator;
use crate::participant::Participant;
use crate::wire::{DecisionAnswer, PrepareAnswer, PrepareRequest, TxRef};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use shoal_core::{ApiError, Error, ErrorKind, Origin};

/// Largest body of a commit, abort or decision request (a transaction id).
const SMALL_BODY_BYTES: usize = 4 * 1024;
/// The path prefix of the coordinator's routes.
pub const COORDINATOR_PREFIX: &str = "/2pc/coordinator";

/// Parse a JSON body ourselves, so a bad one is answered in the platform's error
/// shape rather than axum's plain-text rejection.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::from(Error::new(
            ErrorKind::InvalidInput,
            Origin::Downstream,
            format!("request body: {e}"),
        ))
    })
}

fn not_found(tx_id: &str) -> ApiError {
    ApiError::not_found(format!("no transaction {tx_id} here"))
}

/// The participant's routes, under `/2pc/{name}` (its endpoint, for the
/// coordinator, is `http://host:port/2pc/{name}`):
///
/// - `POST prepare` with a [`PrepareRequest`] → `{"vote":"yes"|"no"}`;
/// - `POST commit`, `POST abort` with `{"tx_id":…}` → the participant's state of the
///   transaction (200 also when it was already applied; 409 if it contradicts it);
/// - `GET tx/{tx_id}` → the participant's state of the transaction, or 404.
///
/// Prepare bodies are limited to the participant's `max_payload_bytes` (plus room
/// for the envelope).
pub fn participant_router(participant: Participant) -> Router {
    let base = format!("/2pc/{}", participant.name());
    let prepare_limit = participant
        .max_payload_bytes()
        .saturating_add(SMALL_BODY_BYTES);
    Router::new()
        .route(
            &format!("{base}/prepare"),
            post(prepare).layer(DefaultBodyLimit::max(prepare_limit)),
        )
        .route(
            &format!("{base}/commit"),
            post(commit).layer(DefaultBodyLimit::max(SMALL_BODY_BYTES)),
        )
        .route(
            &format!("{base}/abort"),
            post(abort).layer(DefaultBodyLimit::max(SMALL_BODY_BYTES)),
        )
        .route(&format!("{base}/tx/{{tx_id}}"), get(participant_status))
        .with_state(participant)
}

async fn prepare(
    State(p): State<Participant>,
    body: Bytes,
) -> Result<Json<PrepareAnswer>, ApiError> {
    let req: PrepareRequest = parse(&body)?;
    let vote = p.prepare(&req).await.map_err(ApiError::from)?;
    Ok(Json(PrepareAnswer { vote }))
}

async fn commit(
    State(p): State<Participant>,
    body: Bytes,
) -> Result<Json<crate::ParticipantTx>, ApiError> {
    let req: TxRef = parse(&body)?;
    Ok(Json(p.commit(&req.tx_id).await.map_err(log_and_convert)?))
}

async fn abort(
    State(p): State<Participant>,
    body: Bytes,
) -> Result<Json<crate::ParticipantTx>, ApiError> {
    let req: TxRef = parse(&body)?;
    Ok(Json(p.abort(&req.tx_id).await.map_err(log_and_convert)?))
}

async fn participant_status(
    State(p): State<Participant>,
    Path(tx_id): Path<String>,
) -> Result<Json<crate::ParticipantTx>, ApiError> {
    match p.status(&tx_id).await.map_err(log_and_convert)? {
        Some(s) => Ok(Json(s)),
        None => Err(not_found(&tx_id)),
    }
}

/// The coordinator's routes, under [`COORDINATOR_PREFIX`] (its endpoint, for
/// participants, is `http://host:port/2pc/coordinator`):
///
/// - `POST decision` with `{"tx_id":…}` → `{"tx_id":…,"decision":"commit"|"abort"|"pending"}`
///   (an unknown transaction, or one undecided past its deadline, is decided abort);
/// - `GET tx/{tx_id}` → the coordinator's state of the transaction, or 404.
pub fn coordinator_router(coordinator: Coordinator) -> Router {
    Router::new()
        .route(
            &format!("{COORDINATOR_PREFIX}/decision"),
            post(decision).layer(DefaultBodyLimit::max(SMALL_BODY_BYTES)),
        )
        .route(
            &format!("{COORDINATOR_PREFIX}/tx/{{tx_id}}"),
            get(coordinator_status),
        )
        .with_state(coordinator)
}

async fn decision(
    State(c): State<Coordinator>,
    body: Bytes,
) -> Result<Json<DecisionAnswer>, ApiError> {
    let req: TxRef = parse(&body)?;
    let decision = c.decision(&req.tx_id).await.map_err(log_and_convert)?;
    Ok(Json(DecisionAnswer {
        tx_id: req.tx_id,
        decision,
    }))
}

async fn coordinator_status(
    State(c): State<Coordinator>,
    Path(tx_id): Path<String>,
) -> Result<Json<crate::CoordinatorTx>, ApiError> {
    match c.status(&tx_id).await.map_err(log_and_convert)? {
        Some(s) => Ok(Json(s)),
        None => Err(not_found(&tx_id)),
    }
}

/// Internal failures are answered `internal error`; their details go to the log.
fn log_and_convert(e: Error) -> ApiError {
    if e.origin() == Origin::Internal {
        tracing::warn!(error = %e, "two-phase commit request failed");
    }
    ApiError::from(e)
}
