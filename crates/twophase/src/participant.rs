//! The participant: runs the service's [`Resource`] for prepare, commit and abort,
//! each inside one transaction of the service's own database together with the
//! participant's state row, and resolves doubt by asking the coordinator, never by
//! deciding a prepared transaction alone.

use crate::config::ParticipantConfig;
use crate::link::CoordinatorLink;
use crate::schema::{self, Side};
use crate::stop::{self, Stop, StopGuard};
use crate::wire::{
    validate_tx_id, Decision, Outcome, ParticipantState, ParticipantTx, PrepareRequest, Vote,
};
use shoal_core::{unix_ms, Error, ErrorKind, Origin};
use shoal_db::{db_err, Db};
use sqlx::AnyConnection;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`Resource`] method returns: boxed, so resources can be used as `dyn`.
pub type ResourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// The service's side of two-phase commit. Each method runs inside a transaction of
/// the participant's database (`conn`), in which the crate also writes the
/// participant's state row: the local effect and the state change commit together,
/// or neither does.
///
/// - `prepare` makes the change durable but held (stock reserved, not moved) and
///   votes. A no, an error or a timeout rolls everything back.
/// - `commit` applies what `prepare` held; `abort` releases it. The crate calls each
///   at most once per transaction (a repeated commit or abort finds the state row
///   already final and changes nothing), and never `commit` or `abort` without a
///   successful `prepare` before.
///
/// `payload` is what the coordinator sent with prepare; the crate keeps it in the
/// state row and hands it to `commit` and `abort` too.
pub trait Resource: Send + Sync + 'static {
    /// Make the change durable but held, and vote.
    fn prepare<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, Vote>;

    /// Apply the held change.
    fn commit<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()>;

    /// Release the held change.
    fn abort<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()>;
}

/// A two-phase commit participant over its own [`Db`]; cheap to clone. Dropping the
/// last clone stops its background questions.
#[derive(Clone)]
pub struct Participant {
    inner: Arc<Inner>,
    _stop: Arc<StopGuard>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.inner.name)
            .field("db", &self.inner.db.label())
            .finish()
    }
}

struct Inner {
    name: String,
    db: Db,
    resource: Arc<dyn Resource>,
    link: Arc<dyn CoordinatorLink>,
    cfg: ParticipantConfig,
    /// In-doubt transactions past `max_in_doubt_ms`, as of the last round.
    stuck: AtomicUsize,
    /// Those already logged as stuck, so each is logged once, not every round.
    reported: Mutex<HashSet<String>>,
    stop: Stop,
}

/// A participant name is 1 to 64 of `a-z 0-9 _ -`: it is the participant's routes'
/// path segment and the key of its state rows.
fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "coordinator"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "twophase participant name {name:?}: use 1 to 64 of a-z 0-9 _ - (and not \"coordinator\")"
        )))
    }
}

fn now_i64() -> i64 {
    unix_ms() as i64
}

type Row = (String, String, i64, Option<i64>);

impl Participant {
    /// Open participant `name` on `db` (creating its table if missing) for
    /// `resource`, and start asking coordinators about every transaction left
    /// prepared (at once: this is the participant's recovery after a restart), then
    /// about each one prepared longer than `in_doubt_after_ms`, every
    /// `query_interval_ms`.
    pub async fn start(
        name: &str,
        db: Db,
        resource: Arc<dyn Resource>,
        link: Arc<dyn CoordinatorLink>,
        cfg: ParticipantConfig,
    ) -> Result<Self, Error> {
        validate_name(name)?;
        cfg.validate()?;
        schema::ensure(&db, Side::Participant).await?;
        let (guard, stop) = stop::channel();
        let p = Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                db,
                resource,
                link,
                cfg,
                stuck: AtomicUsize::new(0),
                reported: Mutex::new(HashSet::new()),
                stop,
            }),
            _stop: Arc::new(guard),
        };
        let inner = p.inner.clone();
        tokio::spawn(async move { inner.query_loop().await });
        Ok(p)
    }

    /// The participant's name (its routes live under `/2pc/{name}`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn max_payload_bytes(&self) -> usize {
        self.inner.cfg.max_payload_bytes
    }

    /// Prepare: run the resource's prepare and record the state `prepared` in one
    /// database transaction, and vote. Repeating a prepare answers the same vote
    /// without running it again. A prepare that fails, or runs past its time, is
    /// rolled back and recorded as aborted, so a late repeat votes no too.
    pub async fn prepare(&self, req: &PrepareRequest) -> Result<Vote, Error> {
        validate_tx_id(&req.tx_id)?;
        self.inner.prepare(req).await
    }

    /// Commit: apply the held change and record `committed`, once. Repeated, it
    /// changes nothing and succeeds. A commit for a transaction never prepared here,
    /// or already aborted, is a `Conflict`: the coordinator's log and this one
    /// disagree, which needs a person.
    pub async fn commit(&self, tx_id: &str) -> Result<ParticipantTx, Error> {
        validate_tx_id(tx_id)?;
        self.inner.finish(tx_id, Outcome::Commit).await
    }

    /// Abort: release the held change and record `aborted`, once. Repeated, it
    /// changes nothing and succeeds; for a transaction never prepared it records
    /// `aborted`, so a prepare arriving later votes no. An abort for a committed
    /// transaction is a `Conflict`.
    pub async fn abort(&self, tx_id: &str) -> Result<ParticipantTx, Error> {
        validate_tx_id(tx_id)?;
        self.inner.finish(tx_id, Outcome::Abort).await
    }

    /// Where transaction `tx_id` stands here, if this participant knows it.
    pub async fn status(&self, tx_id: &str) -> Result<Option<ParticipantTx>, Error> {
        validate_tx_id(tx_id)?;
        self.inner.row(tx_id).await
    }

    /// Every transaction prepared here and not yet decided (oldest first, at most
    /// `query_batch`).
    pub async fn in_doubt(&self) -> Result<Vec<ParticipantTx>, Error> {
        self.inner.prepared_before(i64::MAX).await
    }

    /// How many transactions were in doubt longer than `max_in_doubt_ms` at the last
    /// round of questions: each needs its coordinator back (see docs/twophase.md).
    pub fn stuck_in_doubt(&self) -> usize {
        self.inner.stuck.load(Ordering::Relaxed)
    }

    /// Ask the coordinators about every prepared transaction now, and apply the
    /// answers; returns how many were resolved. The background task does the same
    /// on its own; this is for callers that cannot wait for its next round.
    pub async fn resolve_in_doubt(&self) -> Result<usize, Error> {
        self.inner.query_round(true).await.map(|r| r.resolved)
    }
}

/// What one round of questions did.
struct Round {
    resolved: usize,
    unreachable: bool,
}

impl Inner {
    async fn row(&self, tx_id: &str) -> Result<Option<ParticipantTx>, Error> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT state, coordinator, prepared_at_ms, finished_at_ms
             FROM _shoal_2pc_participant WHERE resource = $1 AND tx_id = $2",
        )
        .bind(&self.name)
        .bind(tx_id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading transaction {tx_id} of participant {} from {}",
            self.name,
            self.db.label()
        )))?;
        row.map(|r| to_tx(tx_id.to_string(), r)).transpose()
    }

    async fn prepare(&self, req: &PrepareRequest) -> Result<Vote, Error> {
        let tx_id = req.tx_id.as_str();
        let now = unix_ms();
        let left_ms = req
            .deadline_ms
            .saturating_sub(now)
            .min(self.cfg.prepare_timeout_ms);
        let payload = serde_json::to_string(&req.payload).map_err(|e| {
            Error::internal(format!("encoding the payload of {tx_id}")).with_source(e)
        })?;
        let attempt = async {
            if left_ms == 0 {
                return Ok::<_, Error>(Attempt::Refused("the prepare deadline had passed"));
            }
            let mut tx = self
                .db
                .pool()
                .begin()
                .await
                .map_err(db_err(format!("beginning the prepare of {tx_id}")))?;
            // The state row first: a write, so SQLite takes its write lock now rather
            // than failing to upgrade a read later; and the primary key makes a
            // concurrent or repeated prepare find the row instead of preparing twice.
            let inserted = sqlx::query(
                "INSERT INTO _shoal_2pc_participant (resource, tx_id, state, coordinator, payload, prepared_at_ms)
                 VALUES ($1, $2, 'prepared', $3, $4, $5) ON CONFLICT (resource, tx_id) DO NOTHING",
            )
            .bind(&self.name)
            .bind(tx_id)
            .bind(&req.coordinator)
            .bind(&payload)
            .bind(now_i64())
            .execute(&mut *tx)
            .await
            .map_err(db_err(format!("recording the prepare of {tx_id}")))?
            .rows_affected();
            if inserted == 0 {
                return Ok(Attempt::Known);
            }
            let (held,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM _shoal_2pc_participant WHERE resource = $1 AND state = 'prepared'",
            )
            .bind(&self.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err(format!("counting prepared transactions of {}", self.name)))?;
            if held > i64::from(self.cfg.max_prepared) {
                return Ok(Attempt::Refused(
                    "too many transactions prepared already (max_prepared)",
                ));
            }
            match self.resource.prepare(tx_id, &req.payload, &mut tx).await? {
                Vote::Yes => {
                    tx.commit()
                        .await
                        .map_err(db_err(format!("committing the prepare of {tx_id}")))?;
                    Ok(Attempt::Prepared)
                }
                Vote::No => Ok(Attempt::Refused("the resource voted no")),
            }
        };
        // A transaction dropped unfinished rolls back: the timeout undoes everything.
        let result = tokio::time::timeout(Duration::from_millis(left_ms.max(1)), attempt).await;
        match result {
            Ok(Ok(Attempt::Prepared)) => {
                tracing::info!(participant = %self.name, tx_id, "two-phase commit: prepared");
                return Ok(Vote::Yes);
            }
            Ok(Ok(Attempt::Known)) => {}
            Ok(Ok(Attempt::Refused(why))) => {
                tracing::info!(participant = %self.name, tx_id, why, "two-phase commit: voting no");
                self.record_aborted(tx_id, &req.coordinator, &payload)
                    .await?;
            }
            Ok(Err(e)) => {
                tracing::warn!(participant = %self.name, tx_id, error = %e, "two-phase commit: prepare failed; voting no");
                self.record_aborted(tx_id, &req.coordinator, &payload)
                    .await?;
            }
            Err(_) => {
                tracing::warn!(participant = %self.name, tx_id, limit_ms = left_ms, "two-phase commit: prepare ran out of time; aborting on its own and voting no");
                self.record_aborted(tx_id, &req.coordinator, &payload)
                    .await?;
            }
        }
        // Whatever the row says now is the vote: a prepare that did commit before
        // its answer was lost, or a concurrent one, reads as prepared.
        match self.row(tx_id).await?.map(|s| s.state) {
            Some(ParticipantState::Prepared | ParticipantState::Committed) => Ok(Vote::Yes),
            Some(ParticipantState::Aborted) => Ok(Vote::No),
            None => Err(Error::internal(format!(
                "transaction {tx_id} has no state row after its prepare"
            ))),
        }
    }

    /// Record `aborted` for a transaction that holds nothing here, unless a row
    /// exists already.
    async fn record_aborted(
        &self,
        tx_id: &str,
        coordinator: &str,
        payload: &str,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "INSERT INTO _shoal_2pc_participant (resource, tx_id, state, coordinator, payload, prepared_at_ms, finished_at_ms)
             VALUES ($1, $2, 'aborted', $3, $4, $5, $5) ON CONFLICT (resource, tx_id) DO NOTHING",
        )
        .bind(&self.name)
        .bind(tx_id)
        .bind(coordinator)
        .bind(payload)
        .bind(now_i64())
        .execute(self.db.pool())
        .await
        .map_err(db_err(format!("recording the abort of {tx_id}")))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Commit or abort: move the row from `prepared` to the final state and run the
    /// resource's method in the same transaction, once.
    async fn finish(&self, tx_id: &str, outcome: Outcome) -> Result<ParticipantTx, Error> {
        let (to, verb) = match outcome {
            Outcome::Commit => (ParticipantState::Committed, "commit"),
            Outcome::Abort => (ParticipantState::Aborted, "abort"),
        };
        // A few rounds: an abort racing a first prepare may see neither a row nor
        // the prepared state; the next round sees the row.
        for _ in 0..3 {
            let mut tx = self
                .db
                .pool()
                .begin()
                .await
                .map_err(db_err(format!("beginning the {verb} of {tx_id}")))?;
            // The conditional update first: it takes the write lock (SQLite) or the
            // row lock (PostgreSQL), so of two concurrent commits one applies and
            // the other finds the row final.
            let moved = sqlx::query(
                "UPDATE _shoal_2pc_participant SET state = $1, finished_at_ms = $2
                 WHERE resource = $3 AND tx_id = $4 AND state = 'prepared'",
            )
            .bind(to.as_str())
            .bind(now_i64())
            .bind(&self.name)
            .bind(tx_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err(format!("recording the {verb} of {tx_id}")))?
            .rows_affected();
            if moved == 1 {
                let (payload,): (String,) = sqlx::query_as(
                    "SELECT payload FROM _shoal_2pc_participant WHERE resource = $1 AND tx_id = $2",
                )
                .bind(&self.name)
                .bind(tx_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err(format!("reading the payload of {tx_id}")))?;
                let payload: serde_json::Value = serde_json::from_str(&payload).map_err(|e| {
                    Error::internal(format!("the stored payload of {tx_id} is not JSON"))
                        .with_source(e)
                })?;
                match outcome {
                    Outcome::Commit => self.resource.commit(tx_id, &payload, &mut tx).await?,
                    Outcome::Abort => self.resource.abort(tx_id, &payload, &mut tx).await?,
                }
                tx.commit()
                    .await
                    .map_err(db_err(format!("committing the {verb} of {tx_id}")))?;
                tracing::info!(participant = %self.name, tx_id, outcome = outcome.as_str(), "two-phase commit: applied");
                self.reported
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(tx_id);
                return self.final_row(tx_id).await;
            }
            drop(tx);
            match self.row(tx_id).await? {
                Some(s) if s.state == to => return Ok(s), // repeated: nothing to do
                Some(s) if s.state == ParticipantState::Prepared => continue,
                Some(s) => {
                    tracing::error!(participant = %self.name, tx_id, asked = verb, state = s.state.as_str(), "two-phase commit: told an outcome that contradicts the recorded one");
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        Origin::Downstream,
                        format!(
                            "participant {}: transaction {tx_id} is {} here, cannot {verb} it",
                            self.name,
                            s.state.as_str()
                        ),
                    ));
                }
                None if outcome == Outcome::Abort => {
                    if self.record_aborted(tx_id, "", "null").await? {
                        return self.final_row(tx_id).await;
                    }
                }
                None => {
                    tracing::error!(participant = %self.name, tx_id, "two-phase commit: told to commit a transaction never prepared here");
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        Origin::Downstream,
                        format!(
                            "participant {}: transaction {tx_id} was never prepared here, cannot commit it",
                            self.name
                        ),
                    ));
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            Origin::Internal,
            format!(
                "participant {}: the {verb} of {tx_id} kept racing another change; try again",
                self.name
            ),
        ))
    }

    async fn final_row(&self, tx_id: &str) -> Result<ParticipantTx, Error> {
        self.row(tx_id).await?.ok_or_else(|| {
            Error::internal(format!(
                "transaction {tx_id} has no state row after finishing"
            ))
        })
    }

    /// Prepared rows older than `before_ms` (unix ms), oldest first, one batch.
    async fn prepared_before(&self, before_ms: i64) -> Result<Vec<ParticipantTx>, Error> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT tx_id, state, coordinator, prepared_at_ms, finished_at_ms
             FROM _shoal_2pc_participant
             WHERE resource = $1 AND state = 'prepared' AND prepared_at_ms < $2
             ORDER BY prepared_at_ms LIMIT $3",
        )
        .bind(&self.name)
        .bind(before_ms)
        .bind(i64::from(self.cfg.query_batch))
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err(format!(
            "reading prepared transactions of participant {} from {}",
            self.name,
            self.db.label()
        )))?;
        rows.into_iter()
            .map(|(id, s, c, at, fin)| to_tx(id, (s, c, at, fin)))
            .collect()
    }

    /// Ask about every transaction in doubt (all prepared ones if `all`, else those
    /// prepared longer than `in_doubt_after_ms`), apply the answers, and count the
    /// ones stuck past `max_in_doubt_ms`.
    async fn query_round(&self, all: bool) -> Result<Round, Error> {
        let now = now_i64();
        let before = if all {
            i64::MAX
        } else {
            now.saturating_sub(self.cfg.in_doubt_after_ms as i64)
        };
        let rows = self.prepared_before(before).await?;
        let mut round = Round {
            resolved: 0,
            unreachable: false,
        };
        let call_timeout = Duration::from_millis(self.cfg.call_timeout_ms);
        for tx in &rows {
            if self.stop.is_stopped() {
                break;
            }
            let answer = if tx.coordinator.is_empty() {
                Err(Error::internal("no coordinator recorded"))
            } else {
                tokio::time::timeout(call_timeout, self.link.decision(&tx.coordinator, &tx.tx_id))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::new(
                            ErrorKind::Timeout,
                            Origin::Upstream,
                            format!(
                                "coordinator {} did not answer within {} ms",
                                tx.coordinator, self.cfg.call_timeout_ms
                            ),
                        ))
                    })
            };
            let applied = match answer {
                Ok(Decision::Commit) => self.finish(&tx.tx_id, Outcome::Commit).await.map(Some),
                Ok(Decision::Abort) => self.finish(&tx.tx_id, Outcome::Abort).await.map(Some),
                Ok(Decision::Pending) => Ok(None),
                Err(e) => {
                    round.unreachable = true;
                    tracing::warn!(participant = %self.name, tx_id = %tx.tx_id, coordinator = %tx.coordinator, error = %e, "two-phase commit: in doubt, and the coordinator could not be asked");
                    Ok(None)
                }
            };
            match applied {
                Ok(Some(_)) => round.resolved += 1,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(participant = %self.name, tx_id = %tx.tx_id, error = %e, "two-phase commit: applying the coordinator's decision failed");
                }
            }
        }
        self.count_stuck().await?;
        Ok(round)
    }

    async fn count_stuck(&self) -> Result<(), Error> {
        let before = now_i64().saturating_sub(self.cfg.max_in_doubt_ms as i64);
        let stuck = self.prepared_before(before).await?;
        self.stuck.store(stuck.len(), Ordering::Relaxed);
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let now_stuck: HashSet<String> = stuck.iter().map(|t| t.tx_id.clone()).collect();
        for t in &stuck {
            if !reported.contains(&t.tx_id) {
                tracing::error!(
                    participant = %self.name,
                    tx_id = %t.tx_id,
                    coordinator = %t.coordinator,
                    in_doubt_ms = unix_ms().saturating_sub(t.prepared_at_ms),
                    "two-phase commit: transaction stuck in doubt: prepared, holding its change, and no decision from the coordinator; still asking"
                );
            }
        }
        *reported = now_stuck;
        Ok(())
    }

    async fn purge(&self) -> Result<(), Error> {
        let before = now_i64().saturating_sub(self.cfg.retain_finished_ms as i64);
        sqlx::query(
            "DELETE FROM _shoal_2pc_participant
             WHERE resource = $1 AND state <> 'prepared' AND finished_at_ms < $2",
        )
        .bind(&self.name)
        .bind(before)
        .execute(self.db.pool())
        .await
        .map_err(db_err(format!(
            "deleting old transactions of participant {} from {}",
            self.name,
            self.db.label()
        )))?;
        Ok(())
    }

    /// Recovery at start (ask about everything prepared), then a round every
    /// `query_interval_ms`, slower while coordinators cannot be reached.
    async fn query_loop(self: Arc<Self>) {
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let r = self.query_round(first).await;
            let ok = match r {
                Ok(round) => {
                    first = false;
                    !round.unreachable
                }
                Err(e) => {
                    tracing::warn!(participant = %self.name, error = %e, "two-phase commit: round of in-doubt questions failed");
                    false
                }
            };
            if let Err(e) = self.purge().await {
                tracing::warn!(participant = %self.name, error = %e, "two-phase commit: purge failed");
            }
            failures = if ok { 0 } else { failures.saturating_add(1) };
            let base = self.cfg.query_interval_ms;
            let pause = base
                .saturating_mul(1u64 << failures.min(20))
                .min(self.cfg.query_backoff_max_ms);
            if !self.stop.sleep(Duration::from_millis(pause)).await {
                return;
            }
        }
    }
}

/// Why an attempt to prepare ended without preparing.
enum Attempt {
    Prepared,
    /// A row existed already: answer from it.
    Known,
    Refused(&'static str),
}

fn to_tx(tx_id: String, (state, coordinator, at, fin): Row) -> Result<ParticipantTx, Error> {
    Ok(ParticipantTx {
        tx_id,
        state: ParticipantState::parse(&state)?,
        coordinator,
        prepared_at_ms: at.max(0) as u64,
        finished_at_ms: fin.map(|f| f.max(0) as u64),
    })
}
