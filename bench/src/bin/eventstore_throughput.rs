//! Durable append and read throughput of the event store on SQLite, each beside its
//! floor measured in the same run on the same kind of database: plain inserts of
//! rows of the same size, in the same batch sizes, into a bare table (WAL,
//! `synchronous = FULL`). Also: 64 concurrent writers appending one event at a time
//! against what one fsync per append allows, and projection catch-up.
//!
//! Usage: `eventstore-throughput [scale]` (default 1.0; 0.1 for a quick look).
//! Run by `bench/eventstore.sh`.

use serde_json::json;
use shoal_bench::report;
use shoal_eventstore::{
    EventStore, ExpectedVersion, NewEvent, Projection, ProjectionFuture, ProjectionRunner,
    RecordedEvent, Upcasters,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The payload of every row and event: 256 bytes of JSON.
fn payload() -> serde_json::Value {
    json!({ "p": "x".repeat(248) })
}

async fn pool(tag: &str) -> (SqlitePool, PathBuf) {
    let dir = std::env::temp_dir().join(format!("shoal-bench-es-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let path = dir.join("bench.db");
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .expect("url")
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .expect("open bench database");
    (pool, dir)
}

/// A database with the bare table the floors write and read: the rows' columns and
/// nothing else (no index besides the row id).
async fn plain_table(tag: &str) -> (SqlitePool, PathBuf) {
    let (pool, dir) = pool(tag).await;
    sqlx::raw_sql(
        "CREATE TABLE plain (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, data TEXT NOT NULL)",
    )
    .execute(&pool)
    .await
    .expect("plain table");
    (pool, dir)
}

/// Rows per second inserting `rows` rows, `batch` per transaction, into a bare table.
async fn plain_inserts(rows: usize, batch: usize) -> f64 {
    let (pool, dir) = plain_table("plain").await;
    let data = payload().to_string();
    let start = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = batch.min(rows - done);
        // The batch in one statement, as the store writes an append: the fastest
        // way to put these rows in, and so the honest floor.
        let sql = format!(
            "INSERT INTO plain (stream, data) VALUES {}",
            vec!["(?, ?)"; n].join(",")
        );
        let mut tx = pool.begin().await.expect("begin");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in 0..n {
            q = q.bind(format!("s-{}", (done + i) % 1000)).bind(&data);
        }
        q.execute(&mut *tx).await.expect("insert");
        tx.commit().await.expect("commit");
        done += n;
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
    rate
}

/// Rows per second reading a bare table of `rows` rows in pages of 1,000.
async fn plain_reads(rows: usize) -> f64 {
    let (pool, dir) = plain_table("plain-read").await;
    let data = payload().to_string();
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..rows {
        sqlx::query("INSERT INTO plain (stream, data) VALUES (?, ?)")
            .bind(format!("s-{}", i % 1000))
            .bind(&data)
            .execute(&mut *tx)
            .await
            .expect("insert");
    }
    tx.commit().await.expect("commit");
    let start = Instant::now();
    let mut after = 0i64;
    let mut seen = 0;
    loop {
        let page: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, stream, data FROM plain WHERE id > ? ORDER BY id LIMIT 1000",
        )
        .bind(after)
        .fetch_all(&pool)
        .await
        .expect("select");
        let Some(last) = page.last() else { break };
        after = last.0;
        // Decode the JSON as the store does, so both do the same work per row.
        for (_, _, d) in &page {
            let _: serde_json::Value = serde_json::from_str(d).expect("json");
        }
        seen += page.len();
    }
    assert_eq!(seen, rows);
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
    rate
}

async fn store(tag: &str) -> (EventStore, PathBuf) {
    let (pool, dir) = pool(tag).await;
    (
        EventStore::open(pool, Upcasters::new())
            .await
            .expect("open store"),
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
async fn appends(total: usize, batch: usize, streams: usize) -> (f64, EventStore, PathBuf) {
    let (s, dir) = store("append").await;
    let start = Instant::now();
    let mut done = 0;
    let mut i = 0;
    while done < total {
        let n = batch.min(total - done);
        s.append(
            &format!("s-{}", i % streams),
            ExpectedVersion::Any,
            events(n),
        )
        .await
        .expect("append");
        done += n;
        i += 1;
    }
    (total as f64 / start.elapsed().as_secs_f64(), s, dir)
}

/// Events per second with `writers` tasks each appending one event at a time.
async fn concurrent_appends(writers: usize, per_writer: usize) -> f64 {
    let (s, dir) = store("concurrent").await;
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
    let _ = std::fs::remove_dir_all(dir);
    rate
}

struct CountPerStream;

impl Projection for CountPerStream {
    fn name(&self) -> &str {
        "count_per_stream"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::SqliteConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO per_stream (stream, n) VALUES (?, 1)
                 ON CONFLICT (stream) DO UPDATE SET n = n + 1",
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
        tx: &'a mut sqlx::SqliteConnection,
        events: &'a [RecordedEvent],
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            // Fold the batch, then one upsert statement for it.
            let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
            for e in events {
                *counts.entry(e.stream.as_str()).or_default() += 1;
            }
            let sql = format!(
                "INSERT INTO per_stream (stream, n) VALUES {} ON CONFLICT (stream) DO UPDATE SET n = n + excluded.n",
                vec!["(?, ?)"; counts.len()].join(",")
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

    fn reset<'a>(&'a self, tx: &'a mut sqlx::SqliteConnection) -> ProjectionFuture<'a> {
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
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1.0);
    let n = |x: f64| ((x * scale) as usize).max(100);
    let batched = n(100_000.0);
    let unbatched = n(2_000.0);

    let floor_batched = plain_inserts(batched, 100).await;
    let (ours, _, dir) = appends(batched, 100, 1).await;
    let _ = std::fs::remove_dir_all(dir);
    report(
        "durable append, 1 stream, 100 events per append (reference: plain inserts, 100 rows per transaction)",
        ours,
        floor_batched,
        "events/s",
    );
    let (ours, s, dir) = appends(batched, 100, 1_000).await;
    report(
        "durable append, 1,000 streams, 100 events per append (reference: plain inserts, 100 rows per transaction)",
        ours,
        floor_batched,
        "events/s",
    );

    let floor_read = plain_reads(batched).await;
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
    report(
        "read all, pages of 1,000 (reference: plain select of the same rows, JSON decoded)",
        batched as f64 / start.elapsed().as_secs_f64(),
        floor_read,
        "events/s",
    );

    sqlx::raw_sql("CREATE TABLE per_stream (stream TEXT PRIMARY KEY, n INTEGER NOT NULL)")
        .execute(s.pool())
        .await
        .expect("read model");
    let runner = ProjectionRunner::new(s.clone(), Arc::new(CountPerStream), 1_000);
    let start = Instant::now();
    let applied = runner.catch_up().await.expect("catch up");
    assert_eq!(applied as usize, batched);
    report(
        "projection catch-up, 1,000 events per transaction (reference: the 100,000 events/s target)",
        applied as f64 / start.elapsed().as_secs_f64(),
        100_000.0,
        "events/s",
    );
    drop(runner);
    drop(s);
    let _ = std::fs::remove_dir_all(dir);

    let floor_single = plain_inserts(unbatched, 1).await;
    let (ours, _, dir) = appends(unbatched, 1, 1).await;
    let _ = std::fs::remove_dir_all(dir);
    report(
        "durable append, one event per append, one writer (reference: plain inserts, one row per transaction)",
        ours,
        floor_single,
        "events/s",
    );
    let per_writer = (unbatched * 10 / 64).max(10);
    let ours = concurrent_appends(64, per_writer).await;
    report(
        "64 concurrent writers, one event per append (reference: one fsync per append, the plain one-row-per-transaction rate)",
        ours,
        floor_single,
        "events/s",
    );
}
