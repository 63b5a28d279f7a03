//! Durable append and read throughput of the event store on SQLite and on
//! PostgreSQL, each beside its floor measured in the same run on the same database:
//! plain inserts of the same rows (every column the store writes, with the same
//! values: stream, version, time-ordered id, type, type version, data, metadata,
//! time), in the same batch sizes, into a bare table (no index but the row id) (SQLite in WAL mode with `synchronous = FULL`; PostgreSQL with its default
//! `fsync` and `synchronous_commit`). Also: 64 concurrent writers appending one
//! event at a time against what one fsync per append allows, and projection
//! catch-up.
//!
//! Usage: `eventstore-throughput [scale] [sqlite|postgres|both]` (default 1.0 and
//! both; 0.1 for a quick look). Run by `bench/eventstore.sh`, which starts the
//! PostgreSQL server (`scripts/postgres`).

use serde_json::json;
use shoal_bench::{median, report};
use shoal_db::{Db, DbOptions, Native};
use shoal_eventstore::{
    EventStore, ExpectedVersion, NewEvent, Projection, ProjectionFuture, ProjectionRunner,
    RecordedEvent, Upcasters,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The payload of every row and event: 256 bytes of JSON.
fn payload() -> serde_json::Value {
    json!({ "p": "x".repeat(248) })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
        }
    }
}

/// A fresh, empty database, and the directory to remove after (SQLite).
async fn fresh(kind: Kind, tag: &str) -> (Db, Option<PathBuf>) {
    let (url, dir) = match kind {
        Kind::Sqlite => {
            let dir = std::env::temp_dir().join(format!(
                "shoal-bench-es-{tag}-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&dir).expect("bench dir");
            (
                format!("sqlite://{}", dir.join("bench.db").display()),
                Some(dir),
            )
        }
        Kind::Postgres => (shoal_testkit::postgres::fresh_database().await, None),
    };
    let db = Db::open(&DbOptions::new(url), &[])
        .await
        .expect("open bench database");
    (db, dir)
}

async fn done_with(db: Db, dir: Option<PathBuf>) {
    db.close().await;
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Run `$body` with `$pool` bound to the backend's own pool.
macro_rules! on_pool {
    ($native:expr, $pool:ident => $body:expr) => {
        match $native {
            Native::Sqlite($pool) => $body,
            Native::Postgres($pool) => $body,
        }
    };
}

/// `($1, $2),($3, $4),…` for `n` rows of two values.
fn pairs(n: usize) -> String {
    tuples(n, 2)
}

/// `(?, …),(?, …),…` for `n` rows of `k` values on SQLite, as the store writes its
/// inserts (SQLite takes `$1` for a named parameter, and a statement with hundreds
/// of names costs much more to run than one with `?`), `($1, …, $k),($k+1, …),…`
/// on PostgreSQL.
fn values(kind: Kind, n: usize, k: usize) -> String {
    match kind {
        Kind::Sqlite => vec![format!("({})", vec!["?"; k].join(", ")); n].join(","),
        Kind::Postgres => tuples(n, k),
    }
}

/// `($1, …, $k),($k+1, …),…` for `n` rows of `k` values.
fn tuples(n: usize, k: usize) -> String {
    (0..n)
        .map(|i| {
            let row: Vec<String> = (1..=k).map(|j| format!("${}", k * i + j)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The columns of an event row, as the store writes them.
const ROW_COLUMNS: &str =
    "stream, version, event_id, event_type, type_version, data, metadata, recorded_at_ms";

/// One row as the store writes it for the `k`-th event (from 0) of a run appending
/// `per_stream` events to a stream before moving to the next of `streams`.
struct Row {
    stream: String,
    version: i64,
    id: String,
}

fn rows(n: usize, batch: usize, streams: usize) -> Vec<Row> {
    let mut versions = vec![0i64; streams];
    (0..n)
        .map(|k| {
            let s = (k / batch) % streams;
            versions[s] += 1;
            Row {
                stream: format!("s-{s}"),
                version: versions[s],
                id: uuid::Uuid::now_v7().to_string(),
            }
        })
        .collect()
}

/// A database with the bare table the floors write and read: the event rows'
/// columns and nothing else (no index besides the row id).
async fn plain_table(kind: Kind, tag: &str) -> (Db, Option<PathBuf>) {
    let (db, dir) = fresh(kind, tag).await;
    let sql = match kind {
        Kind::Sqlite => {
            "CREATE TABLE plain (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
             event_id TEXT NOT NULL, event_type TEXT NOT NULL, type_version INTEGER NOT NULL,
             data TEXT NOT NULL, metadata TEXT NOT NULL, recorded_at_ms INTEGER NOT NULL)"
        }
        Kind::Postgres => {
            "CREATE TABLE plain (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, stream TEXT NOT NULL,
             version BIGINT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
             type_version BIGINT NOT NULL, data TEXT NOT NULL, metadata TEXT NOT NULL,
             recorded_at_ms BIGINT NOT NULL)"
        }
    };
    sqlx::raw_sql(sql)
        .execute(db.pool())
        .await
        .expect("plain table");
    (db, dir)
}

/// Insert one batch of rows into the bare table in one statement per transaction,
/// as the store writes an append: the fastest plain way to put these rows in, and
/// so the honest floor.
async fn plain_batch(db: &Db, kind: Kind, chunk: &[Row], data: &str) {
    let sql = format!(
        "INSERT INTO plain ({ROW_COLUMNS}) VALUES {}",
        values(kind, chunk.len(), 8)
    );
    let now = shoal_core::unix_ms() as i64;
    on_pool!(db.native(), pool => {
        let mut tx = pool.begin().await.expect("begin");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(&r.stream)
                .bind(r.version)
                .bind(&r.id)
                .bind("Bench")
                .bind(1i64)
                .bind(data)
                .bind("{}")
                .bind(now);
        }
        q.execute(&mut *tx).await.expect("insert");
        tx.commit().await.expect("commit");
    });
}

/// Rows per second inserting `n` event rows, `batch` per transaction, over `streams`
/// streams in turn, into a bare table, through the backend's own driver.
async fn plain_inserts(kind: Kind, n: usize, batch: usize, streams: usize) -> f64 {
    let (db, dir) = plain_table(kind, "plain").await;
    let data = payload().to_string();
    // Made before the clock starts, as the store's events are.
    let rows = rows(n, batch, streams);
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        plain_batch(&db, kind, chunk, &data).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    done_with(db, dir).await;
    rate
}

/// The time to insert these batches into the bare table.
async fn plain_slice(db: &Db, kind: Kind, batches: Vec<&[Row]>, data: &str) -> Duration {
    let start = Instant::now();
    for chunk in batches {
        plain_batch(db, kind, chunk, data).await;
    }
    start.elapsed()
}

/// The time to make these appends, one at a time.
async fn append_slice(s: &EventStore, appends: Vec<(String, Vec<NewEvent>)>) -> Duration {
    let start = Instant::now();
    for (stream, events) in appends {
        s.append(&stream, ExpectedVersion::Any, events)
            .await
            .expect("append");
    }
    start.elapsed()
}

/// Events per slice in [`batched_side_by_side`].
const SLICE: usize = 2_000;

/// Events per second of the floor (plain inserts) and of the store, each writing
/// `total` events, `batch` per transaction, over `streams` streams in turn, into
/// its own fresh database. The two take turns in slices of [`SLICE`] events, the
/// side going first alternating, and each adds up only its own time: a noisy
/// stretch of the shared machine then falls on both alike, not on whichever ran
/// through it. The store is kept for the read figures.
async fn batched_side_by_side(
    kind: Kind,
    total: usize,
    batch: usize,
    streams: usize,
) -> (f64, f64, EventStore, Db, Option<PathBuf>) {
    let (plain, plain_dir) = plain_table(kind, "plain").await;
    let (s, db, dir) = store(kind, "append").await;
    let data = payload().to_string();
    // Rows and events made before any clock starts: making them is the caller's
    // work, not the database's or the store's.
    let rows = rows(total, batch, streams);
    let appends = append_list(total, batch, streams);
    let per_slice = (SLICE / batch).max(1);
    let mut row_chunks = rows.chunks(batch);
    let mut appends = appends.into_iter();
    let (mut floor_time, mut ours_time) = (Duration::ZERO, Duration::ZERO);
    for slice in 0.. {
        let floor: Vec<&[Row]> = row_chunks.by_ref().take(per_slice).collect();
        let ours: Vec<(String, Vec<NewEvent>)> = appends.by_ref().take(per_slice).collect();
        if floor.is_empty() {
            break;
        }
        if slice % 2 == 0 {
            floor_time += plain_slice(&plain, kind, floor, &data).await;
            ours_time += append_slice(&s, ours).await;
        } else {
            ours_time += append_slice(&s, ours).await;
            floor_time += plain_slice(&plain, kind, floor, &data).await;
        }
    }
    done_with(plain, plain_dir).await;
    (
        total as f64 / floor_time.as_secs_f64(),
        total as f64 / ours_time.as_secs_f64(),
        s,
        db,
        dir,
    )
}

/// Rows per second reading a bare table of `n` event rows in pages of 1,000.
async fn plain_reads(kind: Kind, n: usize) -> f64 {
    let (db, dir) = plain_table(kind, "plain-read").await;
    let data = payload().to_string();
    let now = shoal_core::unix_ms() as i64;
    for chunk in rows(n, 100, 1_000).chunks(1_000) {
        let sql = format!(
            "INSERT INTO plain ({ROW_COLUMNS}) VALUES {}",
            values(kind, chunk.len(), 8)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.stream.clone())
                .bind(r.version)
                .bind(r.id.clone())
                .bind("Bench")
                .bind(1i64)
                .bind(data.clone())
                .bind("{}")
                .bind(now);
        }
        q.execute(db.pool()).await.expect("insert");
    }
    let start = Instant::now();
    let mut after = 0i64;
    let mut seen = 0;
    loop {
        type Plain = (i64, String, i64, String, String, i64, String, String, i64);
        let page: Vec<Plain> = on_pool!(db.native(), pool => sqlx::query_as(
            "SELECT id, stream, version, event_id, event_type, type_version, data, metadata, recorded_at_ms
               FROM plain WHERE id > $1 ORDER BY id LIMIT 1000",
        )
        .bind(after)
        .fetch_all(pool)
        .await
        .expect("select"));
        let Some(last) = page.last() else { break };
        after = last.0;
        // Decode the JSON as the store does, so both do the same work per row.
        for r in &page {
            let _: serde_json::Value = serde_json::from_str(&r.6).expect("json");
        }
        seen += page.len();
    }
    assert_eq!(seen, n);
    let rate = n as f64 / start.elapsed().as_secs_f64();
    done_with(db, dir).await;
    rate
}

async fn store(kind: Kind, tag: &str) -> (EventStore, Db, Option<PathBuf>) {
    let (db, dir) = fresh(kind, tag).await;
    (
        EventStore::open(&db, Upcasters::new())
            .await
            .expect("open store"),
        db,
        dir,
    )
}

fn events(n: usize) -> Vec<NewEvent> {
    let data = payload();
    (0..n)
        .map(|_| NewEvent::new("Bench", 1, &data).expect("event"))
        .collect()
}

/// Events per second appending `total` events, `batch` per append, over `streams`
/// streams in turn, one append at a time.
async fn appends(
    kind: Kind,
    total: usize,
    batch: usize,
    streams: usize,
) -> (f64, EventStore, Db, Option<PathBuf>) {
    let (s, db, dir) = store(kind, "append").await;
    // The events are made before the clock starts, as the floor's rows are: making
    // them (ids, JSON values) is the caller's work, not the store's.
    let appends = append_list(total, batch, streams);
    let took = append_slice(&s, appends).await;
    (total as f64 / took.as_secs_f64(), s, db, dir)
}

/// `total` events in appends of `batch`, over `streams` streams in turn.
fn append_list(total: usize, batch: usize, streams: usize) -> Vec<(String, Vec<NewEvent>)> {
    let mut appends = Vec::new();
    let mut done = 0;
    while done < total {
        let n = batch.min(total - done);
        appends.push((format!("s-{}", appends.len() % streams), events(n)));
        done += n;
    }
    appends
}

/// Events per second with `writers` tasks each appending one event at a time.
async fn concurrent_appends(kind: Kind, writers: usize, per_writer: usize) -> f64 {
    let (s, db, dir) = store(kind, "concurrent").await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..per_writer {
                    s.append(&format!("w-{w}"), ExpectedVersion::Any, events(1))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    let rate = (writers * per_writer) as f64 / start.elapsed().as_secs_f64();
    drop(s);
    done_with(db, dir).await;
    rate
}

struct CountPerStream;

impl Projection for CountPerStream {
    fn name(&self) -> &str {
        "count_per_stream"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO per_stream (stream, n) VALUES ($1, 1)
                 ON CONFLICT (stream) DO UPDATE SET n = per_stream.n + 1",
            )
            .bind(&event.stream)
            .execute(&mut *tx)
            .await
            .map_err(|e| shoal_core::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }

    fn apply_batch<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        events: &'a [RecordedEvent],
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            // Fold the batch, then one upsert statement for it.
            let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
            for e in events {
                *counts.entry(e.stream.as_str()).or_default() += 1;
            }
            let sql = format!(
                "INSERT INTO per_stream (stream, n) VALUES {} ON CONFLICT (stream) DO UPDATE SET n = per_stream.n + excluded.n",
                pairs(counts.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (stream, n) in counts {
                q = q.bind(stream).bind(n);
            }
            q.execute(&mut *tx)
                .await
                .map_err(|e| shoal_core::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }

    fn reset<'a>(&'a self, tx: &'a mut sqlx::AnyConnection) -> ProjectionFuture<'a> {
        Box::pin(async move {
            sqlx::query("DELETE FROM per_stream")
                .execute(&mut *tx)
                .await
                .map_err(|e| shoal_core::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let scale: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let kinds = match args.next().as_deref() {
        Some("sqlite") => vec![Kind::Sqlite],
        Some("postgres") => vec![Kind::Postgres],
        _ => vec![Kind::Sqlite, Kind::Postgres],
    };
    for kind in kinds {
        run(kind, scale).await;
    }
}

async fn run(kind: Kind, scale: f64) {
    let b = kind.name();
    let n = |x: f64| ((x * scale) as usize).max(100);
    let batched = n(100_000.0);
    let unbatched = n(2_000.0);

    // Three rounds, each with the floor and ours taking turns (see
    // `batched_side_by_side`), and the median of each.
    let (mut floor_one, mut floor_many, mut one_w, mut many_w, mut floor_r, mut ours_r) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut kept = None;
    for _ in 0..3 {
        let (floor, ours, s, db, dir) = batched_side_by_side(kind, batched, 100, 1).await;
        floor_one.push(floor);
        one_w.push(ours);
        drop(s);
        done_with(db, dir).await;
        let (floor, ours, s, db, dir) = batched_side_by_side(kind, batched, 100, 1_000).await;
        floor_many.push(floor);
        many_w.push(ours);
        floor_r.push(plain_reads(kind, batched).await);
        let start = Instant::now();
        let mut after = 0;
        let mut seen = 0;
        loop {
            let page = s.read_all(after, 1_000).await.expect("read all");
            let Some(last) = page.last() else { break };
            after = last.position;
            seen += page.len();
        }
        assert_eq!(seen, batched);
        ours_r.push(batched as f64 / start.elapsed().as_secs_f64());
        if let Some((s, db, dir)) = kept.replace((s, db, dir)) {
            drop(s);
            done_with(db, dir).await;
        }
    }
    report(
        &format!("{b}: durable append, 1 stream, 100 events per append (reference: plain inserts of the same rows, 100 per transaction)"),
        median(one_w),
        median(floor_one),
        "events/s",
    );
    report(
        &format!("{b}: durable append, 1,000 streams, 100 events per append (reference: plain inserts of the same rows, 100 per transaction)"),
        median(many_w),
        median(floor_many),
        "events/s",
    );
    report(
        &format!("{b}: read all, pages of 1,000 (reference: plain select of the same rows, JSON decoded)"),
        median(ours_r),
        median(floor_r),
        "events/s",
    );
    let Some((s, db, dir)) = kept else {
        return;
    };

    sqlx::raw_sql("CREATE TABLE per_stream (stream TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(db.pool())
        .await
        .expect("read model");
    let runner = ProjectionRunner::new(s.clone(), Arc::new(CountPerStream), 1_000);
    let start = Instant::now();
    let applied = runner.catch_up().await.expect("catch up");
    assert_eq!(applied as usize, batched);
    report(
        &format!("{b}: projection catch-up, 1,000 events per transaction (reference: the 100,000 events/s target)"),
        applied as f64 / start.elapsed().as_secs_f64(),
        100_000.0,
        "events/s",
    );
    drop(runner);
    drop(s);
    done_with(db, dir).await;

    let floor_single = plain_inserts(kind, unbatched, 1, 1).await;
    let (ours, s, db, dir) = appends(kind, unbatched, 1, 1).await;
    drop(s);
    done_with(db, dir).await;
    report(
        &format!("{b}: durable append, one event per append, one writer (reference: plain inserts, one row per transaction)"),
        ours,
        floor_single,
        "events/s",
    );
    let per_writer = (unbatched * 10 / 64).max(10);
    let ours = concurrent_appends(kind, 64, per_writer).await;
    report(
        &format!("{b}: 64 concurrent writers, one event per append (reference: one fsync per append, the plain one-row-per-transaction rate)"),
        ours,
        floor_single,
        "events/s",
    );
}
