//! `shoal sidecar`: the platform's features for a service written in any language.
//!
//! The sidecar runs beside one app process (its `PORT` on 127.0.0.1) and is an SDK
//! service of the app's name, so what the SDK gives a Rust service it gives the app:
//! registration with a lease, mutual TLS on the way in (`[tls]`), readiness from the
//! app's own health path, metrics, server spans, access logs, fault injection and a
//! graceful shutdown. Every request it serves (other than the SDK's `/health/*`,
//! `/metrics` and `/ops/*`) goes on to the app over plain HTTP on loopback
//! ([`inbound`]). The app calls other services through the sidecar's outbound
//! listener, `http://127.0.0.1:<port>/<service>/<path>` ([`outbound`]): the SDK's
//! client then balances, applies the `[resilience]` policy of that dependency,
//! speaks mTLS with the callee's identity, records client spans and passes on the
//! deadline. docs/sidecar.md.

mod headers;
mod inbound;
mod outbound;
mod settings;

pub use settings::SidecarSettings;

use shoal::{Ctx, Service};
use std::sync::{Arc, OnceLock};

/// The sidecar of service `name`: run it with [`Service::main`] (or `run`). Its
/// settings come from `[settings]` of its config (and `SHOAL_SETTINGS__*`).
pub fn service(name: &str) -> Service {
    // The app's client is made in `setup` (it needs the settings) and shared with
    // the readiness check, which the builder takes before any settings are read.
    let shared: Arc<OnceLock<Arc<inbound::App>>> = Arc::new(OnceLock::new());
    let for_check = shared.clone();
    Service::new(name)
        .settings::<SidecarSettings>()
        .readiness("app", move |_ctx: Ctx| {
            let app = for_check.get().cloned();
            async move {
                match app {
                    Some(app) => app.healthy().await,
                    None => Err("sidecar starting".to_string()),
                }
            }
        })
        .setup(move |ctx: Ctx| async move {
            let settings = ctx.settings::<SidecarSettings>();
            settings.validate()?;
            // Bound before the service registers: an app that calls out at once
            // finds the port open, and a port in use stops the start naming it.
            let out = outbound::bind(&settings).await?;
            let app = Arc::new(inbound::App::new(&settings));
            let _ = shared.set(app.clone());
            tracing::info!(
                app = %settings.app_addr,
                outbound = %out.local_addr()?,
                health_path = %settings.health_path,
                "sidecar forwarding"
            );
            ctx.spawn(outbound::serve(ctx.clone(), out, settings.clone()));
            Ok(inbound::router(app))
        })
}
