//! The authorization policy of service-to-service calls: which caller (by the
//! SPIFFE identity its client certificate proves) may call which routes.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use shoal_core::ApiError;
use shoal_telemetry::Metrics;
use shoal_tls::PeerIdentity;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most callers a policy names.
const MAX_CALLERS: usize = 256;
/// Most patterns per caller.
const MAX_PATTERNS: usize = 64;
/// Longest pattern.
const MAX_PATTERN_LEN: usize = 512;

/// The `[authorization]` table: `allow = { gateway = ["*"], orders =
/// ["/internal/reservations*"] }`. With it, a request is served only if its
/// caller is listed with a pattern matching the path; everything else is 403
/// `forbidden_caller`. The control plane may always reach `/health/*`, `/metrics`
/// and `/ops/*`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizationConfig {
    /// Caller name (a service's name, `gateway` or `control-plane`) → route
    /// patterns: `*` (everything), `/exact/path`, or `/prefix*`.
    pub allow: BTreeMap<String, Vec<String>>,
}

impl AuthorizationConfig {
    /// Reject a policy that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        let bad = |k: String, why: &str| Err(shoal_core::Error::config(format!("{k}: {why}")));
        if self.allow.len() > MAX_CALLERS {
            return bad("authorization.allow".into(), "at most 256 callers");
        }
        for (caller, patterns) in &self.allow {
            let key = format!("authorization.allow.{caller}");
            if let Err(e) = shoal_tls::SpiffeId::for_name(shoal_tls::DEFAULT_TRUST_DOMAIN, caller) {
                return Err(shoal_core::Error::config(format!("{key}: {e}")));
            }
            if patterns.len() > MAX_PATTERNS {
                return bad(key, "at most 64 patterns");
            }
            for p in patterns {
                let star = p.find('*');
                let ok = p.len() <= MAX_PATTERN_LEN
                    && (p == "*" || (p.starts_with('/') && star.is_none_or(|i| i == p.len() - 1)));
                if !ok {
                    return bad(
                        key,
                        "patterns are \"*\", \"/exact/path\" or \"/prefix*\" (at most 512 characters)",
                    );
                }
            }
        }
        Ok(())
    }
}

/// Paths the control plane reaches on every instance whatever the policy says.
fn is_ops_path(path: &str) -> bool {
    path.starts_with("/health/") || path == "/metrics" || path.starts_with("/ops/")
}

fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

/// A compiled policy and its denial counter.
#[derive(Clone)]
pub(crate) struct Policy {
    allow: Arc<BTreeMap<String, Vec<String>>>,
    denied: Family<Vec<(&'static str, String)>, Counter>,
}

impl Policy {
    pub(crate) fn new(cfg: &AuthorizationConfig, metrics: &Metrics) -> Self {
        let denied = Family::default();
        metrics.register(
            "shoal_authz_denied",
            "Requests refused by the authorization policy, by caller identity",
            denied.clone(),
        );
        Self {
            allow: Arc::new(cfg.allow.clone()),
            denied,
        }
    }

    fn allows(&self, caller: &str, path: &str) -> bool {
        if caller == "control-plane" && is_ops_path(path) {
            return true;
        }
        self.allow
            .get(caller)
            .is_some_and(|ps| ps.iter().any(|p| matches(p, path)))
    }
}

/// The middleware: serve the request only if the policy allows its caller.
pub(crate) async fn middleware(State(policy): State<Policy>, req: Request, next: Next) -> Response {
    let caller = req.extensions().get::<PeerIdentity>().map(|p| p.0.clone());
    let path = req.uri().path();
    let allowed = caller
        .as_ref()
        .is_some_and(|c| policy.allows(c.name(), path));
    if allowed {
        return next.run(req).await;
    }
    let who = caller
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_else(|| "unknown".into());
    tracing::warn!(caller = %who, path = %path, method = %req.method(), "caller not allowed by the authorization policy");
    policy
        .denied
        .get_or_create(&vec![("caller", who.clone())])
        .inc();
    ApiError::new(
        http::StatusCode::FORBIDDEN,
        "forbidden_caller",
        format!("{who} may not call {path}"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(toml_text: &str) -> AuthorizationConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix_and_the_control_plane_keeps_ops() {
        let cfg = policy(
            r#"allow = { gateway = ["*"], orders = ["/internal/reservations*", "/api/ping"] }"#,
        );
        cfg.validate().unwrap();
        let p = Policy::new(&cfg, &Metrics::new("t"));
        assert!(p.allows("gateway", "/anything"));
        assert!(p.allows("orders", "/internal/reservations/42"));
        assert!(p.allows("orders", "/api/ping"));
        assert!(!p.allows("orders", "/api/ping/x"));
        assert!(!p.allows("orders", "/api/products"));
        assert!(!p.allows("billing", "/api/ping"));
        assert!(p.allows("control-plane", "/health/ready"));
        assert!(p.allows("control-plane", "/ops/breakers"));
        assert!(!p.allows("control-plane", "/api/products"));
    }

    #[test]
    fn bad_policies_name_their_key() {
        for (text, key) in [
            (
                r#"allow = { Orders = ["*"] }"#,
                "authorization.allow.Orders",
            ),
            (
                r#"allow = { orders = ["api"] }"#,
                "authorization.allow.orders",
            ),
            (
                r#"allow = { orders = ["/a*b"] }"#,
                "authorization.allow.orders",
            ),
        ] {
            let err = policy(text).validate().unwrap_err();
            assert!(err.to_string().starts_with(key), "{err}");
        }
    }
}
