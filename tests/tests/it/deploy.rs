//! `shoal deploy k8s` (docs/deployment.md): the manifests it makes of the repo's
//! shoal.toml have, for every Deployment of a shop service, probes that point at
//! real endpoints of that service. Each service's real binary is started alone, in
//! mutual TLS as its manifest says (certificates from a control plane in this
//! process), with its health port where the manifest puts it, on 127.0.0.1; every
//! probe's path is then asked on that port, in plain HTTP as kubelet asks it. An
//! app in another language runs beside its sidecar, as in its pod.

use serde_json::Value;
use shoal_tests::{
    answers_ok, bin_dir, build_binaries, control_plane, eventually, temp_dir, ChildGuard,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The manifests of the repo's shoal.toml, as deploy/k8s/shop.yaml is made: one
/// JSON document per `---`.
fn manifests() -> Vec<Value> {
    let r = repo();
    let out = Command::new(bin_dir().join("shoal"))
        .current_dir(&r)
        .args([
            "deploy",
            "k8s",
            "--system",
            "shoal.toml",
            "--backends",
            "deploy/k8s/backends.toml",
            "--contracts",
            "shop/contracts",
            "--calls",
            "deploy/k8s/calls.json",
        ])
        .output()
        .expect("run shoal deploy k8s");
    assert!(
        out.status.success(),
        "shoal deploy k8s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.split("\n---\n")
        .skip(1)
        .map(|d| serde_json::from_str(d).expect("a JSON document"))
        .collect()
}

/// A container's environment: (name, literal value, if any).
fn env_of(container: &Value) -> Vec<(String, Option<String>)> {
    container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().map(str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The image's paths on this host: its binaries are this build's, its /app the repo.
fn in_repo(path: &str) -> String {
    match path.strip_prefix("/app/") {
        Some(rest) => repo().join(rest).display().to_string(),
        None => path.to_string(),
    }
}

/// A container's program on this host.
fn program(container: &Value) -> PathBuf {
    let p = container["command"][0].as_str().unwrap();
    match p.strip_prefix("/usr/local/bin/") {
        Some(name) => bin_dir().join(name),
        None => PathBuf::from(in_repo(p)),
    }
}

/// A port free on 127.0.0.1 now (for the addresses a pod has on its own loopback).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The address a service logged for its health port (`health port listening`).
fn logged_health_addr(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "health port listening")
        .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deployments_probes_hit_real_endpoints_of_its_service() {
    build_binaries();
    let docs = manifests();
    let cp = control_plane().await;

    let deployments: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "service")
        .collect();
    // Every [services.*] entry of the shop, the canary included.
    let sys = shoal_supervisor::SystemFile::load(&repo().join("shoal.toml")).unwrap();
    assert_eq!(
        deployments.len(),
        sys.services.len(),
        "one Deployment per entry"
    );

    for d in deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        // The container the probes are on: the service itself, or the sidecar of an
        // app in another language (whose app container listens on loopback only).
        let c = containers
            .iter()
            .find(|c| c.get("readinessProbe").is_some())
            .unwrap_or_else(|| panic!("{name}: no container with probes"));
        let env = env_of(c);
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| v.clone())
        };

        // The probes name the port that SHOAL_HEALTH_LISTEN opens.
        let health_listen: SocketAddr = var("SHOAL_HEALTH_LISTEN")
            .unwrap_or_else(|| panic!("{name}: no SHOAL_HEALTH_LISTEN"))
            .parse()
            .unwrap();
        let ports = c["ports"].as_array().unwrap();
        let mut paths = Vec::new();
        for probe in ["livenessProbe", "readinessProbe"] {
            let get = &c[probe]["httpGet"];
            let port = match &get["port"] {
                Value::String(p) => ports
                    .iter()
                    .find(|x| x["name"] == p.as_str())
                    .and_then(|x| x["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("{name}: {probe} names no container port {p}")),
                v => v.as_u64().unwrap(),
            };
            assert_eq!(port, u64::from(health_listen.port()), "{name}: {probe}");
            paths.push(get["path"].as_str().unwrap().to_string());
        }
        assert_eq!(var("SHOAL_TLS__MODE").as_deref(), Some("mutual"), "{name}");

        let dir = temp_dir(&format!("deploy-{name}"));
        // A sidecar's app and outbound addresses, moved to free ports of this host
        // (in the pod they are its own loopback's).
        let app_port = free_port();
        let out_port = free_port();
        let mut children = Vec::new();
        for (i, container) in containers.iter().enumerate() {
            let probed = std::ptr::eq(container, c);
            let log = dir.join(format!("container-{i}.log"));
            let file = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(program(container));
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file);
            if let Some(args) = container["args"].as_array() {
                cmd.args(args.iter().map(|a| a.as_str().unwrap()));
            }
            if probed {
                // The container's program, alone: its own data folder, SQLite and
                // the control plane's embedded broker for the backends (the
                // manifest's PostgreSQL and JetStream are a cluster's), on 127.0.0.1
                // instead of the pod's address, not registered; TLS mode, trust
                // domain, version, config file and sidecar settings as in the
                // manifest.
                cmd.current_dir(&dir);
                for (k, v) in env_of(container) {
                    let keep = k.starts_with("SHOAL_TLS__")
                        || k.starts_with("SHOAL_SETTINGS__")
                        || k == "SHOAL_VERSION"
                        || k == "SHOAL_CONFIG";
                    if let (true, Some(v)) = (keep, v) {
                        cmd.env(&k, in_repo(&v));
                    }
                }
                if var("SHOAL_SETTINGS__APP_ADDR").is_some() {
                    cmd.env("SHOAL_SETTINGS__APP_ADDR", format!("127.0.0.1:{app_port}"))
                        .env(
                            "SHOAL_SETTINGS__OUTBOUND_LISTEN",
                            format!("127.0.0.1:{out_port}"),
                        );
                }
                cmd.env("SHOAL_REGISTER", "false")
                    .env("SHOAL_REGISTRY_URL", cp.url())
                    .env("SHOAL_LISTEN", "127.0.0.1:0")
                    .env("SHOAL_HEALTH_LISTEN", "127.0.0.1:0")
                    .env("SHOAL_DATA_DIR", dir.join("data"))
                    .env("SHOAL_LOG_LEVEL", "info");
            } else {
                // An app container: run from the repo, which stands for /app.
                cmd.current_dir(repo());
                for (k, v) in env_of(container) {
                    if let Some(v) = v {
                        cmd.env(&k, v);
                    }
                }
                cmd.env("PORT", app_port.to_string())
                    .env("SHOAL_SIDECAR_URL", format!("http://127.0.0.1:{out_port}"));
            }
            children.push((probed, log, ChildGuard(cmd.spawn().unwrap())));
        }
        let (_, log, child) = children.iter_mut().find(|(p, _, _)| *p).unwrap();
        let log = log.clone();

        let mut addr = None;
        let found = eventually(Duration::from_secs(60), || {
            addr = logged_health_addr(&log);
            let exited = child.0.try_wait().ok().flatten().is_some();
            async move { addr.is_some() || exited }
        })
        .await;
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        let addr = match (found, addr) {
            (true, Some(a)) => a,
            _ => panic!("{name}: no health port in its log:\n{}", log_text()),
        };
        for path in &paths {
            assert!(
                answers_ok(addr, path, Duration::from_secs(30)).await,
                "{name}: GET {path} on the health port did not answer 200:\n{}",
                log_text()
            );
        }
        // The health port is plain HTTP and answers nothing but the probes.
        let other = shoal::testing::get(addr, "/metrics").await.unwrap();
        assert_eq!(other.status, 404, "{name}");

        // SIGTERM, as kubelet stops a pod: each container drains and exits (SIGKILL
        // by the guard if it has not within the bound).
        for (_, _, child) in &mut children {
            crate::system::signal(child.0.id(), 15);
            eventually(Duration::from_secs(20), || {
                let exited = child.0.try_wait().ok().flatten().is_some();
                async move { exited }
            })
            .await;
        }
        drop(children);
        let _ = std::fs::remove_dir_all(&dir);
    }
    cp.stop().await;
}
