//! `shoal status [--json]`.

use clap::ArgMatches;
use serde_json::json;
use shoal_core::registry::Catalog;
use shoal_core::Error;
use shoal_discovery::RegistryClient;
use shoal_supervisor::{SystemFile, UpState};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Where the control plane is: the flag, else a running `shoal up`'s state, else the
/// system file's address, else the default. Shared by every command that talks to
/// the control plane (`status`, `chaos`); `m` must define `system` and `registry`.
pub(crate) fn registry_url(m: &ArgMatches) -> (String, Option<UpState>) {
    let system = m
        .get_one::<String>("system")
        .map(String::as_str)
        .unwrap_or("shoal.toml");
    let sys = SystemFile::load(Path::new(system)).ok();
    let root = Path::new(system).parent().unwrap_or(Path::new("."));
    let state_dir = sys
        .as_ref()
        .map(|s| s.supervisor.state_dir.clone())
        .unwrap_or_else(|| ".shoal".into());
    let up = UpState::read(&root.join(state_dir).join("up.json"));
    if let Some(url) = m.get_one::<String>("registry") {
        return (url.clone(), up);
    }
    if let Some(up) = &up {
        return (up.control_plane.clone(), Some(up.clone()));
    }
    match sys {
        Some(s) if s.control_plane.listen.port() != 0 => {
            (format!("http://{}", s.control_plane.listen), None)
        }
        _ => ("http://127.0.0.1:7070".into(), None),
    }
}

/// The contract's shape: services grouped by name and version.
pub(crate) fn status_json(catalog: &Catalog) -> serde_json::Value {
    let mut groups: BTreeMap<(String, String), Vec<serde_json::Value>> = BTreeMap::new();
    for s in &catalog.services {
        for i in &s.instances {
            groups
                .entry((s.name.clone(), i.version.clone()))
                .or_default()
                .push(json!({
                    "id": i.id,
                    "addr": i.addr.to_string(),
                    "pid": i.pid,
                    "healthy": i.healthy,
                }));
        }
    }
    let services: Vec<_> = groups
        .into_iter()
        .map(|((name, version), instances)| json!({"name": name, "version": version, "instances": instances}))
        .collect();
    json!({ "services": services })
}

pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let (url, up) = registry_url(m);
    let catalog = RegistryClient::new(&url)?
        .catalog(None, Duration::ZERO)
        .await
        .map_err(|e| {
            Error::unavailable(format!(
                "control plane at {url} did not answer; is `shoal up` running?"
            ))
            .with_source(e)
        })?;
    let out = status_json(&catalog);
    if m.get_flag("json") {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!("control plane {url}");
    if let Some(up) = &up {
        println!("gateway       {}", up.gateway);
    }
    println!();
    println!(
        "{:<14} {:<10} {:<16} {:<22} {:<8} {:<8} RESTARTS",
        "SERVICE", "VERSION", "INSTANCE", "ADDRESS", "PID", "HEALTH"
    );
    for s in &catalog.services {
        for i in &s.instances {
            let restarts = up
                .as_ref()
                .and_then(|u| {
                    u.processes
                        .iter()
                        .find(|p| p.pid.is_some() && p.pid == i.pid)
                })
                .map(|p| p.restarts.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<14} {:<10} {:<16} {:<22} {:<8} {:<8} {}",
                s.name,
                i.version,
                i.id,
                i.addr,
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if i.healthy { "healthy" } else { "FAILING" },
                restarts
            );
        }
    }
    if let Some(up) = &up {
        for p in up
            .processes
            .iter()
            .filter(|p| p.state == "crash-loop" || p.state == "restarting")
        {
            println!(
                "\n{} is {} after {} restarts (last: {})",
                p.name,
                p.state,
                p.restarts,
                p.last_exit.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}
