//! The event store on SQLite, in the service's own database.
//!
//! Appends go through one writer task that commits whatever appends are waiting in
//! one transaction (group commit): with `synchronous = FULL` every commit is an
//! fsync, and 64 writers appending one event each then share a handful of fsyncs
//! instead of paying 64. Each append runs under its own savepoint, so one append's
//! conflict does not undo its neighbours'. SQLite has one writer at a time and
//! positions are assigned in commit order, so the global order a reader sees has
//! no gaps.

use crate::types::{
    conflict, limits, validate_stream_id, Appended, Direction, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent,
};
use crate::upcast::Upcasters;
use shoal_core::{Error, ErrorKind, Origin};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// The columns every read selects, in the order `decode_row` reads them.
macro_rules! columns {
    () => {
        "position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms"
    };
}

/// Appends waiting for the writer, at most.
const WRITE_QUEUE: usize = 4_096;
/// Appends committed in one transaction, at most.
const MAX_GROUP: usize = 512;
/// How often a live subscription looks for events written by another process.
const POLL_EVERY: Duration = Duration::from_millis(500);

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _shoal_es_events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    type_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS _shoal_es_snapshots (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_es_checkpoints (
    projection TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
";

/// The event store; cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    writes: mpsc::Sender<Write>,
    head: watch::Receiver<u64>,
    upcasters: Upcasters,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

struct Write {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<Encoded>,
    reply: oneshot::Sender<Result<Appended, Error>>,
}

/// An event checked and serialized once, as it will be stored.
struct Encoded {
    id: String,
    event_type: String,
    type_version: u32,
    data: String,
    metadata: String,
}

/// A stream's snapshot: state as of a version.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: u64,
    /// The state.
    pub data: serde_json::Value,
}

pub(crate) fn db_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let what = what.into();
    move |e| {
        let corrupt = e.as_database_error().is_some_and(|d| {
            d.message().contains("not a database") || d.message().contains("malformed")
        });
        let what = if corrupt {
            format!("{what}: the database file is corrupt or not a SQLite database")
        } else {
            what
        };
        Error::new(ErrorKind::Io, Origin::Internal, what).with_source(e)
    }
}

impl EventStore {
    /// The store in `pool`'s database (its tables are made if missing), with
    /// `upcasters` applied to every event read.
    pub async fn open(pool: SqlitePool, upcasters: Upcasters) -> Result<Self, Error> {
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(db_err("creating the event store's tables"))?;
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events")
                .fetch_one(&pool)
                .await
                .map_err(db_err("reading the event store's head"))?;
        let (head_tx, head_rx) = watch::channel(head as u64);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = tokio::spawn(write_loop(pool.clone(), rx, head_tx));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                writes: tx,
                head: head_rx,
                upcasters,
                writer,
            }),
        })
    }

    /// The database the store lives in (projections write their read models here).
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The position of the last event committed.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// Sees every new head position.
    pub(crate) fn head_watch(&self) -> watch::Receiver<u64> {
        self.inner.head.clone()
    }

    /// Append `events` to `stream` if its version is `expected`; durable (fsynced)
    /// when this returns. A `Conflict` error when the version differs. Appending
    /// events whose ids were already appended to this stream (a retry after a lost
    /// answer) appends nothing and answers as the first time did.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        validate_stream_id(stream)?;
        let events = encode_events(events)?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .writes
            .send(Write {
                stream: stream.to_string(),
                expected,
                events,
                reply,
            })
            .await
            .map_err(|_| Error::internal("the event store's writer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::internal("the event store's writer dropped an append"))?
    }

    /// The version of `stream` (0 when it has no events).
    pub async fn stream_version(&self, stream: &str) -> Result<u64, Error> {
        validate_stream_id(stream)?;
        let v: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = ?",
        )
        .bind(stream)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(db_err(format!("reading the version of stream {stream}")))?;
        Ok(v as u64)
    }

    /// Up to `max` events of `stream`: forwards from version `from` (inclusive), or
    /// backwards from `from` (inclusive; `u64::MAX` for the newest).
    pub async fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: Direction,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, Error> {
        validate_stream_id(stream)?;
        let from = from.min(i64::MAX as u64) as i64;
        let sql = match direction {
            Direction::Forwards => concat!(
                "SELECT ",
                columns!(),
                " FROM _shoal_es_events WHERE stream = ? AND version >= ? ORDER BY version ASC LIMIT ?"
            ),
            Direction::Backwards => concat!(
                "SELECT ",
                columns!(),
                " FROM _shoal_es_events WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT ?"
            ),
        };
        let rows = sqlx::query(sql)
            .bind(stream)
            .bind(from)
            .bind(max.min(limits::MAX_READ) as i64)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db_err(format!("reading stream {stream}")))?;
        rows.iter().map(|r| self.decode_row(r)).collect()
    }

    /// Up to `max` events of every stream, in global order, after position `after`
    /// (0 for the start).
    pub async fn read_all(&self, after: u64, max: usize) -> Result<Vec<RecordedEvent>, Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM _shoal_es_events WHERE position > ? ORDER BY position ASC LIMIT ?"
        ))
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(max.min(limits::MAX_READ) as i64)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(db_err("reading all events"))?;
        rows.iter().map(|r| self.decode_row(r)).collect()
    }

    /// Every event after `after`, then each new one as it is committed (catch-up,
    /// then live).
    pub fn subscribe(&self, after: u64) -> Subscription {
        Subscription {
            store: self.clone(),
            after,
            buffer: std::collections::VecDeque::new(),
            head: self.inner.head.clone(),
        }
    }

    /// Keep `data` as `stream`'s state at `version`.
    pub async fn save_snapshot(
        &self,
        stream: &str,
        version: u64,
        data: &serde_json::Value,
    ) -> Result<(), Error> {
        validate_stream_id(stream)?;
        sqlx::query(
            "INSERT INTO _shoal_es_snapshots (stream, version, data, recorded_at_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (stream) DO UPDATE SET version = excluded.version, data = excluded.data,
             recorded_at_ms = excluded.recorded_at_ms WHERE excluded.version >= _shoal_es_snapshots.version",
        )
        .bind(stream)
        .bind(version as i64)
        .bind(data.to_string())
        .bind(shoal_core::unix_ms() as i64)
        .execute(&self.inner.pool)
        .await
        .map_err(db_err(format!("saving a snapshot of stream {stream}")))?;
        Ok(())
    }

    /// `stream`'s latest snapshot.
    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, Error> {
        validate_stream_id(stream)?;
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT version, data FROM _shoal_es_snapshots WHERE stream = ?")
                .bind(stream)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(db_err(format!("loading the snapshot of stream {stream}")))?;
        row.map(|(version, data)| {
            Ok(Snapshot {
                version: version as u64,
                data: serde_json::from_str(&data).map_err(|e| {
                    Error::new(
                        ErrorKind::Protocol,
                        Origin::Internal,
                        format!("the snapshot of stream {stream} is not JSON"),
                    )
                    .with_source(e)
                })?,
            })
        })
        .transpose()
    }

    fn decode_row(&self, r: &SqliteRow) -> Result<RecordedEvent, Error> {
        decode_row(r, &self.inner.upcasters)
    }
}

fn corrupt_row(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Protocol,
        Origin::Internal,
        format!("a stored event's {what} cannot be read"),
    )
    .with_source(e)
}

pub(crate) fn decode_row(r: &SqliteRow, upcasters: &Upcasters) -> Result<RecordedEvent, Error> {
    let get_i64 = |i: usize, c: &str| r.try_get::<i64, _>(i).map_err(|e| corrupt_row(c, e));
    let get_str = |i: usize, c: &str| r.try_get::<String, _>(i).map_err(|e| corrupt_row(c, e));
    let event_type = get_str(4, "event_type")?;
    let data: serde_json::Value =
        serde_json::from_str(&get_str(6, "data")?).map_err(|e| corrupt_row("data", e))?;
    let raw_metadata = get_str(7, "metadata")?;
    let metadata: Metadata = if raw_metadata == "{}" {
        Metadata::default()
    } else {
        serde_json::from_str(&raw_metadata).map_err(|e| corrupt_row("metadata", e))?
    };
    let (type_version, data) =
        upcasters.upcast(&event_type, get_i64(5, "type_version")? as u32, data)?;
    Ok(RecordedEvent {
        position: get_i64(0, "position")? as u64,
        stream: get_str(1, "stream")?,
        version: get_i64(2, "version")? as u64,
        id: get_str(3, "id")?,
        event_type,
        type_version,
        data,
        metadata,
        recorded_at_ms: get_i64(8, "recorded_at_ms")? as u64,
    })
}

/// Check every event and serialize it once, as it will be stored.
fn encode_events(events: Vec<NewEvent>) -> Result<Vec<Encoded>, Error> {
    let bad = |msg: String| Err(Error::new(ErrorKind::InvalidInput, Origin::Downstream, msg));
    if events.is_empty() || events.len() > limits::MAX_EVENTS_PER_APPEND {
        return bad(format!(
            "an append carries 1 to {} events, not {}",
            limits::MAX_EVENTS_PER_APPEND,
            events.len()
        ));
    }
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        if e.event_type.is_empty()
            || e.event_type.len() > limits::MAX_EVENT_TYPE_LEN
            || !e.event_type.bytes().all(|b| b.is_ascii_graphic())
        {
            return bad(format!("event type {:?} is not a valid name", e.event_type));
        }
        if e.id.is_empty() || e.id.len() > 200 {
            return bad(format!("event id {:?} must be 1 to 200 characters", e.id));
        }
        let data = e.data.to_string();
        // Metadata is strings in maps: encoding cannot fail.
        let metadata = serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".to_string());
        let size = data.len() + metadata.len();
        if size > limits::MAX_EVENT_BYTES {
            return bad(format!(
                "event {} is {size} bytes; the limit is {}",
                e.event_type,
                limits::MAX_EVENT_BYTES
            ));
        }
        out.push(Encoded {
            id: e.id,
            event_type: e.event_type,
            type_version: e.type_version,
            data,
            metadata,
        });
    }
    Ok(out)
}

/// The writer: group commit of whatever appends are waiting.
async fn write_loop(pool: SqlitePool, mut rx: mpsc::Receiver<Write>, head: watch::Sender<u64>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        let results = commit_group(&pool, &group).await;
        let mut last = None;
        for (w, r) in group.into_iter().zip(results) {
            if let Ok(a) = &r {
                last = Some(last.unwrap_or(0).max(a.position));
            }
            let _ = w.reply.send(r);
        }
        if let Some(p) = last {
            head.send_if_modified(|h| {
                let changed = p > *h;
                *h = (*h).max(p);
                changed
            });
        }
    }
}

async fn commit_group(pool: &SqlitePool, group: &[Write]) -> Vec<Result<Appended, Error>> {
    let fail_all = |e: &Error| {
        group
            .iter()
            .map(|_| Err(Error::new(e.kind(), e.origin(), e.to_string())))
            .collect::<Vec<_>>()
    };
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return fail_all(&db_err("acquiring a connection to append")(e)),
    };
    if let Err(e) = sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await {
        return fail_all(&db_err("starting an append transaction")(e));
    }
    let results = match append_group(&mut conn, group).await {
        Ok(results) => results,
        Err(GroupError::Fatal(e)) => {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return fail_all(&e);
        }
        // The group's insert was refused as a whole (an event id used twice) and
        // undone: append one by one so only the offending append fails. No
        // savepoints are needed here: every check happens before an append writes,
        // and its one INSERT writes all its events or (SQLite undoes a failed
        // statement) none.
        Err(GroupError::OneByOne) => {
            let mut results = Vec::with_capacity(group.len());
            for w in group {
                results.push(append_one(&mut conn, w).await);
            }
            results
        }
    };
    if let Err(e) = sqlx::raw_sql("COMMIT").execute(&mut *conn).await {
        let e = db_err("committing appends")(e);
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return fail_all(&e);
    }
    results
}

enum GroupError {
    Fatal(Error),
    OneByOne,
}

/// Rows per INSERT statement: 8 values each, under SQLite's 32,766 variables. Tests
/// use a tiny one so that groups of several statements (and their savepoint) are
/// exercised by every larger append.
const ROWS_PER_INSERT: usize = if cfg!(test) { 3 } else { 4_000 };

/// The whole group in a few statements: one query for the streams' versions, one
/// for repeated appends, then every accepted event in one INSERT (a few for a very
/// large group). With sqlx every statement is a round trip to SQLite's thread, so
/// the group costs about as much as one append.
async fn append_group(
    conn: &mut SqliteConnection,
    group: &[Write],
) -> Result<Vec<Result<Appended, Error>>, GroupError> {
    use std::collections::HashMap;
    let fatal = |what: &'static str| move |e: sqlx::Error| GroupError::Fatal(db_err(what)(e));

    // One query for the versions of the group's streams (kind 0) and the appends
    // whose first or last event is stored already (kind 1: retries).
    let mut streams: Vec<&str> = group.iter().map(|w| w.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let ids: Vec<&str> = group
        .iter()
        .flat_map(|w| {
            [
                w.events[0].id.as_str(),
                w.events[w.events.len() - 1].id.as_str(),
            ]
        })
        .collect();
    // One sub-select per stream: SQLite answers `MAX(version)` for one stream from
    // the end of the (stream, version) index, where a GROUP BY over an IN list would
    // walk every event of every stream in it.
    let mut sql = String::new();
    for _ in &streams {
        sql.push_str(
            "SELECT 0, ?, '', (SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = ?), 0 UNION ALL ",
        );
    }
    sql.push_str(&format!(
        "SELECT 1, id, stream, version, position FROM _shoal_es_events WHERE id IN ({})",
        vec!["?"; ids.len()].join(",")
    ));
    let mut q = sqlx::query_as::<_, (i64, String, String, i64, i64)>(sqlx::AssertSqlSafe(sql));
    for st in &streams {
        q = q.bind(*st).bind(*st);
    }
    for id in &ids {
        q = q.bind(*id);
    }
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut stored: HashMap<String, (String, u64, u64)> = HashMap::new();
    for (kind, key, stream, version, position) in q
        .fetch_all(&mut *conn)
        .await
        .map_err(fatal("checking the group's appends"))?
    {
        if kind == 0 {
            versions.insert(key, version as u64);
        } else {
            stored.insert(key, (stream, version as u64, position as u64));
        }
    }

    // Decide each append in order, as if appended one by one.
    enum Plan {
        Done(Result<Appended, Error>),
        Insert { version: u64, rows_before: usize },
        SameAs(usize),
    }
    let mut plans = Vec::with_capacity(group.len());
    let mut rows = 0usize;
    let mut first_ids: HashMap<&str, usize> = HashMap::new();
    for (i, w) in group.iter().enumerate() {
        let first_id = w.events[0].id.as_str();
        if let Some((stream, _, _)) = stored.get(first_id) {
            let last = stored.get(w.events[w.events.len() - 1].id.as_str());
            plans.push(Plan::Done(repeated(w, stream, last)));
            continue;
        }
        if let Some(&j) = first_ids.get(first_id) {
            plans.push(Plan::SameAs(j));
            continue;
        }
        let current = versions.get(&w.stream).copied().unwrap_or(0);
        let ok = match w.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        };
        if !ok {
            plans.push(Plan::Done(Err(conflict(&w.stream, w.expected, current))));
            continue;
        }
        versions.insert(w.stream.clone(), current + w.events.len() as u64);
        first_ids.insert(first_id, i);
        plans.push(Plan::Insert {
            version: current,
            rows_before: rows,
        });
        rows += w.events.len();
    }

    // Every accepted event, in order; positions follow one another.
    let mut first_position = 0u64;
    if rows > 0 {
        // One statement is undone by SQLite itself when it fails; several need a
        // savepoint to be undone together.
        let several = rows > ROWS_PER_INSERT;
        if several {
            sqlx::raw_sql("SAVEPOINT group_insert")
                .execute(&mut *conn)
                .await
                .map_err(fatal("starting the group's insert"))?;
        }
        let now = shoal_core::unix_ms() as i64;
        let mut pending: Vec<(&Write, u64, &Encoded, u64)> = Vec::with_capacity(rows);
        for (w, plan) in group.iter().zip(&plans) {
            if let Plan::Insert { version, .. } = plan {
                for (k, e) in w.events.iter().enumerate() {
                    pending.push((w, *version, e, k as u64 + 1));
                }
            }
        }
        let mut last_position = 0i64;
        for chunk in pending.chunks(ROWS_PER_INSERT) {
            match insert_rows(conn, chunk, now).await {
                Ok(p) => last_position = p,
                Err(e)
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) =>
                {
                    if several {
                        sqlx::raw_sql("ROLLBACK TO group_insert; RELEASE group_insert")
                            .execute(&mut *conn)
                            .await
                            .map_err(fatal("undoing the group's insert"))?;
                    }
                    return Err(GroupError::OneByOne);
                }
                Err(e) => return Err(fatal("appending events")(e)),
            }
        }
        if several {
            sqlx::raw_sql("RELEASE group_insert")
                .execute(&mut *conn)
                .await
                .map_err(fatal("finishing the group's insert"))?;
        }
        first_position = last_position as u64 + 1 - rows as u64;
    }

    let mut results: Vec<Result<Appended, Error>> = Vec::with_capacity(group.len());
    for (w, plan) in group.iter().zip(plans) {
        let r = match plan {
            Plan::Done(r) => r,
            Plan::Insert {
                version,
                rows_before,
            } => Ok(Appended {
                version: version + w.events.len() as u64,
                position: first_position + (rows_before + w.events.len()) as u64 - 1,
            }),
            Plan::SameAs(j) => match &results[j] {
                Ok(a) => Ok(*a),
                Err(e) => Err(Error::new(e.kind(), e.origin(), e.to_string())),
            },
        };
        results.push(r);
    }
    Ok(results)
}

/// Insert rows (append, its base version, event, offset in the append) in one
/// statement; the position of the last row.
async fn insert_rows(
    conn: &mut SqliteConnection,
    rows: &[(&Write, u64, &Encoded, u64)],
    now: i64,
) -> Result<i64, sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO _shoal_es_events
         (stream, version, id, event_type, type_version, data, metadata, recorded_at_ms) VALUES ",
    );
    for i in 0..rows.len() {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)");
    }
    // Built from fixed fragments only; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (w, base, e, k) in rows {
        q = q
            .bind(&w.stream)
            .bind((base + k) as i64)
            .bind(&e.id)
            .bind(&e.event_type)
            .bind(e.type_version as i64)
            .bind(&e.data)
            .bind(&e.metadata)
            .bind(now);
    }
    Ok(q.execute(&mut *conn).await?.last_insert_rowid())
}

/// The answer to an append whose first event is stored already: the same answer
/// as the first time when it is the same append, a conflict otherwise.
fn repeated(w: &Write, stream: &str, last: Option<&(String, u64, u64)>) -> Result<Appended, Error> {
    if stream != w.stream {
        return Err(Error::new(
            ErrorKind::Conflict,
            Origin::Downstream,
            format!(
                "event id {} is already used in stream {stream}",
                w.events[0].id
            ),
        ));
    }
    match last {
        Some((s, version, position)) if *s == w.stream => Ok(Appended {
            version: *version,
            position: *position,
        }),
        _ => Err(Error::new(
            ErrorKind::Conflict,
            Origin::Downstream,
            format!(
                "stream {}: an append repeats event id {} but not the events that came with it",
                w.stream, w.events[0].id
            ),
        )),
    }
}

/// One append alone (after its group was refused): the same decisions as
/// [`append_group`], in as few statements as one append allows.
async fn append_one(conn: &mut SqliteConnection, w: &Write) -> Result<Appended, Error> {
    let first_id = w.events[0].id.as_str();
    let last_id = w.events[w.events.len() - 1].id.as_str();
    let stored: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT id, stream, version, position FROM _shoal_es_events WHERE id IN (?, ?)",
    )
    .bind(first_id)
    .bind(last_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err("checking for a repeated append"))?;
    let find = |id: &str| {
        stored
            .iter()
            .find(|r| r.0 == id)
            .map(|r| (r.1.clone(), r.2 as u64, r.3 as u64))
    };
    if let Some((stream, _, _)) = find(first_id) {
        return repeated(w, &stream, find(last_id).as_ref());
    }
    let current: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = ?",
    )
    .bind(&w.stream)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err(format!(
        "reading the version of stream {}",
        w.stream
    )))?;
    let current = current as u64;
    let ok = match w.expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => current == 0,
        ExpectedVersion::Exact(v) => current == v,
    };
    if !ok {
        return Err(conflict(&w.stream, w.expected, current));
    }
    let rows: Vec<_> = w
        .events
        .iter()
        .enumerate()
        .map(|(k, e)| (w, current, e, k as u64 + 1))
        .collect();
    let position = insert_rows(conn, &rows, shoal_core::unix_ms() as i64)
        .await
        .map_err(|err| {
            if err
                .as_database_error()
                .is_some_and(|d| d.is_unique_violation())
            {
                Error::new(
                    ErrorKind::Conflict,
                    Origin::Downstream,
                    format!(
                        "stream {}: an event id in this append is used already",
                        w.stream
                    ),
                )
            } else {
                db_err(format!("appending to stream {}", w.stream))(err)
            }
        })?;
    Ok(Appended {
        version: current + w.events.len() as u64,
        position: position as u64,
    })
}

/// Events after a position: what is stored, then what is committed next.
pub struct Subscription {
    store: EventStore,
    after: u64,
    buffer: std::collections::VecDeque<RecordedEvent>,
    head: watch::Receiver<u64>,
}

impl Subscription {
    /// The next event, waiting for one when caught up.
    pub async fn next(&mut self) -> Result<RecordedEvent, Error> {
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.after = e.position;
                return Ok(e);
            }
            let batch = self.store.read_all(self.after, 1_000).await?;
            if !batch.is_empty() {
                self.buffer.extend(batch);
                continue;
            }
            // Caught up: wait for this process's writer to commit more, or look
            // again shortly for another process's writes.
            let after = self.after;
            let writer_gone = matches!(
                tokio::time::timeout(POLL_EVERY, self.head.wait_for(|h| *h > after))
                    .await
                    .map(|r| r.is_err()),
                Ok(true)
            );
            if writer_gone {
                // The writer is gone (the store is shutting down): poll only.
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
    }

    /// The position of the last event returned.
    pub fn position(&self) -> u64 {
        self.after
    }
}
