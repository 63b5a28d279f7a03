//! The coordinator: runs a transaction's two phases, logs the decision in its own
//! database before anyone hears it, delivers it until every participant
//! acknowledged, finishes what a crash left behind, and answers participants that
//! ask what was decided.

use crate::config::CoordinatorConfig;
use crate::link::ParticipantLink;
use crate::schema::{self, Side};
use crate::stop::{self, Stop, StopGuard};
use crate::wire::{
    validate_tx_id, BranchStatus, CoordinatorState, CoordinatorTx, Decision, Outcome,
    PrepareRequest, Vote,
};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use shoal_core::{unix_ms, Error, ErrorKind, Origin};
use shoal_db::{db_err, Db};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// One participant's part of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct Branch {
    /// How the link reaches the participant (for HTTP, the base URL of its routes,
    /// such as `http://127.0.0.1:7101/2pc/stock`).
    pub endpoint: String,
    /// What the participant is asked to do, in its own terms.
    pub payload: serde_json::Value,
}

impl Branch {
    /// A branch for the participant at `endpoint`.
    pub fn new(endpoint: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            endpoint: endpoint.into(),
            payload,
        }
    }
}

/// What [`Coordinator::execute`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The transaction.
    pub tx_id: String,
    /// The logged decision.
    pub outcome: Outcome,
    /// Whether every participant acknowledged it within `delivery_wait_ms`. If not,
    /// delivery goes on in the background (and after a restart) until they do.
    pub done: bool,
}

/// What a recovery pass found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Transactions found undecided and decided abort now.
    pub aborted: usize,
    /// Transactions whose decision is being (re-)sent, those just aborted included.
    pub redelivering: usize,
}

/// A two-phase commit coordinator over its own [`Db`]; cheap to clone. Dropping the
/// last clone stops its background work (what it logged stays, and a new coordinator
/// on the same database finishes it).
///
/// One coordinator process per database: at start it aborts every undecided
/// transaction it finds, taking them for its dead predecessor's.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
    _stop: Arc<StopGuard>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("endpoint", &self.inner.cfg.endpoint)
            .field("db", &self.inner.db.label())
            .finish()
    }
}

struct Inner {
    db: Db,
    link: Arc<dyn ParticipantLink>,
    cfg: CoordinatorConfig,
    /// One per transaction until every participant acknowledged: the in-flight bound.
    permits: Arc<Semaphore>,
    /// Transactions some task of this process is working on, so recovery passes
    /// leave them alone and two tasks never deliver the same one.
    claimed: Mutex<HashSet<String>>,
    stop: Stop,
}

/// A transaction claimed by one task; released when dropped.
struct Claim {
    inner: Arc<Inner>,
    tx_id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.inner
            .claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.tx_id);
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn now_i64() -> i64 {
    unix_ms() as i64
}

impl Coordinator {
    /// Open the coordinator on `db` (creating its tables if missing), finish what a
    /// previous run left (see [`Coordinator::recover`]) and start the background
    /// pass that keeps finishing it every `recovery_interval_ms`.
    pub async fn start(
        db: Db,
        link: Arc<dyn ParticipantLink>,
        cfg: CoordinatorConfig,
    ) -> Result<Self, Error> {
        let c = Self::open(db, link, cfg).await?;
        c.recover().await?;
        let inner = c.inner.clone();
        tokio::spawn(async move { inner.recovery_loop().await });
        Ok(c)
    }

    /// Open the coordinator on `db` (creating its tables if missing) without
    /// recovering or starting background work: for tests and for callers that run
    /// [`Coordinator::recover`] themselves.
    pub async fn open(
        db: Db,
        link: Arc<dyn ParticipantLink>,
        cfg: CoordinatorConfig,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        schema::ensure(&db, Side::Coordinator).await?;
        let (guard, stop) = stop::channel();
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                link,
                permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
                cfg,
                claimed: Mutex::new(HashSet::new()),
                stop,
            }),
            _stop: Arc::new(guard),
        })
    }

    /// The endpoint participants reach this coordinator at.
    pub fn endpoint(&self) -> &str {
        &self.inner.cfg.endpoint
    }

    /// Run transaction `tx_id` over `branches`: log its start, ask every participant
    /// to prepare (in parallel, each within `prepare_timeout_ms`), log commit if all
    /// voted yes and abort otherwise, then deliver the decision. Returns once the
    /// decision is logged and either every participant acknowledged or
    /// `delivery_wait_ms` passed. The protocol runs in its own task: dropping the
    /// returned future does not stop it.
    ///
    /// Errors: a bad id or branch list (`InvalidInput`), an id already used
    /// (`Conflict`), too many transactions in flight (`Overloaded`), or a database
    /// failure before the decision was logged (the transaction is then aborted by
    /// recovery).
    pub async fn execute(&self, tx_id: &str, branches: Vec<Branch>) -> Result<Completion, Error> {
        let inner = &self.inner;
        validate_tx_id(tx_id)?;
        inner.validate_branches(tx_id, &branches)?;
        let permit = inner.permits.clone().try_acquire_owned().map_err(|_| {
            Error::new(
                ErrorKind::Overloaded,
                Origin::Internal,
                format!(
                    "transaction {tx_id} refused: {} transactions already in flight",
                    inner.cfg.max_in_flight
                ),
            )
        })?;
        let claim = inner.claim(tx_id).ok_or_else(|| {
            Error::new(
                ErrorKind::Conflict,
                Origin::Downstream,
                format!("transaction {tx_id} is already running"),
            )
        })?;
        let (decided_tx, decided_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let task_inner = inner.clone();
        tokio::spawn(async move {
            task_inner
                .run(claim, permit, branches, decided_tx, done_tx)
                .await;
        });
        let outcome = decided_rx.await.map_err(|_| {
            Error::internal(format!("transaction {tx_id}: the coordinator task ended"))
        })??;
        let done = matches!(
            tokio::time::timeout(ms(inner.cfg.delivery_wait_ms), done_rx).await,
            Ok(Ok(()))
        );
        Ok(Completion {
            tx_id: tx_id.to_string(),
            outcome,
            done,
        })
    }

    /// Finish what a previous run left: every transaction begun but undecided (and
    /// not running in this process) is decided abort, and every decided transaction
    /// not done has its decision re-sent, in the background, until every participant
    /// acknowledged. [`Coordinator::start`] runs this.
    pub async fn recover(&self) -> Result<Recovered, Error> {
        self.inner.recover_pass(true).await
    }

    /// The decision on `tx_id`, for a participant that asks. A transaction never
    /// begun here, or undecided past its prepare deadline, is decided abort now,
    /// durably, and that is the answer; one still within its deadline is `Pending`.
    pub async fn decision(&self, tx_id: &str) -> Result<Decision, Error> {
        validate_tx_id(tx_id)?;
        self.inner.decision(tx_id).await
    }

    /// Where transaction `tx_id` stands, if this coordinator knows it.
    pub async fn status(&self, tx_id: &str) -> Result<Option<CoordinatorTx>, Error> {
        validate_tx_id(tx_id)?;
        self.inner.status(tx_id).await
    }

    /// How many transactions this process is working on now (running, or being
    /// delivered after recovery).
    pub fn in_flight(&self) -> usize {
        self.inner
            .claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Inner {
    fn claim(self: &Arc<Self>, tx_id: &str) -> Option<Claim> {
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        if !claimed.insert(tx_id.to_string()) {
            return None;
        }
        Some(Claim {
            inner: self.clone(),
            tx_id: tx_id.to_string(),
        })
    }

    fn validate_branches(&self, tx_id: &str, branches: &[Branch]) -> Result<(), Error> {
        let bad = |msg: String| Error::new(ErrorKind::InvalidInput, Origin::Downstream, msg);
        if branches.is_empty() {
            return Err(bad(format!("transaction {tx_id}: no participants")));
        }
        if branches.len() > self.cfg.max_participants {
            return Err(bad(format!(
                "transaction {tx_id}: {} participants, at most {} allowed",
                branches.len(),
                self.cfg.max_participants
            )));
        }
        let mut seen = HashSet::new();
        for b in branches {
            if b.endpoint.is_empty() || b.endpoint.len() > 2048 {
                return Err(bad(format!(
                    "transaction {tx_id}: a participant endpoint must be 1 to 2048 bytes"
                )));
            }
            if !seen.insert(b.endpoint.as_str()) {
                return Err(bad(format!(
                    "transaction {tx_id}: participant {} is listed twice",
                    b.endpoint
                )));
            }
            let size = serde_json::to_vec(&b.payload).map(|v| v.len()).unwrap_or(0);
            if size > self.cfg.max_payload_bytes {
                return Err(bad(format!(
                    "transaction {tx_id}: the payload for {} is {size} bytes, at most {} allowed",
                    b.endpoint, self.cfg.max_payload_bytes
                )));
            }
        }
        Ok(())
    }

    /// The whole protocol for one transaction.
    async fn run(
        self: Arc<Self>,
        claim: Claim,
        permit: OwnedSemaphorePermit,
        branches: Vec<Branch>,
        decided: oneshot::Sender<Result<Outcome, Error>>,
        done: oneshot::Sender<()>,
    ) {
        let tx_id = claim.tx_id.clone();
        let deadline_ms = unix_ms() + self.cfg.prepare_timeout_ms;
        if let Err(e) = self.log_begin(&tx_id, deadline_ms, &branches).await {
            let _ = decided.send(Err(e));
            return;
        }
        // Stopped while waiting for votes: like a crash, nothing decided; the next
        // coordinator on this database aborts the transaction.
        let all_yes = tokio::select! {
            v = self.collect_votes(&tx_id, deadline_ms, &branches) => v,
            _ = self.stop.stopped() => return,
        };
        let wanted = if all_yes {
            Outcome::Commit
        } else {
            Outcome::Abort
        };
        let outcome = match self.log_decision(&tx_id, wanted).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing was sent: the next recovery pass finds the transaction
                // undecided past its deadline and aborts it.
                tracing::error!(tx_id = %tx_id, error = %e, "two-phase commit: logging the decision failed");
                let _ = decided.send(Err(e));
                return;
            }
        };
        let _ = decided.send(Ok(outcome));
        if self.deliver(&tx_id, outcome).await {
            let _ = done.send(());
        }
        drop(permit);
        drop(claim);
    }

    async fn log_begin(
        &self,
        tx_id: &str,
        deadline_ms: u64,
        branches: &[Branch],
    ) -> Result<(), Error> {
        let err = || {
            format!(
                "logging the start of transaction {tx_id} in {}",
                self.db.label()
            )
        };
        let mut tx = self.db.pool().begin().await.map_err(db_err(err()))?;
        let inserted = sqlx::query(
            "INSERT INTO _shoal_2pc_coordinator_tx (tx_id, state, done, created_at_ms, deadline_ms)
             VALUES ($1, 'preparing', 0, $2, $3) ON CONFLICT (tx_id) DO NOTHING",
        )
        .bind(tx_id)
        .bind(now_i64())
        .bind(deadline_ms as i64)
        .execute(&mut *tx)
        .await
        .map_err(db_err(err()))?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                Origin::Downstream,
                format!("transaction {tx_id} already exists in this coordinator's log"),
            ));
        }
        for (i, b) in branches.iter().enumerate() {
            sqlx::query(
                "INSERT INTO _shoal_2pc_coordinator_branch (tx_id, idx, endpoint, acked)
                 VALUES ($1, $2, $3, 0)",
            )
            .bind(tx_id)
            .bind(i as i64)
            .bind(&b.endpoint)
            .execute(&mut *tx)
            .await
            .map_err(db_err(err()))?;
        }
        tx.commit().await.map_err(db_err(err()))?;
        Ok(())
    }

    /// Ask every participant to prepare, in parallel; true if all voted yes. The
    /// first no, failure or timeout ends the wait: the outcome is abort whatever the
    /// others say.
    async fn collect_votes(&self, tx_id: &str, deadline_ms: u64, branches: &[Branch]) -> bool {
        let timeout = ms(self.cfg.prepare_timeout_ms);
        let mut votes: FuturesUnordered<_> = branches
            .iter()
            .map(|b| {
                let req = PrepareRequest {
                    tx_id: tx_id.to_string(),
                    coordinator: self.cfg.endpoint.clone(),
                    deadline_ms,
                    payload: b.payload.clone(),
                };
                async move {
                    let r =
                        tokio::time::timeout(timeout, self.link.prepare(&b.endpoint, &req)).await;
                    (b.endpoint.as_str(), r)
                }
            })
            .collect();
        while let Some((endpoint, r)) = votes.next().await {
            match r {
                Ok(Ok(Vote::Yes)) => {}
                Ok(Ok(Vote::No)) => {
                    tracing::info!(
                        tx_id,
                        participant = endpoint,
                        "two-phase commit: participant voted no"
                    );
                    return false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(tx_id, participant = endpoint, error = %e, "two-phase commit: prepare failed; counted as no");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(
                        tx_id,
                        participant = endpoint,
                        timeout_ms = self.cfg.prepare_timeout_ms,
                        "two-phase commit: no vote in time; counted as no"
                    );
                    return false;
                }
            }
        }
        true
    }

    /// Log `wanted` unless the transaction was decided meanwhile (abort, by a
    /// participant's query past the deadline); returns what is logged.
    async fn log_decision(&self, tx_id: &str, wanted: Outcome) -> Result<Outcome, Error> {
        let err = || {
            format!(
                "logging the decision on transaction {tx_id} in {}",
                self.db.label()
            )
        };
        // Conditional, so a decision is written once and never changed.
        sqlx::query(
            "UPDATE _shoal_2pc_coordinator_tx SET state = $1, decided_at_ms = $2
             WHERE tx_id = $3 AND state = 'preparing'",
        )
        .bind(wanted.as_str())
        .bind(now_i64())
        .bind(tx_id)
        .execute(self.db.pool())
        .await
        .map_err(db_err(err()))?;
        let state = self
            .state_of(tx_id)
            .await?
            .ok_or_else(|| Error::internal(format!("transaction {tx_id} vanished from the log")))?;
        let logged = state.0.outcome().ok_or_else(|| {
            Error::internal(format!(
                "transaction {tx_id} is still undecided after logging"
            ))
        })?;
        if logged == wanted {
            tracing::info!(
                tx_id,
                outcome = logged.as_str(),
                "two-phase commit: decided"
            );
        } else {
            tracing::warn!(
                tx_id,
                wanted = wanted.as_str(),
                outcome = logged.as_str(),
                "two-phase commit: decided abort meanwhile (a participant asked past the deadline)"
            );
        }
        Ok(logged)
    }

    async fn state_of(&self, tx_id: &str) -> Result<Option<(CoordinatorState, u64, bool)>, Error> {
        let row: Option<(String, i64, i64)> = sqlx::query_as(
            "SELECT state, deadline_ms, done FROM _shoal_2pc_coordinator_tx WHERE tx_id = $1",
        )
        .bind(tx_id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading transaction {tx_id} from {}",
            self.db.label()
        )))?;
        match row {
            None => Ok(None),
            Some((state, deadline, done)) => Ok(Some((
                CoordinatorState::parse(&state)?,
                deadline.max(0) as u64,
                done != 0,
            ))),
        }
    }

    /// Deliver `outcome` to every participant not yet acknowledged, each retried with
    /// backoff until it acknowledges, then mark the transaction done. False if the
    /// coordinator stopped first.
    async fn deliver(&self, tx_id: &str, outcome: Outcome) -> bool {
        let mut failures = 0u32;
        let pending = loop {
            match self.unacked(tx_id).await {
                Ok(p) => break p,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(tx_id, error = %e, "two-phase commit: reading participants failed");
                    if !self.stop.sleep(self.cfg.retry.delay(failures)).await {
                        return false;
                    }
                }
            }
        };
        let all: Vec<bool> = futures_util::future::join_all(
            pending
                .iter()
                .map(|(idx, endpoint)| self.deliver_one(tx_id, *idx, endpoint, outcome)),
        )
        .await;
        if all.iter().any(|ok| !ok) {
            return false;
        }
        let mut failures = 0u32;
        loop {
            let r = sqlx::query(
                "UPDATE _shoal_2pc_coordinator_tx SET done = 1, done_at_ms = $1 WHERE tx_id = $2",
            )
            .bind(now_i64())
            .bind(tx_id)
            .execute(self.db.pool())
            .await;
            match r {
                Ok(_) => {
                    tracing::info!(
                        tx_id,
                        outcome = outcome.as_str(),
                        "two-phase commit: done, every participant acknowledged"
                    );
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(tx_id, error = %e, "two-phase commit: marking done failed");
                    if !self.stop.sleep(self.cfg.retry.delay(failures)).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn unacked(&self, tx_id: &str) -> Result<Vec<(i64, String)>, Error> {
        sqlx::query_as(
            "SELECT idx, endpoint FROM _shoal_2pc_coordinator_branch
             WHERE tx_id = $1 AND acked = 0 ORDER BY idx",
        )
        .bind(tx_id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading the participants of transaction {tx_id} from {}",
            self.db.label()
        )))
    }

    async fn deliver_one(&self, tx_id: &str, idx: i64, endpoint: &str, outcome: Outcome) -> bool {
        let mut failures = 0u32;
        loop {
            if self.stop.is_stopped() {
                return false;
            }
            let sent = tokio::time::timeout(
                ms(self.cfg.call_timeout_ms),
                self.link.deliver(endpoint, tx_id, outcome),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    Origin::Upstream,
                    format!(
                        "{} of transaction {tx_id}: {endpoint} did not answer within {} ms",
                        outcome.as_str(),
                        self.cfg.call_timeout_ms
                    ),
                ))
            });
            let recorded = match sent {
                Ok(()) => sqlx::query(
                    "UPDATE _shoal_2pc_coordinator_branch SET acked = 1, acked_at_ms = $1
                     WHERE tx_id = $2 AND idx = $3",
                )
                .bind(now_i64())
                .bind(tx_id)
                .bind(idx)
                .execute(self.db.pool())
                .await
                .map(|_| ())
                .map_err(db_err(format!(
                    "recording the acknowledgement of {endpoint} for transaction {tx_id}"
                ))),
                Err(e) => Err(e),
            };
            match recorded {
                Ok(()) => return true,
                Err(e) => {
                    failures += 1;
                    let level_error = failures == 10;
                    if level_error {
                        tracing::error!(tx_id, participant = endpoint, outcome = outcome.as_str(), failures, error = %e, "two-phase commit: participant keeps failing to acknowledge; still retrying");
                    } else {
                        tracing::warn!(tx_id, participant = endpoint, outcome = outcome.as_str(), failures, error = %e, "two-phase commit: delivery failed; retrying");
                    }
                    if !self.stop.sleep(self.cfg.retry.delay(failures)).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn recover_pass(self: &Arc<Self>, startup: bool) -> Result<Recovered, Error> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tx_id, state, deadline_ms FROM _shoal_2pc_coordinator_tx
             WHERE done = 0 ORDER BY created_at_ms LIMIT $1",
        )
        .bind(i64::from(self.cfg.recovery_batch))
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading unfinished transactions from {}",
            self.db.label()
        )))?;
        let mut report = Recovered::default();
        let now = unix_ms();
        for (tx_id, state, deadline) in rows {
            let Some(claim) = self.claim(&tx_id) else {
                continue; // running in this process
            };
            let outcome = match CoordinatorState::parse(&state)? {
                CoordinatorState::Preparing if startup || now > deadline.max(0) as u64 => {
                    let o = self.abort_undecided(&tx_id).await?;
                    if o == Outcome::Abort {
                        report.aborted += 1;
                    }
                    o
                }
                CoordinatorState::Preparing => continue,
                CoordinatorState::Commit => Outcome::Commit,
                CoordinatorState::Abort => Outcome::Abort,
            };
            report.redelivering += 1;
            tracing::info!(tx_id = %tx_id, outcome = outcome.as_str(), "two-phase commit: recovery re-sends the decision");
            let inner = self.clone();
            tokio::spawn(async move {
                let permit = tokio::select! {
                    p = inner.permits.clone().acquire_owned() => p,
                    _ = inner.stop.stopped() => return,
                };
                let Ok(permit) = permit else { return };
                inner.deliver(&claim.tx_id, outcome).await;
                drop(permit);
                drop(claim);
            });
        }
        if report.redelivering > 0 {
            tracing::info!(
                aborted = report.aborted,
                redelivering = report.redelivering,
                "two-phase commit: recovery pass"
            );
        }
        Ok(report)
    }

    /// Decide abort for an undecided transaction; returns what is logged (commit if
    /// it was decided commit meanwhile).
    async fn abort_undecided(&self, tx_id: &str) -> Result<Outcome, Error> {
        sqlx::query(
            "UPDATE _shoal_2pc_coordinator_tx SET state = 'abort', decided_at_ms = $1
             WHERE tx_id = $2 AND state = 'preparing'",
        )
        .bind(now_i64())
        .bind(tx_id)
        .execute(self.db.pool())
        .await
        .map_err(db_err(format!(
            "deciding abort for transaction {tx_id} in {}",
            self.db.label()
        )))?;
        let state = self.state_of(tx_id).await?;
        let outcome = state.and_then(|s| s.0.outcome()).ok_or_else(|| {
            Error::internal(format!("transaction {tx_id} still undecided after abort"))
        })?;
        if outcome == Outcome::Abort {
            tracing::warn!(
                tx_id,
                "two-phase commit: undecided transaction decided abort"
            );
        }
        Ok(outcome)
    }

    async fn decision(&self, tx_id: &str) -> Result<Decision, Error> {
        // At most a few rounds: each one either answers or makes the next one answer.
        for _ in 0..3 {
            match self.state_of(tx_id).await? {
                None => {
                    // Presumed abort, made durable so that a late start of the same
                    // id cannot commit what this participant was told is aborted.
                    sqlx::query(
                        "INSERT INTO _shoal_2pc_coordinator_tx (tx_id, state, done, created_at_ms, deadline_ms, decided_at_ms, done_at_ms)
                         VALUES ($1, 'abort', 1, $2, $2, $2, $2) ON CONFLICT (tx_id) DO NOTHING",
                    )
                    .bind(tx_id)
                    .bind(now_i64())
                    .execute(self.db.pool())
                    .await
                    .map_err(db_err(format!(
                        "recording the presumed abort of unknown transaction {tx_id}"
                    )))?;
                    tracing::info!(
                        tx_id,
                        "two-phase commit: asked about an unknown transaction; answered abort"
                    );
                }
                Some((CoordinatorState::Preparing, deadline, _)) if unix_ms() > deadline => {
                    self.abort_undecided(tx_id).await?;
                }
                Some((CoordinatorState::Preparing, _, _)) => return Ok(Decision::Pending),
                Some((CoordinatorState::Commit, _, _)) => return Ok(Decision::Commit),
                Some((CoordinatorState::Abort, _, _)) => return Ok(Decision::Abort),
            }
        }
        Err(Error::internal(format!(
            "transaction {tx_id}: no decision after three reads"
        )))
    }

    async fn status(&self, tx_id: &str) -> Result<Option<CoordinatorTx>, Error> {
        let Some((state, deadline_ms, done)) = self.state_of(tx_id).await? else {
            return Ok(None);
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT endpoint, acked FROM _shoal_2pc_coordinator_branch WHERE tx_id = $1 ORDER BY idx",
        )
        .bind(tx_id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading the participants of transaction {tx_id} from {}",
            self.db.label()
        )))?;
        Ok(Some(CoordinatorTx {
            tx_id: tx_id.to_string(),
            state,
            done,
            deadline_ms,
            participants: rows
                .into_iter()
                .map(|(endpoint, acked)| BranchStatus {
                    endpoint,
                    acked: acked != 0,
                })
                .collect(),
        }))
    }

    /// Every `recovery_interval_ms`: finish what is decided but not done or undecided
    /// past its deadline, and delete done transactions past their retention.
    async fn recovery_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let pause = if failures == 0 {
                ms(self.cfg.recovery_interval_ms)
            } else {
                self.cfg
                    .retry
                    .delay(failures)
                    .max(ms(self.cfg.recovery_interval_ms))
            };
            if !self.stop.sleep(pause).await {
                return;
            }
            let pass = async {
                self.recover_pass(false).await?;
                self.purge().await
            };
            match pass.await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "two-phase commit: coordinator recovery pass failed");
                }
            }
        }
    }

    async fn purge(&self) -> Result<(), Error> {
        let before = now_i64().saturating_sub(self.cfg.retain_done_ms as i64);
        // Branches go with their transaction (ON DELETE CASCADE).
        sqlx::query("DELETE FROM _shoal_2pc_coordinator_tx WHERE done = 1 AND done_at_ms < $1")
            .bind(before)
            .execute(self.db.pool())
            .await
            .map_err(db_err(format!(
                "deleting old transactions from {}",
                self.db.label()
            )))?;
        Ok(())
    }
}
