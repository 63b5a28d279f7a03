//! Completed 3-step sagas per second with durable state on SQLite, participants in
//! this process (each applies an idempotency key once), beside a reference: the
//! same saga-log rows written one transaction per transition (what a saga log
//! without group commit pays), same database settings, same concurrency, same run.
//!
//!   saga-throughput [scale]

use shoal_db::{Db, DbOptions};
use shoal_saga::{Orchestrator, Saga, Status, Step, StepCtx, StepError};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Sagas in flight at once.
const CONCURRENCY: usize = 256;

#[derive(Clone, Default)]
struct Participants(Arc<Mutex<HashSet<String>>>);

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    amount: u32,
    steps_done: u32,
}

async fn apply(cx: StepCtx<Participants>, mut o: Order) -> Result<Order, StepError> {
    if let Ok(mut keys) = cx.env.0.lock() {
        keys.insert(cx.idempotency_key());
    }
    o.steps_done += 1;
    Ok(o)
}

async fn fresh_db(tag: &str) -> Db {
    let dir = std::env::temp_dir().join(format!(
        "shoal-bench-saga-{tag}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}", dir.join("saga.db").display());
    Db::open(&DbOptions::new(url), &[]).await.expect("open db")
}

async fn ours(n: usize) -> f64 {
    let db = fresh_db("ours").await;
    let saga = Saga::builder("bench")
        .step(Step::new("reserve", apply).compensate(apply))
        .step(Step::new("pay", apply).pivot())
        .step(Step::new("ship", apply).retriable())
        .build()
        .expect("saga");
    let parts = Participants::default();
    let orch = Orchestrator::builder(saga, parts.clone())
        .open(&db)
        .await
        .expect("orchestrator");
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("permit");
        let o = orch.clone();
        tasks.spawn(async move {
            let id = format!("s-{i}");
            o.start(
                &id,
                Order {
                    amount: 10,
                    steps_done: 0,
                },
            )
            .await
            .expect("start");
            let end = o.wait(&id).await.expect("wait");
            assert_eq!(end, Status::Completed);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let applied = parts.0.lock().map(|k| k.len()).unwrap_or(0);
    assert_eq!(applied, 3 * n, "every step applied once");
    orch.shutdown().await;
    n as f64 / secs
}

/// The same rows, one transaction per transition: insert, three updates, four
/// history rows, as the orchestrator writes them.
async fn reference(n: usize) -> f64 {
    let db = fresh_db("reference").await;
    sqlx::raw_sql(
        "CREATE TABLE s (id TEXT PRIMARY KEY, saga TEXT NOT NULL, status TEXT NOT NULL,
             step INTEGER NOT NULL, stuck INTEGER NOT NULL, data TEXT NOT NULL,
             correlation_id TEXT NOT NULL, error TEXT, created_at_ms INTEGER NOT NULL,
             updated_at_ms INTEGER NOT NULL);
         CREATE TABLE h (saga_id TEXT NOT NULL, seq INTEGER NOT NULL, step TEXT NOT NULL,
             event TEXT NOT NULL, detail TEXT, at_ms INTEGER NOT NULL,
             PRIMARY KEY (saga_id, seq));",
    )
    .execute(db.pool())
    .await
    .expect("tables");
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("permit");
        let db = db.clone();
        tasks.spawn(async move {
            let id = format!("s-{i}");
            for seq in 0..4i64 {
                let mut tx = db.pool().begin().await.expect("begin");
                let data = format!("{{\"amount\":10,\"steps_done\":{seq}}}");
                if seq == 0 {
                    sqlx::query(
                        "INSERT INTO s VALUES ($1, 'bench', 'running', 0, 0, $2, $1, NULL, 0, 0)",
                    )
                    .bind(&id)
                    .bind(&data)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                } else {
                    sqlx::query("UPDATE s SET status = $1, step = $2, data = $3 WHERE id = $4")
                        .bind(if seq == 3 { "completed" } else { "running" })
                        .bind(seq)
                        .bind(&data)
                        .bind(&id)
                        .execute(&mut *tx)
                        .await
                        .expect("update");
                }
                sqlx::query("INSERT INTO h VALUES ($1, $2, 'step', 'done', NULL, 0)")
                    .bind(&id)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await
                    .expect("history");
                tx.commit().await.expect("commit");
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = ((20_000.0 * scale) as usize).max(500);
    eprintln!("{n} sagas of 3 steps, {CONCURRENCY} in flight, SQLite (WAL, synchronous=FULL)");
    let r = reference(n).await;
    let o = ours(n).await;
    println!(
        "completed 3-step sagas: ours {o:.0} sagas/s, reference {r:.0} sagas/s, ratio {:.2}",
        o / r
    );
    // The absolute target, as a second line of the same shape.
    println!(
        "completed 3-step sagas against the 1000/s target: ours {o:.0} sagas/s, reference 1000 sagas/s, ratio {:.2}",
        o / 1000.0
    );
}
