//! The control plane's dashboard in a real browser: headless Chromium, driven by
//! `tests/browser/dashboard.mjs` (playwright-core), against a whole system under
//! `shoal up`. The page lists every registered service, shows a replica killed
//! with `kill -9` as down within seconds and up again once the supervisor
//! restarted it. Needs Debian's chromium and the npm packages: `scripts/browser`
//! installs both (scripts/test runs it).

use super::system::{signal, Up, ONE_SYSTEM_AT_A_TIME};
use shoal::testing::get as http_get;
use shoal_tests::{bin_dir, build_binaries, eventually, temp_dir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long the page may take to show a killed replica as down. The supervisor
/// notices the death at once and the page polls every second; this leaves room
/// for a loaded machine.
const DOWN_WITHIN: Duration = Duration::from_secs(15);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Fails (never skips) when the browser or the npm packages are missing.
fn require_browser() {
    let missing: Vec<&str> = [
        (Path::new("/usr/bin/chromium").exists(), "/usr/bin/chromium"),
        (
            browser_dir()
                .join("node_modules/playwright-core/package.json")
                .exists(),
            "tests/browser/node_modules (playwright-core)",
        ),
    ]
    .into_iter()
    .filter(|(present, _)| !present)
    .map(|(_, what)| what)
    .collect();
    assert!(
        missing.is_empty(),
        "the dashboard's browser test needs {}: run scripts/browser",
        missing.join(" and ")
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "the dashboard's browser test needs node on PATH: run scripts/browser"
    );
}

/// Two catalog replicas and inventory, defaults everywhere a user would have them
/// except the restart pause: 3 s instead of 250 ms, so that the killed replica
/// stays down longer than the page's one-second poll and the test sees it down
/// every time, not only when a poll falls into a window of a few hundred ms.
fn write_system_file(dir: &Path, bins: &Path) -> PathBuf {
    let text = format!(
        r#"name = "dashboard under test"

[control_plane]
listen = "127.0.0.1:0"
[control_plane.broker]
listen = "127.0.0.1:0"

[gateway]
listen = "127.0.0.1:0"
[[gateway.routes]]
name = "products"
prefix = "/api/products"
service = "catalog"
weights = {{ "0.1.0" = 100 }}
[[gateway.routes]]
prefix = "/api/inventory"
service = "inventory"

[supervisor]
restart_backoff_initial_ms = 3000
stop_timeout_ms = 10000
ready_timeout_ms = 60000

[services.catalog]
command = ["{bins}/shop-catalog"]
replicas = 2
env = {{ SHOAL_DEREGISTER_GRACE_MS = "100" }}

[services.inventory]
command = ["{bins}/shop-inventory"]
"#,
        bins = bins.display()
    );
    let path = dir.join("shoal.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `tests/browser/dashboard.mjs`, spoken to line by line.
struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    async fn open(control_plane: &str) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg(browser_dir().join("dashboard.mjs"))
            .arg(control_plane)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start node tests/browser/dashboard.mjs");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut b = Self {
            child,
            stdin,
            lines,
        };
        // Starting Chromium on a loaded machine takes a while.
        let first = b.line(Duration::from_secs(60)).await;
        assert_eq!(first, "ready", "the dashboard did not load in the browser");
        b
    }

    async fn line(&mut self, limit: Duration) -> String {
        match tokio::time::timeout(limit, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => panic!("the browser script ended early"),
            Ok(Err(e)) => panic!("reading the browser script: {e}"),
            Err(_) => panic!("the browser script said nothing for {limit:?}"),
        }
    }

    /// Send one command; its answer, which must start with `ok`.
    async fn ask(&mut self, command: &str, limit: Duration) -> String {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let answer = self.line(limit + Duration::from_secs(10)).await;
        assert!(answer.starts_with("ok"), "{command}: {answer}");
        answer
    }

    async fn close(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => assert!(status.unwrap().success()),
            Err(_) => panic!("the browser script did not stop"),
        }
    }
}

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_service_and_a_killed_replica_down_then_up() {
    require_browser();
    let _one = ONE_SYSTEM_AT_A_TIME.lock().await;
    build_binaries();
    let bins = bin_dir();
    let dir = temp_dir("dashboard");
    let system = write_system_file(&dir, &bins);
    let child = std::process::Command::new(bins.join("shoal"))
        .args(["up", "--no-build", "--system"])
        .arg(&system)
        .stdin(Stdio::null())
        .spawn()
        .expect("start shoal up");
    let up = Up {
        child,
        state: dir.join(".shoal/up.json"),
    };
    assert!(
        eventually(Duration::from_secs(30), || async { up.state().is_some() }).await,
        "no up.json"
    );
    let state = up.state().unwrap();
    let (cp, gw) = (addr(&state.control_plane), addr(&state.gateway));
    assert!(
        eventually(Duration::from_secs(60), || async {
            http_get(gw, "/health/ready")
                .await
                .is_ok_and(|a| a.status == 200)
        })
        .await,
        "system not ready in 60 s"
    );

    // What the page draws from: the supervisor's view and the routes are there.
    let topology = http_get(cp, "/v1/dashboard/topology").await.unwrap();
    assert_eq!(topology.status, 200);
    let t = topology.json();
    assert_eq!(t["supervised"], true, "{t}");
    let products = t["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "products")
        .cloned()
        .unwrap_or_default();
    assert_eq!(products["weights"]["0.1.0"], 100, "{t}");
    // The log search reads this system's log store.
    let logs = http_get(cp, "/v1/logs?service=catalog&limit=50")
        .await
        .unwrap();
    assert_eq!(logs.status, 200, "{}", logs.text());
    let found = logs.json();
    assert!(
        found["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "catalog-1"),
        "{found}"
    );
    assert!(!found["lines"].as_array().unwrap().is_empty(), "{found}");

    let services: Vec<String> = http_get(cp, "/v1/services").await.unwrap().json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(services.len() >= 2, "{services:?}");

    let mut page = Browser::open(&state.control_plane).await;
    let wait = Duration::from_secs(15);
    page.ask(&format!("services {} 15000", services.join(",")), wait)
        .await;
    page.ask("health catalog-1 up 15000", wait).await;
    page.ask("health catalog-2 up 15000", wait).await;

    let victim = up.pid("catalog#1");
    let killed = Instant::now();
    signal(victim, 9);
    page.ask(
        &format!("health catalog-1 down {}", DOWN_WITHIN.as_millis()),
        DOWN_WITHIN,
    )
    .await;
    eprintln!("catalog-1 shown down {:?} after kill -9", killed.elapsed());
    // The other replica is not taken down with it.
    page.ask("health catalog-2 up 1000", wait).await;

    assert!(
        eventually(Duration::from_secs(30), || async {
            up.process("catalog#1")
                .is_some_and(|p| p.restarts == 1 && p.pid.is_some_and(|p| p != victim))
        })
        .await,
        "killed process not restarted"
    );
    page.ask("health catalog-1 up 30000", Duration::from_secs(30))
        .await;
    eprintln!("catalog-1 shown up {:?} after kill -9", killed.elapsed());

    let errors = page.ask("errors", wait).await;
    assert_eq!(errors, "ok errors []", "the page had script errors");
    page.close().await;

    // Stop the system; Drop kills it should this fail.
    let mut up = up;
    signal(up.child.id(), 15);
    assert!(
        eventually(Duration::from_secs(30), || {
            let done = up.child.try_wait().ok().flatten().is_some();
            async move { done }
        })
        .await,
        "shoal up did not stop within 30 s"
    );
}
