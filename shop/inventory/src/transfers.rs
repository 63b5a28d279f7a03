//! Stock transfers between this warehouse and the depot, with two-phase commit
//! (`shoal-twophase`): the inventory service is the coordinator and one of the two
//! participants, the depot service the other. See the crate docs for the routes and
//! docs/twophase.md for the protocol.
//!
//! - The participant `inventory` (routes under `/2pc/inventory`) holds units on the
//!   `stock` table: a transfer out moves them from `available` to `outgoing` at
//!   prepare (so no order can reserve units that may leave), a transfer in records
//!   them in `incoming`; commit and abort settle those columns.
//! - The coordinator (routes under `/2pc/coordinator`) runs on this service's own
//!   database. Its endpoint is this instance's own address, which is known only once
//!   the service listens: with a fixed `listen` port at once, otherwise when this
//!   instance shows up in the registry's catalog. Until then transfers answer 503.
//! - The depot's endpoint is looked up in the catalog at every transfer, so a depot
//!   that moved is found; one that is not there is 503 before anything begins.
//! - With mutual TLS (the default under `shoal up`, docs/mtls.md) every 2PC call
//!   goes over mTLS as `spiffe://<td>/service/inventory`, and the other side must
//!   prove to be the service its endpoint belongs to: the participant named in
//!   `…/2pc/{name}` (`depot`, or `inventory` itself), and this service for the
//!   coordinator. Endpoints are then `https://`.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal::{ApiError, Ctx, Db, Error, ErrorKind, Identity};
use shoal_twophase::{
    participant_name, participant_router, validate_tx_id, Branch, Coordinator, CoordinatorConfig,
    CoordinatorState, DecisionAnswer, HttpCoordinatorLink, HttpParticipantLink, LinkFuture,
    Outcome, Participant, ParticipantConfig, ParticipantLink, PrepareRequest, Resource,
    ResourceFuture, TxRef, Vote,
};
use sqlx::AnyConnection;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[cfg(test)]
mod tests;

/// This service's participant name: its routes live under `/2pc/inventory`.
pub(crate) const PARTICIPANT: &str = "inventory";
/// The depot: its service name in the registry and its participant name.
pub(crate) const DEPOT: &str = "depot";
/// Most units one transfer may move.
pub(crate) const MAX_TRANSFER: i64 = 10_000;
/// The scope a caller needs to move stock.
const ADMIN: &str = "admin";

/// The inventory's own settings (`[settings]`): the tuning of the two-phase commit
/// sides. The coordinator's `endpoint` is not read from here: it is always this
/// instance's own address.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Settings {
    /// The transfer coordinator (`prepare_timeout_ms`, `delivery_wait_ms`, `retry`…).
    pub(crate) coordinator: CoordinatorConfig,
    /// The inventory's participant.
    pub(crate) participant: ParticipantConfig,
}

/// Open the participant, check the coordinator's settings and create its tables,
/// and start the task that opens the coordinator once this instance's address is
/// known. Returns the transfer routes, the participant's and the coordinator's.
pub(crate) async fn setup(ctx: Ctx) -> Result<Router, Error> {
    let settings = ctx.settings::<Settings>();
    // The inventory's participant asks its own coordinator: this service.
    let coordinator_link = match ctx.tls() {
        Some(store) => {
            let own = ctx.service().to_string();
            HttpCoordinatorLink::mutual(store.clone(), move |_| Some(own.clone()))
        }
        None => HttpCoordinatorLink::new(),
    };
    let participant = Participant::start(
        PARTICIPANT,
        ctx.db().clone(),
        Arc::new(InventoryStock),
        Arc::new(coordinator_link),
        settings.participant.clone(),
    )
    .await?;
    // A wrong coordinator setting should stop the start, not surface later in a
    // background task: opening (without recovery or background work) checks it and
    // creates the coordinator's tables, with a stand-in endpoint.
    let mut check = settings.coordinator.clone();
    check.endpoint = "http://127.0.0.1:1/2pc/coordinator".into();
    drop(
        Coordinator::open(
            ctx.db().clone(),
            Arc::new(HttpParticipantLink::new()),
            check,
        )
        .await?,
    );

    let transfers = Transfers(Arc::new(Inner {
        coordinator: OnceLock::new(),
        own: OnceLock::new(),
        votes: Arc::new(VoteLog::new(participant_link(&ctx))),
        running: Mutex::new(HashSet::new()),
    }));
    ctx.spawn(open_coordinator(
        ctx.clone(),
        transfers.clone(),
        settings.coordinator.clone(),
    ));
    let api = Router::new()
        .route("/api/stock-transfers", post(create))
        .route("/api/stock-transfers/{id}", get(show))
        .route(
            "/2pc/coordinator/decision",
            post(decision).layer(DefaultBodyLimit::max(4 * 1024)),
        )
        .route("/2pc/coordinator/tx/{tx_id}", get(coordinator_tx))
        .with_state(transfers);
    Ok(api.merge(participant_router(participant)))
}

/// The transfer routes' state; cheap to clone.
#[derive(Clone)]
struct Transfers(Arc<Inner>);

struct Inner {
    /// Set once this instance's address is known (see the module docs).
    coordinator: OnceLock<Coordinator>,
    /// This instance's address, as the coordinator and the depot reach it.
    own: OnceLock<SocketAddr>,
    /// The votes of running transactions, to tell a refusal from an outage.
    votes: Arc<VoteLog>,
    /// Transfers a request of this process is running now: a repeat of one of them
    /// is told it is in progress instead of starting it again.
    running: Mutex<HashSet<String>>,
}

/// This instance's address: from the config when it listens on a fixed port, else
/// from the registry's catalog once this instance is registered.
fn own_addr(ctx: &Ctx) -> Option<SocketAddr> {
    let cfg = ctx.config();
    if cfg.listen.port() != 0 {
        let ip = cfg.advertise_ip.unwrap_or(cfg.listen.ip());
        return Some(SocketAddr::new(ip, cfg.listen.port()));
    }
    ctx.discovery()
        .catalog()
        .instances(ctx.service())
        .iter()
        .find(|i| i.id == ctx.instance_id())
        .map(|i| i.addr)
}

/// Wait for this instance's address, then open the coordinator on it (running its
/// recovery: transfers a previous run left undecided are aborted, decided ones
/// re-delivered). Ends when the service stops.
async fn open_coordinator(ctx: Ctx, transfers: Transfers, mut cfg: CoordinatorConfig) {
    let stopping = ctx.stopping();
    tokio::pin!(stopping);
    let name = ctx.service().to_string();
    let id = ctx.instance_id().to_string();
    let addr = loop {
        if let Some(addr) = own_addr(&ctx) {
            break addr;
        }
        let registered = ctx.discovery().wait_until(Duration::from_secs(1), |c| {
            c.instances(&name).iter().any(|i| i.id == id)
        });
        tokio::select! {
            _ = &mut stopping => return,
            _ = registered => {}
        }
    };
    cfg.endpoint = format!(
        "{}://{addr}{}",
        scheme(&ctx),
        shoal_twophase::COORDINATOR_PREFIX
    );
    let link: Arc<dyn ParticipantLink> = transfers.0.votes.clone();
    let mut failures = 0u32;
    let coordinator = loop {
        match Coordinator::start(ctx.db().clone(), link.clone(), cfg.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "opening the transfer coordinator failed; retrying");
                tokio::select! {
                    _ = &mut stopping => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(endpoint = %cfg.endpoint, "transfer coordinator ready");
    let _ = transfers.0.own.set(addr);
    let _ = transfers.0.coordinator.set(coordinator);
}

/// `https` with mutual TLS, else `http`: the scheme of this service's 2PC endpoints.
fn scheme(ctx: &Ctx) -> &'static str {
    if ctx.tls().is_some() {
        "https"
    } else {
        "http"
    }
}

/// The coordinator's link to the participants: over mutual TLS when the service
/// runs it, each participant proving to be the service it is named after.
fn participant_link(ctx: &Ctx) -> HttpParticipantLink {
    match ctx.tls() {
        Some(store) => {
            HttpParticipantLink::mutual(store.clone(), |e| participant_name(e).map(String::from))
        }
        None => HttpParticipantLink::new(),
    }
}

/// The HTTP participant link, remembering who voted no: the coordinator answers
/// abort for a no and for a participant that could not be reached alike, and the
/// API tells them apart (409 `transfer_refused` or 503).
struct VoteLog {
    http: HttpParticipantLink,
    /// Transaction id → the endpoint that voted no.
    no: Mutex<HashMap<String, String>>,
}

impl VoteLog {
    fn new(http: HttpParticipantLink) -> Self {
        Self {
            http,
            no: Mutex::new(HashMap::new()),
        }
    }

    fn take_no(&self, tx_id: &str) -> Option<String> {
        self.no
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tx_id)
    }
}

impl ParticipantLink for VoteLog {
    fn prepare<'a>(
        &'a self,
        endpoint: &'a str,
        request: &'a PrepareRequest,
    ) -> LinkFuture<'a, Vote> {
        Box::pin(async move {
            let vote = self.http.prepare(endpoint, request).await?;
            if vote == Vote::No {
                self.no
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(request.tx_id.clone(), endpoint.to_string());
            }
            Ok(vote)
        })
    }

    fn deliver<'a>(
        &'a self,
        endpoint: &'a str,
        tx_id: &'a str,
        outcome: Outcome,
    ) -> LinkFuture<'a, ()> {
        self.http.deliver(endpoint, tx_id, outcome)
    }
}

/// A warehouse, as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
enum Warehouse {
    Inventory,
    Depot,
}

impl Warehouse {
    fn as_str(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Depot => "depot",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "inventory" => Some(Self::Inventory),
            "depot" => Some(Self::Depot),
            _ => None,
        }
    }
}

/// `POST /api/stock-transfers`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    product_id: String,
    quantity: i64,
    from: Warehouse,
    to: Warehouse,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
}

fn validate(body: &[u8]) -> Result<TransferRequest, ApiError> {
    let req: TransferRequest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid transfer: {e}")))?;
    if !crate::reservations::valid_id(&req.product_id) {
        return Err(invalid(format!(
            "product_id must be 1 to {} letters, digits, '-', '_', '.' or ':'",
            crate::reservations::MAX_ID_LEN
        )));
    }
    if !(1..=MAX_TRANSFER).contains(&req.quantity) {
        return Err(invalid(format!("quantity: 1 to {MAX_TRANSFER}")));
    }
    if req.from == req.to {
        return Err(invalid("from and to must be different warehouses"));
    }
    Ok(req)
}

/// The caller, if it may move stock: 401 without one, 403 without scope `admin`.
fn admin(identity: Option<Identity>) -> Result<Identity, ApiError> {
    let Some(identity) = identity else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this route needs a signed-in caller",
        ));
    };
    if !identity.has_scope(ADMIN) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "moving stock needs scope admin",
        ));
    }
    Ok(identity)
}

fn db_error(e: sqlx::Error) -> ApiError {
    crate::reservations::db_error(e)
}

fn in_progress(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        format!("transfer {id} is in progress; ask again later"),
    )
}

fn not_ready() -> ApiError {
    ApiError::unavailable(
        "stock transfers are not ready yet: this instance's address is not known (not registered yet)",
    )
}

/// A transfer as stored.
#[derive(Clone, Debug)]
struct Stored {
    request: TransferRequest,
    status: String,
    reason: Option<String>,
    requested_by: String,
}

type StoredRow = (String, i64, String, String, String, Option<String>, String);

async fn load(db: &Db, id: &str) -> Result<Option<Stored>, ApiError> {
    let row: Option<StoredRow> = sqlx::query_as(
        "SELECT product_id, quantity, from_warehouse, to_warehouse, status, reason, requested_by \
         FROM stock_transfers WHERE transfer_id = $1",
    )
    .bind(id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    let Some((product_id, quantity, from, to, status, reason, requested_by)) = row else {
        return Ok(None);
    };
    let (Some(from), Some(to)) = (Warehouse::parse(&from), Warehouse::parse(&to)) else {
        return Err(ApiError::internal(
            "a stored transfer names an unknown warehouse",
        ));
    };
    Ok(Some(Stored {
        request: TransferRequest {
            product_id,
            quantity,
            from,
            to,
        },
        status,
        reason,
        requested_by,
    }))
}

/// Record how transfer `id` ended, once (a repeat that reconciles from the
/// coordinator's log never overwrites an outcome already recorded).
async fn record(db: &Db, id: &str, status: &str, reason: Option<&str>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE stock_transfers SET status = $1, reason = $2, finished_ms = $3 \
         WHERE transfer_id = $4 AND status = 'running'",
    )
    .bind(status)
    .bind(reason)
    .bind(crate::reservations::now_ms())
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The answer for a transfer that ended with `status`.
fn answer(
    id: &str,
    req: &TransferRequest,
    status: &str,
    reason: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let reason = reason.unwrap_or("nothing moved");
    match status {
        "committed" => Ok(Json(json!({
            "transfer_id": id,
            "status": "committed",
            "product_id": req.product_id,
            "quantity": req.quantity,
            "from": req.from,
            "to": req.to,
        }))),
        "refused" => Err(ApiError::new(
            StatusCode::CONFLICT,
            "transfer_refused",
            format!("transfer {id} refused: {reason}; nothing moved"),
        )),
        _ => Err(ApiError::unavailable(format!(
            "transfer {id} aborted: {reason}; nothing moved (use a new Idempotency-Key to try again)"
        ))),
    }
}

/// The depot's participant endpoint, from the catalog as it is now. The depot's
/// replicas would share one database, so any healthy instance will do.
fn depot_endpoint(ctx: &Ctx) -> Option<String> {
    let instances = ctx.discovery().healthy(DEPOT);
    let pick = instances.first()?;
    Some(format!("{}://{}/2pc/{DEPOT}", scheme(ctx), pick.addr))
}

async fn create(
    State(t): State<Transfers>,
    ctx: Ctx,
    identity: Option<Identity>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(identity)?;
    let req = validate(&body)?;
    let id = match headers.get("idempotency-key") {
        Some(v) => {
            let key = v
                .to_str()
                .map_err(|_| invalid("Idempotency-Key must be printable ASCII"))?;
            // The key is the transaction id: it must fit the protocol's id rules.
            validate_tx_id(key).map_err(|e| invalid(format!("Idempotency-Key: {e}")))?;
            key.to_string()
        }
        None => format!("xfer-{}", uuid::Uuid::new_v4().simple()),
    };
    let (Some(coordinator), Some(own)) = (t.0.coordinator.get(), t.0.own.get()) else {
        return Err(not_ready());
    };
    let db = ctx.db();
    if let Some(stored) = load(db, &id).await? {
        return repeat(&t, &ctx, coordinator, *own, &id, &req, stored).await;
    }
    // Nothing can move without the depot: say so before a transaction begins, so
    // the key is not used up by a transfer that never had a chance.
    let Some(depot) = depot_endpoint(&ctx) else {
        return Err(ApiError::unavailable(
            "the depot is not reachable (no instance registered); nothing moved",
        ));
    };
    let claimed = sqlx::query(
        "INSERT INTO stock_transfers \
         (transfer_id, product_id, quantity, from_warehouse, to_warehouse, status, requested_by, created_ms) \
         VALUES ($1, $2, $3, $4, $5, 'running', $6, $7) ON CONFLICT (transfer_id) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.product_id)
    .bind(req.quantity)
    .bind(req.from.as_str())
    .bind(req.to.as_str())
    .bind(&caller.subject)
    .bind(crate::reservations::now_ms())
    .execute(db.pool())
    .await
    .map_err(db_error)?
    .rows_affected();
    if claimed == 0 {
        // A concurrent first call with the same key got in first.
        let stored = load(db, &id)
            .await?
            .ok_or_else(|| ApiError::internal("a claimed transfer vanished"))?;
        return repeat(&t, &ctx, coordinator, *own, &id, &req, stored).await;
    }
    run(&t, &ctx, coordinator, *own, depot, &id, &req).await
}

/// A transfer id seen before: the first call's answer, as far as it is known.
async fn repeat(
    t: &Transfers,
    ctx: &Ctx,
    coordinator: &Coordinator,
    own: SocketAddr,
    id: &str,
    req: &TransferRequest,
    stored: Stored,
) -> Result<Json<Value>, ApiError> {
    if &stored.request != req {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("Idempotency-Key {id} was used for another transfer"),
        ));
    }
    if stored.status != "running" {
        return answer(id, req, &stored.status, stored.reason.as_deref());
    }
    if t.is_running(id) {
        return Err(in_progress(id));
    }
    // Not running here and no outcome recorded: the first call was cut short (a
    // crash, a failed write). The coordinator's log says how it ended.
    let state = coordinator
        .status(id)
        .await
        .map_err(ApiError::from)?
        .map(|tx| tx.state);
    match state {
        // Never begun: no participant ever heard of it, so running it now is the
        // first and only attempt.
        None => {
            let Some(depot) = depot_endpoint(ctx) else {
                return Err(ApiError::unavailable(
                    "the depot is not reachable (no instance registered); nothing moved",
                ));
            };
            run(t, ctx, coordinator, own, depot, id, req).await
        }
        Some(CoordinatorState::Preparing) => Err(in_progress(id)),
        Some(CoordinatorState::Commit) => {
            record(ctx.db(), id, "committed", None)
                .await
                .map_err(db_error)?;
            answer(id, req, "committed", None)
        }
        Some(CoordinatorState::Abort) => {
            let reason = "the transfer was interrupted";
            record(ctx.db(), id, "aborted", Some(reason))
                .await
                .map_err(db_error)?;
            answer(id, req, "aborted", Some(reason))
        }
    }
}

impl Transfers {
    fn is_running(&self, id: &str) -> bool {
        self.0
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// Marks a transfer as run by this process until dropped.
struct Running {
    transfers: Transfers,
    id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.transfers
            .0
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Run transfer `id` as one two-phase commit transaction over the two warehouses,
/// record how it ended and answer it.
async fn run(
    t: &Transfers,
    ctx: &Ctx,
    coordinator: &Coordinator,
    own: SocketAddr,
    depot: String,
    id: &str,
    req: &TransferRequest,
) -> Result<Json<Value>, ApiError> {
    if !t
        .0
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.to_string())
    {
        return Err(in_progress(id));
    }
    let running = Running {
        transfers: t.clone(),
        id: id.to_string(),
    };
    let inventory = format!("{}://{own}/2pc/{PARTICIPANT}", scheme(ctx));
    let payload =
        |op: &str| json!({"op": op, "product_id": req.product_id, "quantity": req.quantity});
    let (from, to) = match req.from {
        Warehouse::Inventory => (inventory, depot),
        Warehouse::Depot => (depot, inventory),
    };
    let branches = vec![
        Branch::new(from, payload("take")),
        Branch::new(to, payload("add")),
    ];
    let (coordinator, db, votes) = (coordinator.clone(), ctx.db().clone(), t.0.votes.clone());
    let (id, req) = (id.to_string(), req.clone());
    // In a task of its own, so a client that hangs up does not keep the outcome
    // from being recorded (the protocol itself runs on regardless).
    let task = tokio::spawn(async move {
        let _running = running;
        let result = coordinator.execute(&id, branches).await;
        let no = votes.take_no(&id);
        let (status, reason) = match result {
            Ok(c) if c.outcome == Outcome::Commit => ("committed", None),
            Ok(_) => match no {
                Some(endpoint) => {
                    let who = if endpoint.ends_with(&format!("/2pc/{DEPOT}")) {
                        DEPOT
                    } else {
                        PARTICIPANT
                    };
                    (
                        "refused",
                        Some(format!(
                            "the {who} voted no (not enough units of {}, or no stock record of it)",
                            req.product_id
                        )),
                    )
                }
                None => (
                    "aborted",
                    Some("a warehouse could not be reached in time".to_string()),
                ),
            },
            Err(e) => {
                // Nothing decided, or not even begun: the record stays `running`,
                // and a repeat finds out from the coordinator's log (recovery aborts
                // what is undecided).
                tracing::warn!(transfer = %id, error = %e, "stock transfer failed");
                return Err(match e.kind() {
                    ErrorKind::Conflict => in_progress(&id),
                    ErrorKind::InvalidInput => ApiError::internal("transfer rejected by the coordinator"),
                    _ => ApiError::unavailable(format!(
                        "transfer {id} could not be run; nothing moved, ask again with the same Idempotency-Key"
                    )),
                });
            }
        };
        if let Err(e) = record(&db, &id, status, reason.as_deref()).await {
            // The outcome is in the coordinator's log; a repeat records it.
            tracing::warn!(transfer = %id, error = %e, "recording a transfer's outcome failed");
        }
        tracing::info!(transfer = %id, status, product = %req.product_id, quantity = req.quantity, from = req.from.as_str(), to = req.to.as_str(), "stock transfer ended");
        answer(&id, &req, status, reason.as_deref())
    });
    task.await
        .map_err(|_| ApiError::internal("the transfer task failed"))?
}

/// `GET /api/stock-transfers/{id}`: the transfer as asked, how it ended, and the
/// coordinator's view of its transaction (`null` while the coordinator is not open).
async fn show(
    State(t): State<Transfers>,
    ctx: Ctx,
    identity: Option<Identity>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(identity)?;
    if validate_tx_id(&id).is_err() {
        return Err(ApiError::not_found(format!("no transfer {id}")));
    }
    let Some(stored) = load(ctx.db(), &id).await? else {
        return Err(ApiError::not_found(format!("no transfer {id}")));
    };
    let transaction = match t.0.coordinator.get() {
        Some(c) => c.status(&id).await.map_err(ApiError::from)?,
        None => None,
    };
    Ok(Json(json!({
        "transfer_id": id,
        "product_id": stored.request.product_id,
        "quantity": stored.request.quantity,
        "from": stored.request.from,
        "to": stored.request.to,
        "status": stored.status,
        "reason": stored.reason,
        "requested_by": stored.requested_by,
        "transaction": transaction,
    })))
}

/// `POST /2pc/coordinator/decision`, served here rather than by the crate's
/// `coordinator_router` because the coordinator opens after the routes are built.
async fn decision(
    State(t): State<Transfers>,
    body: Bytes,
) -> Result<Json<DecisionAnswer>, ApiError> {
    let req: TxRef = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
    // Not open yet: the participant asks again later.
    let c = t.0.coordinator.get().ok_or_else(not_ready)?;
    let decision = c.decision(&req.tx_id).await.map_err(ApiError::from)?;
    Ok(Json(DecisionAnswer {
        tx_id: req.tx_id,
        decision,
    }))
}

/// `GET /2pc/coordinator/tx/{tx_id}`: the coordinator's state of a transaction.
async fn coordinator_tx(
    State(t): State<Transfers>,
    Path(tx_id): Path<String>,
) -> Result<Json<shoal_twophase::CoordinatorTx>, ApiError> {
    let c = t.0.coordinator.get().ok_or_else(not_ready)?;
    match c.status(&tx_id).await.map_err(ApiError::from)? {
        Some(tx) => Ok(Json(tx)),
        None => Err(ApiError::not_found(format!("no transaction {tx_id} here"))),
    }
}

/// Which way a transfer's units go, seen from this warehouse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Take,
    Add,
}

/// A branch's payload: `{"op":"take"|"add","product_id","quantity"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Move {
    op: Op,
    product_id: String,
    quantity: i64,
}

impl Move {
    fn parse(payload: &Value) -> Result<Self, Error> {
        let m: Self = serde_json::from_value(payload.clone()).map_err(|e| {
            Error::internal("a transfer payload the inventory cannot read").with_source(e)
        })?;
        if !(1..=MAX_TRANSFER).contains(&m.quantity) {
            return Err(Error::internal(format!(
                "a transfer payload with quantity {}",
                m.quantity
            )));
        }
        Ok(m)
    }
}

/// Run one guarded update of `stock`; whether it changed the row.
async fn update(conn: &mut AnyConnection, sql: &'static str, m: &Move) -> Result<bool, Error> {
    let n = sqlx::query(sql)
        .bind(m.quantity)
        .bind(&m.product_id)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::internal("inventory: updating stock for a transfer").with_source(e))?
        .rows_affected();
    Ok(n == 1)
}

/// The inventory's side of a transfer, on `stock`, inside the participant's
/// transaction (with its state row).
struct InventoryStock;

impl InventoryStock {
    async fn prepare(
        &self,
        tx_id: &str,
        payload: &Value,
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
            // The same guard as a reservation's: units are taken only where enough
            // are available, so a transfer and an order never get the same units.
            Op::Take => {
                update(
                    conn,
                    "UPDATE stock SET available = available - $1, outgoing = outgoing + $1 \
                     WHERE product_id = $2 AND available >= $1",
                    &m,
                )
                .await?
            }
            Op::Add => {
                update(
                    conn,
                    "UPDATE stock SET incoming = incoming + $1 WHERE product_id = $2",
                    &m,
                )
                .await?
            }
        };
        if !held {
            tracing::info!(tx_id, product = %m.product_id, quantity = m.quantity, op = ?m.op, "transfer refused: not enough stock or unknown product");
            return Ok(Vote::No);
        }
        Ok(Vote::Yes)
    }

    async fn finish(
        &self,
        payload: &Value,
        conn: &mut AnyConnection,
        commit: bool,
    ) -> Result<(), Error> {
        let m = Move::parse(payload)?;
        let sql = match (m.op, commit) {
            // Gone: they are the depot's now.
            (Op::Take, true) => "UPDATE stock SET outgoing = outgoing - $1 WHERE product_id = $2",
            (Op::Take, false) => {
                "UPDATE stock SET outgoing = outgoing - $1, available = available + $1 WHERE product_id = $2"
            }
            (Op::Add, true) => {
                "UPDATE stock SET incoming = incoming - $1, available = available + $1 WHERE product_id = $2"
            }
            (Op::Add, false) => "UPDATE stock SET incoming = incoming - $1 WHERE product_id = $2",
        };
        if !update(conn, sql, &m).await? {
            return Err(Error::internal(format!(
                "inventory: no stock row for {} while applying a transfer decision",
                m.product_id
            )));
        }
        Ok(())
    }
}

impl Resource for InventoryStock {
    fn prepare<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, Vote> {
        Box::pin(InventoryStock::prepare(self, tx_id, payload, conn))
    }

    fn commit<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(self.finish(payload, conn, true))
    }

    fn abort<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(self.finish(payload, conn, false))
    }
}
