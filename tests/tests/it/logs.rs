//! Run-time log levels end to end: an SDK service, in a process of its own (so its
//! logger is the first and only one there, and its stdout is what we read), against a
//! real in-process control plane. `shoal log-level` (the control plane's
//! `/v1/log-levels`) turns its debug lines on without a restart, and `--reset` turns
//! them off again.
//!
//! The child process is this test binary itself, running only
//! [`log_level_child`] (which does nothing unless the parent set `CHILD_ENV`).
//! Every request the service serves is logged by the platform's middleware as
//! `served`: at debug for a 2xx, at warn for a 5xx. So after a 200 request and then a
//! 500 one, the 500's warn line is the proof the 200's debug line would have been
//! written by now, if the level let it through.

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use shoal::testing::request;
use shoal_core::ErrorKind;
use shoal_discovery::RegistryClient;
use shoal_tests::{control_plane, eventually};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Set (to the control plane's URL) in the child process only.
const CHILD_ENV: &str = "SHOAL_IT_LOG_LEVEL_CHILD";
const SERVICE: &str = "log-probe";

/// The child's side: run the service until the parent closes our stdin.
#[tokio::test]
async fn log_level_child() {
    let Ok(registry) = std::env::var(CHILD_ENV) else {
        return;
    };
    let routes = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/fail", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
    let svc = shoal::Service::new(SERVICE)
        .routes(routes)
        .env([
            ("SHOAL_REGISTRY_URL", registry.as_str()),
            ("SHOAL_LOG_LEVEL", "info"),
            // Without access lines a 200 is logged at debug only: what the test
            // switches on.
            ("SHOAL_ACCESS_LOG", "false"),
            ("SHOAL_DEREGISTER_GRACE_MS", "0"),
        ])
        .start()
        .await
        .expect("service starts");
    // The parent closes our stdin (or dies): time to stop.
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 1];
        let _ = std::io::stdin().read(&mut buf);
    })
    .await;
    svc.shutdown().await.expect("clean shutdown");
}

/// The child's JSON log lines, as they arrive.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<serde_json::Value>>>);

impl Lines {
    fn any(&self, f: impl Fn(&serde_json::Value) -> bool) -> bool {
        self.0.lock().unwrap().iter().any(f)
    }
    fn of_request(&self, id: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["request_id"] == id)
            .cloned()
            .collect()
    }
}

async fn get_with_id(addr: SocketAddr, path: &str, id: &str) -> u16 {
    request(addr, http::Method::GET, path, &[("x-request-id", id)], "")
        .await
        .map(|a| a.status.as_u16())
        .unwrap_or(0)
}

/// Send a 200 request `probe`, then a 500 request after it, wait for the 500's warn
/// line, and answer the lines the 200 left by then.
async fn probe(lines: &Lines, addr: SocketAddr, probe: &str) -> Vec<serde_json::Value> {
    assert_eq!(get_with_id(addr, "/ok", probe).await, 200);
    let sync = format!("{probe}-sync");
    assert_eq!(get_with_id(addr, "/fail", &sync).await, 500);
    assert!(
        eventually(Duration::from_secs(10), || async {
            lines
                .of_request(&sync)
                .iter()
                .any(|l| l["level"] == "WARN" && l["message"] == "served")
        })
        .await,
        "the 500's warn line never came"
    );
    lines.of_request(probe)
}

#[tokio::test]
async fn log_level_turns_debug_on_in_a_running_service_and_reset_turns_it_off() {
    let cp = control_plane().await;
    let exe = std::env::current_exe().unwrap();
    let mut child = tokio::process::Command::new(exe)
        .args([
            "logs::log_level_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, cp.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Lines::default();
    {
        let lines = lines.clone();
        let out = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                // libtest's own lines are not JSON, and it prints `test … ... `
                // without a newline, so the first log line follows it.
                let json = line.find('{').map_or("", |i| &line[i..]);
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                    lines.0.lock().unwrap().push(v);
                }
            }
        });
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            lines.any(|l| l["message"] == "service started")
        })
        .await,
        "the child service did not start; its lines: {:?}",
        lines.0.lock().unwrap()
    );
    let addr: SocketAddr = {
        let all = lines.0.lock().unwrap();
        let started = all
            .iter()
            .find(|l| l["message"] == "service started")
            .unwrap();
        started["addr"].as_str().unwrap().parse().unwrap()
    };

    // Configured at info: a 200 leaves no line.
    assert_eq!(
        probe(&lines, addr, "probe-before").await,
        Vec::<serde_json::Value>::new()
    );

    let client = RegistryClient::new(&cp.url()).unwrap();
    // A directive EnvFilter cannot parse is refused; nothing changes.
    let err = client
        .set_log_level(SERVICE, "info,sqlx=loud")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("sqlx=loud"), "{err}");

    client.set_log_level(SERVICE, "debug").await.unwrap();
    let n = AtomicU32::new(0);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let id = format!("probe-debug-{}", n.fetch_add(1, Ordering::Relaxed));
            get_with_id(addr, "/ok", &id).await;
            eventually(Duration::from_millis(200), || async {
                lines
                    .of_request(&id)
                    .iter()
                    .any(|l| l["level"] == "DEBUG" && l["message"] == "served")
            })
            .await
        })
        .await,
        "debug lines never appeared after `log-level {SERVICE} debug`"
    );
    assert!(
        lines.any(|l| l["message"] == "log level changed at run time"
            && l["log_level"] == "debug"
            && l["level"] == "WARN")
    );

    assert!(client.reset_log_level(SERVICE).await.unwrap());
    // The switch back is logged at warn, so it shows at info.
    assert!(
        eventually(Duration::from_secs(10), || async {
            lines.any(|l| {
                l["message"] == "log level changed at run time" && l["log_level"] == "info"
            })
        })
        .await,
        "the reset never reached the service"
    );
    assert_eq!(
        probe(&lines, addr, "probe-after").await,
        Vec::<serde_json::Value>::new()
    );
    assert!(
        !client.reset_log_level(SERVICE).await.unwrap(),
        "nothing left to reset"
    );

    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the child stops once its stdin closes")
        .unwrap();
    assert!(status.success(), "{status}");
    cp.stop().await;
}
