//! The gateway's typed configuration: the `[gateway]` table of the system file and
//! the route table (inline, or in a routes file that is reloaded on change).

use crate::aggregate::AggregateConfig;
use crate::cache::{CacheConfig, CacheLimits};
use crate::guard::{CorsConfig, IpNet, IpRules, RateLimitConfig};
use serde::Deserialize;
use shoal_auth::VerifierConfig;
use shoal_core::Error;
use shoal_discovery::{CallerConfig, Strategy};
use shoal_resilience::ResilienceConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `[gateway]` table of the system file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Largest request body accepted (413 beyond), unless a route sets its own.
    /// Bodies are read whole before forwarding so a refused connection can be
    /// retried on another instance and a schema can be checked.
    pub body_limit_bytes: usize,
    /// Longest a whole request may take (504 beyond).
    pub request_timeout_ms: u64,
    /// How instances are chosen.
    pub load_balancing: Strategy,
    /// Calls to services (timeouts, pool, outlier detection).
    pub upstream: CallerConfig,
    /// Log filter.
    pub log_level: String,
    /// One log line per request (target `shoal::access`): client, method, path,
    /// route, status, duration.
    pub access_log: bool,
    /// The route table, used when `routes_file` is not set.
    pub routes: Vec<RouteConfig>,
    /// A TOML file holding the route table (`[[routes]]`), relative to the system
    /// file; read at start and again whenever it changes. A table that does not
    /// check is refused and the running one stays.
    pub routes_file: Option<PathBuf>,
    /// How often the routes file is checked for a change.
    pub reload_interval_ms: u64,
    /// Resilience policies of calls to services; a route may name its own.
    pub resilience: ResilienceConfig,
    /// Access tokens: how they are checked. Without this table no route may ask for
    /// a token.
    pub auth: Option<AuthConfig>,
    /// Rate limits per client (token subject, else source address).
    pub rate_limit: ClientLimits,
    /// Proxies in front of the gateway whose `X-Forwarded-For` is believed. From
    /// anyone else the header is ignored: the source address is the client.
    #[serde(deserialize_with = "crate::guard::deserialize_nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// Source addresses allowed or denied on every route.
    pub ip: IpRules,
    /// Operators' endpoints (`/admin/*`).
    pub admin: AdminConfig,
    /// Bounds of the response cache shared by the routes that cache.
    pub cache: CacheLimits,
    /// Client connections.
    pub server: ServerConfig,
    /// An OpenAPI 3 document of the public API, served at `GET /openapi.json`
    /// (relative to the system file); read and checked at start.
    pub openapi_file: Option<PathBuf>,
    /// Mutual TLS of the calls to services (`[gateway.tls]`, docs/mtls.md): with
    /// `mode = "mutual"` every upstream call goes over mTLS as
    /// `spiffe://<trust domain>/gateway`. The client side only: clients still reach
    /// the gateway over plain HTTP.
    pub tls: shoal_tls::TlsConfig,
    /// Spans of the requests it serves and the calls it makes (`[gateway.tracing]`):
    /// by default to the control plane's collector.
    pub tracing: shoal_telemetry::TracingConfig,
    /// Count requests and calls in `/metrics`. Off only to measure what counting
    /// costs (bench/gateway.sh `OVERHEAD=1`): without it the gateway's series stay
    /// at zero and its dashboards go blank.
    pub metrics: bool,
    /// The folder relative paths are read from (the system file's); set by the
    /// loader, not by the file.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
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
            access_log: true,
            routes: Vec::new(),
            routes_file: None,
            reload_interval_ms: 1_000,
            resilience: ResilienceConfig::default(),
            auth: None,
            rate_limit: ClientLimits::default(),
            trusted_proxies: Vec::new(),
            ip: IpRules::default(),
            admin: AdminConfig::default(),
            cache: CacheLimits::default(),
            server: ServerConfig::default(),
            openapi_file: None,
            tls: shoal_tls::TlsConfig::default(),
            tracing: shoal_telemetry::TracingConfig::default(),
            metrics: true,
            base_dir: None,
        }
    }
}

/// `[gateway.auth]`: where the keys that verify tokens come from and what a token
/// must say.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Issuer, audience, leeway and key refresh.
    #[serde(flatten)]
    pub verifier: VerifierConfig,
    /// The service serving the JWKS (fetched through discovery), by default
    /// `identity`.
    #[serde(default = "default_jwks_service")]
    pub jwks_service: String,
    /// Its path.
    #[serde(default = "default_jwks_path")]
    pub jwks_path: String,
    /// A JWKS file instead (relative to the system file), reread on refresh.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}

fn default_jwks_service() -> String {
    "identity".into()
}

fn default_jwks_path() -> String {
    "/.well-known/jwks.json".into()
}

/// `[gateway.rate_limit]`: the default limits per client; a route may set its own.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// Clients without a valid token, keyed by source address.
    pub anonymous: RateLimitConfig,
    /// Clients with a valid token, keyed by its subject.
    pub authenticated: RateLimitConfig,
    /// Most clients tracked at once per limiter (memory bound).
    pub max_clients: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            anonymous: RateLimitConfig {
                per_second: 50,
                burst: 100,
            },
            authenticated: RateLimitConfig {
                per_second: 500,
                burst: 1000,
            },
            max_clients: 100_000,
        }
    }
}

/// `[gateway.admin]`: who may use the operators' endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Source addresses allowed (CIDR); default only loopback.
    #[serde(deserialize_with = "crate::guard::deserialize_nets")]
    pub allow: Vec<IpNet>,
    /// The scope a token needs. With `[gateway.auth]` set, a token with it is
    /// required as well as an allowed address.
    pub scope: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            allow: vec![
                "127.0.0.1/32".parse().expect("a CIDR"),
                "::1/128".parse().expect("a CIDR"),
            ],
            scope: "admin".into(),
        }
    }
}

/// `[gateway.server]`: limits on client connections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// A client must send a request's whole head within this time, or its
    /// connection is closed (slow-header attacks).
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection idle this long is closed.
    pub idle_timeout_ms: u64,
    /// Largest request head (431 beyond).
    pub max_header_bytes: usize,
    /// Most client connections at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub http2_max_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            http2_max_streams: 256,
        }
    }
}

/// How a route treats access tokens.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Tokens are not looked at (they still travel to the service).
    #[default]
    None,
    /// A token, when sent, must be valid; the caller's identity is passed on.
    Optional,
    /// A valid token is needed (401 without); `scopes` then apply (403).
    Required,
}

/// One route of the table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name, used by the admin API (`/admin/routes/{name}/weights`) and
    /// in metrics; by default the prefix or path.
    #[serde(default)]
    pub name: Option<String>,
    /// Path prefix, matched on whole segments (`/api/products` matches
    /// `/api/products` and `/api/products/p-1`, not `/api/productsx`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// A whole path with `{param}` segments (`/api/orders/{id}/details`), instead of
    /// a prefix.
    #[serde(default)]
    pub path: Option<String>,
    /// Methods served; empty means any. Others get 405.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only requests for this host (the `Host` header without port, any case).
    #[serde(default)]
    pub host: Option<String>,
    /// The service that serves it (not for aggregate routes).
    #[serde(default)]
    pub service: Option<String>,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// The upstream path instead: for a prefix route, replaces the prefix; for a
    /// path route, a template that may use the path's `{param}`s.
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Traffic split across the service's versions by weight (`{ "1.0.0" = 90,
    /// "2.0.0" = 10 }`); empty sends to any version. Changed at run time by
    /// `PUT /admin/routes/{name}/weights`.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    /// The route still goes to the legacy system (strangler fig): shown in
    /// `/admin/routes`.
    #[serde(default)]
    pub legacy: bool,
    /// A resilience policy of this route's own (with its own breaker); without one,
    /// calls go under the service's policy in `resilience`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Whether a token is looked at or needed.
    #[serde(default)]
    pub auth: AuthMode,
    /// Scopes the token must all carry (implies `auth = "required"`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// This route's own limit per client, instead of `[gateway.rate_limit]`'s.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// This route's own body limit.
    #[serde(default)]
    pub body_limit_bytes: Option<usize>,
    /// A JSON Schema (as a TOML table) request bodies must meet.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// A JSON Schema file instead, relative to the system file.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// CORS for browsers on other origins.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Cache GET answers.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Compose the answer from several services (API composition) instead of
    /// forwarding.
    #[serde(default)]
    pub aggregate: Option<AggregateConfig>,
    /// Source addresses allowed or denied on this route (after the gateway's own).
    #[serde(default)]
    pub ip: IpRules,
}

impl RouteConfig {
    /// A plain route: `prefix` to `service`, every other setting at its default.
    pub fn to(prefix: &str, service: &str) -> Self {
        Self {
            prefix: Some(prefix.into()),
            service: Some(service.into()),
            ..Self::default()
        }
    }

    /// The route's name: its own, else its prefix or path.
    pub fn name(&self) -> &str {
        self.name
            .as_deref()
            .or(self.prefix.as_deref())
            .or(self.path.as_deref())
            .unwrap_or("")
    }

    /// The services the route calls.
    pub fn services(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.service.iter().map(String::as_str).collect();
        if let Some(a) = &self.aggregate {
            out.extend(a.parts.iter().map(|p| p.service.as_str()));
        }
        out
    }

    /// A token is needed.
    pub fn needs_token(&self) -> bool {
        self.auth == AuthMode::Required || !self.scopes.is_empty()
    }
}

/// A routes file: the route table alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// The routes.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl RoutesFile {
    /// Parse a routes file's text; errors name the key and line.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")))
    }
}

/// Paths the gateway answers itself.
pub(crate) const RESERVED: &[&str] =
    &["/health/live", "/health/ready", "/metrics", "/openapi.json"];
/// Prefixes the gateway keeps for itself: operators' endpoints.
pub(crate) const RESERVED_PREFIXES: &[&str] = &["/admin", "/ops"];

impl GatewayConfig {
    /// Reject a configuration that cannot work, naming the key. The route table is
    /// compiled (schemas read and checked) so a mistake stops the start, not the
    /// first request.
    pub fn validate(&self) -> Result<(), Error> {
        self.tracing.validate("gateway.tracing")?;
        self.resilience.validate("gateway.resilience")?;
        self.tls.validate("gateway.tls")?;
        if self.body_limit_bytes == 0 || self.request_timeout_ms == 0 {
            return Err(Error::config(
                "gateway: body_limit_bytes and request_timeout_ms must be positive",
            ));
        }
        if self.reload_interval_ms == 0 {
            return Err(Error::config(
                "gateway.reload_interval_ms: must be positive",
            ));
        }
        self.rate_limit
            .anonymous
            .validate("gateway.rate_limit.anonymous")?;
        self.rate_limit
            .authenticated
            .validate("gateway.rate_limit.authenticated")?;
        if self.rate_limit.max_clients == 0 {
            return Err(Error::config(
                "gateway.rate_limit.max_clients: must be positive",
            ));
        }
        let s = &self.server;
        if s.header_read_timeout_ms == 0
            || s.idle_timeout_ms == 0
            || s.max_connections == 0
            || s.http2_max_streams == 0
        {
            return Err(Error::config(
                "gateway.server: timeouts, max_connections and http2_max_streams must be positive",
            ));
        }
        if s.max_header_bytes < 8192 {
            return Err(Error::config(
                "gateway.server.max_header_bytes: at least 8192 (HTTP/1 needs room for a request line)",
            ));
        }
        self.cache.validate("gateway.cache")?;
        if let Some(a) = &self.auth {
            a.verifier
                .validate()
                .map_err(|e| Error::config(format!("gateway.auth: {}", e.message())))?;
            shoal_core::names::validate_service_name(&a.jwks_service)
                .map_err(|e| Error::config(format!("gateway.auth.jwks_service: {e}")))?;
            if !a.jwks_path.starts_with('/') {
                return Err(Error::config("gateway.auth.jwks_path: must start with '/'"));
            }
        }
        if self.routes_file.is_some() && !self.routes.is_empty() {
            return Err(Error::config(
                "gateway: set either routes or routes_file, not both",
            ));
        }
        self.load_openapi()?;
        let routes = self.load_routes()?;
        crate::table::Table::compile(self, &routes, None)?;
        Ok(())
    }

    /// The OpenAPI document, when configured: JSON, an object with an `openapi`
    /// version 3.x, at most 4 MiB.
    pub(crate) fn load_openapi(&self) -> Result<Option<bytes::Bytes>, Error> {
        let Some(f) = &self.openapi_file else {
            return Ok(None);
        };
        let path = self.resolve(f);
        let bad =
            |why: String| Error::config(format!("gateway.openapi_file: {}: {why}", path.display()));
        let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        if text.len() > 4 * 1024 * 1024 {
            return Err(bad("over 4 MiB".into()));
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if !doc
            .get("openapi")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.starts_with("3."))
        {
            return Err(bad(
                "not an OpenAPI 3 document (no \"openapi\": \"3.x\")".into()
            ));
        }
        Ok(Some(bytes::Bytes::from(text)))
    }

    /// A path from the config, resolved against the system file's folder.
    pub(crate) fn resolve(&self, p: &std::path::Path) -> PathBuf {
        match &self.base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The route table: inline, or read from `routes_file`.
    pub fn load_routes(&self) -> Result<Vec<RouteConfig>, Error> {
        match &self.routes_file {
            None => Ok(self.routes.clone()),
            Some(f) => {
                let path = self.resolve(f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    Error::config(format!(
                        "gateway.routes_file: cannot read {}",
                        path.display()
                    ))
                    .with_source(e)
                })?;
                Ok(RoutesFile::parse(&text, &path.display().to_string())?.routes)
            }
        }
    }
}

/// Check one route on its own, naming it in errors.
pub(crate) fn check_route(
    cfg: &GatewayConfig,
    i: usize,
    r: &RouteConfig,
    params: &[&str],
) -> Result<(), Error> {
    let at = format!("gateway.routes[{i}] ({})", r.name());
    let bad = |why: &str| Err(Error::config(format!("{at}: {why}")));
    let pattern = match (&r.prefix, &r.path) {
        (Some(p), None) => p,
        (None, Some(p)) => p,
        _ => return bad("set exactly one of prefix and path"),
    };
    if !pattern.starts_with('/') || (pattern.len() > 1 && pattern.ends_with('/')) {
        return bad("must start with '/' and not end with '/'");
    }
    if pattern.contains("//")
        || pattern.split('/').any(|s| {
            s == "." || s == ".." || s.contains('%') || s.contains('\\') || s.contains('*')
        })
    {
        return bad("must be plain path segments");
    }
    if r.prefix.is_some() && pattern.contains('{') {
        return bad("a prefix cannot have {param} segments; use path");
    }
    if RESERVED.iter().any(|p| p == pattern)
        || RESERVED_PREFIXES
            .iter()
            .any(|p| pattern == p || pattern.starts_with(&format!("{p}/")))
    {
        return bad("the path is reserved by the gateway");
    }
    if let Some(name) = &r.name {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad("name must be 1 to 64 of [A-Za-z0-9-_.]");
        }
    }
    for m in &r.methods {
        if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
            return bad(&format!("method {m:?} is not an upper-case HTTP method"));
        }
    }
    if let Some(h) = &r.host {
        if h.is_empty() || h.contains(':') || h.contains('/') {
            return bad("host must be a host name without port");
        }
    }
    match (&r.service, &r.aggregate) {
        (Some(s), None) => shoal_core::names::validate_service_name(s)
            .map_err(|e| Error::config(format!("{at}.service: {e}")))?,
        (None, Some(a)) => {
            a.validate(&format!("{at}.aggregate"), params)?;
            if r.rewrite.is_some() || r.strip_prefix || !r.weights.is_empty() {
                return bad("an aggregate route cannot rewrite, strip or weigh");
            }
            for p in &a.parts {
                shoal_core::names::validate_service_name(&p.service)
                    .map_err(|e| Error::config(format!("{at}.aggregate: {e}")))?;
            }
        }
        _ => return bad("set exactly one of service and aggregate"),
    }
    if r.strip_prefix && r.rewrite.is_some() {
        return bad("strip_prefix and rewrite do not go together");
    }
    if let Some(rw) = &r.rewrite {
        if !rw.starts_with('/') {
            return bad("rewrite must start with '/'");
        }
    }
    if r.strip_prefix && r.prefix.is_none() {
        return bad("strip_prefix needs a prefix");
    }
    if !r.weights.is_empty() && r.weights.values().all(|w| *w == 0) {
        return bad("weights cannot all be 0");
    }
    if r.weights.values().any(|w| *w > 10_000) {
        return bad("a weight is at most 10000");
    }
    if let Some(p) = &r.policy {
        cfg.resilience.check_ref(&format!("{at}.policy"), p)?;
    }
    if (r.needs_token() || r.auth == AuthMode::Optional) && cfg.auth.is_none() {
        return bad("asks for tokens but [gateway.auth] is not set");
    }
    if let Some(l) = &r.rate_limit {
        l.validate(&format!("{at}.rate_limit"))?;
    }
    if r.body_limit_bytes == Some(0) {
        return bad("body_limit_bytes must be positive");
    }
    if r.schema.is_some() && r.schema_file.is_some() {
        return bad("set schema or schema_file, not both");
    }
    if let Some(c) = &r.cors {
        c.validate(&format!("{at}.cors"))?;
    }
    if let Some(c) = &r.cache {
        c.validate(&format!("{at}.cache"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GatewayConfig, Error> {
        let c: GatewayConfig = toml::from_str(s).map_err(|e| Error::config(e.to_string()))?;
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
        assert!(e.contains("gateway.routes[0] (/api/orders).policy"), "{e}");
        let e = parse("[resilience.policies.p]\nbulkhead = { max_concurrent = 0 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gateway.resilience.policies.p.bulkhead.max_concurrent"),
            "{e}"
        );
        for prefix in ["/admin", "/admin/x", "/ops", "/metrics"] {
            let e = parse(&format!(
                "[[routes]]\nprefix = \"{prefix}\"\nservice = \"x\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("reserved"), "{prefix}: {e}");
        }
    }

    #[test]
    fn auth_keys_are_checked_too() {
        let ok = parse("[auth]\nissuer = \"i\"\naudience = \"a\"\njwks_service = \"identity\"\n")
            .unwrap();
        assert_eq!(ok.auth.unwrap().verifier.leeway_s, 30);
        for bad in ["colour = 1", "leeway = 3", "jwks_servce = \"x\""] {
            let e = parse(&format!(
                "[auth]\nissuer = \"i\"\naudience = \"a\"\n{bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
    }

    #[test]
    fn route_mistakes_are_named() {
        for (route, why) in [
            (
                "prefix = \"/a\"\npath = \"/b\"\nservice = \"x\"",
                "exactly one of prefix",
            ),
            ("service = \"x\"", "exactly one of prefix"),
            ("prefix = \"/a\"", "exactly one of service"),
            ("prefix = \"/a/{id}\"\nservice = \"x\"", "use path"),
            (
                "prefix = \"/a/../b\"\nservice = \"x\"",
                "plain path segments",
            ),
            (
                "prefix = \"/a\"\nservice = \"x\"\nmethods = [\"get\"]",
                "upper-case",
            ),
            (
                "prefix = \"/a\"\nservice = \"x\"\nweights = { v1 = 0 }",
                "all be 0",
            ),
            (
                "prefix = \"/a\"\nservice = \"x\"\nscopes = [\"s\"]",
                "[gateway.auth]",
            ),
            (
                "path = \"/a\"\nservice = \"x\"\nstrip_prefix = true",
                "needs a prefix",
            ),
            (
                "prefix = \"/a\"\nservice = \"x\"\ncolour = 1",
                "unknown field",
            ),
        ] {
            let e = parse(&format!("[[routes]]\n{route}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{route}: {e}");
        }
    }
}
