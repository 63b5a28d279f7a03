//! The live dashboard: one page (`GET /dashboard`, plain HTML, JS and CSS compiled
//! into the binary) that polls the control plane's JSON endpoints, and
//! `GET /v1/dashboard/topology`, the part of them that is the dashboard's own.
//!
//! The topology joins three views of the system, because none alone says whether an
//! instance is up:
//! - the registry (instances, versions, addresses, health probes): a killed
//!   instance fails its probes and is marked unhealthy after
//!   `unhealthy_threshold` probes (2 × 1 s by default);
//! - the supervisor's `up.json`, when `shoal up` started this control plane: it
//!   knows at once that a process died and whether the registered pid is the live
//!   one, so a killed replica shows down before its probes fail, until its
//!   restarted process registered again;
//! - the gateway's routes and their weights, from the system file (see
//!   [`SystemView::routes`] for what that leaves out).

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_core::registry::Instance;
use shoal_registry::Registry;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest `up.json` read; a bigger one is not the supervisor's.
const MAX_UP_FILE_BYTES: u64 = 1024 * 1024;

/// The page may load its own script, style and data, and nothing else: no inline
/// script, no other origin, no frames, no forms posting anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// The gateway's routes as the dashboard shows them, read again on every call:
/// `Err` says why they cannot be read.
pub type RoutesSource = Arc<dyn Fn() -> Result<Vec<RouteView>, String> + Send + Sync>;

/// What the control plane knows of the system it runs in, beyond its own state.
/// `shoal control-plane --system FILE` fills it from the system file; it is never
/// read from the `[control_plane]` table. Empty (the default), the dashboard shows
/// the registry alone and the log search answers 404.
#[derive(Clone, Default)]
pub struct SystemView {
    /// The log store of `shoal up` (`<state_dir>/logs`), for `GET /v1/logs`.
    pub log_dir: Option<PathBuf>,
    /// The supervisor's `up.json`. Read only while its `pid` is this process's
    /// parent: a file left by an earlier `shoal up` says nothing about now.
    pub up_file: Option<PathBuf>,
    /// The system file's service entries and the service each registers as
    /// (`catalog-v2` → `catalog`): a log search for `catalog` reads the files of
    /// `catalog-v2-1` too, and a supervised replica that is not registered is
    /// shown under its service.
    pub entries: BTreeMap<String, String>,
    /// The gateway's routes and their weights as configured: the system file's
    /// `[[gateway.routes]]` or its `routes_file`, read again on each call (as the
    /// gateway reloads it). A change made through the gateway's admin API
    /// (`PUT /admin/routes/{name}/weights`) lives in the gateway's memory only and
    /// is not shown.
    pub routes: Option<RoutesSource>,
}

impl std::fmt::Debug for SystemView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemView")
            .field("log_dir", &self.log_dir)
            .field("up_file", &self.up_file)
            .field("entries", &self.entries)
            .field("routes", &self.routes.as_ref().map(|_| "…"))
            .finish()
    }
}

/// One gateway route, as the dashboard shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteView {
    /// The route's name (`/admin/routes/{name}`).
    pub name: String,
    /// Its path prefix or path pattern.
    pub matches: String,
    /// The services it calls (one, or an aggregate's parts).
    pub services: Vec<String>,
    /// Version → weight; empty: any version.
    pub weights: BTreeMap<String, u32>,
}

/// One supervised process, as `up.json` has it (the supervisor's `ProcessState`;
/// unknown keys are ignored, so the file may grow).
#[derive(Clone, Debug, Deserialize, Serialize)]
struct UpProcess {
    name: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    restarts: u32,
    #[serde(default)]
    last_exit: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UpFile {
    pid: u32,
    #[serde(default)]
    processes: Vec<UpProcess>,
}

impl UpProcess {
    /// The instance id the supervisor gives it (`catalog#1` → `catalog-1`).
    fn instance_id(&self) -> Option<String> {
        let (entry, n) = self.name.rsplit_once('#')?;
        Some(format!("{entry}-{n}"))
    }
}

/// `up.json`, when the supervisor that wrote it is this process's parent.
fn supervisor_view(view: &SystemView) -> Option<Vec<UpProcess>> {
    use std::io::Read;
    let path = view.up_file.as_ref()?;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_UP_FILE_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    let up: UpFile = serde_json::from_slice(&bytes).ok()?;
    (up.pid == std::os::unix::process::parent_id()).then_some(up.processes)
}

/// Whether an instance is up, and why not.
fn health(i: &Instance, process: Option<&UpProcess>) -> (&'static str, Option<String>) {
    if let Some(p) = process {
        if p.state != "running" {
            let exit = p.last_exit.as_deref().unwrap_or("no exit yet");
            return ("down", Some(format!("process {} ({exit})", p.state)));
        }
        if let (Some(live), Some(registered)) = (p.pid, i.pid) {
            if live != registered {
                return (
                    "down",
                    Some(format!(
                        "registered by pid {registered}, which is gone; pid {live} has not registered yet"
                    )),
                );
            }
        }
    }
    if i.healthy {
        ("up", None)
    } else {
        ("down", Some("failing health probes".into()))
    }
}

/// `GET /v1/dashboard/topology`.
fn topology(registry: &Registry, view: &SystemView) -> Value {
    let catalog = registry.catalog();
    let processes = supervisor_view(view);
    let by_id: BTreeMap<String, &UpProcess> = processes
        .iter()
        .flatten()
        .filter_map(|p| Some((p.instance_id()?, p)))
        .collect();
    let mut services: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in &catalog.services {
        let list = services.entry(s.name.clone()).or_default();
        for i in &s.instances {
            let process = by_id.get(&i.id).copied();
            let (health, reason) = health(i, process);
            list.push(json!({
                "id": i.id,
                "version": i.version,
                "addr": i.addr.to_string(),
                "pid": i.pid,
                "healthy": i.healthy,
                "registered": true,
                "registered_at_ms": i.registered_at_ms,
                "health": health,
                "reason": reason,
                "process": process,
            }));
        }
    }
    // Supervised replicas the registry does not list (not registered yet, or
    // deregistered on their way out) are down.
    for (id, p) in &by_id {
        let Some(entry) = p.service.as_deref() else {
            continue;
        };
        let service = view.entries.get(entry).map_or(entry, String::as_str);
        let listed = catalog
            .services
            .iter()
            .any(|s| s.instances.iter().any(|i| &i.id == id));
        if !listed {
            services
                .entry(service.to_string())
                .or_default()
                .push(json!({
                    "id": id,
                    "registered": false,
                    "healthy": false,
                    "health": "down",
                    "reason": format!("not registered (process {})", p.state),
                    "process": p,
                }));
        }
    }
    let (routes, routes_error) = match &view.routes {
        Some(f) => match f() {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let others: Vec<&UpProcess> = processes
        .iter()
        .flatten()
        .filter(|p| p.service.is_none())
        .collect();
    json!({
        "at_ms": shoal_core::unix_ms(),
        "index": catalog.index,
        "services": services
            .into_iter()
            .map(|(name, instances)| json!({"name": name, "instances": instances}))
            .collect::<Vec<_>>(),
        "supervised": processes.is_some(),
        "platform": others,
        "routes": routes,
        "routes_error": routes_error,
    })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    // Small, and must change with the binary: revalidated on every load.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// The dashboard's routes: `/` (a redirect), the page and its assets, and the
/// topology.
pub(crate) fn router(registry: Registry, view: SystemView) -> Router {
    let view = Arc::new(view);
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route(
            "/dashboard",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/v1/dashboard/topology",
            get(
                |State((registry, view)): State<(Registry, Arc<SystemView>)>| async move {
                    Json(topology(&registry, &view))
                },
            ),
        )
        .with_state((registry, view))
}

#[cfg(test)]
mod tests;
