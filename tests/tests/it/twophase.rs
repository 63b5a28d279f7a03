//! Two-phase commit across real crashes: a coordinator and two stock participants,
//! each a `twophase-probe` process with its own SQLite file on 127.0.0.1, killed
//! with SIGKILL at the protocol's worst moments and restarted on the same file and
//! port. After each, every participant reaches the coordinator's outcome, units are
//! conserved, and no transaction is applied twice (each application writes a row
//! keyed by the transaction).

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use shoal::testing::{get, request};
use shoal_tests::{eventually, temp_dir, ChildGuard};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long any one wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

/// A probe process and where it listens.
struct Probe {
    child: ChildGuard,
    addr: SocketAddr,
    // Kept open so the probe never writes into a closed pipe.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Probe {
    /// Start `twophase-probe <args>` and read the address it prints.
    async fn start(args: Vec<String>) -> Self {
        let mut child = std::process::Command::new(shoal_tests::bin_dir().join("twophase-probe"))
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start twophase-probe");
        let stdout = child.stdout.take().expect("stdout");
        let child = ChildGuard(child);
        let (line, reader) = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            (line, reader)
        })
        .await
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("twophase-probe {args:?} printed {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            _stdout: reader,
        }
    }

    fn kill(mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn coordinator(dir: &Path, listen: &str, extra: &[&str]) -> Probe {
    let db = dir.join("coordinator.db");
    let mut a = args(&[
        "coordinator",
        "--db",
        db.to_str().unwrap(),
        "--listen",
        listen,
    ]);
    a.extend(args(extra));
    Probe::start(a).await
}

async fn participant(dir: &Path, warehouse: &str, initial: i64, listen: &str) -> Probe {
    let db = dir.join(format!("{warehouse}.db"));
    Probe::start(args(&[
        "participant",
        "--db",
        db.to_str().unwrap(),
        "--listen",
        listen,
        "--warehouse",
        warehouse,
        "--initial",
        &initial.to_string(),
    ]))
    .await
}

async fn json_at(addr: SocketAddr, path: &str) -> Option<Value> {
    match get(addr, path).await {
        Ok(a) if a.status == StatusCode::OK => Some(a.json()),
        _ => None,
    }
}

/// A participant's state of `tx` ("prepared", "committed", "aborted"), if it answers.
async fn p_state(p: SocketAddr, tx: &str) -> Option<String> {
    json_at(p, &format!("/2pc/stock/tx/{tx}"))
        .await
        .and_then(|v| v["state"].as_str().map(String::from))
}

/// The coordinator's (state, done) of `tx`, if it answers.
async fn c_state(c: SocketAddr, tx: &str) -> Option<(String, bool)> {
    let v = json_at(c, &format!("/2pc/coordinator/tx/{tx}")).await?;
    Some((v["state"].as_str()?.to_string(), v["done"].as_bool()?))
}

async fn all_in(ps: &[SocketAddr], tx: &str, state: &str) -> bool {
    for p in ps {
        if p_state(*p, tx).await.as_deref() != Some(state) {
            return false;
        }
    }
    true
}

/// Ask the coordinator to move `n` units from warehouse a to warehouse b.
async fn start_transfer(c: SocketAddr, tx: &str, a: SocketAddr, b: SocketAddr, n: i64) {
    let body = json!({
        "tx_id": tx,
        "participants": [
            { "endpoint": format!("http://{a}/2pc/stock"), "payload": { "delta": -n } },
            { "endpoint": format!("http://{b}/2pc/stock"), "payload": { "delta": n } },
        ]
    });
    let answer = request(
        c,
        Method::POST,
        "/tx",
        &[("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
}

/// A warehouse's stock: (available, held_out, held_in, moves as (tx, delta, outcome)).
async fn stock(p: SocketAddr) -> (i64, i64, i64, Vec<(String, i64, String)>) {
    let v = json_at(p, "/stock").await.expect("stock");
    let moves = serde_json::from_value(v["moves"].clone()).unwrap();
    (
        v["available"].as_i64().unwrap(),
        v["held_out"].as_i64().unwrap(),
        v["held_in"].as_i64().unwrap(),
        moves,
    )
}

/// A participant's state of `tx` read from its database file, for a dead process.
async fn state_in_file(file: PathBuf, tx: &str) -> Option<String> {
    let db = shoal_db::Db::open(
        &shoal_db::DbOptions::new(format!("sqlite://{}", file.display())),
        &[],
    )
    .await
    .unwrap();
    let row: Option<(String,)> =
        shoal::sqlx::query_as("SELECT state FROM _shoal_2pc_participant WHERE tx_id = $1")
            .bind(tx)
            .fetch_optional(db.pool())
            .await
            .unwrap();
    db.close().await;
    row.map(|r| r.0)
}

/// The coordinator is killed with every participant prepared and no decision
/// logged (its votes held back by the probe): after its restart it decides abort,
/// and every participant aborts and gives its units back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_before_deciding_aborts_everywhere_after_restart() {
    shoal_tests::build_binaries();
    let dir = temp_dir("2pc-coordinator-undecided");
    let a = participant(&dir, "a", 100, "127.0.0.1:0").await;
    let b = participant(&dir, "b", 0, "127.0.0.1:0").await;
    let ps = [a.addr, b.addr];
    let c = coordinator(&dir, "127.0.0.1:0", &["--hold-votes-ms", "60000"]).await;
    let c_addr = c.addr;

    start_transfer(c_addr, "t1", a.addr, b.addr, 5).await;
    assert!(
        eventually(WAIT, || all_in(&ps, "t1", "prepared")).await,
        "the participants did not prepare"
    );
    assert_eq!(
        c_state(c_addr, "t1").await,
        Some(("preparing".into(), false))
    );
    c.kill();
    // Prepared participants do not decide alone.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(all_in(&ps, "t1", "prepared").await);
    assert_eq!(stock(a.addr).await.0, 95, "a holds the units");

    let _c = coordinator(&dir, &c_addr.to_string(), &[]).await;
    assert!(
        eventually(WAIT, || all_in(&ps, "t1", "aborted")).await,
        "the participants did not abort"
    );
    assert!(
        eventually(WAIT, || async {
            c_state(c_addr, "t1").await == Some(("abort".into(), true))
        })
        .await,
        "the coordinator did not finish: {:?}",
        c_state(c_addr, "t1").await
    );
    let (a_av, a_out, _, a_moves) = stock(a.addr).await;
    let (b_av, _, b_in, b_moves) = stock(b.addr).await;
    assert_eq!((a_av, a_out, b_av, b_in), (100, 0, 0, 0));
    assert_eq!(a_moves, vec![("t1".to_string(), -5, "abort".to_string())]);
    assert_eq!(b_moves, vec![("t1".to_string(), 5, "abort".to_string())]);
}

/// The coordinator is killed with commit logged and not yet delivered (the probe
/// holds its commit calls): after its restart every participant commits, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_deciding_commit_commits_everywhere_after_restart() {
    shoal_tests::build_binaries();
    let dir = temp_dir("2pc-coordinator-decided");
    let a = participant(&dir, "a", 100, "127.0.0.1:0").await;
    let b = participant(&dir, "b", 0, "127.0.0.1:0").await;
    let ps = [a.addr, b.addr];
    let c = coordinator(&dir, "127.0.0.1:0", &["--hold-decision-ms", "60000"]).await;
    let c_addr = c.addr;

    start_transfer(c_addr, "t1", a.addr, b.addr, 5).await;
    assert!(
        eventually(WAIT, || async {
            c_state(c_addr, "t1").await == Some(("commit".into(), false))
        })
        .await,
        "the coordinator did not decide"
    );
    assert!(
        all_in(&ps, "t1", "prepared").await,
        "delivered before the kill"
    );
    c.kill();

    let _c = coordinator(&dir, &c_addr.to_string(), &[]).await;
    assert!(
        eventually(WAIT, || all_in(&ps, "t1", "committed")).await,
        "the participants did not commit"
    );
    assert!(
        eventually(WAIT, || async {
            c_state(c_addr, "t1").await == Some(("commit".into(), true))
        })
        .await,
        "the coordinator did not finish"
    );
    let (a_av, a_out, _, a_moves) = stock(a.addr).await;
    let (b_av, _, b_in, b_moves) = stock(b.addr).await;
    assert_eq!((a_av, a_out, b_av, b_in), (95, 0, 5, 0));
    assert_eq!(a_moves, vec![("t1".to_string(), -5, "commit".to_string())]);
    assert_eq!(b_moves, vec![("t1".to_string(), 5, "commit".to_string())]);
}

/// A participant is killed with three transactions prepared and their commit
/// logged but not delivered (the probe delays commit calls): after its restart it
/// asks the coordinator, commits each exactly once, and the coordinator's own
/// delivery, arriving later, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_while_prepared_applies_the_outcome_once_after_restart() {
    shoal_tests::build_binaries();
    let dir = temp_dir("2pc-participant-killed");
    let a = participant(&dir, "a", 100, "127.0.0.1:0").await;
    let b = participant(&dir, "b", 0, "127.0.0.1:0").await;
    let b_addr = b.addr;
    let c = coordinator(&dir, "127.0.0.1:0", &["--hold-decision-ms", "5000"]).await;
    let txs = ["t1", "t2", "t3"];

    for tx in txs {
        start_transfer(c.addr, tx, a.addr, b_addr, 5).await;
    }
    for tx in txs {
        assert!(
            eventually(WAIT, || async {
                c_state(c.addr, tx).await == Some(("commit".into(), false))
            })
            .await,
            "the coordinator did not decide {tx}"
        );
    }
    b.kill();
    for tx in txs {
        assert_eq!(
            state_in_file(dir.join("b.db"), tx).await.as_deref(),
            Some("prepared"),
            "b was not left prepared for {tx}"
        );
    }

    let b = participant(&dir, "b", 0, &b_addr.to_string()).await;
    let ps = [a.addr, b.addr];
    for tx in txs {
        assert!(
            eventually(WAIT, || all_in(&ps, tx, "committed")).await,
            "{tx} did not commit everywhere"
        );
        assert!(
            eventually(WAIT, || async {
                c_state(c.addr, tx).await == Some(("commit".into(), true))
            })
            .await,
            "the coordinator did not finish {tx}"
        );
    }
    let (a_av, a_out, _, a_moves) = stock(a.addr).await;
    let (b_av, _, b_in, b_moves) = stock(b.addr).await;
    assert_eq!((a_av, a_out, b_av, b_in), (85, 0, 15, 0), "units conserved");
    let expect = |d: i64| {
        txs.iter()
            .map(|t| (t.to_string(), d, "commit".to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(a_moves, expect(-5));
    assert_eq!(b_moves, expect(5), "each applied exactly once");
}
