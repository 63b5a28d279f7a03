//! The compiled route table: path normalisation, matching by host, method and
//! path (prefixes and `{param}` patterns), and each route's run-time state (its
//! limiter, schema, CORS rules and live traffic weights).
//!
//! The table is immutable once compiled except for weights; a reload compiles a
//! new one and swaps it in whole, so a request sees one table from start to end.

use crate::config::{check_route, GatewayConfig, RouteConfig};
use crate::guard::{BodySchema, Cors, RateLimiter};
use http::Method;
use shoal_core::Error;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Longest request path looked at (414 beyond).
pub(crate) const MAX_PATH_LEN: usize = 4096;
/// Most routes in one table.
pub(crate) const MAX_ROUTES: usize = 1024;
/// Largest schema file read.
const MAX_SCHEMA_BYTES: u64 = 1024 * 1024;

#[derive(Debug)]
enum Seg {
    Lit(String),
    Param(String),
}

/// One compiled route.
pub(crate) struct Route {
    pub(crate) cfg: RouteConfig,
    pub(crate) name: String,
    /// The name for metrics, shared rather than copied per request.
    pub(crate) label: Arc<str>,
    segs: Vec<Seg>,
    is_prefix: bool,
    methods: Vec<Method>,
    host: Option<String>,
    pub(crate) limiter: Option<RateLimiter>,
    pub(crate) schema: Option<BodySchema>,
    pub(crate) cors: Option<Cors>,
    /// Live weights by version; the admin API changes them in place.
    weights: RwLock<Vec<(String, u32)>>,
}

/// A route that matched, with the path's parameters.
pub(crate) struct Matched {
    pub(crate) route: Arc<Route>,
    pub(crate) params: HashMap<String, String>,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Found(Matched),
    /// A route has the path but not the method: 405 with these in `Allow`.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// The route table.
pub(crate) struct Table {
    /// Most specific first.
    routes: Vec<Arc<Route>>,
    /// Bumped by every reload (shown in `/admin/routes`).
    pub(crate) generation: u64,
}

impl Table {
    /// Compile `routes` under `cfg`, checking every route (errors name it). Routes
    /// whose name and limit are unchanged keep their limiter state from `previous`,
    /// so a reload does not hand every client a fresh burst.
    pub(crate) fn compile(
        cfg: &GatewayConfig,
        routes: &[RouteConfig],
        previous: Option<&Table>,
    ) -> Result<Self, Error> {
        if routes.len() > MAX_ROUTES {
            return Err(Error::config(format!(
                "gateway.routes: at most {MAX_ROUTES} routes"
            )));
        }
        let mut out: Vec<Arc<Route>> = Vec::with_capacity(routes.len());
        let mut names = std::collections::HashSet::new();
        let mut shapes = std::collections::HashSet::new();
        for (i, r) in routes.iter().enumerate() {
            let pattern = r.prefix.as_deref().or(r.path.as_deref()).unwrap_or("");
            let segs: Vec<Seg> = split(pattern)
                .map(
                    |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                        Some(p) => Seg::Param(p.to_string()),
                        None => Seg::Lit(s.to_string()),
                    },
                )
                .collect();
            let params: Vec<&str> = segs
                .iter()
                .filter_map(|s| match s {
                    Seg::Param(p) => Some(p.as_str()),
                    Seg::Lit(_) => None,
                })
                .collect();
            check_route(cfg, i, r, &params)?;
            let at = format!("gateway.routes[{i}] ({})", r.name());
            for p in &params {
                if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(Error::config(format!(
                        "{at}: parameter {{{p}}} must be [A-Za-z0-9_]+"
                    )));
                }
            }
            if let Some(rw) = &r.rewrite {
                for p in template_params(rw) {
                    if !params.contains(&p) {
                        return Err(Error::config(format!(
                            "{at}.rewrite: {{{p}}} is not a parameter of the path"
                        )));
                    }
                }
            }
            let name = r.name().to_string();
            if !names.insert(name.clone()) {
                return Err(Error::config(format!("{at}: the name is used twice")));
            }
            // Two routes of the same shape would make one unreachable.
            let shape = (
                r.host.clone().map(|h| h.to_ascii_lowercase()),
                r.prefix.is_some(),
                segs.iter()
                    .map(|s| match s {
                        Seg::Lit(l) => l.clone(),
                        Seg::Param(_) => "{}".into(),
                    })
                    .collect::<Vec<_>>(),
                {
                    let mut m = r.methods.clone();
                    m.sort();
                    m
                },
            );
            if !shapes.insert(shape) {
                return Err(Error::config(format!(
                    "{at}: another route has the same host, path and methods"
                )));
            }
            let schema = match (&r.schema, &r.schema_file) {
                (Some(v), _) => Some(BodySchema::compile(v, &format!("{at}.schema"))?),
                (None, Some(f)) => {
                    let path = cfg.resolve(f);
                    let text = read_bounded(&path)
                        .map_err(|e| Error::config(format!("{at}.schema_file: {e}")))?;
                    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        Error::config(format!(
                            "{at}.schema_file: {} is not JSON: {e}",
                            path.display()
                        ))
                    })?;
                    Some(BodySchema::compile(&v, &format!("{at}.schema_file"))?)
                }
                (None, None) => None,
            };
            let limiter = r.rate_limit.as_ref().map(|l| {
                previous
                    .and_then(|t| t.by_name(&name))
                    .filter(|old| old.cfg.rate_limit.as_ref() == Some(l))
                    .and_then(|old| old.limiter.clone())
                    .unwrap_or_else(|| RateLimiter::new(l, cfg.rate_limit.max_clients))
            });
            let methods = r
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect();
            out.push(Arc::new(Route {
                label: Arc::from(name.as_str()),
                name,
                is_prefix: r.prefix.is_some(),
                segs,
                methods,
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                limiter,
                schema,
                cors: r
                    .cors
                    .as_ref()
                    .map(|c| Cors::new(c, &format!("{at}.cors")))
                    .transpose()?,
                weights: RwLock::new(r.weights.iter().map(|(k, v)| (k.clone(), *v)).collect()),
                cfg: r.clone(),
            }));
        }
        // Most specific first: a host beats none, more segments beat fewer, a whole
        // path beats a prefix of the same length, literals beat parameters. The sort
        // is stable, so equal routes keep the file's order.
        out.sort_by_key(|r| {
            let literals = r.segs.iter().filter(|s| matches!(s, Seg::Lit(_))).count();
            std::cmp::Reverse((
                r.host.is_some(),
                r.segs.len(),
                !r.is_prefix,
                literals,
                !r.methods.is_empty(),
            ))
        });
        Ok(Self {
            routes: out,
            generation: previous.map_or(1, |t| t.generation + 1),
        })
    }

    /// The routes, most specific first.
    pub(crate) fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The route for a request. `path` must be normalised ([`normalize_path`]);
    /// `host` is lower case without port.
    pub(crate) fn lookup(&self, method: &Method, host: Option<&str>, path: &str) -> Lookup {
        let segs: Vec<&str> = split(path).collect();
        let mut allowed: Vec<Method> = Vec::new();
        for r in &self.routes {
            if r.host.as_deref().is_some_and(|h| Some(h) != host) {
                continue;
            }
            let Some(params) = r.match_path(&segs) else {
                continue;
            };
            if !r.methods.is_empty() && !r.methods.contains(method) {
                allowed.extend(r.methods.iter().cloned());
                continue;
            }
            return Lookup::Found(Matched {
                route: r.clone(),
                params,
            });
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            allowed.dedup();
            Lookup::MethodNotAllowed(allowed)
        }
    }
}

impl Route {
    fn match_path(&self, segs: &[&str]) -> Option<HashMap<String, String>> {
        if segs.len() < self.segs.len() || (!self.is_prefix && segs.len() != self.segs.len()) {
            return None;
        }
        let mut params = HashMap::new();
        for (want, got) in self.segs.iter().zip(segs) {
            match want {
                Seg::Lit(l) if l == got => {}
                Seg::Lit(_) => return None,
                Seg::Param(p) => {
                    params.insert(p.clone(), percent_decode(got));
                }
            }
        }
        Some(params)
    }

    /// The upstream path for `path` (normalised) matched with `params`.
    pub(crate) fn upstream_path(&self, path: &str, params: &HashMap<String, String>) -> String {
        let cfg = &self.cfg;
        let prefix_len = cfg
            .prefix
            .as_deref()
            .filter(|p| *p != "/")
            .map_or(0, str::len);
        if cfg.strip_prefix {
            let rest = &path[prefix_len.min(path.len())..];
            return if rest.is_empty() {
                "/".into()
            } else {
                rest.into()
            };
        }
        match (&cfg.rewrite, cfg.prefix.is_some()) {
            (Some(rw), true) => {
                let rest = &path[prefix_len.min(path.len())..];
                if rw == "/" && !rest.is_empty() {
                    rest.to_string()
                } else {
                    format!("{rw}{rest}")
                }
            }
            (Some(rw), false) => fill_template(rw, params),
            (None, _) => path.to_string(),
        }
    }

    /// The live weights.
    pub(crate) fn weights(&self) -> Vec<(String, u32)> {
        self.weights
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace the weights (the admin API); at least one must be positive.
    pub(crate) fn set_weights(&self, w: Vec<(String, u32)>) {
        *self
            .weights
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = w;
    }

    /// Choose a version by weight among those `has_instances` says can serve; `Ok(None)`
    /// when the route has no weights (any instance will do), `Err` when no weighted
    /// version can serve. A version at weight 0 gets nothing: it drains.
    pub(crate) fn pick_version(
        &self,
        has_instances: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, ()> {
        let weights = self.weights();
        if weights.is_empty() {
            return Ok(None);
        }
        let live: Vec<(String, u32)> = weights
            .into_iter()
            .filter(|(v, w)| *w > 0 && has_instances(v))
            .collect();
        let total: u64 = live.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(());
        }
        let mut n = fastrand::u64(..total);
        for (v, w) in live {
            if n < u64::from(w) {
                return Ok(Some(v));
            }
            n -= u64::from(w);
        }
        Err(())
    }
}

/// A path's segments (none for `/`); a trailing slash adds no segment.
fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn template_params(t: &str) -> Vec<&str> {
    split(t)
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// A template with `{param}` segments filled, each value percent-encoded so it
/// stays one segment.
pub(crate) fn fill_template(t: &str, params: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(t.len() + 16);
    for s in split(t) {
        out.push('/');
        match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(p) => percent_encode(params.get(p).map_or("", String::as_str), &mut out),
            None => out.push_str(s),
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// `value` percent-encoded onto `out`: everything but RFC 3986's unreserved
/// characters, so `/`, `?`, `#`, `&`, `=` and `%` in a value stay inside it.
pub(crate) fn percent_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why a path was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadPath {
    TooLong,
    Invalid(&'static str),
}

/// The one spelling of a request path that rules are checked against and that is
/// forwarded: percent-encoded unreserved characters decoded (RFC 3986 §6.2.2.2), so
/// `/api/%70roducts` is `/api/products`; hex digits of what stays encoded in upper
/// case. Paths that could mean something else to another parser are refused rather
/// than guessed at: dot segments (also encoded), encoded `/` or `\`, a backslash,
/// empty segments, NUL and control characters.
pub(crate) fn normalize_path(raw: &str) -> Result<String, BadPath> {
    if raw.len() > MAX_PATH_LEN {
        return Err(BadPath::TooLong);
    }
    if !raw.starts_with('/') {
        return Err(BadPath::Invalid("the path must start with '/'"));
    }
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(BadPath::Invalid("a '%' is not followed by two hex digits"));
            };
            let d = h << 4 | l;
            if d.is_ascii_alphanumeric() || b"-._~".contains(&d) {
                out.push(d as char);
            } else if d == b'/' || d == b'\\' {
                return Err(BadPath::Invalid("the path has an encoded separator"));
            } else if d < 0x20 || d == 0x7f {
                return Err(BadPath::Invalid(
                    "the path has an encoded control character",
                ));
            } else {
                out.push_str(&format!("%{d:02X}"));
            }
            i += 3;
            continue;
        }
        if c == b'\\' {
            return Err(BadPath::Invalid("the path has a backslash"));
        }
        if c < 0x20 || c == 0x7f {
            return Err(BadPath::Invalid("the path has a control character"));
        }
        // A URI is ASCII: other characters travel percent-encoded (found by the
        // route fuzz target, when bytes were taken for characters one by one).
        if !c.is_ascii() {
            return Err(BadPath::Invalid(
                "the path has non-ASCII characters; percent-encode them",
            ));
        }
        out.push(char::from(c));
        i += 1;
    }
    let segs: Vec<&str> = out[1..].split('/').collect();
    for (n, s) in segs.iter().enumerate() {
        if *s == "." || *s == ".." {
            return Err(BadPath::Invalid("the path has dot segments"));
        }
        // One trailing slash is allowed; other empty segments are not.
        if s.is_empty() && n + 1 != segs.len() {
            return Err(BadPath::Invalid("the path has empty segments"));
        }
    }
    Ok(out)
}

fn read_bounded(path: &std::path::Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > MAX_SCHEMA_BYTES {
        return Err(format!(
            "{} is over {MAX_SCHEMA_BYTES} bytes",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> Table {
        let cfg = GatewayConfig::default();
        let routes = crate::config::RoutesFile::parse(routes, "test")
            .unwrap()
            .routes;
        Table::compile(&cfg, &routes, None).unwrap()
    }

    fn found(
        t: &Table,
        m: &str,
        host: Option<&str>,
        path: &str,
    ) -> Option<(String, HashMap<String, String>)> {
        match t.lookup(&Method::from_bytes(m.as_bytes()).unwrap(), host, path) {
            Lookup::Found(m) => Some((m.route.name.clone(), m.params)),
            _ => None,
        }
    }

    const ROUTES: &str = r#"
        [[routes]]
        prefix = "/api"
        service = "legacy"
        [[routes]]
        prefix = "/api/orders"
        service = "orders"
        [[routes]]
        name = "details"
        path = "/api/orders/{id}/details"
        aggregate = { parts = [{ name = "order", service = "orders", path = "/orders/{id}", timeout_ms = 500, required = true }] }
        [[routes]]
        name = "create"
        path = "/api/orders"
        methods = ["POST"]
        service = "orders"
        [[routes]]
        name = "shop-host"
        prefix = "/"
        host = "shop.example"
        service = "web"
        [[routes]]
        name = "ro"
        path = "/api/reviews"
        methods = ["GET"]
        service = "legacy"
    "#;

    #[test]
    fn the_most_specific_route_wins() {
        let t = table(ROUTES);
        assert_eq!(found(&t, "GET", None, "/api/x").unwrap().0, "/api");
        assert_eq!(
            found(&t, "GET", None, "/api/orders").unwrap().0,
            "/api/orders"
        );
        assert_eq!(found(&t, "POST", None, "/api/orders").unwrap().0, "create");
        assert_eq!(
            found(&t, "GET", None, "/api/orders/o-1").unwrap().0,
            "/api/orders"
        );
        let (name, params) = found(&t, "GET", None, "/api/orders/o-1/details").unwrap();
        assert_eq!(name, "details");
        assert_eq!(params["id"], "o-1");
        // Whole segments only.
        assert_eq!(found(&t, "GET", None, "/api/ordersx").unwrap().0, "/api");
        assert!(found(&t, "GET", None, "/apix").is_none());
        // A host route beats every route without a host, for that host only.
        assert_eq!(
            found(&t, "GET", Some("shop.example"), "/api/orders")
                .unwrap()
                .0,
            "shop-host"
        );
        assert!(found(&t, "GET", Some("other.example"), "/").is_none());
        // A path with the wrong method falls back to a less specific route, and
        // with none left is a 405 naming the methods.
        assert_eq!(found(&t, "DELETE", None, "/api/reviews").unwrap().0, "/api");
        let only = table("[[routes]]\npath = \"/r\"\nmethods = [\"GET\"]\nservice = \"x\"\n");
        match only.lookup(&Method::DELETE, None, "/r") {
            Lookup::MethodNotAllowed(m) => assert_eq!(m, vec![Method::GET]),
            _ => panic!("expected 405"),
        }
    }

    #[test]
    fn rewrites_and_strips_build_the_upstream_path() {
        let t = table(
            r#"
            [[routes]]
            prefix = "/api/catalog"
            service = "catalog"
            strip_prefix = true
            [[routes]]
            prefix = "/old"
            service = "legacy"
            rewrite = "/v1/legacy"
            [[routes]]
            path = "/api/reviews/{product}"
            service = "legacy"
            rewrite = "/reviews/by-product/{product}"
        "#,
        );
        let up = |p: &str| match t.lookup(&Method::GET, None, p) {
            Lookup::Found(m) => m.route.upstream_path(p, &m.params),
            _ => panic!("{p}"),
        };
        assert_eq!(up("/api/catalog"), "/");
        assert_eq!(up("/api/catalog/products/1"), "/products/1");
        assert_eq!(up("/old/x"), "/v1/legacy/x");
        assert_eq!(up("/api/reviews/p-1"), "/reviews/by-product/p-1");
        // An encoded character in a parameter stays encoded: it cannot add a segment.
        assert_eq!(up("/api/reviews/a%3Fb"), "/reviews/by-product/a%3Fb");
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        assert_eq!(normalize_path("/api/%70roducts").unwrap(), "/api/products");
        assert_eq!(normalize_path("/a/%7e%2D").unwrap(), "/a/~-");
        assert_eq!(normalize_path("/a/%3f").unwrap(), "/a/%3F");
        assert_eq!(normalize_path("/a/").unwrap(), "/a/");
        for bad in [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/.%2e/admin",
            "/api/./x",
            "/api/a%2fb",
            "/api/a%2Fb",
            "/api/a%5cb",
            "/a//b",
            "/a\\b",
            "/a%00b",
            "/a%0ab",
            "/a%zz",
            "/a%4",
            "relative",
            "/ta\u{416}",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_path(&"/a".repeat(3000)), Err(BadPath::TooLong));
    }

    #[test]
    fn weights_split_and_a_zero_weight_drains() {
        let t = table("[[routes]]\nname = \"c\"\nprefix = \"/c\"\nservice = \"catalog\"\nweights = { v1 = 75, v2 = 25 }\n");
        let r = t.by_name("c").unwrap();
        let mut n2 = 0;
        for _ in 0..4000 {
            if r.pick_version(|_| true).unwrap().as_deref() == Some("v2") {
                n2 += 1;
            }
        }
        // 25 % of 4000 is 1000; five standard deviations (about 27 each) either side.
        assert!((860..1140).contains(&n2), "{n2}");
        r.set_weights(vec![("v1".into(), 0), ("v2".into(), 100)]);
        for _ in 0..100 {
            assert_eq!(r.pick_version(|_| true).unwrap().as_deref(), Some("v2"));
        }
        // The only weighted version has no instance: no fallback to the drained one.
        assert!(r.pick_version(|v| v == "v1").is_err());
    }

    #[test]
    fn tables_that_cannot_work_are_refused() {
        let cfg = GatewayConfig::default();
        for (routes, why) in [
            ("[[routes]]\nprefix = \"/a\"\nservice = \"x\"\n[[routes]]\nprefix = \"/a\"\nservice = \"y\"\n", "name is used twice"),
            ("[[routes]]\nname = \"a\"\npath = \"/a/{id}\"\nservice = \"x\"\n[[routes]]\nname = \"b\"\npath = \"/a/{key}\"\nservice = \"y\"\n", "same host, path"),
            ("[[routes]]\npath = \"/a/{id}\"\nservice = \"x\"\nrewrite = \"/b/{other}\"\n", "not a parameter"),
            ("[[routes]]\npath = \"/a/{i-d}\"\nservice = \"x\"\n", "must be [A-Za-z0-9_]+"),
        ] {
            let routes = crate::config::RoutesFile::parse(routes, "t").unwrap().routes;
            let e = Table::compile(&cfg, &routes, None).err().expect(why).to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
