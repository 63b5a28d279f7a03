//! The shoal API gateway: the single entry point of a shoal system.
//!
//! A request passes, in order: the source-address rules (with `X-Forwarded-For`
//! believed only from trusted proxies), path normalisation, the route table (host,
//! method, path prefix or `{param}` pattern), CORS, the access token (JWT against
//! the identity service's JWKS), the client's rate limit, the route's scopes, the
//! response cache, the body limit and JSON Schema, and then goes to an instance of
//! the route's service (found through the registry, balanced, with outlier
//! detection and the resilience policies, by version weight for canary and
//! blue-green) or is composed from several services. Routes reload from a file or
//! change through `/admin`. See docs/gateway.md.

mod admin;
mod aggregate;
mod cache;
mod config;
mod gateway;
mod guard;
mod proxy;
mod server;
mod table;

pub use aggregate::{AggregateConfig, PartConfig};
pub use cache::{CacheConfig, CacheLimits};
pub use config::{
    AdminConfig, AuthConfig, AuthMode, ClientLimits, GatewayConfig, RouteConfig, RoutesFile,
    ServerConfig,
};
pub use gateway::{serve, Gateway};
pub use guard::{CorsConfig, IpNet, IpRules, RateLimitConfig};

/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::OnceLock;

    /// Normalise `input` as a request path and look it up in a fixed table: must
    /// never panic, and a path that normalises must normalise to itself again.
    pub fn route(input: &[u8]) {
        static TABLE: OnceLock<crate::table::Table> = OnceLock::new();
        let table = TABLE.get_or_init(|| {
            let routes = crate::config::RoutesFile::parse(
                r#"
                [[routes]]
                prefix = "/api"
                service = "a"
                [[routes]]
                name = "p"
                path = "/api/orders/{id}/details"
                aggregate = { parts = [{ name = "o", service = "o", path = "/o/{id}", timeout_ms = 1, required = true }] }
                [[routes]]
                name = "r"
                path = "/api/items/{id}"
                methods = ["GET"]
                service = "b"
                rewrite = "/v1/{id}"
                [[routes]]
                name = "h"
                prefix = "/"
                host = "x.example"
                service = "c"
                "#,
                "fuzz",
            )
            .expect("fuzz routes")
            .routes;
            crate::table::Table::compile(&crate::GatewayConfig::default(), &routes, None)
                .expect("fuzz table")
        });
        let Ok(text) = std::str::from_utf8(input) else {
            return;
        };
        let (host, path) = text.split_once('\n').unwrap_or(("", text));
        if let Ok(p) = crate::table::normalize_path(path) {
            assert_eq!(crate::table::normalize_path(&p).as_deref(), Ok(p.as_str()));
            let host = (!host.is_empty()).then_some(host);
            if let crate::table::Lookup::Found(m) = table.lookup(&http::Method::GET, host, &p) {
                let up = m.route.upstream_path(&p, &m.params);
                assert!(up.starts_with('/'), "{up}");
                assert!(!up.split('/').any(|s| s == ".."), "{up}");
            }
        }
    }
}
