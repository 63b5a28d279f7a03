//! A two-phase commit process for the crash tests (`tests/tests/it/twophase.rs`):
//! a coordinator or a stock participant, each over its own SQLite file, serving on
//! 127.0.0.1 and printing `listening on <addr>` once it does.
//!
//! ```text
//! twophase-probe coordinator --db FILE --listen ADDR [--prepare-timeout-ms N]
//!                [--hold-votes-ms N] [--hold-decision-ms N]
//! twophase-probe participant --db FILE --listen ADDR --warehouse NAME --initial N
//! ```
//!
//! The coordinator serves the crate's coordinator routes and `POST /tx`
//! (`{"tx_id":…,"participants":[{"endpoint":…,"payload":…}]}`, answered 202 at once,
//! the transaction running in the background). Its hold flags make the test's crash
//! window real without any platform setting: `--hold-votes-ms` keeps each vote
//! (already durable at the participant) from the coordinator that long, so it can
//! be killed with every participant prepared and nothing decided;
//! `--hold-decision-ms` delays each commit or abort call, so it can be killed with
//! the decision logged and not delivered.
//!
//! The participant serves the crate's routes under `/2pc/stock` and `GET /stock`.
//! Its effect is one warehouse's stock: `{"delta": n}` moves n units in or out,
//! held at prepare, moved at commit, released at abort; each commit or abort also
//! writes a `moves` row keyed by the transaction, so applying one twice would fail.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use shoal::sqlx::{self, AnyConnection};
use shoal_core::{ApiError, Error};
use shoal_db::{Db, DbOptions, Migration};
use shoal_twophase::{
    coordinator_router, participant_router, Backoff, Branch, Coordinator, CoordinatorConfig,
    HttpCoordinatorLink, HttpParticipantLink, LinkFuture, Outcome, Participant, ParticipantConfig,
    ParticipantLink, PrepareRequest, Resource, ResourceFuture, Vote, COORDINATOR_PREFIX,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

static STOCK: &[Migration] = &[Migration::new(
    1,
    "stock",
    "CREATE TABLE stock (
        warehouse TEXT PRIMARY KEY,
        available INTEGER NOT NULL,
        held_out INTEGER NOT NULL,
        held_in INTEGER NOT NULL
    );
    CREATE TABLE moves (tx_id TEXT PRIMARY KEY, delta INTEGER NOT NULL, outcome TEXT NOT NULL);",
)];

/// `--key value` pairs after the role.
fn flags(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {k:?}"))?;
        let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        out.insert(key.to_string(), v.clone());
    }
    Ok(out)
}

fn need<'a>(f: &'a HashMap<String, String>, key: &str) -> Result<&'a str, String> {
    f.get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("--{key} is required"))
}

fn num(f: &HashMap<String, String>, key: &str, default: u64) -> Result<u64, String> {
    match f.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{key} {v:?} is not a number")),
    }
}

async fn open(path: &str) -> Result<Db, String> {
    Db::open(&DbOptions::new(format!("sqlite://{path}")), STOCK)
        .await
        .map_err(|e| e.to_string())
}

async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    if !a.ip().is_loopback() {
        return Err(format!("{a}: the probe listens on 127.0.0.1 only"));
    }
    Ok((l, a))
}

async fn serve(l: tokio::net::TcpListener, addr: SocketAddr, router: Router) -> Result<(), String> {
    // The test reads this line to learn the port.
    println!("listening on {addr}");
    axum::serve(l, router)
        .with_graceful_shutdown(shoal_core::shutdown::signal())
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("coordinator") => coordinator(&args[1..]).await,
        Some("participant") => participant(&args[1..]).await,
        _ => Err("usage: twophase-probe coordinator|participant --db FILE --listen ADDR …".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twophase-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The HTTP link with the probe's holds in front of it.
struct HoldLink {
    http: HttpParticipantLink,
    hold_votes: Duration,
    hold_decision: Duration,
}

impl ParticipantLink for HoldLink {
    fn prepare<'a>(
        &'a self,
        endpoint: &'a str,
        request: &'a PrepareRequest,
    ) -> LinkFuture<'a, Vote> {
        Box::pin(async move {
            let vote = self.http.prepare(endpoint, request).await?;
            tokio::time::sleep(self.hold_votes).await;
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
            tokio::time::sleep(self.hold_decision).await;
            self.http.deliver(endpoint, tx_id, outcome).await
        })
    }
}

#[derive(serde::Deserialize)]
struct Begin {
    tx_id: String,
    participants: Vec<BranchBody>,
}

#[derive(serde::Deserialize)]
struct BranchBody {
    endpoint: String,
    payload: serde_json::Value,
}

async fn coordinator(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let db = open(need(&f, "db")?).await?;
    let (l, addr) = bind(need(&f, "listen")?).await?;
    let hold_votes = num(&f, "hold-votes-ms", 0)?;
    let hold_decision = num(&f, "hold-decision-ms", 0)?;
    let mut cfg = CoordinatorConfig::new(format!("http://{addr}{COORDINATOR_PREFIX}"));
    cfg.prepare_timeout_ms = num(&f, "prepare-timeout-ms", 60_000)?;
    // Each call waits out the hold first, so it must be allowed more than that.
    cfg.call_timeout_ms = 2_000 + hold_decision;
    cfg.retry = Backoff {
        initial_ms: 50,
        max_ms: 500,
    };
    cfg.recovery_interval_ms = 200;
    let link = Arc::new(HoldLink {
        http: HttpParticipantLink::new(),
        hold_votes: Duration::from_millis(hold_votes),
        hold_decision: Duration::from_millis(hold_decision),
    });
    let c = Coordinator::start(db, link, cfg)
        .await
        .map_err(|e| e.to_string())?;
    let router = coordinator_router(c.clone()).route("/tx", post(begin).with_state(c));
    serve(l, addr, router).await
}

async fn begin(
    State(c): State<Coordinator>,
    body: Bytes,
) -> Result<(http::StatusCode, &'static str), ApiError> {
    let b: Begin =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    let branches = b
        .participants
        .into_iter()
        .map(|p| Branch::new(p.endpoint, p.payload))
        .collect();
    tokio::spawn(async move {
        if let Err(e) = c.execute(&b.tx_id, branches).await {
            eprintln!("twophase-probe: transaction {}: {e}", b.tx_id);
        }
    });
    Ok((http::StatusCode::ACCEPTED, "started"))
}

async fn participant(args: &[String]) -> Result<(), String> {
    let f = flags(args)?;
    let db = open(need(&f, "db")?).await?;
    let warehouse = need(&f, "warehouse")?.to_string();
    let initial = num(&f, "initial", 0)? as i64;
    // Only the first start sets the stock; a restart finds it.
    sqlx::query(
        "INSERT INTO stock (warehouse, available, held_out, held_in) VALUES ($1, $2, 0, 0)
         ON CONFLICT (warehouse) DO NOTHING",
    )
    .bind(&warehouse)
    .bind(initial)
    .execute(db.pool())
    .await
    .map_err(|e| e.to_string())?;
    let (l, addr) = bind(need(&f, "listen")?).await?;
    let cfg = ParticipantConfig {
        in_doubt_after_ms: 500,
        query_interval_ms: 100,
        query_backoff_max_ms: 500,
        call_timeout_ms: 2_000,
        max_in_doubt_ms: 10_000,
        ..ParticipantConfig::default()
    };
    let resource = Arc::new(Stock {
        warehouse: warehouse.clone(),
    });
    let p = Participant::start(
        "stock",
        db.clone(),
        resource,
        Arc::new(HttpCoordinatorLink::new()),
        cfg,
    )
    .await
    .map_err(|e| e.to_string())?;
    let router = participant_router(p).route("/stock", get(show_stock).with_state((db, warehouse)));
    serve(l, addr, router).await
}

async fn show_stock(
    State((db, warehouse)): State<(Db, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let err = |e: sqlx::Error| ApiError::from(Error::internal("reading stock").with_source(e));
    let (available, held_out, held_in): (i64, i64, i64) =
        sqlx::query_as("SELECT available, held_out, held_in FROM stock WHERE warehouse = $1")
            .bind(&warehouse)
            .fetch_one(db.pool())
            .await
            .map_err(err)?;
    let moves: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT tx_id, delta, outcome FROM moves ORDER BY tx_id")
            .fetch_all(db.pool())
            .await
            .map_err(err)?;
    Ok(Json(serde_json::json!({
        "warehouse": warehouse,
        "available": available,
        "held_out": held_out,
        "held_in": held_in,
        "moves": moves,
    })))
}

/// One warehouse's stock as a two-phase commit resource.
struct Stock {
    warehouse: String,
}

fn delta(payload: &serde_json::Value) -> Result<i64, Error> {
    payload["delta"]
        .as_i64()
        .ok_or_else(|| Error::internal("payload without a whole-number delta"))
}

fn sql_err(e: sqlx::Error) -> Error {
    Error::internal("updating stock").with_source(e)
}

async fn record_move(
    conn: &mut AnyConnection,
    tx_id: &str,
    d: i64,
    outcome: &str,
) -> Result<(), Error> {
    sqlx::query("INSERT INTO moves (tx_id, delta, outcome) VALUES ($1, $2, $3)")
        .bind(tx_id)
        .bind(d)
        .bind(outcome)
        .execute(&mut *conn)
        .await
        .map_err(sql_err)?;
    Ok(())
}

impl Resource for Stock {
    fn prepare<'a>(
        &'a self,
        _tx_id: &'a str,
        payload: &'a serde_json::Value,
        conn: &'a mut AnyConnection,
    ) -> ResourceFuture<'a, Vote> {
        Box::pin(async move {
            let d = delta(payload)?;
            // Out: reserve units that are there; in: announce incoming units.
            let sql = if d < 0 {
                "UPDATE stock SET available = available - $1, held_out = held_out + $1
                 WHERE warehouse = $2 AND available >= $1"
            } else {
                "UPDATE stock SET held_in = held_in + $1 WHERE warehouse = $2"
            };
            let n = sqlx::query(sql)
                .bind(d.abs())
                .bind(&self.warehouse)
                .execute(&mut *conn)
                .await
                .map_err(sql_err)?
                .rows_affected();
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
