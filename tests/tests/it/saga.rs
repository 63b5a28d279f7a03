//! Orchestrated sagas across real crashes: the orchestrator (`saga-probe`, its own
//! process) is killed with SIGKILL at every step boundary in turn, restarted, and
//! every saga must end completed or fully compensated with no effect applied twice.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use shoal_tests::{temp_dir, ChildGuard};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// Where the participant holds a call for the kill: before or after applying it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    Before,
    After,
}

#[derive(Default)]
struct Shared {
    /// Outcome per idempotency key: a repeat gets the first answer, no new effect.
    by_key: HashMap<String, (StatusCode, String)>,
    /// Effects per (saga, step, phase): the invariant is that none passes 1. The
    /// participant dedupes by key, so a second effect means the orchestrator sent
    /// the same step under a new key.
    effects: HashMap<(String, String, String), u32>,
    /// The crash point, armed until the first call that matches it.
    trap: Option<(String, String, When)>,
    /// Told when the trap holds a call.
    trapped: Option<oneshot::Sender<()>>,
}

#[derive(Clone, Default)]
struct Participant {
    shared: Arc<Mutex<Shared>>,
    /// Never notified: a trapped call waits here until its connection dies.
    hold: Arc<Notify>,
}

#[derive(serde::Deserialize)]
struct Body {
    saga_id: String,
    amount: u32,
}

async fn step(
    State(p): State<Participant>,
    Path((step, phase)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Body>,
) -> (StatusCode, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let trap = {
        let mut s = p.shared.lock().unwrap();
        match &s.trap {
            Some((ts, tp, when)) if *ts == step && *tp == phase => {
                let when = *when;
                s.trap = None;
                Some((when, s.trapped.take()))
            }
            _ => None,
        }
    };
    let (when, mut tx) = match trap {
        Some((w, tx)) => (Some(w), tx),
        None => (None, None),
    };
    if when == Some(When::Before) {
        if let Some(tx) = tx.take() {
            let _ = tx.send(());
        }
        p.hold.notified().await;
    }
    let answer = {
        let mut s = p.shared.lock().unwrap();
        if let Some(a) = s.by_key.get(&key) {
            a.clone()
        } else {
            let a = if step == "pay" && phase == "do" && body.amount > 100 {
                (StatusCode::CONFLICT, "card declined".to_string())
            } else {
                *s.effects
                    .entry((body.saga_id.clone(), step.clone(), phase.clone()))
                    .or_insert(0) += 1;
                (StatusCode::OK, "done".to_string())
            };
            s.by_key.insert(key, a.clone());
            a
        }
    };
    if when == Some(When::After) {
        if let Some(tx) = tx.take() {
            let _ = tx.send(());
        }
        p.hold.notified().await;
    }
    answer
}

struct Probe {
    child: ChildGuard,
    lines: std::sync::mpsc::Receiver<String>,
}

fn start_probe(db: &std::path::Path, url: &str, ids: &[String]) -> Probe {
    let mut child = Command::new(shoal_tests::bin_dir().join("saga-probe"))
        .arg(db)
        .arg(url)
        .args(ids)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start saga-probe");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Probe {
        child: ChildGuard(child),
        lines,
    }
}

/// Every step boundary, as the participant sees it: the call for a step arrives
/// and is not applied yet (the step before it is recorded), or it is applied and
/// its answer not yet back (the orchestrator has not recorded it). The last two
/// are the compensation of a saga whose payment was declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_end_completed_or_compensated_after_a_kill_9_at_every_step_boundary() {
    shoal_tests::build_binaries();
    let points = [
        ("reserve", "do", When::Before),
        ("reserve", "do", When::After),
        ("pay", "do", When::Before),
        ("pay", "do", When::After),
        ("ship", "do", When::Before),
        ("ship", "do", When::After),
        ("reserve", "undo", When::Before),
        ("reserve", "undo", When::After),
    ];
    for (round, (step_name, phase, when)) in points.into_iter().enumerate() {
        let participant = Participant::default();
        let (tx, trapped) = oneshot::channel();
        {
            let mut s = participant.shared.lock().unwrap();
            s.trap = Some((step_name.into(), phase.into(), when));
            s.trapped = Some(tx);
        }
        let app = Router::new()
            .route("/{step}/{phase}", post(step))
            .with_state(participant.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let dir = temp_dir("saga-crash");
        let db = dir.join("orders.db");
        let ids: Vec<String> = (0..6)
            .map(|i| {
                if i % 3 == 2 {
                    format!("bad-{i}")
                } else {
                    format!("ok-{i}")
                }
            })
            .collect();
        let mut probe = start_probe(&db, &url, &ids);
        let at = format!("{step_name}/{phase} {when:?}");
        tokio::time::timeout(Duration::from_secs(60), trapped)
            .await
            .unwrap_or_else(|_| panic!("round {round} ({at}): the crash point was never reached"))
            .unwrap();
        probe.child.0.kill().unwrap(); // SIGKILL
        probe.child.0.wait().unwrap();

        // Restarted with the same ids: it resumes, and starts nothing twice.
        let probe = start_probe(&db, &url, &ids);
        let mut ended = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while ended.len() < ids.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = probe
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("round {round} ({at}): sagas did not end: {ended:?}"));
            if let Some(rest) = line.strip_prefix("saga ") {
                let (id, status) = rest.split_once(' ').unwrap();
                ended.insert(id.to_string(), status.to_string());
            }
        }
        drop(probe);

        let s = participant.shared.lock().unwrap();
        for ((saga, st, ph), n) in &s.effects {
            assert_eq!(
                *n, 1,
                "round {round} ({at}): {saga} {st}/{ph} applied {n} times"
            );
        }
        let has = |id: &str, st: &str, ph: &str| {
            s.effects
                .contains_key(&(id.to_string(), st.to_string(), ph.to_string()))
        };
        for id in &ids {
            let status = &ended[id];
            if id.starts_with("bad-") {
                assert_eq!(status, "compensated", "round {round} ({at}): {id}");
                assert!(
                    has(id, "reserve", "do") && has(id, "reserve", "undo"),
                    "round {round} ({at}): {id}"
                );
                assert!(
                    !has(id, "pay", "do") && !has(id, "ship", "do"),
                    "round {round} ({at}): {id}"
                );
            } else {
                assert_eq!(status, "completed", "round {round} ({at}): {id}");
                for st in ["reserve", "pay", "ship"] {
                    assert!(has(id, st, "do"), "round {round} ({at}): {id} has no {st}");
                }
                assert!(!has(id, "reserve", "undo"), "round {round} ({at}): {id}");
            }
        }
        drop(s);
        server.abort();
    }
}
