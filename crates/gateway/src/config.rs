use serde::Deserialize;
use shoal_discovery::{CallerConfig, Strategy};
use shoal_resilience::ResilienceConfig;
use std::net::{IpAddr, SocketAddr};

/// The `[gateway]` table of the system file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Largest request body accepted (413 beyond). Bodies are read whole before
    /// forwarding so a refused connection can be retried on another instance.
    pub body_limit_bytes: usize,
    /// Longest a whole request may take (503 beyond).
    pub request_timeout_ms: u64,
    /// How instances are chosen.
    pub load_balancing: Strategy,
    /// Calls to services.
    pub upstream: CallerConfig,
    /// Log filter.
    pub log_level: String,
    /// The route table, matched by longest prefix.
    pub routes: Vec<RouteConfig>,
    /// Resilience policies of calls to services; a route may name its own.
    pub resilience: ResilienceConfig,
    /// Source addresses allowed to use `/admin/*`.
    pub admin_allow: Vec<IpAddr>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            load_balancing: Strategy::default(),
            upstream: CallerConfig::default(),
            log_level: "info".into(),
            routes: Vec::new(),
            resilience: ResilienceConfig::default(),
            admin_allow: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
            ],
        }
    }
}

/// One route: a path prefix served by a service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on whole segments (`/api/products` matches
    /// `/api/products` and `/api/products/p-1`, not `/api/productsx`).
    pub prefix: String,
    /// Service that serves it.
    pub service: String,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// A resilience policy of this route's own (with its own breaker); without one,
    /// calls go under the service's policy in `resilience`.
    #[serde(default)]
    pub policy: Option<String>,
}

/// Paths the gateway answers itself.
pub(crate) const RESERVED: &[&str] = &["/health/live", "/health/ready", "/metrics"];
/// Prefixes the gateway keeps for itself: operators' endpoints.
pub(crate) const RESERVED_PREFIXES: &[&str] = &["/admin", "/ops"];

impl GatewayConfig {
    /// Reject a route table that cannot work, naming the route.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let bad = |why: String| {
                Err(shoal_core::Error::config(format!(
                    "gateway.routes[{i}] ({}): {why}",
                    r.prefix
                )))
            };
            if !r.prefix.starts_with('/') || (r.prefix.len() > 1 && r.prefix.ends_with('/')) {
                return bad("prefix must start with '/' and not end with '/'".into());
            }
            if r.prefix.contains("//")
                || r.prefix
                    .split('/')
                    .any(|s| s == "." || s == ".." || s.contains('{') || s.contains('%'))
            {
                return bad("prefix must be plain path segments".into());
            }
            if RESERVED.iter().any(|p| *p == r.prefix)
                || RESERVED_PREFIXES
                    .iter()
                    .any(|p| r.prefix == *p || r.prefix.starts_with(&format!("{p}/")))
            {
                return bad("prefix is reserved by the gateway".into());
            }
            if let Some(p) = &r.policy {
                self.resilience
                    .check_ref(&format!("gateway.routes[{i}].policy"), p)?;
            }
            if !seen.insert(r.prefix.clone()) {
                return bad("prefix listed twice".into());
            }
            shoal_core::names::validate_service_name(&r.service).map_err(|e| {
                shoal_core::Error::config(format!("gateway.routes[{i}].service: {e}"))
            })?;
        }
        self.resilience.validate("gateway.resilience")?;
        if self.body_limit_bytes == 0 || self.request_timeout_ms == 0 {
            return Err(shoal_core::Error::config(
                "gateway: body_limit_bytes and request_timeout_ms must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GatewayConfig, shoal_core::Error> {
        let c: GatewayConfig =
            toml::from_str(s).map_err(|e| shoal_core::Error::config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn route_policies_must_exist_and_admin_prefixes_are_reserved() {
        let ok = parse(
            r#"
            [[routes]]
            prefix = "/api/orders"
            service = "orders"
            policy = "strict"
            [resilience.policies.strict]
            timeout_ms = 500
            "#,
        )
        .unwrap();
        assert_eq!(ok.routes[0].policy.as_deref(), Some("strict"));
        let e = parse(
            r#"
            [[routes]]
            prefix = "/api/orders"
            service = "orders"
            policy = "missing"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("gateway.routes[0].policy"), "{e}");
        let e = parse("[resilience.policies.p]\nbulkhead = { max_concurrent = 0 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gateway.resilience.policies.p.bulkhead.max_concurrent"),
            "{e}"
        );
        for prefix in ["/admin", "/admin/x", "/ops"] {
            let e = parse(&format!(
                "[[routes]]\nprefix = \"{prefix}\"\nservice = \"x\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("reserved"), "{prefix}: {e}");
        }
    }
}
