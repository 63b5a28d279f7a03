//! `shoal`: one binary for the control plane, the gateway, the supervisor (`up`)
//! and the operator's commands (`status`, `chaos`, `logs`, `log-level`). Each subcommand parses its flags and
//! calls into the crate that does the work.

use clap::{Arg, ArgAction, ArgMatches, Command};
use shoal_core::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod chaos;
mod deploy;
mod log_level;
mod logs;
mod sidecar;
mod status;
mod trace;

fn cli() -> Command {
    let system = Arg::new("system")
        .long("system")
        .value_name("FILE")
        .default_value("shoal.toml")
        .help("The system file");
    let listen = Arg::new("listen")
        .long("listen")
        .value_name("ADDR")
        .value_parser(clap::value_parser!(SocketAddr))
        .help("Listen here instead of the system file's address");
    let registry = Arg::new("registry")
        .long("registry")
        .value_name("URL")
        .help("The control plane's URL");
    Command::new("shoal")
        .about("shoal: microservice patterns as working parts, on one machine or many")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("up")
                .about("Build and run the whole system in the system file, supervised")
                .arg(system.clone())
                .arg(
                    Arg::new("no-build")
                        .long("no-build")
                        .action(ArgAction::SetTrue)
                        .help("Skip the build step"),
                )
                .arg(
                    Arg::new("only")
                        .long("only")
                        .value_name("PARTS")
                        .value_delimiter(',')
                        .help(
                            "Run only these services (and `gateway`), e.g. --only orders,payments",
                        ),
                )
                .arg(
                    Arg::new("join")
                        .long("join")
                        .value_name("URL")
                        .help("Register with the control plane at URL instead of starting one"),
                ),
        )
        .subcommand(
            Command::new("status")
                .about("Services, versions, instances, addresses, pids and health")
                .arg(system.clone())
                .arg(registry.clone())
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("Machine-readable output"),
                ),
        )
        .subcommand(chaos::command(system.clone(), registry.clone()))
        .subcommand(deploy::command(system.clone()))
        .subcommand(logs::command(system.clone()))
        .subcommand(log_level::command(system.clone(), registry.clone()))
        .subcommand(trace::command(system.clone(), registry.clone()))
        .subcommand(sidecar::command())
        .subcommand(
            Command::new("control-plane")
                .about("Run the control plane (service registry)")
                .arg(system.clone())
                .arg(listen.clone()),
        )
        .subcommand(
            Command::new("gateway")
                .about("Run the API gateway")
                .arg(system)
                .arg(listen)
                .arg(registry.default_value("http://127.0.0.1:7070")),
        )
}

fn system_file(m: &ArgMatches) -> Result<shoal_supervisor::SystemFile, Error> {
    let path = m
        .get_one::<String>("system")
        .map(String::as_str)
        .unwrap_or("shoal.toml");
    shoal_supervisor::SystemFile::load(Path::new(path))
}

/// What the control plane's dashboard and log search take from the system file: the
/// log store and `up.json` under its `state_dir`, its service entries, and the
/// gateway's routes with their weights (read again on each call, as the gateway
/// reloads its routes file).
fn system_view(path: &Path, sys: &shoal_supervisor::SystemFile) -> shoal_control_plane::SystemView {
    let state_dir = logs::log_dir(path, Some(sys))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let gateway = sys.gateway.clone();
    let routes: shoal_control_plane::RoutesSource = std::sync::Arc::new(move || {
        let routes = gateway.load_routes().map_err(|e| e.to_string())?;
        Ok(routes
            .iter()
            .map(|r| shoal_control_plane::RouteView {
                name: r.name().to_string(),
                matches: r
                    .prefix
                    .clone()
                    .or_else(|| r.path.clone())
                    .unwrap_or_default(),
                services: r.services().into_iter().map(String::from).collect(),
                weights: r.weights.clone(),
            })
            .collect())
    });
    shoal_control_plane::SystemView {
        log_dir: Some(state_dir.join("logs")),
        up_file: Some(state_dir.join("up.json")),
        entries: sys
            .services
            .iter()
            .map(|(k, spec)| (k.clone(), spec.registers_as(k).to_string()))
            .collect(),
        routes: Some(routes),
    }
}

async fn control_plane(m: &ArgMatches) -> Result<(), Error> {
    let sys = system_file(m)?;
    let path = m
        .get_one::<String>("system")
        .map(String::as_str)
        .unwrap_or("shoal.toml");
    let mut cfg = sys.control_plane.clone();
    cfg.system = system_view(Path::new(path), &sys);
    if let Some(addr) = m.get_one::<SocketAddr>("listen") {
        cfg.listen = *addr;
    }
    shoal_telemetry::logging::init("control-plane", "control-plane", &cfg.log_level)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::config(format!("control plane cannot listen on {}", cfg.listen)).with_source(e)
        })?;
    tracing::info!(addr = %listener.local_addr()?, "control plane listening");
    shoal_control_plane::run(cfg, listener, shoal_core::shutdown::signal()).await
}

async fn gateway(m: &ArgMatches) -> Result<(), Error> {
    let mut cfg = system_file(m)?.gateway;
    if let Some(addr) = m.get_one::<SocketAddr>("listen") {
        cfg.listen = *addr;
    }
    let logs = shoal_telemetry::logging::init("gateway", "gateway", &cfg.log_level)?;
    let registry_url = m
        .get_one::<String>("registry")
        .map(String::as_str)
        .unwrap_or("http://127.0.0.1:7070");
    // `shoal log-level gateway …`, applied without a restart; stops when dropped.
    let _log_watch = shoal_discovery::LogLevelWatch::start(
        shoal_discovery::RegistryClient::new(registry_url)?,
        "gateway",
        logs,
        &cfg.log_level,
    );
    let discovery =
        shoal_discovery::Discovery::start(shoal_discovery::RegistryClient::new(registry_url)?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::config(format!("gateway cannot listen on {}", cfg.listen)).with_source(e)
        })?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    shoal_gateway::serve(&cfg, listener, discovery, shoal_core::shutdown::signal()).await
}

async fn up(m: &ArgMatches) -> Result<(), Error> {
    let system_file = PathBuf::from(
        m.get_one::<String>("system")
            .map(String::as_str)
            .unwrap_or("shoal.toml"),
    );
    let shoal_exe = std::env::current_exe()?;
    shoal_supervisor::up(shoal_supervisor::UpOptions {
        system_file,
        no_build: m.get_flag("no-build"),
        shoal_exe,
        only: m.get_many::<String>("only").map(|v| v.cloned().collect()),
        join: m.get_one::<String>("join").cloned(),
    })
    .await
}

/// mimalloc rather than glibc's malloc: a request through the gateway allocates and
/// frees short-lived buffers by the hundred, and glibc's bins and consolidation
/// cost a gateway under load about a seventh of its CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("up", m)) => up(m).await,
        Some(("status", m)) => status::run(m).await,
        Some(("chaos", m)) => chaos::run(m).await,
        Some(("deploy", m)) => deploy::run(m).await,
        Some(("logs", m)) => logs::run(m).await,
        Some(("log-level", m)) => log_level::run(m).await,
        Some(("trace", m)) => trace::run(m).await,
        Some(("sidecar", m)) => sidecar::run(m).await,
        Some(("control-plane", m)) => control_plane(m).await,
        Some(("gateway", m)) => gateway(m).await,
        _ => Err(Error::config("unknown command; see shoal --help")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e}");
            ExitCode::FAILURE
        }
    }
}
