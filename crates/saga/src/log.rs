//! The saga log: one row per saga (where it stands, its data) and one row per
//! transition (its history), in the orchestrating service's own database.
//!
//! Every transition is durable before the saga moves on. Writes from all running
//! sagas go through one writer task that commits whatever is queued in one
//! transaction (group commit): a thousand sagas in flight pay for a few fsyncs, not
//! a thousand.

use shoal_core::trace::TraceContext;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::{db_err, Db};
use shoal_telemetry::Tracer;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

const SQLITE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS _shoal_saga (
    id TEXT PRIMARY KEY,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    stuck INTEGER NOT NULL,
    data TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    error TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS _shoal_saga_unfinished ON _shoal_saga (saga, status)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS _shoal_saga_history (
    saga_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
";

const POSTGRES_TABLES: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_saga'));
CREATE TABLE IF NOT EXISTS _shoal_saga (
    id TEXT PRIMARY KEY,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    step BIGINT NOT NULL,
    stuck BIGINT NOT NULL,
    data TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    error TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS _shoal_saga_unfinished ON _shoal_saga (saga, status)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS _shoal_saga_history (
    saga_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    step TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
COMMIT;
";

/// Where a saga stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Going forward: `step` is the next step to run.
    Running,
    /// Undoing: `step` steps remain to compensate, the last of them next.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every step before it was compensated.
    Compensated,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            other => {
                return Err(Error::internal(format!(
                    "saga log: unknown status {other:?} (a newer version's row, or a damaged one)"
                )))
            }
        })
    }

    /// Whether the saga has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

/// A saga's row.
#[derive(Clone, Debug)]
pub(crate) struct SagaRow {
    pub(crate) id: String,
    pub(crate) status: Status,
    pub(crate) step: usize,
    pub(crate) stuck: bool,
    pub(crate) data: String,
    pub(crate) correlation_id: String,
    pub(crate) error: Option<String>,
    /// The next history sequence number.
    pub(crate) next_seq: i64,
    /// The trace the saga continues (the request that started it) and where its
    /// step spans go; kept in the `started` history entry, not in the row.
    pub(crate) trace: Option<(TraceContext, Tracer)>,
}

/// One transition, written with the row it leads to.
pub(crate) struct Transition {
    pub(crate) row: SagaRow,
    pub(crate) step_name: String,
    pub(crate) event: &'static str,
    pub(crate) detail: Option<String>,
    /// The first write of a saga: an insert (which finds out whether the id is
    /// taken) rather than an update.
    pub(crate) insert: Option<String>,
}

type Reply = oneshot::Sender<Result<bool, Error>>;

/// Queued writes at most; a full queue holds back the sagas that write, not memory.
const QUEUE: usize = 4_096;
/// Transitions in one transaction at most.
const BATCH: usize = 512;

/// The writer's handle.
#[derive(Clone)]
pub(crate) struct SagaLog {
    db: Db,
    tx: mpsc::Sender<(Transition, Reply)>,
}

impl SagaLog {
    /// Make the tables if missing and start the writer.
    pub(crate) async fn open(db: &Db) -> Result<Self, Error> {
        db.ensure_tables(SQLITE_TABLES, POSTGRES_TABLES, "the saga log's tables")
            .await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(db.clone(), rx));
        Ok(Self { db: db.clone(), tx })
    }

    /// Write `t` durably. For an insert: `false` when the id was already taken
    /// (nothing written).
    pub(crate) async fn write(&self, t: Transition) -> Result<bool, Error> {
        let (reply, rx) = oneshot::channel();
        let closed = || Error::unavailable("saga log: the writer has stopped");
        self.tx.send((t, reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// The unfinished sagas of definition `saga`.
    pub(crate) async fn unfinished(&self, saga: &str) -> Result<Vec<SagaRow>, Error> {
        let rows = sqlx::query(
            "SELECT s.id, s.status, s.step, s.stuck, s.data, s.correlation_id, s.error,
                    (SELECT COALESCE(MAX(h.seq), -1) FROM _shoal_saga_history h WHERE h.saga_id = s.id)
             FROM _shoal_saga s WHERE s.saga = $1 AND s.status IN ('running', 'compensating')
             ORDER BY s.created_at_ms",
        )
        .bind(saga)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err("saga log: reading unfinished sagas"))?;
        rows.iter().map(row_from).collect()
    }

    /// One saga's row and history.
    pub(crate) async fn get(
        &self,
        id: &str,
    ) -> Result<Option<(String, SagaRow, Vec<HistoryEntry>)>, Error> {
        let row = sqlx::query(
            "SELECT s.id, s.status, s.step, s.stuck, s.data, s.correlation_id, s.error,
                    (SELECT COALESCE(MAX(h.seq), -1) FROM _shoal_saga_history h WHERE h.saga_id = s.id),
                    s.saga
             FROM _shoal_saga s WHERE s.id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_err(format!("saga log: reading saga {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let saga: String = row.try_get(8).map_err(db_err("saga log: a saga row"))?;
        let parsed = row_from(&row)?;
        let history = sqlx::query(
            "SELECT step, event, detail, at_ms FROM _shoal_saga_history WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_err(format!("saga log: reading the history of saga {id}")))?
        .iter()
        .map(|r| {
            Ok(HistoryEntry {
                step: r.try_get(0)?,
                event: r.try_get(1)?,
                detail: r.try_get(2)?,
                at_ms: r.try_get::<i64, _>(3)? as u64,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(db_err("saga log: a history row"))?;
        Ok(Some((saga, parsed, history)))
    }
}

fn row_from(r: &sqlx::any::AnyRow) -> Result<SagaRow, Error> {
    let get = || -> Result<_, sqlx::Error> {
        Ok((
            r.try_get::<String, _>(0)?,
            r.try_get::<String, _>(1)?,
            r.try_get::<i64, _>(2)?,
            r.try_get::<i64, _>(3)?,
            r.try_get::<String, _>(4)?,
            r.try_get::<String, _>(5)?,
            r.try_get::<Option<String>, _>(6)?,
            r.try_get::<i64, _>(7)?,
        ))
    };
    let (id, status, step, stuck, data, correlation_id, error, max_seq) =
        get().map_err(db_err("saga log: a saga row"))?;
    Ok(SagaRow {
        id,
        status: Status::parse(&status)?,
        step: usize::try_from(step)
            .map_err(|_| Error::internal(format!("saga log: step {step} is negative")))?,
        stuck: stuck != 0,
        data,
        correlation_id,
        error,
        next_seq: max_seq + 1,
        trace: None,
    })
}

/// One line of a saga's history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HistoryEntry {
    /// The step it concerns (the saga's name for its start and end).
    pub step: String,
    /// What happened: `started`, `done`, `rejected`, `failed`, `compensated`,
    /// `stuck`, `completed`, `compensating`.
    pub event: String,
    /// Why, for failures.
    pub detail: Option<String>,
    /// When (Unix ms).
    pub at_ms: u64,
}

async fn writer(db: Db, mut rx: mpsc::Receiver<(Transition, Reply)>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return; // every handle is gone
        }
        let outcome = write_batch(&db, &batch).await;
        match outcome {
            Ok(inserted) => {
                for ((_, reply), ok) in batch.drain(..).zip(inserted) {
                    let _ = reply.send(Ok(ok));
                }
            }
            Err(e) => {
                // The whole transaction rolled back: every saga in it hears so and
                // tries again; nothing of the batch was written.
                let msg = e.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(Error::new(
                        ErrorKind::Io,
                        Origin::Internal,
                        format!("saga log: writing a transition: {msg}"),
                    )
                    .with_retryable(true)));
                }
            }
        }
    }
}

async fn write_batch(db: &Db, batch: &[(Transition, Reply)]) -> Result<Vec<bool>, Error> {
    let err = || db_err("saga log: writing transitions");
    let mut tx = db.pool().begin().await.map_err(err())?;
    let now = shoal_core::unix_ms() as i64;
    let mut written = Vec::with_capacity(batch.len());
    for (t, _) in batch {
        let r = &t.row;
        let ok = if let Some(saga) = &t.insert {
            let n = sqlx::query(
                "INSERT INTO _shoal_saga (id, saga, status, step, stuck, data, correlation_id,
                     error, created_at_ms, updated_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&r.id)
            .bind(saga)
            .bind(r.status.as_str())
            .bind(r.step as i64)
            .bind(i64::from(r.stuck))
            .bind(&r.data)
            .bind(&r.correlation_id)
            .bind(r.error.as_deref())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err())?
            .rows_affected();
            n == 1
        } else {
            sqlx::query(
                "UPDATE _shoal_saga SET status = $1, step = $2, stuck = $3, data = $4, error = $5,
                     updated_at_ms = $6 WHERE id = $7",
            )
            .bind(r.status.as_str())
            .bind(r.step as i64)
            .bind(i64::from(r.stuck))
            .bind(&r.data)
            .bind(r.error.as_deref())
            .bind(now)
            .bind(&r.id)
            .execute(&mut *tx)
            .await
            .map_err(err())?;
            true
        };
        if ok {
            sqlx::query(
                "INSERT INTO _shoal_saga_history (saga_id, seq, step, event, detail, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&r.id)
            .bind(r.next_seq)
            .bind(&t.step_name)
            .bind(t.event)
            .bind(t.detail.as_deref())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err())?;
        }
        written.push(ok);
    }
    tx.commit().await.map_err(err())?;
    Ok(written)
}
