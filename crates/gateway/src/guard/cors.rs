//! CORS per route: browsers' preflights answered at the edge, and the CORS headers of
//! actual answers set by the gateway alone.
//!
//! The gateway is the one authority on a route's CORS policy: [`Cors::apply`] removes
//! any `Access-Control-*` header a service set, so a service answering
//! `Access-Control-Allow-Origin: *` cannot widen what the route allows.

use axum::response::{IntoResponse, Response};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use shoal_core::{ApiError, Error};

/// Longest preflight cache lifetime accepted; browsers cap it lower anyway (Firefox at
/// a day, Chromium at two hours).
const MAX_AGE_LIMIT_S: u64 = 86_400;
/// Most headers one preflight may ask for; more is refused rather than scanned.
const MAX_REQUESTED_HEADERS: usize = 64;

/// A route's CORS policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins whose pages may call the route: exact origins
    /// (`"https://shop.example"`, `"http://localhost:3000"`), or `["*"]` for any.
    pub allow_origins: Vec<String>,
    /// Methods a cross-origin page may use.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a cross-origin page may send beyond the CORS-safelisted ones
    /// (`content-type` for JSON bodies belongs here); `"*"` for any.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a cross-origin page may read beyond the safelisted ones.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether pages may send cookies and read answers to credentialed requests.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer, in seconds.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

fn default_max_age_s() -> u64 {
    600
}

impl CorsConfig {
    /// Refuse a policy browsers would reject or that means something else than it
    /// seems, naming the config key `at`.
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        Cors::new(self, at).map(drop)
    }
}

#[derive(Debug)]
enum Origins {
    Any,
    /// Lowercase serialized origins.
    List(Vec<String>),
}

#[derive(Debug)]
enum AllowHeaders {
    Any,
    List(Vec<HeaderName>),
}

/// A compiled CORS policy (header values built once, at start).
#[derive(Debug)]
pub(crate) struct Cors {
    origins: Origins,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    headers: AllowHeaders,
    /// The configured list, answered whole so one preflight's cache covers them all.
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

impl Cors {
    /// Check `cfg` and compile it; errors name the config key `at`.
    pub(crate) fn new(cfg: &CorsConfig, at: &str) -> Result<Self, Error> {
        let bad = |what: &str, why: String| Error::config(format!("{at}.{what}: {why}"));
        let origins = if cfg.allow_origins.iter().any(|o| o == "*") {
            if cfg.allow_origins.len() > 1 {
                return Err(bad("allow_origins", "\"*\" must stand alone".into()));
            }
            if cfg.allow_credentials {
                return Err(bad(
                    "allow_origins",
                    "\"*\" cannot be combined with allow_credentials (browsers refuse it, \
                     and echoing any origin with credentials would open the route to \
                     every site); list the origins"
                        .into(),
                ));
            }
            Origins::Any
        } else {
            if cfg.allow_origins.is_empty() {
                return Err(bad(
                    "allow_origins",
                    "list at least one origin, or \"*\"".into(),
                ));
            }
            let mut list = Vec::with_capacity(cfg.allow_origins.len());
            for o in &cfg.allow_origins {
                check_origin(o).map_err(|why| bad("allow_origins", format!("{o:?}: {why}")))?;
                list.push(o.to_ascii_lowercase());
            }
            Origins::List(list)
        };

        if cfg.allow_methods.is_empty() {
            return Err(bad("allow_methods", "list at least one method".into()));
        }
        let mut methods = Vec::with_capacity(cfg.allow_methods.len());
        for m in &cfg.allow_methods {
            match Method::from_bytes(m.as_bytes()) {
                Ok(method) if !m.is_empty() => methods.push(method),
                _ => return Err(bad("allow_methods", format!("{m:?} is not a method name"))),
            }
        }

        let headers = if cfg.allow_headers.iter().any(|h| h == "*") {
            if cfg.allow_headers.len() > 1 {
                return Err(bad("allow_headers", "\"*\" must stand alone".into()));
            }
            AllowHeaders::Any
        } else {
            AllowHeaders::List(
                header_names(&cfg.allow_headers).map_err(|why| bad("allow_headers", why))?,
            )
        };
        let expose = if cfg.expose_headers.iter().any(|h| h == "*") {
            if cfg.expose_headers.len() > 1 || cfg.allow_credentials {
                return Err(bad(
                    "expose_headers",
                    "\"*\" must stand alone and means a literal header name with \
                     allow_credentials; list the headers"
                        .into(),
                ));
            }
            vec!["*".to_string()]
        } else {
            header_names(&cfg.expose_headers)
                .map_err(|why| bad("expose_headers", why))?
                .iter()
                .map(|h| h.as_str().to_string())
                .collect()
        };
        if cfg.max_age_s > MAX_AGE_LIMIT_S {
            return Err(bad("max_age_s", format!("at most {MAX_AGE_LIMIT_S}")));
        }

        let list = |items: Vec<String>| -> Result<Option<HeaderValue>, Error> {
            if items.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(&items.join(", "))
                .map(Some)
                .map_err(|e| Error::config(format!("{at}: {e}")))
        };
        let allow_methods = list(methods.iter().map(|m| m.as_str().to_string()).collect())?
            .unwrap_or_else(|| HeaderValue::from_static("GET"));
        let allow_headers = match &headers {
            AllowHeaders::Any => None,
            AllowHeaders::List(l) => list(l.iter().map(|h| h.as_str().to_string()).collect())?,
        };
        Ok(Self {
            origins,
            methods,
            allow_methods,
            headers,
            allow_headers,
            expose_headers: list(expose)?,
            credentials: cfg.allow_credentials,
            max_age: HeaderValue::from(cfg.max_age_s),
        })
    }

    /// The answer to a CORS preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`): 204 with the allow headers when the origin, the
    /// method and every requested header are allowed, else 403 `cors_refused`. `None`
    /// for any other request, which goes on as usual.
    pub(crate) fn preflight(&self, req: &http::request::Parts) -> Option<Response> {
        if req.method != Method::OPTIONS {
            return None;
        }
        let origin = req.headers.get(ORIGIN)?;
        let method = req.headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
        Some(
            self.answer_preflight(origin, method, &req.headers)
                .unwrap_or_else(|why| {
                    let mut res =
                        ApiError::new(StatusCode::FORBIDDEN, "cors_refused", why).into_response();
                    vary_preflight(res.headers_mut());
                    res
                }),
        )
    }

    fn answer_preflight(
        &self,
        origin: &HeaderValue,
        method: &HeaderValue,
        headers: &HeaderMap,
    ) -> Result<Response, String> {
        let allow_origin = self
            .allowed_origin(origin)
            .ok_or_else(|| "this origin may not call this route".to_string())?;
        let shown = |v: &[u8]| super::truncate(&String::from_utf8_lossy(v), 40).into_owned();
        if !Method::from_bytes(method.as_bytes()).is_ok_and(|m| self.methods.contains(&m)) {
            return Err(format!(
                "method {} is not allowed from another origin",
                shown(method.as_bytes())
            ));
        }
        let mut requested = Vec::new();
        for line in headers.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
            for name in line.as_bytes().split(|b| *b == b',') {
                let name = name.trim_ascii();
                if name.is_empty() {
                    continue;
                }
                let parsed = HeaderName::from_bytes(name)
                    .map_err(|_| format!("{} is not a header name", shown(name)))?;
                if let AllowHeaders::List(allowed) = &self.headers {
                    if !allowed.contains(&parsed) {
                        return Err(format!(
                            "header {} is not allowed from another origin",
                            shown(name)
                        ));
                    }
                }
                requested.push(parsed);
                if requested.len() > MAX_REQUESTED_HEADERS {
                    return Err(format!(
                        "more than {MAX_REQUESTED_HEADERS} headers requested"
                    ));
                }
            }
        }

        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        match (&self.allow_headers, requested.is_empty()) {
            (_, true) => {}
            (Some(list), false) => {
                h.insert(ACCESS_CONTROL_ALLOW_HEADERS, list.clone());
            }
            // Any header: echo the ones asked for (a literal `*` would not cover
            // credentialed requests).
            (None, false) => {
                let echo: Vec<&str> = requested.iter().map(HeaderName::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&echo.join(", ")) {
                    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
                }
            }
        }
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        vary_preflight(h);
        Ok(res)
    }

    /// Set the CORS headers of an actual (non-preflight) answer: the allowed origin,
    /// credentials and exposed headers when the request's `Origin` is allowed, and
    /// always `Vary: Origin` when the answer depends on the origin, so a shared cache
    /// never hands one origin's answer to another. Any `Access-Control-*` header the
    /// service set is removed first.
    pub(crate) fn apply(&self, request_headers: &HeaderMap, response_headers: &mut HeaderMap) {
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_EXPOSE_HEADERS,
            ACCESS_CONTROL_ALLOW_METHODS,
            ACCESS_CONTROL_ALLOW_HEADERS,
            ACCESS_CONTROL_MAX_AGE,
        ] {
            response_headers.remove(name);
        }
        if matches!(self.origins, Origins::List(_)) {
            add_vary(response_headers, "origin");
        }
        let Some(allow_origin) = request_headers
            .get(ORIGIN)
            .and_then(|o| self.allowed_origin(o))
        else {
            return;
        };
        response_headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if self.credentials {
            response_headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            response_headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, if it may call the route.
    fn allowed_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(list) => list
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
                .then(|| origin.clone()),
        }
    }
}

/// Whether `o` is a serialized origin: `scheme://host[:port]`, nothing more. `null` is
/// refused: sandboxed frames and local files send it, so allowing it allows anyone.
fn check_origin(o: &str) -> Result<(), &'static str> {
    if o == "null" {
        return Err("the \"null\" origin is sent by any sandboxed page and cannot be trusted");
    }
    let (scheme, rest) = o
        .split_once("://")
        .ok_or("expected scheme://host[:port], like \"https://shop.example\"")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("the scheme is not valid");
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    if host.is_empty()
        || host.chars().any(|c| {
            matches!(c, '/' | '?' | '#' | '@' | '\\' | '*') || c.is_whitespace() || c.is_control()
        })
    {
        return Err("an origin is scheme://host[:port]: no path, no trailing '/', no wildcard");
    }
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) || p.starts_with('0') {
            return Err("the port is not valid");
        }
    }
    Ok(())
}

fn header_names(names: &[String]) -> Result<Vec<HeaderName>, String> {
    names
        .iter()
        .map(|n| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"))
        })
        .collect()
}

/// A preflight's answer depends on all three request headers.
fn vary_preflight(h: &mut HeaderMap) {
    for name in [
        "origin",
        "access-control-request-method",
        "access-control-request-headers",
    ] {
        add_vary(h, name);
    }
}

/// Add `name` to `Vary` unless it (or `*`) is already there; the service's own `Vary`
/// entries (`Accept-Encoding`) are kept.
fn add_vary(h: &mut HeaderMap, name: &'static str) {
    let present = h.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.eq_ignore_ascii_case(name))
        })
    });
    if !present {
        h.append(VARY, HeaderValue::from_static(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_src: &str) -> CorsConfig {
        toml::from_str(toml_src).unwrap()
    }

    fn shop() -> Cors {
        let c = cfg(r#"
            allow_origins = ["https://shop.example", "http://localhost:3000"]
            allow_methods = ["GET", "POST", "PUT"]
            allow_headers = ["content-type", "x-request-id"]
            expose_headers = ["x-request-id", "Retry-After"]
            allow_credentials = true
            "#);
        Cors::new(&c, "gateway.routes[0].cors").unwrap()
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri("/api/orders");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn vary(h: &HeaderMap) -> Vec<String> {
        h.get_all(VARY)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn defaults_and_strict_keys() {
        let c = cfg(r#"allow_origins = ["https://shop.example"]"#);
        assert_eq!(c.allow_methods, ["GET", "HEAD", "POST"]);
        assert_eq!(c.max_age_s, 600);
        assert!(!c.allow_credentials);
        c.validate("cors").unwrap();
        assert!(toml::from_str::<CorsConfig>("allow_origins = []\nallow_origin = []").is_err());
    }

    #[test]
    fn policies_that_cannot_work_are_refused() {
        let refused = |src: &str, needle: &str| {
            let e = cfg(src)
                .validate("gateway.routes[2].cors")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("gateway.routes[2].cors."), "{e}");
            assert!(e.contains(needle), "{src}: {e}");
        };
        refused(
            "allow_origins = [\"*\"]\nallow_credentials = true",
            "allow_credentials",
        );
        refused("allow_origins = [\"*\", \"https://a.example\"]", "alone");
        refused("allow_origins = []", "at least one origin");
        for bad in [
            "https://shop.example/",
            "https://shop.example/path",
            "shop.example",
            "https://*.shop.example",
            "https://shop.example:0",
            "https://shop.example:99999",
            "https://user@shop.example",
            "null",
        ] {
            refused(&format!("allow_origins = [{bad:?}]"), "allow_origins");
        }
        let o = "allow_origins = [\"https://a.example\"]\n";
        refused(&format!("{o}allow_methods = [\"GE T\"]"), "not a method");
        refused(&format!("{o}allow_methods = [\"\"]"), "not a method");
        refused(&format!("{o}allow_methods = []"), "at least one method");
        refused(
            &format!("{o}allow_headers = [\"x y\"]"),
            "not a header name",
        );
        refused(
            &format!("{o}expose_headers = [\"a:b\"]"),
            "not a header name",
        );
        refused(
            &format!("{o}expose_headers = [\"*\"]\nallow_credentials = true"),
            "expose_headers",
        );
        refused(&format!("{o}max_age_s = 86401"), "max_age_s");
        for good in [
            "http://localhost:3000",
            "https://[::1]:8443",
            "https://Shop.Example",
            "app://shop",
        ] {
            cfg(&format!("allow_origins = [{good:?}]"))
                .validate("cors")
                .unwrap();
        }
    }

    #[test]
    fn an_allowed_preflight_gets_204_with_the_allow_headers() {
        let req = request(
            "OPTIONS",
            &[
                ("origin", "https://shop.example"),
                ("access-control-request-method", "PUT"),
                (
                    "access-control-request-headers",
                    "Content-Type, x-request-id",
                ),
            ],
        );
        let res = shop().preflight(&req).expect("a preflight");
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        let h = res.headers();
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET, POST, PUT");
        assert_eq!(
            h[ACCESS_CONTROL_ALLOW_HEADERS],
            "content-type, x-request-id"
        );
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(
            vary(h),
            [
                "origin",
                "access-control-request-method",
                "access-control-request-headers"
            ]
        );
    }

    #[tokio::test]
    async fn refused_preflights_say_why() {
        let cors = shop();
        for (origin, method, headers, needle) in [
            ("https://evil.example", "GET", "", "origin"),
            ("https://shop.example.evil", "GET", "", "origin"),
            ("https://shop.example", "DELETE", "", "method DELETE"),
            ("https://shop.example", "get", "", "method get"),
            (
                "https://shop.example",
                "POST",
                "x-request-id, authorization",
                "header authorization",
            ),
            ("https://shop.example", "POST", "x y", "not a header name"),
        ] {
            let mut h = vec![
                ("origin", origin),
                ("access-control-request-method", method),
            ];
            if !headers.is_empty() {
                h.push(("access-control-request-headers", headers));
            }
            let res = cors
                .preflight(&request("OPTIONS", &h))
                .expect("a preflight");
            assert!(res.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
            let e = crate::guard::tests::api_error(res).await;
            assert_eq!(e.status, StatusCode::FORBIDDEN);
            assert_eq!(e.code, "cors_refused");
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        let many = vec!["x-request-id"; MAX_REQUESTED_HEADERS + 1].join(",");
        let h = [
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", many.as_str()),
        ];
        let res = cors
            .preflight(&request("OPTIONS", &h))
            .expect("a preflight");
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        // A client-supplied method is quoted only in part.
        let long = "X".repeat(5000);
        let h = [
            ("origin", "https://shop.example"),
            ("access-control-request-method", &long),
        ];
        let e =
            crate::guard::tests::api_error(cors.preflight(&request("OPTIONS", &h)).unwrap()).await;
        assert!(e.message.len() < 200, "{}", e.message.len());
    }

    #[test]
    fn other_requests_are_not_preflights() {
        let cors = shop();
        let origin = ("origin", "https://shop.example");
        let acrm = ("access-control-request-method", "POST");
        assert!(cors.preflight(&request("GET", &[origin, acrm])).is_none());
        assert!(cors.preflight(&request("OPTIONS", &[origin])).is_none());
        assert!(cors.preflight(&request("OPTIONS", &[acrm])).is_none());
    }

    #[test]
    fn any_origin_and_any_header() {
        let c = cfg("allow_origins = [\"*\"]\nallow_headers = [\"*\"]\nmax_age_s = 60");
        let cors = Cors::new(&c, "cors").unwrap();
        let req = request(
            "OPTIONS",
            &[
                ("origin", "https://anyone.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-a,X-B"),
            ],
        );
        let res = cors.preflight(&req).unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        assert_eq!(res.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(res.headers()[ACCESS_CONTROL_ALLOW_HEADERS], "x-a, x-b");
        assert!(res
            .headers()
            .get(ACCESS_CONTROL_ALLOW_CREDENTIALS)
            .is_none());
        assert_eq!(res.headers()[ACCESS_CONTROL_MAX_AGE], "60");
        // An answer that is the same for every origin needs no `Vary: Origin`.
        let mut out = HeaderMap::new();
        let req_h = request("GET", &[("origin", "https://anyone.example")]).headers;
        cors.apply(&req_h, &mut out);
        assert_eq!(out[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(out.get(VARY).is_none());
    }

    #[test]
    fn actual_answers_get_the_origin_credentials_and_exposed_headers() {
        let cors = shop();
        let req_h = request("POST", &[("origin", "https://shop.example")]).headers;
        let mut out = HeaderMap::new();
        out.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        out.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("99999"));
        cors.apply(&req_h, &mut out);
        assert_eq!(out[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert_eq!(out[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(
            out[ACCESS_CONTROL_EXPOSE_HEADERS],
            "x-request-id, retry-after"
        );
        assert!(
            out.get(ACCESS_CONTROL_MAX_AGE).is_none(),
            "the service's CORS headers go"
        );
        assert_eq!(vary(&out), ["Accept-Encoding", "origin"]);
        // Applied twice (a retried answer), Vary does not grow.
        cors.apply(&req_h, &mut out);
        assert_eq!(vary(&out).len(), 2);
    }

    #[test]
    fn other_origins_get_no_cors_headers_but_still_vary() {
        let cors = shop();
        for req_h in [
            request("GET", &[("origin", "https://evil.example")]).headers,
            request("GET", &[]).headers,
        ] {
            let mut out = HeaderMap::new();
            out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            out.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
            cors.apply(&req_h, &mut out);
            assert!(out.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
            assert!(out.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
            assert_eq!(vary(&out), ["origin"]);
        }
    }
}
