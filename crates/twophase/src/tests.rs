//! Unit tests: coordinator and participants in one process, each over its own SQLite
//! file in a temporary folder, linked in memory (and once over real HTTP on
//! 127.0.0.1). The participants' resource moves stock between warehouses, so every
//! test can check that units are conserved and nothing was applied twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use shoal_db::{Db, DbOptions, Migration};
use sqlx::AnyConnection;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static STOCK: &[Migration] = &[Migration::new(
    1,
    "stock",
    "CREATE TABLE stock (
        warehouse TEXT PRIMARY KEY,
        available BIGINT NOT NULL,
        held_out BIGINT NOT NULL,
        held_in BIGINT NOT NULL
    );
    CREATE TABLE moves (tx_id TEXT PRIMARY KEY, delta BIGINT NOT NULL, outcome TEXT NOT NULL);",
)];

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("shoal-2pc-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A SQLite file `name` in `dir`, as a URL.
fn sqlite(dir: &std::path::Path, name: &str) -> String {
    format!("sqlite://{}", dir.join(format!("{name}.db")).display())
}

async fn open_db(url: &str) -> Db {
    Db::open(&DbOptions::new(url), STOCK).await.unwrap()
}

/// Where each party of a [`World`] keeps its data.
#[derive(Clone)]
struct Urls {
    a: String,
    b: String,
    coordinator: String,
}

impl Urls {
    fn sqlite(tag: &str) -> Self {
        let dir = temp_dir(tag);
        Self {
            a: sqlite(&dir, "a"),
            b: sqlite(&dir, "b"),
            coordinator: sqlite(&dir, "coordinator"),
        }
    }

    async fn postgres() -> Self {
        use shoal_testkit::postgres::fresh_database;
        Self {
            a: fresh_database().await,
            b: fresh_database().await,
            coordinator: fresh_database().await,
        }
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s: {what}");
}

/// Stock of one warehouse: the payload `{"delta": n}` moves n units in (n > 0) or
/// out (n < 0). Prepare holds them (`held_out` / `held_in`); commit moves them;
/// abort gives them back. Every commit or abort writes a `moves` row keyed by the
/// transaction, so a second application would fail on the key.
struct Stock {
    warehouse: String,
    /// Sleep this long inside prepare (a slow participant).
    prepare_delay: Duration,
}

fn delta(payload: &serde_json::Value) -> Result<i64, shoal_core::Error> {
    payload["delta"]
        .as_i64()
        .ok_or_else(|| shoal_core::Error::internal("payload without delta"))
}

fn sql_err(e: sqlx::Error) -> shoal_core::Error {
    shoal_core::Error::internal("stock").with_source(e)
}

impl Resource for Stock {
    fn prepare<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            tokio::time::sleep(self.prepare_delay).await;
            let d = delta(payload)?;
            let n = if d < 0 {
                sqlx::query(
                    "UPDATE stock SET available = available - $1, held_out = held_out + $1
                     WHERE warehouse = $2 AND available >= $1",
                )
                .bind(-d)
                .bind(&self.warehouse)
                .execute(&mut *conn)
                .await
                .map_err(sql_err)?
                .rows_affected()
            } else {
                sqlx::query("UPDATE stock SET held_in = held_in + $1 WHERE warehouse = $2")
                    .bind(d)
                    .bind(&self.warehouse)
                    .execute(&mut *conn)
                    .await
                    .map_err(sql_err)?
                    .rows_affected()
            };
            Ok(if n == 1 { Vote::Yes } else { Vote::No })
        })
    }

    fn commit<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let d = delta(payload)?;
            let sql = if d < 0 {
                "UPDATE stock SET held_out = held_out - $1 WHERE warehouse = $2"
            } else {
                "UPDATE stock SET held_in = held_in - $1, available = available + $1 WHERE warehouse = $2"
            };
            sqlx::query(sql)
                .bind(d.abs())
                .bind(&self.warehouse)
                .execute(&mut *conn)
                .await
                .map_err(sql_err)?;
            record_move(conn, tx_id, d, "commit").await
        })
    }

    fn abort<'a>(
        &'a self,
        tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, ()> {
        Box::pin(async move {
            let d = delta(payload)?;
            let sql = if d < 0 {
                "UPDATE stock SET held_out = held_out - $1, available = available + $1 WHERE warehouse = $2"
            } else {
                "UPDATE stock SET held_in = held_in - $1 WHERE warehouse = $2"
            };
            sqlx::query(sql)
                .bind(d.abs())
                .bind(&self.warehouse)
                .execute(&mut *conn)
                .await
                .map_err(sql_err)?;
            record_move(conn, tx_id, d, "abort").await
        })
    }
}

async fn record_move(
    conn: &mut AnyConnection,
    tx_id: &str,
    d: i64,
    outcome: &str,
) -> Result<(), shoal_core::Error> {
    sqlx::query("INSERT INTO moves (tx_id, delta, outcome) VALUES ($1, $2, $3)")
        .bind(tx_id)
        .bind(d)
        .bind(outcome)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
    Ok(())
}

/// (available, held_out, held_in) of a warehouse.
async fn stock(db: &Db, warehouse: &str) -> (i64, i64, i64) {
    sqlx::query_as("SELECT available, held_out, held_in FROM stock WHERE warehouse = $1")
        .bind(warehouse)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

async fn moves(db: &Db) -> Vec<(String, String)> {
    sqlx::query_as("SELECT tx_id, outcome FROM moves ORDER BY tx_id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Participants by endpoint, called in process. Switches stand in for a network
/// that loses messages.
#[derive(Default)]
struct LocalParticipants {
    by_endpoint: Mutex<HashMap<String, Participant>>,
    /// Commit and abort calls fail (the participant is unreachable).
    deliveries_fail: AtomicBool,
    /// Prepare reaches the participant, but its answer never comes back.
    votes_lost: AtomicBool,
    deliveries: AtomicU32,
}

impl LocalParticipants {
    fn get(&self, endpoint: &str) -> Result<Participant, shoal_core::Error> {
        self.by_endpoint
            .lock()
            .unwrap()
            .get(endpoint)
            .cloned()
            .ok_or_else(|| shoal_core::Error::unavailable(format!("{endpoint} is down")))
    }
}

impl ParticipantLink for LocalParticipants {
    fn prepare<'a>(
        &'a self,
        endpoint: &'a str,
        request: &'a PrepareRequest,
    ) -> LinkFuture<'a, Vote> {
        Box::pin(async move {
            let vote = self.get(endpoint)?.prepare(request).await?;
            if self.votes_lost.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
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
        Box::pin(async move {
            if self.deliveries_fail.load(Ordering::SeqCst) {
                return Err(shoal_core::Error::unavailable(format!(
                    "{endpoint} unreachable"
                )));
            }
            let p = self.get(endpoint)?;
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            match outcome {
                Outcome::Commit => p.commit(tx_id).await.map(|_| ()),
                Outcome::Abort => p.abort(tx_id).await.map(|_| ()),
            }
        })
    }
}

/// The coordinator, called in process; `None` while it is down.
#[derive(Default)]
struct LocalCoordinator {
    current: Mutex<Option<Coordinator>>,
    queries: AtomicU32,
}

impl CoordinatorLink for LocalCoordinator {
    fn decision<'a>(&'a self, _endpoint: &'a str, tx_id: &'a str) -> LinkFuture<'a, Decision> {
        Box::pin(async move {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let c = self
                .current
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| shoal_core::Error::unavailable("coordinator is down"))?;
            c.decision(tx_id).await
        })
    }
}

const COORDINATOR: &str = "http://coordinator.test/2pc/coordinator";

fn coordinator_config() -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(COORDINATOR);
    cfg.prepare_timeout_ms = 2_000;
    cfg.call_timeout_ms = 1_000;
    cfg.retry = Backoff {
        initial_ms: 10,
        max_ms: 100,
    };
    cfg.delivery_wait_ms = 5_000;
    cfg.recovery_interval_ms = 100;
    cfg
}

fn participant_config() -> ParticipantConfig {
    ParticipantConfig {
        // Long, so that a test sees the coordinator's delivery and not the
        // participant's own question, unless it restarts the participant.
        in_doubt_after_ms: 60_000,
        query_interval_ms: 50,
        query_backoff_max_ms: 200,
        call_timeout_ms: 1_000,
        ..ParticipantConfig::default()
    }
}

/// Two warehouses (a with 100 units, b with none), each a participant over its own
/// database, and a coordinator over a third.
struct World {
    urls: Urls,
    parts: Arc<LocalParticipants>,
    coord_link: Arc<LocalCoordinator>,
    a: (Participant, Db),
    b: (Participant, Db),
}

impl World {
    async fn new(tag: &str) -> Self {
        Self::with(tag, Duration::ZERO, participant_config()).await
    }

    async fn with(tag: &str, b_prepare_delay: Duration, pcfg: ParticipantConfig) -> Self {
        Self::on(Urls::sqlite(tag), b_prepare_delay, pcfg).await
    }

    async fn on(urls: Urls, b_prepare_delay: Duration, pcfg: ParticipantConfig) -> Self {
        let parts = Arc::new(LocalParticipants::default());
        let coord_link = Arc::new(LocalCoordinator::default());
        let a = Self::start_warehouse(
            &urls.a,
            &parts,
            &coord_link,
            "a",
            100,
            Duration::ZERO,
            pcfg.clone(),
        )
        .await;
        let b = Self::start_warehouse(&urls.b, &parts, &coord_link, "b", 0, b_prepare_delay, pcfg)
            .await;
        Self {
            urls,
            parts,
            coord_link,
            a,
            b,
        }
    }

    async fn start_warehouse(
        url: &str,
        parts: &Arc<LocalParticipants>,
        coord_link: &Arc<LocalCoordinator>,
        warehouse: &str,
        initial: i64,
        prepare_delay: Duration,
        cfg: ParticipantConfig,
    ) -> (Participant, Db) {
        let db = open_db(url).await;
        sqlx::query(
            "INSERT INTO stock (warehouse, available, held_out, held_in) VALUES ($1, $2, 0, 0)
             ON CONFLICT (warehouse) DO NOTHING",
        )
        .bind(warehouse)
        .bind(initial)
        .execute(db.pool())
        .await
        .unwrap();
        let resource = Arc::new(Stock {
            warehouse: warehouse.to_string(),
            prepare_delay,
        });
        let p = Participant::start("stock", db.clone(), resource, coord_link.clone(), cfg)
            .await
            .unwrap();
        parts
            .by_endpoint
            .lock()
            .unwrap()
            .insert(warehouse.to_string(), p.clone());
        (p, db)
    }

    async fn coordinator(&self, cfg: CoordinatorConfig) -> Coordinator {
        let db = open_db(&self.urls.coordinator).await;
        let c = Coordinator::start(db, self.parts.clone(), cfg)
            .await
            .unwrap();
        *self.coord_link.current.lock().unwrap() = Some(c.clone());
        c
    }

    /// The coordinator goes away (its handle dropped: its tasks stop, its log stays).
    fn crash_coordinator(&self, c: Coordinator) {
        *self.coord_link.current.lock().unwrap() = None;
        drop(c);
    }

    /// Move `n` units from a to b.
    fn transfer(n: i64) -> Vec<Branch> {
        vec![
            Branch::new("a", serde_json::json!({ "delta": -n })),
            Branch::new("b", serde_json::json!({ "delta": n })),
        ]
    }

    async fn state(&self, p: &Participant, tx_id: &str) -> Option<ParticipantState> {
        p.status(tx_id).await.unwrap().map(|s| s.state)
    }

    /// Units are conserved: available plus held out across both warehouses is 100,
    /// and what b holds incoming is what a holds outgoing.
    async fn assert_conserved(&self) {
        let (a_av, a_out, a_in) = stock(&self.a.1, "a").await;
        let (b_av, b_out, b_in) = stock(&self.b.1, "b").await;
        assert_eq!(a_av + a_out + b_av + b_out, 100, "units lost or made");
        assert_eq!(a_in + b_out, 0);
        assert_eq!(a_out, b_in, "held amounts disagree");
    }
}

async fn all_yes_commits_everywhere(urls: Urls) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    let c = w.coordinator(coordinator_config()).await;
    let done = c.execute("t1", World::transfer(5)).await.unwrap();
    assert_eq!(done.outcome, Outcome::Commit);
    assert!(done.done);
    assert_eq!(
        w.state(&w.a.0, "t1").await,
        Some(ParticipantState::Committed)
    );
    assert_eq!(
        w.state(&w.b.0, "t1").await,
        Some(ParticipantState::Committed)
    );
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
    assert_eq!(stock(&w.b.1, "b").await, (5, 0, 0));
    w.assert_conserved().await;
    let s = c.status("t1").await.unwrap().unwrap();
    assert_eq!(s.state, CoordinatorState::Commit);
    assert!(s.done && s.participants.iter().all(|p| p.acked));
    assert_eq!(c.decision("t1").await.unwrap(), Decision::Commit);
}

async fn one_no_aborts_everywhere(urls: Urls) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    let c = w.coordinator(coordinator_config()).await;
    // a has only 100: it votes no; b prepared its incoming units and must let go.
    let done = c.execute("t1", World::transfer(500)).await.unwrap();
    assert_eq!(done.outcome, Outcome::Abort);
    assert!(done.done);
    assert_eq!(w.state(&w.a.0, "t1").await, Some(ParticipantState::Aborted));
    eventually("b aborted", || async {
        w.state(&w.b.0, "t1").await == Some(ParticipantState::Aborted)
    })
    .await;
    assert_eq!(stock(&w.a.1, "a").await, (100, 0, 0));
    assert_eq!(stock(&w.b.1, "b").await, (0, 0, 0));
    // a never held anything, so its resource was never asked to abort.
    assert!(moves(&w.a.1).await.is_empty());
    w.assert_conserved().await;
}

#[tokio::test]
async fn a_participant_that_does_not_answer_in_time_aborts_the_transaction() {
    // b takes 3 s to prepare; the coordinator waits 300 ms.
    let w = World::with("slow", Duration::from_secs(3), participant_config()).await;
    let mut cfg = coordinator_config();
    cfg.prepare_timeout_ms = 300;
    let c = w.coordinator(cfg).await;
    let done = c.execute("t1", World::transfer(5)).await.unwrap();
    assert_eq!(done.outcome, Outcome::Abort);
    assert!(done.done);
    eventually("a aborted", || async {
        w.state(&w.a.0, "t1").await == Some(ParticipantState::Aborted)
    })
    .await;
    // b gave up its prepare on its own at the deadline, and holds nothing.
    eventually("b aborted", || async {
        w.state(&w.b.0, "t1").await == Some(ParticipantState::Aborted)
    })
    .await;
    assert_eq!(stock(&w.a.1, "a").await, (100, 0, 0));
    assert_eq!(stock(&w.b.1, "b").await, (0, 0, 0));
    // A prepare arriving late finds the abort and votes no.
    let late = PrepareRequest {
        tx_id: "t1".into(),
        coordinator: COORDINATOR.into(),
        deadline_ms: shoal_core::unix_ms() + 10_000,
        payload: serde_json::json!({ "delta": 5 }),
    };
    assert_eq!(w.b.0.prepare(&late).await.unwrap(), Vote::No);
    assert_eq!(stock(&w.b.1, "b").await, (0, 0, 0));
}

async fn repeated_prepare_commit_and_abort_have_no_second_effect(urls: Urls) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    let req = |tx: &str, d: i64| PrepareRequest {
        tx_id: tx.into(),
        coordinator: COORDINATOR.into(),
        deadline_ms: shoal_core::unix_ms() + 10_000,
        payload: serde_json::json!({ "delta": d }),
    };
    let a = &w.a.0;
    assert_eq!(a.prepare(&req("t1", -5)).await.unwrap(), Vote::Yes);
    assert_eq!(a.prepare(&req("t1", -5)).await.unwrap(), Vote::Yes);
    assert_eq!(stock(&w.a.1, "a").await, (95, 5, 0), "prepared once");
    // Two commits at once, then one more: one effect.
    let (x, y) = tokio::join!(a.commit("t1"), a.commit("t1"));
    assert_eq!(x.unwrap().state, ParticipantState::Committed);
    assert_eq!(y.unwrap().state, ParticipantState::Committed);
    a.commit("t1").await.unwrap();
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
    assert_eq!(moves(&w.a.1).await, vec![("t1".into(), "commit".into())]);
    // An abort after the commit contradicts it: refused, nothing changes.
    let e = a.abort("t1").await.unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::Conflict);
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));

    assert_eq!(a.prepare(&req("t2", -10)).await.unwrap(), Vote::Yes);
    let (x, y) = tokio::join!(a.abort("t2"), a.abort("t2"));
    x.unwrap();
    y.unwrap();
    a.abort("t2").await.unwrap();
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
    assert_eq!(
        moves(&w.a.1).await,
        vec![
            ("t1".into(), "commit".into()),
            ("t2".into(), "abort".into())
        ]
    );
    assert_eq!(
        a.commit("t2").await.unwrap_err().kind(),
        shoal_core::ErrorKind::Conflict
    );
    // Commit for a transaction never prepared here is refused too.
    assert_eq!(
        a.commit("t3").await.unwrap_err().kind(),
        shoal_core::ErrorKind::Conflict
    );
    // Abort before prepare is remembered: the late prepare votes no.
    a.abort("t4").await.unwrap();
    assert_eq!(a.prepare(&req("t4", -1)).await.unwrap(), Vote::No);
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
}

async fn a_restarted_coordinator_resends_a_decision_not_yet_delivered(urls: Urls) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    w.parts.deliveries_fail.store(true, Ordering::SeqCst);
    let mut cfg = coordinator_config();
    cfg.delivery_wait_ms = 200;
    let c = w.coordinator(cfg.clone()).await;
    let done = c.execute("t1", World::transfer(5)).await.unwrap();
    assert_eq!(done.outcome, Outcome::Commit);
    assert!(!done.done, "nobody could be told");
    assert_eq!(
        w.state(&w.a.0, "t1").await,
        Some(ParticipantState::Prepared)
    );
    assert_eq!(
        w.state(&w.b.0, "t1").await,
        Some(ParticipantState::Prepared)
    );
    assert_eq!(stock(&w.a.1, "a").await, (95, 5, 0), "held, not moved");
    w.crash_coordinator(c);

    w.parts.deliveries_fail.store(false, Ordering::SeqCst);
    let c = w.coordinator(cfg).await;
    eventually("both committed", || async {
        w.state(&w.a.0, "t1").await == Some(ParticipantState::Committed)
            && w.state(&w.b.0, "t1").await == Some(ParticipantState::Committed)
    })
    .await;
    eventually("done", || async {
        c.status("t1").await.unwrap().is_some_and(|s| s.done)
    })
    .await;
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
    assert_eq!(stock(&w.b.1, "b").await, (5, 0, 0));
    assert_eq!(moves(&w.b.1).await.len(), 1);
    // The participants never asked: the coordinator's re-send did it.
    assert_eq!(w.coord_link.queries.load(Ordering::SeqCst), 0);
}

async fn an_undecided_transaction_is_aborted_when_the_coordinator_restarts(urls: Urls) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    w.parts.votes_lost.store(true, Ordering::SeqCst);
    let mut cfg = coordinator_config();
    cfg.prepare_timeout_ms = 60_000;
    let c = w.coordinator(cfg.clone()).await;
    let c2 = c.clone();
    let running = tokio::spawn(async move { c2.execute("t1", World::transfer(5)).await });
    eventually("both prepared", || async {
        w.state(&w.a.0, "t1").await == Some(ParticipantState::Prepared)
            && w.state(&w.b.0, "t1").await == Some(ParticipantState::Prepared)
    })
    .await;
    // The coordinator dies with the votes in and no decision logged.
    running.abort();
    let _ = running.await;
    w.crash_coordinator(c);
    w.parts.votes_lost.store(false, Ordering::SeqCst);

    let db = open_db(&w.urls.coordinator).await;
    let c = Coordinator::open(db, w.parts.clone(), cfg).await.unwrap();
    assert_eq!(
        c.recover().await.unwrap(),
        Recovered {
            aborted: 1,
            redelivering: 1
        }
    );
    eventually("both aborted", || async {
        w.state(&w.a.0, "t1").await == Some(ParticipantState::Aborted)
            && w.state(&w.b.0, "t1").await == Some(ParticipantState::Aborted)
    })
    .await;
    assert_eq!(c.decision("t1").await.unwrap(), Decision::Abort);
    assert_eq!(stock(&w.a.1, "a").await, (100, 0, 0));
    assert_eq!(stock(&w.b.1, "b").await, (0, 0, 0));
    w.assert_conserved().await;
}

async fn a_participant_restarted_while_prepared_learns_the_outcome_from_the_coordinator(
    urls: Urls,
) {
    let w = World::on(urls, Duration::ZERO, participant_config()).await;
    w.parts.deliveries_fail.store(true, Ordering::SeqCst);
    let mut cfg = coordinator_config();
    cfg.delivery_wait_ms = 200;
    let c = w.coordinator(cfg).await;
    let done = c.execute("t1", World::transfer(5)).await.unwrap();
    assert_eq!((done.outcome, done.done), (Outcome::Commit, false));

    // b goes down while prepared and comes back on the same database.
    w.parts.by_endpoint.lock().unwrap().remove("b");
    let World { a, b, .. } = w;
    let (b_participant, b_db) = b;
    drop(b_participant);
    b_db.close().await;
    let w = World {
        a,
        b: World::start_warehouse(
            &w.urls.b,
            &w.parts,
            &w.coord_link,
            "b",
            0,
            Duration::ZERO,
            participant_config(),
        )
        .await,
        urls: w.urls,
        parts: w.parts,
        coord_link: w.coord_link,
    };
    // At start it asks the coordinator about everything it holds, and commits.
    eventually("b committed", || async {
        w.state(&w.b.0, "t1").await == Some(ParticipantState::Committed)
    })
    .await;
    assert_eq!(stock(&w.b.1, "b").await, (5, 0, 0));
    assert!(w.coord_link.queries.load(Ordering::SeqCst) >= 1);
    // a was not restarted and has not been told yet: still held.
    assert_eq!(
        w.state(&w.a.0, "t1").await,
        Some(ParticipantState::Prepared)
    );

    w.parts.deliveries_fail.store(false, Ordering::SeqCst);
    eventually("done", || async {
        c.status("t1").await.unwrap().is_some_and(|s| s.done)
    })
    .await;
    assert_eq!(
        w.state(&w.a.0, "t1").await,
        Some(ParticipantState::Committed)
    );
    assert_eq!(stock(&w.a.1, "a").await, (95, 0, 0));
    // b heard commit twice (its question, then the delivery) and applied it once.
    assert_eq!(stock(&w.b.1, "b").await, (5, 0, 0));
    assert_eq!(moves(&w.b.1).await, vec![("t1".into(), "commit".into())]);
    w.assert_conserved().await;
}

#[tokio::test]
async fn a_transaction_in_doubt_too_long_is_reported_stuck_until_the_coordinator_answers() {
    let cfg = ParticipantConfig {
        in_doubt_after_ms: 20,
        max_in_doubt_ms: 100,
        query_interval_ms: 20,
        query_backoff_max_ms: 50,
        ..participant_config()
    };
    let w = World::with("stuck", Duration::ZERO, cfg).await;
    // Prepared by a coordinator that is not there to answer.
    let req = PrepareRequest {
        tx_id: "t1".into(),
        coordinator: COORDINATOR.into(),
        deadline_ms: shoal_core::unix_ms() + 10_000,
        payload: serde_json::json!({ "delta": -5 }),
    };
    assert_eq!(w.a.0.prepare(&req).await.unwrap(), Vote::Yes);
    eventually("reported stuck", || async { w.a.0.stuck_in_doubt() == 1 }).await;
    assert_eq!(
        w.state(&w.a.0, "t1").await,
        Some(ParticipantState::Prepared)
    );
    assert_eq!(w.a.0.in_doubt().await.unwrap().len(), 1);
    // A coordinator that never logged t1 answers abort (presumed abort).
    let c = w.coordinator(coordinator_config()).await;
    eventually("aborted", || async {
        w.state(&w.a.0, "t1").await == Some(ParticipantState::Aborted)
    })
    .await;
    eventually("no longer stuck", || async { w.a.0.stuck_in_doubt() == 0 }).await;
    assert_eq!(stock(&w.a.1, "a").await, (100, 0, 0));
    // That answer is durable: the id cannot be used to commit afterwards.
    let e = c.execute("t1", World::transfer(5)).await.unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::Conflict);
}

#[tokio::test]
async fn the_decision_query_is_pending_within_the_deadline() {
    let w = World::new("pending").await;
    w.parts.votes_lost.store(true, Ordering::SeqCst);
    let mut cfg = coordinator_config();
    cfg.prepare_timeout_ms = 60_000;
    let c = w.coordinator(cfg).await;
    let c2 = c.clone();
    let _running = tokio::spawn(async move { c2.execute("t1", World::transfer(5)).await });
    eventually("logged", || async {
        c.status("t1").await.unwrap().is_some()
    })
    .await;
    assert_eq!(c.decision("t1").await.unwrap(), Decision::Pending);
    assert_eq!(c.in_flight(), 1);
}

#[tokio::test]
async fn bad_input_and_limits_are_refused() {
    let w = World::new("limits").await;
    let mut cfg = coordinator_config();
    cfg.max_participants = 1;
    cfg.max_payload_bytes = 32;
    let c = w.coordinator(cfg).await;
    let kind = |r: Result<Completion, shoal_core::Error>| r.unwrap_err().kind();
    use shoal_core::ErrorKind::InvalidInput;
    assert_eq!(
        kind(
            c.execute("bad id/", vec![Branch::new("a", serde_json::json!({}))])
                .await
        ),
        InvalidInput
    );
    assert_eq!(kind(c.execute("t1", vec![]).await), InvalidInput);
    assert_eq!(
        kind(c.execute("t1", World::transfer(1)).await),
        InvalidInput
    );
    let big = serde_json::json!({ "delta": -1, "note": "x".repeat(100) });
    assert_eq!(
        kind(c.execute("t1", vec![Branch::new("a", big)]).await),
        InvalidInput
    );
    // Config typos are errors.
    let typo = serde_json::from_str::<CoordinatorConfig>(
        r#"{"endpoint": "http://x", "prepare_timout_ms": 5}"#,
    );
    assert!(typo.is_err());
    assert!(serde_json::from_str::<ParticipantConfig>(r#"{"max_in_doubt": 5}"#).is_err());
    let ok: ParticipantConfig = serde_json::from_str(r#"{"max_in_doubt_ms": 5}"#).unwrap();
    assert_eq!(ok.max_in_doubt_ms, 5);
    let db = open_db(&format!("{}-other", w.urls.coordinator)).await;
    let e = Coordinator::open(db, w.parts.clone(), CoordinatorConfig::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::Config);
}

#[test]
fn backoff_grows_and_is_capped() {
    let b = Backoff {
        initial_ms: 100,
        max_ms: 1_000,
    };
    for failures in 1..40 {
        let d = b.delay(failures).as_millis() as u64;
        let full = (100u64 << (failures - 1).min(30)).min(1_000);
        assert!(d >= full / 2 && d <= full, "{failures}: {d}");
    }
}

#[tokio::test]
async fn over_http_on_loopback_all_yes_commits() {
    let dir = temp_dir("http");
    let listen = |router: axum::Router| async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        addr
    };
    let coord_link: Arc<dyn CoordinatorLink> = Arc::new(HttpCoordinatorLink::new());
    let mut endpoints = Vec::new();
    let mut dbs = Vec::new();
    for (wh, initial) in [("a", 100), ("b", 0)] {
        let db = open_db(&sqlite(&dir, wh)).await;
        sqlx::query("INSERT INTO stock VALUES ($1, $2, 0, 0)")
            .bind(wh)
            .bind(initial)
            .execute(db.pool())
            .await
            .unwrap();
        let p = Participant::start(
            "stock",
            db.clone(),
            Arc::new(Stock {
                warehouse: wh.into(),
                prepare_delay: Duration::ZERO,
            }),
            coord_link.clone(),
            participant_config(),
        )
        .await
        .unwrap();
        let addr = listen(participant_router(p)).await;
        endpoints.push(format!("http://{addr}/2pc/stock"));
        dbs.push(db);
    }
    // The coordinator's endpoint is known only once it listens: bind first.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = CoordinatorConfig::new(format!("http://{addr}{COORDINATOR_PREFIX}"));
    let c = Coordinator::start(
        open_db(&sqlite(&dir, "coordinator")).await,
        Arc::new(HttpParticipantLink::new()),
        cfg,
    )
    .await
    .unwrap();
    let router = coordinator_router(c.clone());
    tokio::spawn(async move { axum::serve(l, router).await });

    let done = c
        .execute(
            "t1",
            vec![
                Branch::new(&endpoints[0], serde_json::json!({ "delta": -7 })),
                Branch::new(&endpoints[1], serde_json::json!({ "delta": 7 })),
            ],
        )
        .await
        .unwrap();
    assert_eq!((done.outcome, done.done), (Outcome::Commit, true));
    assert_eq!(stock(&dbs[0], "a").await, (93, 0, 0));
    assert_eq!(stock(&dbs[1], "b").await, (7, 0, 0));
    // The participant's question and the coordinator's answer over HTTP.
    let link = HttpCoordinatorLink::new();
    let url = format!("http://{addr}{COORDINATOR_PREFIX}");
    assert_eq!(link.decision(&url, "t1").await.unwrap(), Decision::Commit);
    assert_eq!(link.decision(&url, "never").await.unwrap(), Decision::Abort);
    // A repeated commit over HTTP is acknowledged and changes nothing.
    HttpParticipantLink::new()
        .deliver(&endpoints[1], "t1", Outcome::Commit)
        .await
        .unwrap();
    assert_eq!(stock(&dbs[1], "b").await, (7, 0, 0));
    // A contradicting abort is a 409 the coordinator sees as an error.
    let e = HttpParticipantLink::new()
        .deliver(&endpoints[1], "t1", Outcome::Abort)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::Conflict);
}

/// The links in mutual TLS mode: every call is TLS (an `http://` endpoint too),
/// the server must prove to be the service the endpoint belongs to, and a plain
/// link cannot reach a mutual-mode participant.
#[tokio::test]
async fn mutual_links_check_the_peers_identity_and_plain_text_is_refused() {
    let dir = temp_dir("mtls");
    let ca = shoal_tls::Ca::load_or_create(&dir.join("ca"), "shoal.local").unwrap();
    let store = |name: &str| {
        let id = shoal_tls::SpiffeId::for_name("shoal.local", name).unwrap();
        let (key, res) = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        shoal_tls::CertStore::new(
            shoal_tls::Material::from_pem(&res.cert_pem, &key, &res.ca_pem).unwrap(),
        )
    };
    let db = open_db(&sqlite(&dir, "depot")).await;
    sqlx::query("INSERT INTO stock VALUES ('depot', 10, 0, 0)")
        .execute(db.pool())
        .await
        .unwrap();
    let p = Participant::start(
        "depot",
        db.clone(),
        Arc::new(Stock {
            warehouse: "depot".into(),
            prepare_delay: Duration::ZERO,
        }),
        Arc::new(HttpCoordinatorLink::new()),
        participant_config(),
    )
    .await
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let config = shoal_tls::server_config(store("depot")).unwrap();
    tokio::spawn(shoal_tls::serve(
        l,
        config,
        participant_router(p.clone()),
        std::future::pending::<()>(),
    ));
    assert_eq!(
        participant_name(&format!("https://{addr}/2pc/depot/")),
        Some("depot")
    );
    assert_eq!(participant_name("https://h/2pc/"), None);

    // The coordinator's link, as the inventory: the depot proves to be the depot.
    let link = HttpParticipantLink::mutual(store("inventory"), |e| {
        participant_name(e).map(String::from)
    });
    for endpoint in [
        format!("https://{addr}/2pc/depot"),
        format!("http://{addr}/2pc/depot"),
    ] {
        link.deliver(&endpoint, "never-prepared", Outcome::Abort)
            .await
            .unwrap();
    }
    assert_eq!(
        p.status("never-prepared").await.unwrap().unwrap().state,
        ParticipantState::Aborted
    );
    // Expecting another service at that address: refused at the handshake.
    let wrong = HttpParticipantLink::mutual(store("inventory"), |_| Some("orders".into()));
    let e = wrong
        .deliver(&format!("https://{addr}/2pc/depot"), "t2", Outcome::Abort)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::Unavailable, "{e}");
    // No identity to expect: no call.
    let none = HttpParticipantLink::mutual(store("inventory"), |_| None);
    let e = none
        .deliver(&format!("https://{addr}/2pc/depot"), "t2", Outcome::Abort)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::InvalidInput, "{e}");
    // A plain link: an https:// endpoint is not for it, plain text is refused.
    let plain = HttpParticipantLink::new();
    let e = plain
        .deliver(&format!("https://{addr}/2pc/depot"), "t2", Outcome::Abort)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_core::ErrorKind::InvalidInput, "{e}");
    assert!(plain
        .deliver(&format!("http://{addr}/2pc/depot"), "t2", Outcome::Abort)
        .await
        .is_err());
    assert!(p.status("t2").await.unwrap().is_none());
}

/// The scenarios above, each on SQLite files.
mod on_sqlite {
    use super::*;

    #[tokio::test]
    async fn all_yes_commits_everywhere() {
        super::all_yes_commits_everywhere(Urls::sqlite("all-yes")).await;
    }

    #[tokio::test]
    async fn one_no_aborts_everywhere() {
        super::one_no_aborts_everywhere(Urls::sqlite("one-no")).await;
    }

    #[tokio::test]
    async fn repeated_prepare_commit_and_abort_have_no_second_effect() {
        super::repeated_prepare_commit_and_abort_have_no_second_effect(Urls::sqlite("repeat"))
            .await;
    }

    #[tokio::test]
    async fn a_restarted_coordinator_resends_a_decision_not_yet_delivered() {
        super::a_restarted_coordinator_resends_a_decision_not_yet_delivered(Urls::sqlite("resend"))
            .await;
    }

    #[tokio::test]
    async fn an_undecided_transaction_is_aborted_when_the_coordinator_restarts() {
        super::an_undecided_transaction_is_aborted_when_the_coordinator_restarts(Urls::sqlite(
            "undecided",
        ))
        .await;
    }

    #[tokio::test]
    async fn a_participant_restarted_while_prepared_learns_the_outcome_from_the_coordinator() {
        super::a_participant_restarted_while_prepared_learns_the_outcome_from_the_coordinator(
            Urls::sqlite("participant-restart"),
        )
        .await;
    }
}

/// The same scenarios on a real PostgreSQL server (`scripts/postgres`), each on
/// fresh databases: the tables and queries are portable.
mod on_postgres {
    use super::*;

    #[tokio::test]
    async fn all_yes_commits_everywhere() {
        super::all_yes_commits_everywhere(Urls::postgres().await).await;
    }

    #[tokio::test]
    async fn one_no_aborts_everywhere() {
        super::one_no_aborts_everywhere(Urls::postgres().await).await;
    }

    #[tokio::test]
    async fn repeated_prepare_commit_and_abort_have_no_second_effect() {
        super::repeated_prepare_commit_and_abort_have_no_second_effect(Urls::postgres().await)
            .await;
    }

    #[tokio::test]
    async fn a_restarted_coordinator_resends_a_decision_not_yet_delivered() {
        super::a_restarted_coordinator_resends_a_decision_not_yet_delivered(Urls::postgres().await)
            .await;
    }

    #[tokio::test]
    async fn an_undecided_transaction_is_aborted_when_the_coordinator_restarts() {
        super::an_undecided_transaction_is_aborted_when_the_coordinator_restarts(
            Urls::postgres().await,
        )
        .await;
    }

    #[tokio::test]
    async fn a_participant_restarted_while_prepared_learns_the_outcome_from_the_coordinator() {
        super::a_participant_restarted_while_prepared_learns_the_outcome_from_the_coordinator(
            Urls::postgres().await,
        )
        .await;
    }
}
