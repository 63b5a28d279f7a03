//! The reference shop's depot: a second warehouse holding overflow stock, with its
//! own database, and a two-phase commit participant (`shoal-twophase`) for the one
//! operation that must span both warehouses: moving stock between the depot and the
//! inventory service, so that units are never counted in both or in neither.
//!
//! For each product it keeps `units` (on the shelf, can be taken), `outgoing` (held
//! by a prepared transfer out of the depot: no longer takeable, not yet gone) and
//! `incoming` (held by a prepared transfer into the depot: not yet takeable). All
//! three are never negative, enforced by the database (`CHECK`). Routes:
//!
//! - `GET /internal/depot/{product_id}` answers `{"product_id","units","outgoing","incoming"}`,
//!   or 404 `not_found` for a product the depot holds no record of.
//! - `/2pc/depot/prepare`, `/commit`, `/abort`, `/tx/{tx_id}`: the participant's
//!   routes (see docs/twophase.md), called by the inventory service, which
//!   coordinates stock transfers. A branch's payload is
//!   `{"op":"take"|"add","product_id","quantity"}`:
//!   - `take` prepares by moving the units from `units` to `outgoing` (votes no when
//!     fewer units are on the shelf, or the product is unknown); commit lets them go
//!     (`outgoing` −q); abort puts them back (`outgoing` −q, `units` +q);
//!   - `add` prepares by recording them in `incoming` (votes no for an unknown
//!     product); commit shelves them (`incoming` −q, `units` +q); abort forgets them.
//!
//! The participant's tuning is `[settings.participant]` (`ParticipantConfig`). The
//! first migration creates the table and the development seed stock for the
//! catalog's seed products (`p-1` … `p-6`, 20 units each).

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal::{ApiError, Ctx, Error, Migration, Service};
use shoal_twophase::{
    participant_router, HttpCoordinatorLink, Participant, ParticipantConfig, Resource,
    ResourceFuture, Vote,
};
use sqlx::AnyConnection;
use std::sync::Arc;

#[cfg(test)]
mod tests;

/// The schema and seed data, applied once per database at start.
static MIGRATIONS: &[Migration] = &[Migration::new(
    1,
    "init",
    include_str!("../migrations/001_init.sql"),
)];

/// The participant's name: its routes live under `/2pc/depot`.
pub const PARTICIPANT: &str = "depot";

/// The service that coordinates the depot's transfers: with mutual TLS, the
/// coordinator the depot asks about a decision must prove to be it.
const COORDINATOR_SERVICE: &str = "inventory";

/// Most units one transfer may move; the coordinator allows fewer.
const MAX_QUANTITY: i64 = 100_000;

/// The depot's own settings (`[settings]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How the two-phase commit participant prepares and resolves doubt.
    pub participant: ParticipantConfig,
}

/// The depot service, ready to run (`service().main().await`) or to start in a test.
pub fn service() -> Service {
    Service::new("depot")
        .version(env!("CARGO_PKG_VERSION"))
        .settings::<Settings>()
        .database(MIGRATIONS)
        .routes(router())
        .setup(setup)
}

fn router() -> Router {
    // `/internal/`: no gateway route leads here; the depot is reached by services.
    Router::new().route("/internal/depot/{product_id}", get(get_stock))
}

/// Open the participant on the depot's database. Starting it also asks the
/// coordinators about every transfer left prepared by a previous run, so held
/// units end the way their transfer was decided.
async fn setup(ctx: Ctx) -> Result<Router, Error> {
    let settings = ctx.settings::<Settings>();
    let link = match ctx.tls() {
        Some(store) => {
            HttpCoordinatorLink::mutual(store.clone(), |_| Some(COORDINATOR_SERVICE.to_string()))
        }
        None => HttpCoordinatorLink::new(),
    };
    let participant = Participant::start(
        PARTICIPANT,
        ctx.db().clone(),
        Arc::new(DepotStock),
        Arc::new(link),
        settings.participant.clone(),
    )
    .await?;
    Ok(participant_router(participant))
}

/// One product's stock as the API shows it.
#[derive(Debug, Serialize)]
struct Stock {
    product_id: String,
    units: i64,
    outgoing: i64,
    incoming: i64,
}

async fn get_stock(ctx: Ctx, Path(product_id): Path<String>) -> Result<Json<Stock>, ApiError> {
    let row = sqlx::query_as::<_, (String, i64, i64, i64)>(
        "SELECT product_id, units, outgoing, incoming FROM depot_stock WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(ctx.db().pool())
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "depot query failed");
        ApiError::internal("database error")
    })?;
    match row {
        Some((product_id, units, outgoing, incoming)) => Ok(Json(Stock {
            product_id,
            units,
            outgoing,
            incoming,
        })),
        None => Err(ApiError::not_found(format!(
            "the depot holds no record of product {product_id}"
        ))),
    }
}

/// Which way a transfer's units go, seen from the depot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    /// Units leave the depot.
    Take,
    /// Units arrive at the depot.
    Add,
}

/// A branch's payload: what the depot is asked to do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Move {
    op: Op,
    product_id: String,
    quantity: i64,
}

impl Move {
    /// The payload read and checked. Prepare votes no on a bad one; commit and abort
    /// only ever see payloads their prepare accepted.
    fn parse(payload: &serde_json::Value) -> Result<Self, Error> {
        let m: Self = serde_json::from_value(payload.clone()).map_err(|e| {
            Error::internal("a transfer payload the depot cannot read").with_source(e)
        })?;
        if !(1..=MAX_QUANTITY).contains(&m.quantity) || m.product_id.is_empty() {
            return Err(Error::internal(format!(
                "a transfer payload with quantity {} of {:?}",
                m.quantity, m.product_id
            )));
        }
        Ok(m)
    }
}

fn db_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::internal(format!("depot: {what}")).with_source(e)
}

/// Run one guarded update; whether it changed a row.
async fn update(
    conn: &mut AnyConnection,
    sql: &'static str,
    m: &Move,
    what: &'static str,
) -> Result<bool, Error> {
    let n = sqlx::query(sql)
        .bind(m.quantity)
        .bind(&m.product_id)
        .execute(&mut *conn)
        .await
        .map_err(db_error(what))?
        .rows_affected();
    Ok(n == 1)
}

/// The depot's side of a transfer, on `depot_stock`. Every statement runs in the
/// participant's transaction, together with its state row.
struct DepotStock;

impl DepotStock {
    async fn prepare(
        &self,
        tx_id: &str,
        payload: &serde_json::Value,
        conn: &mut AnyConnection,
    ) -> Result<Vote, Error> {
        let m = match Move::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(tx_id, error = %e, "transfer refused: bad payload");
                return Ok(Vote::No);
            }
        };
        let held = match m.op {
            // The guard in the WHERE clause is what keeps two transfers (or a
            // transfer and the CHECK) from taking the same units; SQLite's write
            // lock, taken by the participant's state row, serialises them.
            Op::Take => {
                update(
                    conn,
                    "UPDATE depot_stock SET units = units - $1, outgoing = outgoing + $1 \
                     WHERE product_id = $2 AND units >= $1",
                    &m,
                    "holding outgoing units",
                )
                .await?
            }
            Op::Add => {
                update(
                    conn,
                    "UPDATE depot_stock SET incoming = incoming + $1 WHERE product_id = $2",
                    &m,
                    "recording incoming units",
                )
                .await?
            }
        };
        if !held {
            tracing::info!(tx_id, product = %m.product_id, quantity = m.quantity, op = ?m.op, "transfer refused: not enough units or unknown product");
            return Ok(Vote::No);
        }
        Ok(Vote::Yes)
    }

    async fn finish(
        &self,
        payload: &serde_json::Value,
        conn: &mut AnyConnection,
        commit: bool,
    ) -> Result<(), Error> {
        let m = Move::parse(payload)?;
        let sql = match (m.op, commit) {
            (Op::Take, true) => "UPDATE depot_stock SET outgoing = outgoing - $1 WHERE product_id = $2",
            (Op::Take, false) => {
                "UPDATE depot_stock SET outgoing = outgoing - $1, units = units + $1 WHERE product_id = $2"
            }
            (Op::Add, true) => {
                "UPDATE depot_stock SET incoming = incoming - $1, units = units + $1 WHERE product_id = $2"
            }
            (Op::Add, false) => "UPDATE depot_stock SET incoming = incoming - $1 WHERE product_id = $2",
        };
        // The prepare held exactly these units, so the row is there and the CHECKs
        // hold; a failure here is a bug, and the coordinator retries the delivery.
        if !update(conn, sql, &m, "applying a transfer decision").await? {
            return Err(Error::internal(format!(
                "depot: no stock row for {} while applying a transfer decision",
                m.product_id
            )));
        }
        Ok(())
    }
}

impl Resource for DepotStock {
    fn prepare<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, Vote> {
        Box::pin(DepotStock::prepare(self, tx_id, payload, conn))
    }

    fn commit<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(self.finish(payload, conn, true))
    }

    fn abort<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(self.finish(payload, conn, false))
    }
}
