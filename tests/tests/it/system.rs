//! The whole system as users run it: `shoal up` with real processes, killed and
//! stopped with real signals.

use shoal::testing::get as http_get;
use shoal_supervisor::{ProcessState, UpState};
use shoal_tests::{bin_dir, build_binaries, eventually, temp_dir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Whole-system tests run one at a time (a dozen processes each on a small
/// machine), also under plain `cargo test`, which runs tests on threads; nextest
/// runs each in its own process and uses the `whole-system` test group instead.
pub(crate) static ONE_SYSTEM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie is not alive for our purposes.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

pub(crate) fn signal(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) struct Up {
    pub(crate) child: Child,
    pub(crate) state: PathBuf,
}

impl Up {
    pub(crate) fn state(&self) -> Option<UpState> {
        UpState::read(&self.state)
    }

    pub(crate) fn process(&self, name: &str) -> Option<ProcessState> {
        self.state()?.processes.into_iter().find(|p| p.name == name)
    }

    pub(crate) fn pid(&self, name: &str) -> u32 {
        self.process(name)
            .and_then(|p| p.pid)
            .expect("process running")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed test must not leave the system running: SIGKILL the supervisor,
        // and the kernel kills its children (parent-death signal).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small shop (catalog and inventory). No `[tls]` table: it runs on mutual TLS,
/// `shoal up`'s default, like the real shop, so the restart below also shows a
/// restarted replica coming back in mutual mode and passing the control plane's
/// mTLS probes.
fn write_system_file(dir: &Path, bins: &Path) -> PathBuf {
    let text = format!(
        r#"name = "shop under test"

[control_plane]
listen = "127.0.0.1:0"
[control_plane.registry.health]
interval_ms = 200
[control_plane.broker]
listen = "127.0.0.1:0"

[gateway]
listen = "127.0.0.1:0"
# This test polls through the gateway; limits are not what it is about.
rate_limit = {{ anonymous = {{ per_second = 100000, burst = 100000 }} }}
[[gateway.routes]]
prefix = "/api/products"
service = "catalog"
[[gateway.routes]]
prefix = "/api/inventory"
service = "inventory"

[supervisor]
restart_backoff_initial_ms = 100
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_runs_the_shop_restarts_a_killed_service_and_stops_cleanly() {
    let _one = ONE_SYSTEM_AT_A_TIME.lock().await;
    build_binaries();
    let bins = bin_dir();
    let dir = temp_dir("up");
    let system = write_system_file(&dir, &bins);
    let child = Command::new(bins.join("shoal"))
        .args(["up", "--no-build", "--system"])
        .arg(&system)
        .stdin(Stdio::null())
        .spawn()
        .expect("start shoal up");
    let up = Up {
        child,
        state: dir.join(".shoal/up.json"),
    };

    // Ready: the gateway's readiness covers every route.
    assert!(
        eventually(Duration::from_secs(30), || async { up.state().is_some() }).await,
        "no up.json"
    );
    let gw: SocketAddr = up
        .state()
        .unwrap()
        .gateway
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            http_get(gw, "/health/ready")
                .await
                .is_ok_and(|a| a.status == 200)
        })
        .await,
        "system not ready in 60 s"
    );
    let products = http_get(gw, "/api/products").await.unwrap();
    assert_eq!(products.status, 200);
    assert!(products.json().as_array().unwrap().len() >= 5);
    let stock = http_get(gw, "/api/inventory/p-1").await.unwrap();
    assert_eq!(stock.status, 200, "{}", stock.text());
    assert_eq!(stock.json()["product_id"], "p-1");

    // `shoal status --json` in the contract's shape.
    let out = Command::new(bins.join("shoal"))
        .args(["status", "--json", "--system"])
        .arg(&system)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let catalog = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "catalog")
        .unwrap();
    assert_eq!(catalog["version"], "0.1.0");
    let instances = catalog["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    for i in instances {
        assert!(i["id"].is_string() && i["addr"].is_string() && i["pid"].is_u64());
        assert_eq!(i["healthy"], true);
    }

    // kill -9 one catalog process: restarted, re-registered, served again.
    let victim = up.pid("catalog#1");
    signal(victim, 9);
    assert!(
        eventually(Duration::from_secs(30), || async {
            up.process("catalog#1")
                .is_some_and(|p| p.restarts == 1 && p.pid.is_some_and(|p| p != victim))
        })
        .await,
        "killed process not restarted"
    );
    let new_pid = up.pid("catalog#1");
    let registry: SocketAddr = up
        .state()
        .unwrap()
        .control_plane
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            http_get(registry, "/v1/instances/catalog-1")
                .await
                .is_ok_and(|a| {
                    let i = a.json();
                    a.status == 200
                        && i["pid"] == new_pid
                        && i["healthy"] == true
                        && i["metadata"]["tls"] == "mutual"
                })
        })
        .await,
        "restarted process not re-registered"
    );
    for _ in 0..20 {
        assert_eq!(http_get(gw, "/api/products").await.unwrap().status, 200);
    }

    // SIGTERM to a service: it drains and exits 0 (then is restarted like any exit).
    let term = up.pid("catalog#2");
    signal(term, 15);
    assert!(
        eventually(Duration::from_secs(30), || async {
            up.process("catalog#2")
                .is_some_and(|p| p.last_exit.as_deref() == Some("exit code 0"))
        })
        .await,
        "SIGTERM did not end the service cleanly: {:?}",
        up.state()
    );
    let log = std::fs::read_to_string(dir.join(".shoal/logs/catalog-2.log")).unwrap();
    assert!(
        log.contains("shutting down: deregistering and draining")
            && log.contains("drained; stopped"),
        "{log}"
    );

    // SIGTERM to `shoal up`: everything stops, nothing is left behind.
    let pids: Vec<u32> = up
        .state()
        .unwrap()
        .processes
        .iter()
        .filter_map(|p| p.pid)
        .collect();
    assert!(pids.len() >= 4);
    let mut up = up;
    signal(up.child.id(), 15);
    let mut exited = None;
    for _ in 0..300 {
        if let Some(s) = up.child.try_wait().unwrap() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = exited.expect("shoal up did not stop within 30 s");
    assert!(exited.success(), "{exited:?}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived shoal up");
    }
}

/// Start `shoal up` on `system` with extra arguments (`--only …`, `--join …`).
fn up_part(dir: &Path, system: &Path, args: &[&str]) -> Up {
    let child = Command::new(bin_dir().join("shoal"))
        .args(["up", "--no-build", "--system"])
        .arg(system)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal up");
    Up {
        child,
        state: dir.join(".shoal/up.json"),
    }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// The ids of the healthy `catalog` instances the registry at `cp` serves.
async fn catalog_ids(cp: SocketAddr) -> Vec<String> {
    let Ok(a) = http_get(cp, "/v1/services/catalog").await else {
        return Vec::new();
    };
    let v = a.json();
    let mut ids: Vec<String> = v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["healthy"] == true)
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// One service per host: three "hosts" (three system folders on this machine)
/// run parts of one system. Host A runs the gateway and inventory with a control
/// plane that keeps its registry in etcd; host B runs only the catalog, with its
/// own control plane on the same etcd; host C runs only the catalog too and joins
/// host A's control plane instead of starting one. A's gateway serves the catalog
/// from B and C; when host B dies whole (`kill -9` of its `shoal up`, which takes
/// its processes with it) its instances leave A's catalog once their etcd leases
/// run out, and C's keep serving. The hosts share one CA (its folder copied to
/// each host in a real deployment), so mutual TLS holds across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_share_one_catalog_through_etcd_or_a_joined_control_plane() {
    let _one = ONE_SYSTEM_AT_A_TIME.lock().await;
    build_binaries();
    let bins = bin_dir();
    let ca = temp_dir("hosts-ca");
    let prefix = shoal_testkit::etcd::unique_prefix();
    let host = |tag: &str| {
        let dir = temp_dir(tag);
        let path = write_system_file(&dir, &bins);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replace(
            "[control_plane.broker]",
            &format!(
                "[control_plane.ca]\ndir = \"{}\"\n[control_plane.broker]",
                ca.display()
            ),
        );
        text.push_str(&format!(
            "\n[backends]\netcd = {{ endpoints = [\"{}\"], prefix = \"{prefix}\" }}\n",
            shoal_testkit::etcd::url()
        ));
        std::fs::write(&path, text).unwrap();
        (dir, path)
    };
    let (dir_a, sys_a) = host("host-a");
    let (dir_b, sys_b) = host("host-b");
    let (dir_c, sys_c) = host("host-c");

    let a = up_part(&dir_a, &sys_a, &["--only", "gateway,inventory"]);
    assert!(
        eventually(Duration::from_secs(30), || async { a.state().is_some() }).await,
        "host A: no up.json"
    );
    let state = a.state().unwrap();
    let (cp_a, gw) = (addr_of(&state.control_plane), addr_of(&state.gateway));
    assert!(
        eventually(Duration::from_secs(30), || async {
            http_get(cp_a, "/health/live")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await,
        "host A's control plane not live"
    );
    // Only what was asked for runs on host A.
    let names: Vec<String> = state.processes.iter().map(|p| p.name.clone()).collect();
    assert!(!names.iter().any(|n| n.starts_with("catalog")), "{names:?}");

    let b = up_part(&dir_b, &sys_b, &["--only", "catalog"]);
    let c = up_part(
        &dir_c,
        &sys_c,
        &["--only", "catalog", "--join", &format!("http://{cp_a}")],
    );
    // Four catalog instances in host A's catalog: two through etcd, two joined.
    assert!(
        eventually(Duration::from_secs(60), || async {
            catalog_ids(cp_a).await.len() == 4
        })
        .await,
        "host A sees {:?}",
        catalog_ids(cp_a).await
    );
    assert!(
        eventually(Duration::from_secs(60), || async {
            http_get(gw, "/api/products")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await,
        "host A's gateway does not serve the catalog from the other hosts"
    );
    let c_state = c.state().unwrap();
    assert_eq!(c_state.control_plane, format!("http://{cp_a}"));
    assert!(
        !c_state.processes.iter().any(|p| p.name == "control-plane"),
        "a joined host runs no control plane: {:?}",
        c_state.processes
    );
    // Host B's instances are in its own catalog too (it is a registry like A's).
    let cp_b = addr_of(&b.state().unwrap().control_plane);
    assert_eq!(catalog_ids(cp_b).await.len(), 4);

    // Host B dies whole.
    let b_ids: Vec<String> = {
        let own = http_get(cp_b, "/v1/services/catalog").await.unwrap().json();
        let c_ids = catalog_ids(cp_a).await;
        let mut mine: Vec<String> = own["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        mine.sort();
        assert_eq!(mine, c_ids);
        // Both registries list the same four. Ids carry a host tag, so B's and
        // C's `catalog-1` are two instances, not one taking the other's place.
        let tags: std::collections::BTreeSet<&str> = mine
            .iter()
            .map(|id| id.rsplit('-').next().unwrap())
            .collect();
        assert_eq!(tags.len(), 2, "{mine:?}");
        mine
    };
    let mut b = b;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    // The default lease is 10 s; the leases of B's instances run out in etcd.
    assert!(
        eventually(Duration::from_secs(40), || async {
            catalog_ids(cp_a).await.len() == 2
        })
        .await,
        "host B's instances still in host A's catalog: {:?} (B had {b_ids:?})",
        catalog_ids(cp_a).await
    );
    for _ in 0..20 {
        let r = http_get(gw, "/api/products").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    drop(c);
    drop(a);
}
