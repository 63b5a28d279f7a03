//! `shoal up`: the whole system, supervised.

use crate::process::{supervise, Board, ProcSpec};
use crate::state::{ProcessState, UpState};
use crate::SystemFile;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use shoal_core::Error;
use shoal_discovery::RegistryClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How `up` was asked to run.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The system file.
    pub system_file: PathBuf,
    /// Skip the build step.
    pub no_build: bool,
    /// The `shoal` executable that runs the control plane and gateway.
    pub shoal_exe: PathBuf,
    /// Run only these parts of the system file: service entries by name, and
    /// `gateway` for the gateway (one service per host). `None` runs everything.
    pub only: Option<Vec<String>>,
    /// Join the control plane at this URL instead of starting one here: this
    /// host's services register there (`http://10.0.0.5:7070`).
    pub join: Option<String>,
}

impl UpOptions {
    /// Whether `part` (a service entry, or `gateway`) runs on this host.
    fn runs(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }
}

/// The instance id of replica `n` of entry `svc`: `catalog-1`, or `catalog-1-3fa2c1`
/// with a host tag.
fn instance_id(svc: &str, n: u32, host: Option<&str>) -> String {
    match host {
        Some(tag) => format!("{svc}-{n}-{tag}"),
        None => format!("{svc}-{n}"),
    }
}

/// Six hex digits naming this host and system folder, the same at every start
/// (FNV-1a of the host name and the state folder's path).
fn host_tag(state_dir: &Path) -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in name
        .trim()
        .bytes()
        .chain(state_dir.to_string_lossy().bytes())
    {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0x00ff_ffff)
}

/// Check `--only` and `--join` against the system file.
fn check_selection(sys: &SystemFile, opts: &UpOptions) -> Result<(), Error> {
    if let Some(only) = &opts.only {
        if only.is_empty() {
            return Err(Error::config(
                "--only: name at least one service (or gateway)",
            ));
        }
        for part in only {
            if part != "gateway" && !sys.services.contains_key(part) {
                let known: Vec<&str> = sys.services.keys().map(String::as_str).collect();
                return Err(Error::config(format!(
                    "--only: no service {part:?} in the system file (it has gateway, {})",
                    known.join(", ")
                )));
            }
        }
    }
    if let Some(url) = &opts.join {
        RegistryClient::new(url).map_err(|e| Error::config(format!("--join: {}", e.message())))?;
    }
    Ok(())
}

/// A concrete, free address for a configured one: port 0 becomes a free port chosen
/// now, so the address stays the same across restarts of the process that owns it.
/// A port already in use is refused here, before anything starts, rather than
/// leaving the process that needs it in a crash loop (or, worse, talking to another
/// system's control plane).
fn concrete(what: &str, addr: SocketAddr) -> Result<SocketAddr, Error> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        Error::config(format!(
            "{what} address {addr} is not free (is another `shoal up` running?)"
        ))
        .with_source(e)
    })?;
    Ok(l.local_addr()?)
}

/// Whether a service's config file has a `[tls]` table of its own. A file that
/// cannot be read or parsed counts as not: the service reports that itself.
fn sets_tls(config: &Path) -> bool {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .is_some_and(|t| t.contains_key("tls"))
}

fn http_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_ok(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await,
        Ok(Ok(res)) if res.status().is_success()
    )
}

/// Run the system until SIGINT or SIGTERM. Returns once everything has stopped.
pub async fn up(opts: UpOptions) -> Result<(), Error> {
    let t0 = Instant::now();
    let sys = SystemFile::load(&opts.system_file)?;
    let root = opts
        .system_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let root = std::fs::canonicalize(&root)
        .map_err(|e| Error::config(format!("system folder {}", root.display())).with_source(e))?;
    let system_file = std::fs::canonicalize(&opts.system_file)?;
    let state_dir = root.join(&sys.supervisor.state_dir);
    let log_dir = state_dir.join("logs");
    std::fs::create_dir_all(&log_dir).map_err(|e| {
        Error::config(format!("cannot create {}", log_dir.display())).with_source(e)
    })?;
    let name = sys.name.clone().unwrap_or_else(|| "system".into());
    check_selection(&sys, &opts)?;
    let run_cp = opts.join.is_none();
    let run_gw = opts.runs("gateway");
    if opts.only.is_some() && run_cp && sys.control_plane.registry.etcd.is_none() {
        eprintln!(
            "shoal: note: --only without --join or [backends] etcd: this host's control \
             plane shares its catalog with no other host"
        );
    }

    // Checked before the build, so a busy port fails in a second, not after minutes.
    let cp_addr = if run_cp {
        concrete("control plane", sys.control_plane.listen)?
    } else {
        sys.control_plane.listen
    };
    let gw_addr = if run_gw {
        concrete("gateway", sys.gateway.listen)?
    } else {
        sys.gateway.listen
    };
    // The broker's port is the control plane's to pick when it is 0 (it reports it
    // at `/v1/broker`); a fixed one must be free too.
    let broker = &sys.control_plane.broker;
    if run_cp && broker.enabled && broker.listen.port() != 0 {
        concrete("broker", broker.listen)?;
    }

    if let (Some(build), false) = (&sys.build, opts.no_build) {
        eprintln!("shoal: building {name}: {}", build.command.join(" "));
        let status = tokio::process::Command::new(&build.command[0])
            .args(&build.command[1..])
            .current_dir(&root)
            .status()
            .await
            .map_err(|e| {
                Error::config(format!("cannot run build command {:?}", build.command[0]))
                    .with_source(e)
            })?;
        if !status.success() {
            return Err(Error::config(format!(
                "build failed ({status}); nothing was started"
            )));
        }
    }

    // Instance ids are stable per replica (a restarted process replaces its own
    // stale entry). When several hosts share one catalog (a joined control plane,
    // or etcd) they also carry a tag of this host and system folder, so two hosts'
    // `catalog-1` do not take each other's place.
    let shared = opts.join.is_some() || opts.only.is_some() || sys.backends.etcd.is_some();
    let host = shared.then(|| host_tag(&state_dir));
    let cp_url = match &opts.join {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!("http://{cp_addr}"),
    };
    let gw_url = format!("http://{gw_addr}");
    let exe = opts.shoal_exe.display().to_string();
    let sys_arg = system_file.display().to_string();

    let cp_spec = ProcSpec {
        name: "control-plane".into(),
        service: None,
        argv: vec![
            exe.clone(),
            "control-plane".into(),
            "--system".into(),
            sys_arg.clone(),
            "--listen".into(),
            cp_addr.to_string(),
        ],
        env: vec![],
        cwd: root.clone(),
        log: log_dir.join("control-plane.log"),
    };
    let gw_spec = ProcSpec {
        name: "gateway".into(),
        service: None,
        argv: vec![
            exe.clone(),
            "gateway".into(),
            "--system".into(),
            sys_arg.clone(),
            "--listen".into(),
            gw_addr.to_string(),
            "--registry".into(),
            cp_url.clone(),
        ],
        env: vec![],
        cwd: root.clone(),
        log: log_dir.join("gateway.log"),
    };
    let mut service_specs = Vec::new();
    for (svc, spec) in sys.services.iter().filter(|(k, _)| opts.runs(k)) {
        for replica in 1..=spec.replicas {
            let mut env = vec![
                ("SHOAL_REGISTRY_URL".to_string(), cp_url.clone()),
                // Stable per replica: a restarted process replaces its own stale entry.
                (
                    "SHOAL_INSTANCE_ID".to_string(),
                    instance_id(svc, replica, host.as_deref()),
                ),
                (
                    "SHOAL_DATA_DIR".to_string(),
                    state_dir
                        .join("data")
                        .join(spec.registers_as(svc))
                        .display()
                        .to_string(),
                ),
            ];
            if let Some(version) = &spec.version {
                env.push(("SHOAL_VERSION".into(), version.clone()));
            }
            if let Some(cfg) = &spec.config {
                env.push(("SHOAL_CONFIG".into(), root.join(cfg).display().to_string()));
            }
            // The system's mTLS, unless the service's config file chooses its own
            // (the environment would override the file); its `env` wins anyway.
            if sys.tls.is_mutual()
                && !spec
                    .config
                    .as_ref()
                    .is_some_and(|c| sets_tls(&root.join(c)))
            {
                env.push(("SHOAL_TLS__MODE".into(), "mutual".into()));
                env.push((
                    "SHOAL_TLS__TRUST_DOMAIN".into(),
                    sys.tls.trust_domain.clone(),
                ));
            }
            // The system's distributed engines (`[backends]`), before the entry's
            // own `env`, which wins.
            env.extend(sys.backends.service_env(spec.registers_as(svc)));
            env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            let mut argv = spec.command.clone();
            if argv[0].contains('/') {
                argv[0] = root.join(&argv[0]).display().to_string();
            }
            let proc = ProcSpec {
                name: format!("{svc}#{replica}"),
                service: Some(svc.clone()),
                argv,
                env,
                cwd: root.clone(),
                log: log_dir.join(format!("{svc}-{replica}.log")),
            };
            match &spec.sidecar {
                Some(sc) => service_specs.extend(with_sidecar(
                    proc,
                    sc,
                    spec.registers_as(svc),
                    &exe,
                    &log_dir.join(format!("{svc}-app-{replica}.log")),
                )?),
                None => service_specs.push(proc),
            }
        }
    }

    let all: Vec<&ProcSpec> = run_cp
        .then_some(&cp_spec)
        .into_iter()
        .chain(run_gw.then_some(&gw_spec))
        .chain(service_specs.iter())
        .collect();
    let board = Board {
        state: Arc::new(Mutex::new(UpState {
            pid: std::process::id(),
            control_plane: cp_url.clone(),
            gateway: gw_url.clone(),
            processes: all
                .iter()
                .map(|s| ProcessState {
                    name: s.name.clone(),
                    service: s.service.clone(),
                    pid: None,
                    state: "starting".into(),
                    restarts: 0,
                    last_exit: None,
                })
                .collect(),
        })),
        path: state_dir.join("up.json"),
    };

    // Three tiers, stopped in reverse order of start.
    let (stop_cp, stop_cp_rx) = watch::channel(false);
    let (stop_gw, stop_gw_rx) = watch::channel(false);
    let (stop_svc, stop_svc_rx) = watch::channel(false);
    let mut cp_tasks = JoinSet::new();
    let mut gw_tasks = JoinSet::new();
    let mut svc_tasks = JoinSet::new();
    let client = http_client();
    let cfg = sys.supervisor.clone();

    let interrupted = async {
        let live = format!("{cp_url}/health/live");
        if run_cp {
            eprintln!("shoal: starting control plane on {cp_url}");
            cp_tasks.spawn(supervise(
                cp_spec.clone(),
                cfg.clone(),
                board.clone(),
                stop_cp_rx,
            ));
        } else {
            eprintln!("shoal: joining the control plane at {cp_url}");
        }
        if !wait_until(Duration::from_secs(30), || get_ok(&client, &live)).await && !run_cp {
            // The services would start, fail to register and crash-loop: say why.
            eprintln!("shoal: the control plane at {cp_url} does not answer; services start anyway and retry");
        }
        if run_gw {
            eprintln!("shoal: starting gateway on {gw_url}");
            gw_tasks.spawn(supervise(
                gw_spec.clone(),
                cfg.clone(),
                board.clone(),
                stop_gw_rx,
            ));
        }
        eprintln!(
            "shoal: starting {} service process(es)",
            service_specs.len()
        );
        for spec in &service_specs {
            svc_tasks.spawn(supervise(
                spec.clone(),
                cfg.clone(),
                board.clone(),
                stop_svc_rx.clone(),
            ));
        }
        let ready = wait_ready(
            &sys,
            &opts,
            host.as_deref(),
            &cp_url,
            &gw_url,
            &client,
            Duration::from_millis(cfg.ready_timeout_ms),
        )
        .await;
        print_summary(
            &name,
            &sys,
            &opts,
            &board,
            &gw_url,
            &cp_url,
            &log_dir,
            t0.elapsed(),
            ready,
        );
    };
    tokio::select! {
        _ = interrupted => shoal_core::shutdown::signal().await,
        _ = shoal_core::shutdown::signal() => {}
    }

    eprintln!("shoal: stopping services");
    let _ = stop_svc.send(true);
    while svc_tasks.join_next().await.is_some() {}
    eprintln!("shoal: stopping gateway");
    let _ = stop_gw.send(true);
    while gw_tasks.join_next().await.is_some() {}
    eprintln!("shoal: stopping control plane");
    let _ = stop_cp.send(true);
    while cp_tasks.join_next().await.is_some() {}
    eprintln!("shoal: stopped");
    Ok(())
}

/// An entry with `sidecar = { … }`: its `command` is an app in any language, run
/// beside a `shoal sidecar` process (docs/sidecar.md). The sidecar takes the
/// replica's place (its name, log, instance id and `SHOAL_*` environment: it is
/// what registers and serves mTLS); the app gets a port of its own on loopback
/// (`PORT`) and the sidecar's outbound address (`SHOAL_SIDECAR_URL`). Both ports
/// are chosen once here, so they stay the same when either process restarts.
fn with_sidecar(
    replica: ProcSpec,
    sc: &crate::SidecarSpec,
    service: &str,
    exe: &str,
    app_log: &Path,
) -> Result<[ProcSpec; 2], Error> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let app_addr = concrete("sidecar app", loopback)?;
    let out_addr = concrete("sidecar outbound", loopback)?;
    // First, so the entry's own `env` (after it) can override them.
    let settings = [
        ("SHOAL_SETTINGS__APP_ADDR", app_addr.to_string()),
        ("SHOAL_SETTINGS__OUTBOUND_LISTEN", out_addr.to_string()),
        ("SHOAL_SETTINGS__HEALTH_PATH", sc.health_path.clone()),
    ];
    let mut sidecar_env: Vec<(String, String)> = settings
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    sidecar_env.extend(replica.env.iter().cloned());
    let mut app_env = replica.env.clone();
    app_env.push(("PORT".into(), app_addr.port().to_string()));
    app_env.push(("SHOAL_SIDECAR_URL".into(), format!("http://{out_addr}")));
    let app = ProcSpec {
        name: replica.name.replacen('#', "-app#", 1),
        // Not a replica of its own: counted once, as its sidecar.
        service: None,
        argv: replica.argv.clone(),
        env: app_env,
        cwd: replica.cwd.clone(),
        log: app_log.to_path_buf(),
    };
    let sidecar = ProcSpec {
        argv: vec![exe.to_string(), "sidecar".into(), service.to_string()],
        env: sidecar_env,
        ..replica
    };
    Ok([app, sidecar])
}

async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_ready(
    sys: &SystemFile,
    opts: &UpOptions,
    host: Option<&str>,
    cp_url: &str,
    gw_url: &str,
    client: &Client<HttpConnector, Empty<Bytes>>,
    limit: Duration,
) -> bool {
    let Ok(registry) = RegistryClient::new(cp_url) else {
        return false;
    };
    wait_until(limit, || async {
        let Ok(catalog) = registry.catalog(None, Duration::ZERO).await else {
            return false;
        };
        // Each entry's own replicas, by their stable instance ids: two entries
        // that register as one service (two versions) are counted apart.
        let mut mine = sys.services.iter().filter(|(k, _)| opts.runs(k));
        let all_up = mine.all(|(key, spec)| {
            let instances = catalog.instances(spec.registers_as(key));
            (1..=spec.replicas).all(|n| {
                let id = instance_id(key, n, host);
                instances.iter().any(|i| i.healthy && i.id == id)
            })
        });
        all_up && (!opts.runs("gateway") || get_ok(client, &format!("{gw_url}/health/ready")).await)
    })
    .await
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    name: &str,
    sys: &SystemFile,
    opts: &UpOptions,
    board: &Board,
    gw_url: &str,
    cp_url: &str,
    log_dir: &Path,
    took: Duration,
    ready: bool,
) {
    let st = board
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if ready {
        eprintln!("\nshoal: {name} is up ({:.1} s)", took.as_secs_f64());
    } else {
        eprintln!(
            "\nshoal: {name} is NOT fully healthy after {:.1} s; see the logs",
            took.as_secs_f64()
        );
    }
    if opts.runs("gateway") {
        eprintln!("  {:<16} {gw_url}", "gateway");
    }
    let joined = if opts.join.is_some() { " (joined)" } else { "" };
    eprintln!("  {:<16} {cp_url}{joined}", "control plane");
    if sys.tls.is_mutual() {
        eprintln!(
            "  {:<16} mutual TLS between gateway and services ({})",
            "mTLS", sys.tls.trust_domain
        );
    } else {
        eprintln!("  {:<16} off ([tls] mode = \"off\")", "mTLS");
    }
    let broker = &sys.control_plane.broker;
    if broker.enabled && broker.listen.port() != 0 {
        eprintln!("  {:<16} {} (message bus)", "broker", broker.listen);
    }
    for svc in sys.services.keys().filter(|k| opts.runs(k)) {
        let pids: Vec<String> = st
            .processes
            .iter()
            .filter(|p| p.service.as_deref() == Some(svc.as_str()))
            .map(|p| p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()))
            .collect();
        eprintln!(
            "  {svc:<16} {} replica(s), pid {}",
            pids.len(),
            pids.join(", ")
        );
    }
    if let Some(p) = sys
        .gateway
        .load_routes()
        .ok()
        .and_then(|r| r.into_iter().find_map(|r| r.prefix))
    {
        eprintln!("\n  try:    curl {gw_url}{p}");
    }
    eprintln!("  status: shoal status   logs: {}", log_dir.display());
    eprintln!("  Ctrl-C stops everything.\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_port_is_refused_and_port_zero_becomes_a_real_port() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = concrete("gateway", busy.local_addr().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateway address") && err.contains("not free"),
            "{err}"
        );
        let free = concrete("gateway", "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(free.port(), 0);
    }

    #[test]
    fn a_sidecar_entry_is_an_app_and_its_sidecar() {
        let replica = ProcSpec {
            name: "rec#1".into(),
            service: Some("rec".into()),
            argv: vec!["python3".into(), "app.py".into()],
            env: vec![("SHOAL_INSTANCE_ID".into(), "rec-1".into())],
            cwd: PathBuf::from("/"),
            log: PathBuf::from("/logs/rec-1.log"),
        };
        let sc = crate::SidecarSpec {
            health_path: "/ping".into(),
        };
        let [app, sidecar] = with_sidecar(
            replica,
            &sc,
            "rec",
            "/bin/shoal",
            Path::new("/logs/rec-app-1.log"),
        )
        .unwrap();
        assert_eq!(app.name, "rec-app#1");
        assert_eq!(app.argv, ["python3", "app.py"]);
        let get = |env: &[(String, String)], k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let port = get(&app.env, "PORT").unwrap();
        assert_eq!(
            get(&sidecar.env, "SHOAL_SETTINGS__APP_ADDR").unwrap(),
            format!("127.0.0.1:{port}")
        );
        let out = get(&sidecar.env, "SHOAL_SETTINGS__OUTBOUND_LISTEN").unwrap();
        assert_eq!(
            get(&app.env, "SHOAL_SIDECAR_URL").unwrap(),
            format!("http://{out}")
        );
        assert_eq!(
            get(&sidecar.env, "SHOAL_SETTINGS__HEALTH_PATH").unwrap(),
            "/ping"
        );
        assert_eq!(get(&sidecar.env, "SHOAL_INSTANCE_ID").unwrap(), "rec-1");
        assert_eq!(sidecar.name, "rec#1");
        assert_eq!(sidecar.argv, ["/bin/shoal", "sidecar", "rec"]);
    }

    #[test]
    fn a_config_file_with_its_own_tls_table_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("shoal-up-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let own = dir.join("own.toml");
        std::fs::write(&own, "[tls]\nmode = \"off\"\n").unwrap();
        let other = dir.join("other.toml");
        std::fs::write(&other, "listen = \"127.0.0.1:0\"\n").unwrap();
        assert!(sets_tls(&own));
        assert!(!sets_tls(&other));
        assert!(!sets_tls(&dir.join("missing.toml")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
