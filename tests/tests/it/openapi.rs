//! `shop/api/openapi.json` against what the gateway really serves: the route table
//! of `shoal.toml` and the schema the gateway checks order bodies with. No servers:
//! the two files are read and compared.

use serde_json::Value;
use shoal_gateway::{AuthMode, RouteConfig};
use shoal_supervisor::SystemFile;
use std::path::{Path, PathBuf};

/// Paths the gateway answers itself, before the route table (docs/gateway.md).
const GATEWAY_OWN: &[&str] = &["/health/ready", "/openapi.json"];
/// The admin API, also the gateway's own.
const GATEWAY_OWN_PREFIX: &str = "/admin/";
/// OpenAPI's operation keys.
const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Follow a local `$ref` (`#/components/...`) until a value without one.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("not a local $ref: {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref to nothing: {r}"));
    }
    panic!("$ref chain too long");
}

fn segments(p: &str) -> Vec<&str> {
    p.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect()
}

fn is_param(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

/// Whether `route` takes requests for the documented path template `doc_path`, and
/// how specific the match is (higher wins, as in the gateway: a whole path over a
/// prefix, more segments over fewer, literals over parameters).
fn matches(route: &RouteConfig, doc_path: &str) -> Option<(u8, usize, usize)> {
    let doc = segments(doc_path);
    if let Some(path) = &route.path {
        let want = segments(path);
        if want.len() != doc.len() {
            return None;
        }
        let mut literals = 0;
        for (w, d) in want.iter().zip(&doc) {
            if is_param(w) {
                continue;
            }
            if w != d {
                return None;
            }
            literals += 1;
        }
        return Some((1, want.len(), literals));
    }
    let prefix = segments(route.prefix.as_deref()?);
    let under = prefix.len() <= doc.len() && prefix.iter().zip(&doc).all(|(p, d)| p == d);
    under.then_some((0, prefix.len(), prefix.len()))
}

fn serves_method(route: &RouteConfig, method: &str) -> bool {
    route.methods.is_empty() || route.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
}

/// The route that answers `method doc_path`, if any.
fn route_for<'a>(
    routes: &'a [RouteConfig],
    doc_path: &str,
    method: &str,
) -> Option<&'a RouteConfig> {
    routes
        .iter()
        .filter(|r| serves_method(r, method))
        .filter_map(|r| matches(r, doc_path).map(|rank| (rank, r)))
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, r)| r)
}

fn route_name(r: &RouteConfig) -> String {
    r.name
        .clone()
        .or_else(|| r.path.clone())
        .or_else(|| r.prefix.clone())
        .unwrap_or_default()
}

fn declares_bearer(op: &Value) -> bool {
    op.get("security")
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(|req| req.get("bearerAuth").is_some()))
}

#[test]
fn the_openapi_document_matches_the_route_table() {
    let mut system: SystemFile =
        shoal_core::config::load_str(&read("shoal.toml"), "shoal.toml", Vec::new()).unwrap();
    // The gateway's own start-time check: the document is JSON, OpenAPI 3, at most
    // 4 MiB, and the route table (its schema files included) compiles.
    system.gateway.base_dir = Some(repo());
    system.gateway.validate().unwrap();
    let gw = &system.gateway;
    assert_eq!(
        gw.openapi_file.as_deref(),
        Some(Path::new("shop/api/openapi.json")),
        "the gateway serves this document"
    );
    let routes = &gw.routes;
    assert!(!routes.is_empty(), "shoal.toml has no gateway routes");
    let doc: Value = serde_json::from_str(&read("shop/api/openapi.json")).unwrap();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3"
    );
    let scheme = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    let paths = doc["paths"].as_object().expect("paths");
    let ops_of = |p: &str| -> Vec<&str> {
        paths[p]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| METHODS.contains(k))
            .collect()
    };
    let mut problems = Vec::new();

    // Every route is documented with every method it serves.
    for route in routes {
        let name = route_name(route);
        assert!(
            !route.methods.is_empty(),
            "{name}: a route for any method cannot be documented method by method"
        );
        let documented: Vec<&String> = paths
            .keys()
            .filter(|p| matches(route, p).is_some())
            .collect();
        if let Some(path) = &route.path {
            if !paths.contains_key(path) {
                problems.push(format!("{name}: {path} is not documented"));
                continue;
            }
        }
        for method in &route.methods {
            let m = method.to_ascii_lowercase();
            // Under a prefix: every documented path this route answers has the method.
            let answered: Vec<&&String> = documented
                .iter()
                .filter(|p| route_for(routes, p, &m).is_some_and(|r| std::ptr::eq(r, route)))
                .collect();
            if answered.is_empty() {
                problems.push(format!("{name}: no documented path for {method}"));
            }
            for p in answered {
                if !ops_of(p).contains(&m.as_str()) {
                    problems.push(format!("{name}: {method} {p} is not documented"));
                }
            }
        }
    }

    // Every documented operation is served, and says what its route demands.
    for (path, item) in paths {
        let own = GATEWAY_OWN.contains(&path.as_str()) || path.starts_with(GATEWAY_OWN_PREFIX);
        for method in ops_of(path) {
            let op = &item[method];
            let what = format!("{} {path}", method.to_ascii_uppercase());
            let responses = op["responses"].as_object().expect("responses");
            for (status, r) in responses {
                let r = resolve(&doc, r);
                // 431 is written by the HTTP layer itself, before any middleware.
                let has_id = r
                    .get("headers")
                    .and_then(Value::as_object)
                    .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("x-request-id")));
                if status != "431" && !has_id {
                    problems.push(format!("{what} {status}: no x-request-id header"));
                }
            }
            let route = match (route_for(routes, path, method), own) {
                (None, true) => continue,
                (None, false) => {
                    problems.push(format!("{what}: no route of shoal.toml serves it"));
                    continue;
                }
                (Some(r), true) => {
                    problems.push(format!(
                        "{what}: the gateway's own, yet route {}",
                        route_name(r)
                    ));
                    continue;
                }
                (Some(r), false) => r,
            };
            if !responses.contains_key("429") {
                problems.push(format!("{what}: no 429"));
            }
            let required = route.auth == AuthMode::Required || !route.scopes.is_empty();
            if required {
                if !declares_bearer(op) {
                    problems.push(format!("{what}: auth required, no bearerAuth security"));
                }
                if !responses.contains_key("401") {
                    problems.push(format!("{what}: auth required, no 401"));
                }
            } else if route.auth == AuthMode::None && declares_bearer(op) {
                problems.push(format!(
                    "{what}: declares bearerAuth, the route takes no token"
                ));
            }
        }
    }

    // The order body is documented as the gateway checks it.
    let schema_file: Value =
        serde_json::from_str(&read("shop/api/place-order.schema.json")).unwrap();
    let place = routes
        .iter()
        .find(|r| r.path.as_deref() == Some("/api/orders") && serves_method(r, "POST"))
        .expect("a POST /api/orders route");
    assert_eq!(
        place.schema_file.as_deref(),
        Some(Path::new("shop/api/place-order.schema.json"))
    );
    let body = resolve(
        &doc,
        &doc["paths"]["/api/orders"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"],
    );
    for key in ["properties", "required"] {
        if body[key] != schema_file[key] {
            problems.push(format!(
                "POST /api/orders: the body's {key} differs from place-order.schema.json"
            ));
        }
    }

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
