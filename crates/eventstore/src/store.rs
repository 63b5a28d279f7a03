//! The event store's API, over either backend of the service's database.
//!
//! Appends go through one writer task per store that commits whatever appends are
//! waiting in one transaction (group commit): every commit is an fsync, and 64
//! writers appending one event each then share a handful of fsyncs instead of paying
//! 64. How each backend keeps the global order free of gaps is in its module:
//! [`crate::sqlite`] (one writer at a time by SQLite's design) and
//! [`crate::postgres`] (appends serialised by a transaction-scoped advisory lock).
//! Reads are the same SQL on both.

use crate::types::{
    conflict, limits, validate_stream_id, Appended, Direction, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent,
};
use crate::upcast::Upcasters;
use crate::{postgres, sqlite, TRACEPARENT_KEY};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_db::{Db, Native};
use sqlx::Row;
use std::collections::HashMap;
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

/// Run `$body` with `$pool` bound to the backend's own pool: the same sqlx code,
/// type-checked once per backend.
macro_rules! on_pool {
    ($native:expr, $pool:ident => $body:expr) => {
        match $native {
            Native::Sqlite($pool) => $body,
            Native::Postgres($pool) => $body,
        }
    };
}

/// Appends waiting for the writer, at most.
const WRITE_QUEUE: usize = 4_096;
/// Appends committed in one transaction, at most.
const MAX_GROUP: usize = 512;
/// How often a live subscription looks for events written by another process (on
/// PostgreSQL, a notification usually tells it sooner).
const POLL_EVERY: Duration = Duration::from_millis(500);

/// The event store; cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    writes: mpsc::Sender<Write>,
    head: watch::Receiver<u64>,
    upcasters: Upcasters,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One append waiting for the writer.
pub(crate) struct Write {
    pub(crate) stream: String,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<Encoded>,
    reply: oneshot::Sender<Result<Appended, Error>>,
}

/// An event checked and serialized once, as it will be stored.
pub(crate) struct Encoded {
    pub(crate) id: String,
    pub(crate) event_type: String,
    pub(crate) type_version: u32,
    pub(crate) data: String,
    pub(crate) metadata: String,
}

/// A stream's snapshot: state as of a version.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The stream version the state includes.
    pub version: u64,
    /// The state.
    pub data: serde_json::Value,
}

pub(crate) use shoal_db::db_err;

impl EventStore {
    /// The store in the service's database `db` (its tables are made if missing),
    /// with `upcasters` applied to every event read.
    pub async fn open(db: &Db, upcasters: Upcasters) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let mut tasks = Vec::new();
        let head_rx = match db.native() {
            Native::Sqlite(pool) => {
                let head = sqlite::prepare(pool).await?;
                let (head_tx, head_rx) = watch::channel(head);
                let pool = pool.clone();
                tasks.push(tokio::spawn(write_loop(
                    rx,
                    Arc::new(head_tx),
                    move |group| {
                        let pool = pool.clone();
                        async move {
                            let results = sqlite::commit_group(&pool, &group).await;
                            (group, results)
                        }
                    },
                )));
                head_rx
            }
            Native::Postgres(pool) => {
                let (head, channel) = postgres::prepare(pool).await?;
                let (head_tx, head_rx) = watch::channel(head);
                let head_tx = Arc::new(head_tx);
                tasks.push(tokio::spawn(postgres::listen(
                    pool.clone(),
                    channel.clone(),
                    head_tx.clone(),
                )));
                let pool = pool.clone();
                let channel: Arc<str> = channel.into();
                let conn = postgres::WriterConn::default();
                tasks.push(tokio::spawn(write_loop(rx, head_tx, move |group| {
                    let (pool, conn, channel) = (pool.clone(), conn.clone(), channel.clone());
                    async move {
                        let results = postgres::commit_group(&pool, &conn, &channel, &group).await;
                        (group, results)
                    }
                })));
                head_rx
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db: db.clone(),
                writes: tx,
                head: head_rx,
                upcasters,
                tasks,
            }),
        })
    }

    /// The database the store lives in (projections write their read models here).
    pub fn db(&self) -> &Db {
        &self.inner.db
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
    /// when this returns. A `Conflict` error when the version differs. Sending an
    /// append again after a lost answer appends nothing and answers as the first
    /// time did: it is recognised by its first and last event ids, stored in this
    /// stream at versions `v+1` and `v+n` for `Exact(v)` (`NoStream`: 1 and n),
    /// and, for `Any`, while it is the stream's latest append
    /// (`docs/eventstore.md` has the whole rule). Event ids are not otherwise
    /// checked for uniqueness.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        validate_stream_id(stream)?;
        let mut events = events;
        // Events written while handling a request remember its trace: what they
        // cause later (a projection's message, a consumer's work) continues it.
        if let Some(ctx) = shoal_telemetry::RequestContext::current() {
            let tp = ctx.trace.to_header();
            for e in &mut events {
                e.metadata
                    .extra
                    .entry(TRACEPARENT_KEY.to_string())
                    .or_insert_with(|| tp.clone());
            }
        }
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
        let v: i64 = on_pool!(self.inner.db.native(), pool => sqlx::query_scalar(
            "SELECT COALESCE(MAX(last_version), 0) FROM _shoal_es_appends WHERE stream = $1",
        )
        .bind(stream)
        .fetch_one(pool)
        .await)
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
        if max == 0 {
            return Ok(Vec::new());
        }
        let max = max.min(limits::MAX_READ) as i64;
        let from = from.min(i64::MAX as u64) as i64;
        // A stream's events are found through its appends (one row per append, see
        // `crate::sqlite`): each append's events are at the positions from its
        // first, one per version. A stream's versions have no gaps, so a page is
        // the versions from..from+max-1 (forwards) or from-max+1..from, from at
        // most the stream's version (backwards): only the appends holding them are
        // read, found through their key, and only those rows are sorted
        // ([`read_sql`]).
        let pg = matches!(self.inner.db.native(), Native::Postgres(_));
        let (sql, lo, hi) = match direction {
            Direction::Forwards => {
                let lo = from.max(1);
                (read_sql(pg, true), lo, lo.saturating_add(max - 1))
            }
            Direction::Backwards => (read_sql(pg, false), from, max),
        };
        let up = &self.inner.upcasters;
        on_pool!(self.inner.db.native(), pool => {
            let rows = sqlx::query(sql)
                .bind(stream)
                .bind(lo)
                .bind(hi)
                .bind(max)
                .fetch_all(pool)
                .await
                .map_err(db_err(format!("reading stream {stream}")))?;
            rows.iter().map(|r| decode_row(r, up)).collect()
        })
    }

    /// Up to `max` events of every stream, in global order, after position `after`
    /// (0 for the start).
    pub async fn read_all(&self, after: u64, max: usize) -> Result<Vec<RecordedEvent>, Error> {
        let after = after.min(i64::MAX as u64) as i64;
        let max = max.min(limits::MAX_READ) as i64;
        let up = &self.inner.upcasters;
        on_pool!(self.inner.db.native(), pool => {
            let rows = sqlx::query(concat!(
                "SELECT ",
                columns!(),
                " FROM _shoal_es_events WHERE position > $1 ORDER BY position ASC LIMIT $2"
            ))
            .bind(after)
            .bind(max)
            .fetch_all(pool)
            .await
            .map_err(db_err("reading all events"))?;
            rows.iter().map(|r| decode_row(r, up)).collect()
        })
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
        let data = data.to_string();
        on_pool!(self.inner.db.native(), pool => sqlx::query(
            "INSERT INTO _shoal_es_snapshots (stream, version, data, recorded_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (stream) DO UPDATE SET version = excluded.version, data = excluded.data,
             recorded_at_ms = excluded.recorded_at_ms WHERE excluded.version >= _shoal_es_snapshots.version",
        )
        .bind(stream)
        .bind(version as i64)
        .bind(&data)
        .bind(shoal_core::unix_ms() as i64)
        .execute(pool)
        .await
        .map(|_| ()))
        .map_err(db_err(format!("saving a snapshot of stream {stream}")))
    }

    /// `stream`'s latest snapshot.
    pub async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, Error> {
        validate_stream_id(stream)?;
        let row: Option<(i64, String)> = on_pool!(self.inner.db.native(), pool =>
            sqlx::query_as("SELECT version, data FROM _shoal_es_snapshots WHERE stream = $1")
                .bind(stream)
                .fetch_optional(pool)
                .await)
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
}

/// The writer: group commit of whatever appends are waiting, by `commit`.
async fn write_loop<F, Fut>(mut rx: mpsc::Receiver<Write>, head: Arc<watch::Sender<u64>>, commit: F)
where
    F: Fn(Vec<Write>) -> Fut,
    Fut: std::future::Future<Output = (Vec<Write>, Vec<Result<Appended, Error>>)>,
{
    while let Some(first) = rx.recv().await {
        // Writers answered by the last commit are waking up to append again: give
        // them turns to queue while they keep coming, or the next group is the one
        // straggler that came first and the rest wait a whole commit for the group
        // after it. A lone writer pays one yield.
        let mut group = vec![first];
        loop {
            let before = group.len();
            tokio::task::yield_now().await;
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            if group.len() == before || group.len() >= MAX_GROUP {
                break;
            }
        }
        let (group, results) = commit(group).await;
        let mut last = None;
        for (w, r) in group.into_iter().zip(results) {
            if let Ok(a) = &r {
                last = Some(last.unwrap_or(0).max(a.position));
            }
            let _ = w.reply.send(r);
        }
        if let Some(p) = last {
            advance(&head, p);
        }
    }
}

/// Move the head forwards to `p` (never backwards: notifications may arrive late).
pub(crate) fn advance(head: &watch::Sender<u64>, p: u64) {
    head.send_if_modified(|h| {
        let changed = p > *h;
        *h = (*h).max(p);
        changed
    });
}

/// The query of [`EventStore::read_stream`]: `$1` the stream, `$4` the page size;
/// forwards, `$2..=$3` the versions; backwards, `$2` the newest version wanted and
/// `$3` the page size. SQLite walks the appends' key and then the events' row ids
/// (`CROSS JOIN` fixes that order). On PostgreSQL the events are read in a `LATERAL`
/// subquery with a `LIMIT`, which the planner cannot pull up into the join: so
/// always by a position range, whatever the statistics say (as one join, a plan
/// for a store of one stream could scan the whole events table).
fn read_sql(postgres: bool, forwards: bool) -> &'static str {
    // The parts both backends share.
    macro_rules! columns_of_e {
        () => {
            "SELECT e.position, e.stream, e.version, e.id, e.event_type, e.type_version,
                    e.data, e.metadata, e.recorded_at_ms"
        };
    }
    // An append's events: positions from its first, one per version.
    macro_rules! in_append {
        ($e:literal) => {
            concat!(
                $e,
                ".position BETWEEN a.first_position
                     AND a.first_position + a.last_version - a.first_version"
            )
        };
    }
    // Forwards: the appends holding versions $2..=$3.
    macro_rules! appends_forwards {
        () => {
            "a.stream = $1
             AND a.last_version BETWEEN $2 AND COALESCE(
                 (SELECT MIN(b.last_version) FROM _shoal_es_appends b
                   WHERE b.stream = $1 AND b.last_version >= $3), $3)"
        };
    }
    // Backwards: `top`, the last version of the append holding `$2`, else the
    // stream's version; the page's versions `lo..=hi` below it.
    macro_rules! backwards_page {
        () => {
            "WITH top AS (
                 SELECT COALESCE(
                     (SELECT MIN(b.last_version) FROM _shoal_es_appends b
                       WHERE b.stream = $1 AND b.last_version >= $2),
                     (SELECT MAX(c.last_version) FROM _shoal_es_appends c WHERE c.stream = $1),
                     0) AS t
             ), page AS (
                 SELECT t, CASE WHEN $2 < t THEN $2 ELSE t END - $3 + 1 AS lo,
                        CASE WHEN $2 < t THEN $2 ELSE t END AS hi
                   FROM top
             ) "
        };
    }
    match (postgres, forwards) {
        (false, true) => concat!(
            columns_of_e!(),
            " FROM _shoal_es_appends a CROSS JOIN _shoal_es_events e WHERE ",
            appends_forwards!(),
            " AND ",
            in_append!("e"),
            " AND e.version BETWEEN $2 AND $3
              ORDER BY a.last_version ASC, e.position ASC LIMIT $4"
        ),
        (true, true) => concat!(
            columns_of_e!(),
            " FROM _shoal_es_appends a CROSS JOIN LATERAL (
                  SELECT x.* FROM _shoal_es_events x WHERE ",
            in_append!("x"),
            " AND x.version BETWEEN $2 AND $3
                   ORDER BY x.position ASC LIMIT $4
              ) AS e WHERE ",
            appends_forwards!(),
            " ORDER BY a.last_version ASC, e.position ASC LIMIT $4"
        ),
        (false, false) => concat!(
            backwards_page!(),
            columns_of_e!(),
            " FROM page CROSS JOIN _shoal_es_appends a CROSS JOIN _shoal_es_events e
              WHERE a.stream = $1 AND a.last_version BETWEEN page.lo AND page.t AND ",
            in_append!("e"),
            " AND e.version BETWEEN page.lo AND page.hi
              ORDER BY a.last_version DESC, e.position DESC LIMIT $4"
        ),
        (true, false) => concat!(
            backwards_page!(),
            columns_of_e!(),
            " FROM page CROSS JOIN _shoal_es_appends a CROSS JOIN LATERAL (
                  SELECT x.* FROM _shoal_es_events x WHERE ",
            in_append!("x"),
            " AND x.version BETWEEN page.lo AND page.hi
                   ORDER BY x.position DESC LIMIT $4
              ) AS e
              WHERE a.stream = $1 AND a.last_version BETWEEN page.lo AND page.t
              ORDER BY a.last_version DESC, e.position DESC LIMIT $4"
        ),
    }
}

/// What the writer decided for one append of a group.
pub(crate) enum Plan {
    /// Answered without writing (a conflict, or a repeat of a stored append).
    Done(Result<Appended, Error>),
    /// Written at stream version `version` + 1.., after `rows_before` rows of the
    /// group.
    Insert { version: u64, rows_before: usize },
    /// The same append as an earlier one in the group (a retry racing itself).
    SameAs(usize),
}

/// How far back from a stream's newest event an append with
/// [`ExpectedVersion::Any`] is looked for when deciding whether it repeats a stored
/// one: its last event among the stream's newest `REPEAT_WINDOW` events (and its
/// first where that puts it). 1: only when it is the stream's latest append. Every
/// such append reads this many rows of its stream's tail, and with many streams
/// those pages are seldom in SQLite's cache (64 cost the 1,000-stream benchmark
/// about a tenth).
pub(crate) const REPEAT_WINDOW: u64 = 1;

/// Where to look for one event id of an append in its stream, to recognise a
/// repeated append: versions `lo..=hi`, counted from the stream's current version
/// (`lo`, `hi` are offsets, at most 0) when `from_head`, else absolute.
pub(crate) struct Probe<'a> {
    pub(crate) stream: &'a str,
    pub(crate) id: &'a str,
    pub(crate) from_head: bool,
    pub(crate) lo: i64,
    pub(crate) hi: i64,
}

/// The streams of a group (each once) and the probes that tell whether an append
/// repeats a stored one, by (stream, version) through the appends: for `NoStream` and
/// `Exact(v)`, its first and last ids at versions v+1 and v+n (where a first try
/// that succeeded put them, however much came after); for `Any`, its last id among
/// the stream's newest [`REPEAT_WINDOW`] events and its first id n-1 versions
/// before. A probe of an append that is new finds nothing, at the cost of an index
/// look-up (`Exact`) or of reading up to [`REPEAT_WINDOW`] rows (`Any`).
pub(crate) fn lookups(group: &[Write]) -> (Vec<&str>, Vec<Probe<'_>>) {
    let mut streams: Vec<&str> = group.iter().map(|w| w.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let mut probes = Vec::with_capacity(group.len() * 2);
    for w in group {
        let n = w.events.len() as i64;
        let (first, last) = (
            w.events[0].id.as_str(),
            w.events[w.events.len() - 1].id.as_str(),
        );
        let window = REPEAT_WINDOW as i64;
        let (from_head, first_at, last_at) = match w.expected {
            ExpectedVersion::Any => (true, (1 - window - (n - 1), -(n - 1)), (1 - window, 0)),
            ExpectedVersion::NoStream => (false, (1, 1), (n, n)),
            ExpectedVersion::Exact(v) => {
                let v = v.min((i64::MAX - n) as u64) as i64;
                (false, (v + 1, v + 1), (v + n, v + n))
            }
        };
        probes.push(Probe {
            stream: &w.stream,
            id: first,
            from_head,
            lo: first_at.0,
            hi: first_at.1,
        });
        if n > 1 {
            probes.push(Probe {
                stream: &w.stream,
                id: last,
                from_head,
                lo: last_at.0,
                hi: last_at.1,
            });
        }
    }
    (streams, probes)
}

/// What the probes found: (stream, event id) → (version, position).
pub(crate) type Stored = HashMap<(String, String), (u64, u64)>;

/// The rows of a group's check query, either backend's: kind 0 a stream's version
/// (stream, version), kind 1 an event a probe found (id, stream, version,
/// position), kind 2 the head position (in the version column). Returns the
/// streams' versions, what the probes found, and the head.
pub(crate) fn checked(
    rows: Vec<(i64, String, String, i64, i64)>,
) -> (HashMap<String, u64>, Stored, u64) {
    let mut versions = HashMap::new();
    let mut stored: Stored = HashMap::new();
    let mut head = 0u64;
    for (kind, key, stream, version, position) in rows {
        match kind {
            0 => {
                versions.insert(key, version as u64);
            }
            1 => {
                stored.insert((stream, key), (version as u64, position as u64));
            }
            _ => head = version as u64,
        }
    }
    (versions, stored, head)
}

/// Decide each append of a group in order, as if appended one by one, from the
/// streams' current `versions` and what the probes found `stored`. Returns the
/// plans and the number of rows to insert.
pub(crate) fn plan(
    group: &[Write],
    mut versions: HashMap<String, u64>,
    stored: &Stored,
) -> (Vec<Plan>, usize) {
    let mut plans = Vec::with_capacity(group.len());
    let mut rows = 0usize;
    let mut first_ids: HashMap<(&str, &str), usize> = HashMap::new();
    // The probes looked at the stored streams, before any append of the group.
    let before = versions.clone();
    for (i, w) in group.iter().enumerate() {
        let first_id = w.events[0].id.as_str();
        if let Some(r) = repeated(w, before.get(&w.stream).copied().unwrap_or(0), stored) {
            plans.push(Plan::Done(r));
            continue;
        }
        if let Some(&j) = first_ids.get(&(w.stream.as_str(), first_id)) {
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
        first_ids.insert((w.stream.as_str(), first_id), i);
        plans.push(Plan::Insert {
            version: current,
            rows_before: rows,
        });
        rows += w.events.len();
    }
    (plans, rows)
}

/// The rows to insert for `plans`: (append, its base version, event, offset in the
/// append), in group order.
pub(crate) fn rows_of<'a>(
    group: &'a [Write],
    plans: &[Plan],
    rows: usize,
) -> Vec<(&'a Write, u64, &'a Encoded, u64)> {
    let mut pending = Vec::with_capacity(rows);
    for (w, plan) in group.iter().zip(plans) {
        if let Plan::Insert { version, .. } = plan {
            for (k, e) in w.events.iter().enumerate() {
                pending.push((w, *version, e, k as u64 + 1));
            }
        }
    }
    pending
}

/// One row of `_shoal_es_appends` per append that `plans` insert: its stream, its
/// last and first versions, and its first position, the group's rows starting at
/// `first_position`.
pub(crate) fn appends_of<'a>(
    group: &'a [Write],
    plans: &[Plan],
    first_position: u64,
) -> Vec<(&'a str, i64, i64, i64)> {
    group
        .iter()
        .zip(plans)
        .filter_map(|(w, plan)| match plan {
            Plan::Insert {
                version,
                rows_before,
            } => Some((
                w.stream.as_str(),
                (version + w.events.len() as u64) as i64,
                (version + 1) as i64,
                (first_position + *rows_before as u64) as i64,
            )),
            _ => None,
        })
        .collect()
}

/// Each append's answer, once its rows (if any) are in at `first_position` on.
pub(crate) fn answers(
    group: &[Write],
    plans: Vec<Plan>,
    first_position: u64,
) -> Vec<Result<Appended, Error>> {
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
    results
}

/// The same error for every append of a group.
pub(crate) fn fail_all(group: &[Write], e: &Error) -> Vec<Result<Appended, Error>> {
    group
        .iter()
        .map(|_| Err(Error::new(e.kind(), e.origin(), e.to_string())))
        .collect()
}

/// Whether `w` repeats an append stored already in its stream, by what its probes
/// found (the stream being at version `current` before the group): the first
/// answer again when its first and last events are stored n-1 versions apart where
/// its probes looked; a conflict when only one of them is; `None` (a new append)
/// when neither is.
pub(crate) fn repeated(
    w: &Write,
    current: u64,
    stored: &Stored,
) -> Option<Result<Appended, Error>> {
    let n = w.events.len() as u64;
    let at = |id: &str| stored.get(&(w.stream.clone(), id.to_string())).copied();
    let (first, last) = (at(&w.events[0].id), at(&w.events[w.events.len() - 1].id));
    // Where the probes looked: a hit elsewhere (another append's probe of the same
    // stream) is not this append's.
    let in_window = |v: u64, lo: u64, hi: u64| v >= lo && v <= hi;
    let (first, last) = match w.expected {
        ExpectedVersion::Any => {
            let top = current;
            let bottom = current.saturating_sub(REPEAT_WINDOW - 1);
            let last = last.filter(|(v, _)| in_window(*v, bottom, top));
            let first = first.filter(|(v, _)| {
                in_window(*v, bottom.saturating_sub(n - 1), top.saturating_sub(n - 1))
            });
            (first, last)
        }
        ExpectedVersion::NoStream => (
            first.filter(|(v, _)| *v == 1),
            last.filter(|(v, _)| *v == n),
        ),
        ExpectedVersion::Exact(e) => (
            first.filter(|(v, _)| *v == e.saturating_add(1)),
            last.filter(|(v, _)| *v == e.saturating_add(n)),
        ),
    };
    match (first, last) {
        (None, None) => None,
        (Some((fv, _)), Some((lv, position))) if lv == fv + n - 1 => Some(Ok(Appended {
            version: lv,
            position,
        })),
        _ => Some(Err(Error::new(
            ErrorKind::Conflict,
            Origin::Downstream,
            format!(
                "stream {}: an append repeats stored event ids ({} … {}) but not the events that came with them",
                w.stream,
                w.events[0].id,
                w.events[w.events.len() - 1].id
            ),
        ))),
    }
}

/// An append refused by a unique constraint of the store's tables (a stream version
/// taken, by the appends' key; the writer's own checks make this unexpected).
pub(crate) fn id_taken(w: &Write) -> Error {
    Error::new(
        ErrorKind::Conflict,
        Origin::Downstream,
        format!(
            "stream {}: this append was refused by a unique constraint of the event store's tables",
            w.stream
        ),
    )
}

fn corrupt_row(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Protocol,
        Origin::Internal,
        format!("a stored event's {what} cannot be read"),
    )
    .with_source(e)
}

/// One row of `columns!()` as an event, on either backend.
pub(crate) fn decode_row<R: Row>(r: &R, upcasters: &Upcasters) -> Result<RecordedEvent, Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
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
