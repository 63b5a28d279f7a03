//! Composed routes (API composition): one JSON answer built from several services'
//! answers, called at once, so a client makes one round trip instead of several.
//!
//! The answer is an object with each part's JSON under its name, in config order,
//! and `"degraded"`: the optional parts whose value is missing because they failed.
//! How each part's outcome shapes it:
//!
//! | The part answers | optional | required |
//! |---|---|---|
//! | 2xx JSON | its JSON | its JSON |
//! | 204 | `null` | `null` |
//! | 404 | `null`, not degraded (there is none) | the whole answer is 404 (the part's JSON error, else the gateway's `not_found`) |
//! | 401 / 403 | `null`, degraded | the whole answer is that status (the part's JSON error, else the gateway's) |
//! | another status, a non-JSON body | `null`, degraded | 502 `upstream_unavailable` |
//! | no answer within `timeout_ms` | `null`, degraded | 504 `upstream_timeout` |
//! | a call error | `null`, degraded | by its kind: 504 `upstream_timeout`, 503 `circuit_open` / `overloaded`, else 502 `upstream_unavailable` |
//!
//! An optional part refused with 401/403 is degraded rather than silently `null`: its
//! value is missing for a reason other than "there is none", and a client must not read
//! it as absence. A required part's other 4xx is a 502: the gateway built that request
//! from its config, so the refusal says the composition is broken, not the client.
//!
//! The answer goes out as soon as it is decided: at the first required part that
//! fails (the other calls are dropped, which cancels them), else when every part has
//! answered or timed out.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use serde::Deserialize;
use shoal_core::{ApiError, Error, ErrorKind};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Most parts one route may compose: each is a call per request.
pub(crate) const MAX_PARTS: usize = 16;
/// Longest a part's `timeout_ms` may be; the request's own timeout bounds it anyway.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Longest part name (it is a JSON key clients write in code).
const MAX_NAME_LEN: usize = 64;
/// The answer's own key, which no part may take.
const DEGRADED: &str = "degraded";

/// A route's `aggregate` table: the answer is composed instead of forwarded.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The calls whose answers make up the answer, 1 to 16.
    pub parts: Vec<PartConfig>,
}

/// One call of a composed route.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// The key of its answer in the composed object: an identifier (`order`,
    /// `shipment_status`), not `degraded`.
    pub name: String,
    /// The service called.
    pub service: String,
    /// The path called, a template: `{param}` is replaced by the route's path
    /// parameter, percent-encoded, so no value can change the path's shape
    /// (`/orders/{id}`). May end in a literal query (`/shipments?order={id}`).
    pub path: String,
    /// Longest the part may take; past it the part counts as failed.
    pub timeout_ms: u64,
    /// Whether the answer cannot go without it: a required part that fails fails
    /// the whole answer; an optional one is `null` and listed in `degraded`.
    #[serde(default)]
    pub required: bool,
}

/// One part's call: its status and whole (bounded) body.
pub(crate) type PartFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(StatusCode, Bytes), Error>> + Send + 'a>>;

impl AggregateConfig {
    /// Refuse a table that cannot work, naming the config key `at`; `params` are the
    /// path parameters the route's path has, the only ones templates may use.
    pub(crate) fn validate(&self, at: &str, params: &[&str]) -> Result<(), Error> {
        let bad = |what: String, why: String| Err(Error::config(format!("{at}.{what}: {why}")));
        if self.parts.is_empty() || self.parts.len() > MAX_PARTS {
            return bad("parts".into(), format!("list 1 to {MAX_PARTS} parts"));
        }
        for (i, p) in self.parts.iter().enumerate() {
            let here = |key: &str| format!("parts[{i}].{key}");
            if !is_identifier(&p.name) || p.name.len() > MAX_NAME_LEN {
                return bad(
                    here("name"),
                    format!(
                        "{:?} must be 1 to {MAX_NAME_LEN} of letters, digits and '_', \
                         not starting with a digit",
                        p.name
                    ),
                );
            }
            if p.name == DEGRADED {
                return bad(
                    here("name"),
                    "\"degraded\" is the answer's list of failed parts".into(),
                );
            }
            if self.parts[..i].iter().any(|q| q.name == p.name) {
                return bad(here("name"), format!("{:?} is used twice", p.name));
            }
            shoal_core::names::validate_service_name(&p.service)
                .map_err(|e| Error::config(format!("{at}.{}: {e}", here("service"))))?;
            let pieces = parse_template(&p.path)
                .map_err(|e| Error::config(format!("{at}.{}: {e}", here("path"))))?;
            for piece in &pieces {
                if let Piece::Param(name) = piece {
                    if !params.contains(name) {
                        return bad(
                            here("path"),
                            format!("{{{name}}} is not a parameter of the route's path"),
                        );
                    }
                }
            }
            if p.timeout_ms == 0 || p.timeout_ms > MAX_TIMEOUT_MS {
                return bad(here("timeout_ms"), format!("must be 1 to {MAX_TIMEOUT_MS}"));
            }
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Debug, PartialEq, Eq)]
enum Piece<'t> {
    Literal(&'t str),
    Param(&'t str),
}

/// A path template's pieces, or why it is not one: it starts with `/`; literals are
/// visible ASCII without `%` (nothing to decode), `#`, `\` or braces, and the path
/// has no empty or dot segments; `{name}` is an identifier.
fn parse_template(t: &str) -> Result<Vec<Piece<'_>>, String> {
    if !t.starts_with('/') {
        return Err(format!("{t:?} must start with '/'"));
    }
    let mut pieces = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            Some(0) if rest.starts_with('{') => {
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("{t:?} has an unclosed '{{'"))?;
                let name = &rest[1..end];
                if !is_identifier(name) {
                    return Err(format!("{t:?}: {{{name}}} is not a parameter name"));
                }
                pieces.push(Piece::Param(name));
                rest = &rest[end + 1..];
            }
            Some(0) => return Err(format!("{t:?} has a '}}' without '{{'")),
            Some(i) => {
                pieces.push(Piece::Literal(&rest[..i]));
                rest = &rest[i..];
            }
            None => {
                pieces.push(Piece::Literal(rest));
                rest = "";
            }
        }
    }
    for piece in &pieces {
        if let Piece::Literal(l) = piece {
            if let Some(c) = l
                .chars()
                .find(|c| !c.is_ascii_graphic() || matches!(c, '%' | '#' | '\\'))
            {
                return Err(format!("{t:?} has {c:?}; write the path plainly"));
            }
        }
    }
    // With every parameter standing for one non-empty, non-dot value, the shape
    // checked here is the shape every request gets.
    let shape: String = pieces
        .iter()
        .map(|p| match p {
            Piece::Literal(l) => *l,
            Piece::Param(_) => "p",
        })
        .collect();
    if ambiguous(path_of(&shape)) {
        return Err(format!("{t:?} has empty or dot segments"));
    }
    Ok(pieces)
}

/// The path part of a path with an optional query.
fn path_of(s: &str) -> &str {
    s.split_once('?').map_or(s, |(p, _)| p)
}

/// Empty or dot segments: a path another parser may read as a different one.
fn ambiguous(path: &str) -> bool {
    path.contains("//") || path.split('/').any(|s| s == "." || s == "..")
}

/// The path a part calls for this request: 400 when a parameter is empty or would
/// make a dot segment, 500 when the config was not validated against the route.
fn fill(template: &str, params: &HashMap<String, String>) -> Result<String, ApiError> {
    let pieces = parse_template(template).map_err(|e| {
        tracing::error!(template, error = %e, "composed route's template was not validated");
        ApiError::internal("the route's configuration is broken")
    })?;
    let mut out = String::with_capacity(template.len() + 16);
    for piece in pieces {
        match piece {
            Piece::Literal(l) => out.push_str(l),
            Piece::Param(name) => match params.get(name) {
                Some(v) if !v.is_empty() => crate::table::percent_encode(v, &mut out),
                Some(_) => {
                    return Err(ApiError::bad_request(format!(
                        "the path parameter {name} is empty"
                    )))
                }
                None => {
                    tracing::error!(template, param = name, "composed route lacks a parameter");
                    return Err(ApiError::internal("the route's configuration is broken"));
                }
            },
        }
    }
    if ambiguous(path_of(&out)) {
        return Err(ApiError::bad_request(
            "a path parameter is \".\" or \"..\", which cannot name a resource",
        ));
    }
    Ok(out)
}

/// How one part ended.
enum Outcome {
    /// Its JSON, checked to be JSON and UTF-8.
    Value(Bytes),
    /// `null`, not degraded: the part says there is none (204, optional 404).
    Null,
    /// The part failed: what a required part's failure answers.
    Failed(ApiError),
}

type Answer = Result<Result<(StatusCode, Bytes), Error>, tokio::time::error::Elapsed>;

fn outcome(part: &PartConfig, answer: Answer) -> Outcome {
    let (name, service) = (part.name.as_str(), part.service.as_str());
    let (status, body) = match answer {
        Err(_) => {
            return Outcome::Failed(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "{name} ({service}) did not answer within {} ms",
                    part.timeout_ms
                ),
            ))
        }
        Ok(Err(e)) => return Outcome::Failed(call_error(part, &e)),
        Ok(Ok(answer)) => answer,
    };
    if status == StatusCode::NO_CONTENT {
        return Outcome::Null;
    }
    if status.is_success() {
        // JSON is UTF-8 (RFC 8259 §8.1); checked apart because skipping a value
        // does not look inside its strings. IgnoredAny checks the syntax without
        // building the value: the bytes are spliced into the answer as they came.
        let json = std::str::from_utf8(&body).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
        return if json {
            Outcome::Value(body)
        } else {
            Outcome::Failed(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("{name} ({service}) answered {status} without a JSON body"),
            ))
        };
    }
    match status {
        StatusCode::NOT_FOUND if !part.required => Outcome::Null,
        StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Outcome::Failed(ApiError::from_json(status, &body).unwrap_or_else(|| {
                let message = match status {
                    StatusCode::NOT_FOUND => format!("{name} not found"),
                    _ => format!("{name}: access refused"),
                };
                ApiError::new(status, ApiError::code_for(status), message)
            }))
        }
        _ => Outcome::Failed(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("{name} ({service}) answered {status}"),
        )),
    }
}

/// A required part's failed call as the gateway's answer, by the error's kind (the
/// proxy's mapping, less `no_healthy_upstream`, which needs the balancer).
fn call_error(part: &PartConfig, e: &Error) -> ApiError {
    let (name, service) = (part.name.as_str(), part.service.as_str());
    let (status, code, message) = match e.kind() {
        ErrorKind::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("{name} ({service}) did not answer in time"),
        ),
        ErrorKind::CircuitOpen => (
            StatusCode::SERVICE_UNAVAILABLE,
            "circuit_open",
            format!("{service} is failing; calls are paused"),
        ),
        ErrorKind::Overloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("too many calls to {service} in flight"),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("{name} ({service}) could not be reached"),
        ),
    };
    ApiError::new(status, code, message)
}

/// Call every part of `cfg` at once (each through `call` with its filled path, under
/// its own timeout) and compose the answer; see the module's table.
///
/// `params` are the route's path parameters; `call` makes one part's request (the
/// caller's identity, the resilience policy, the body limit) and returns its status
/// and whole body. Part bodies are spliced into the answer as they came.
pub(crate) async fn compose<'a, F>(
    cfg: &'a AggregateConfig,
    params: &'a HashMap<String, String>,
    call: F,
) -> Response
where
    F: Fn(&'a PartConfig, String) -> PartFuture<'a>,
{
    // Every path first: a bad parameter refuses the request before any call.
    let mut paths = Vec::with_capacity(cfg.parts.len());
    for part in &cfg.parts {
        match fill(&part.path, params) {
            Ok(p) => paths.push(p),
            Err(e) => return e.into_response(),
        }
    }
    let mut pending: FuturesUnordered<_> = cfg
        .parts
        .iter()
        .zip(paths)
        .enumerate()
        .map(|(i, (part, path))| {
            let call = call(part, path);
            let limit = Duration::from_millis(part.timeout_ms);
            async move { (i, tokio::time::timeout(limit, call).await) }
        })
        .collect();
    let mut values: Vec<Option<Bytes>> = vec![None; cfg.parts.len()];
    let mut failed = vec![false; cfg.parts.len()];
    while let Some((i, answer)) = pending.next().await {
        let part = &cfg.parts[i];
        match outcome(part, answer) {
            Outcome::Value(body) => values[i] = Some(body),
            Outcome::Null => {}
            Outcome::Failed(e) if part.required => {
                tracing::warn!(part = %part.name, service = %part.service, error = %e, "required part failed");
                return e.into_response();
            }
            Outcome::Failed(e) => {
                tracing::warn!(part = %part.name, service = %part.service, error = %e, "optional part failed; answer degraded");
                failed[i] = true;
            }
        }
    }
    let degraded: Vec<&str> = cfg
        .parts
        .iter()
        .zip(&failed)
        .filter(|(_, f)| **f)
        .map(|(p, _)| p.name.as_str())
        .collect();
    let mut out = Vec::with_capacity(64 + values.iter().flatten().map(Bytes::len).sum::<usize>());
    out.push(b'{');
    for (part, value) in cfg.parts.iter().zip(&values) {
        // Names are identifiers: nothing in them needs escaping.
        out.push(b'"');
        out.extend_from_slice(part.name.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            Some(v) => out.extend_from_slice(v),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b',');
    }
    out.extend_from_slice(b"\"degraded\":");
    out.extend_from_slice(serde_json::Value::from(degraded).to_string().as_bytes());
    out.push(b'}');
    let mut res = Response::new(Body::from(out));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};
    use tokio::time::{sleep, Instant};

    /// What a fake part does: wait, then answer.
    #[derive(Clone)]
    enum Fake {
        Ok(u64, u16, &'static str),
        Fail(u64, ErrorKind),
    }

    fn part(name: &str, path: &str, timeout_ms: u64, required: bool) -> PartConfig {
        PartConfig {
            name: name.into(),
            service: "svc".into(),
            path: path.into(),
            timeout_ms,
            required,
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Compose `parts` with each answering as `fakes` says (by name); returns the
    /// status, the JSON body and the paths called.
    async fn run(
        parts: Vec<PartConfig>,
        fakes: &[(&str, Fake)],
        params: HashMap<String, String>,
    ) -> (StatusCode, Value, Vec<String>) {
        let cfg = AggregateConfig { parts };
        let fakes: HashMap<String, Fake> = fakes
            .iter()
            .map(|(n, f)| (n.to_string(), f.clone()))
            .collect();
        let called = Arc::new(Mutex::new(Vec::new()));
        let res = compose(&cfg, &params, |p, path| {
            called.lock().unwrap().push(path);
            let fake = fakes[&p.name].clone();
            Box::pin(async move {
                match fake {
                    Fake::Ok(ms, status, body) => {
                        sleep(Duration::from_millis(ms)).await;
                        Ok((StatusCode::from_u16(status).unwrap(), Bytes::from(body)))
                    }
                    Fake::Fail(ms, kind) => {
                        sleep(Duration::from_millis(ms)).await;
                        Err(Error::new(kind, shoal_core::Origin::Upstream, "fake"))
                    }
                }
            })
        })
        .await;
        let status = res.status();
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let json = serde_json::from_slice(&body).unwrap();
        let called = called.lock().unwrap().clone();
        (status, json, called)
    }

    fn details() -> Vec<PartConfig> {
        vec![
            part("order", "/orders/{id}", 2000, true),
            part("customer", "/customers/me", 1000, false),
            part("shipment", "/shipments/by-order/{id}", 1000, false),
        ]
    }

    fn id() -> HashMap<String, String> {
        params(&[("id", "o-1")])
    }

    #[tokio::test(start_paused = true)]
    async fn all_parts_answer() {
        let (status, body, called) = run(
            details(),
            &[
                ("order", Fake::Ok(10, 200, r#"{"id":"o-1","total":5}"#)),
                ("customer", Fake::Ok(10, 200, r#"{"name":"Ann"}"#)),
                ("shipment", Fake::Ok(10, 200, "[1, 2]")),
            ],
            id(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({
                "order": {"id": "o-1", "total": 5},
                "customer": {"name": "Ann"},
                "shipment": [1, 2],
                "degraded": [],
            })
        );
        assert_eq!(
            called,
            ["/orders/o-1", "/customers/me", "/shipments/by-order/o-1"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_optional_part_that_times_out_is_degraded() {
        let start = Instant::now();
        let (status, body, _) = run(
            details(),
            &[
                ("order", Fake::Ok(10, 200, "{}")),
                ("customer", Fake::Ok(5_000, 200, "{}")),
                ("shipment", Fake::Ok(10, 200, "{}")),
            ],
            id(),
        )
        .await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(1000),
            "the part's timeout"
        );
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"order": {}, "customer": null, "shipment": {}, "degraded": ["customer"]})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn optional_failures_are_degraded_in_config_order() {
        let (status, body, _) = run(
            details(),
            &[
                ("order", Fake::Ok(10, 200, "{}")),
                // Finishes last but is listed first: config order, not arrival order.
                ("customer", Fake::Ok(50, 403, "")),
                ("shipment", Fake::Fail(10, ErrorKind::Unavailable)),
            ],
            id(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["degraded"], json!(["customer", "shipment"]));
        for (fake, what) in [
            (Fake::Ok(1, 500, r#"{"error":{}}"#), "a 5xx"),
            (Fake::Ok(1, 200, "<html>"), "not JSON"),
            (Fake::Ok(1, 200, ""), "empty"),
            (Fake::Ok(1, 200, "{} {}"), "trailing data"),
            (Fake::Ok(1, 409, "{}"), "another 4xx"),
            (Fake::Fail(1, ErrorKind::CircuitOpen), "an open breaker"),
        ] {
            let (status, body, _) = run(
                details(),
                &[
                    ("order", Fake::Ok(1, 200, "{}")),
                    ("customer", fake),
                    ("shipment", Fake::Ok(1, 200, "{}")),
                ],
                id(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{what}");
            assert_eq!(body["degraded"], json!(["customer"]), "{what}");
            assert_eq!(body["customer"], Value::Null, "{what}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_optional_404_is_null_without_degrading() {
        let (status, body, _) = run(
            details(),
            &[
                ("order", Fake::Ok(10, 200, "{}")),
                ("customer", Fake::Ok(10, 200, "{}")),
                (
                    "shipment",
                    Fake::Ok(10, 404, r#"{"error":{"code":"not_found","message":"x"}}"#),
                ),
            ],
            id(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({"order": {}, "customer": {}, "shipment": null, "degraded": []})
        );
        let (_, body, _) = run(
            details(),
            &[
                ("order", Fake::Ok(10, 200, "{}")),
                ("customer", Fake::Ok(10, 204, "")),
                ("shipment", Fake::Ok(10, 200, "{}")),
            ],
            id(),
        )
        .await;
        assert_eq!(
            (&body["customer"], &body["degraded"]),
            (&Value::Null, &json!([]))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_required_404_is_the_answer() {
        let others = [
            ("customer", Fake::Ok(10, 200, "{}")),
            ("shipment", Fake::Ok(10, 200, "{}")),
        ];
        let part_error = r#"{"error":{"code":"not_found","message":"no order o-1"}}"#;
        let fakes = [&[("order", Fake::Ok(10, 404, part_error))], &others[..]].concat();
        let (status, body, _) = run(details(), &fakes, id()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            json!({"error": {"code": "not_found", "message": "no order o-1"}})
        );
        // Without a JSON error of its own, the gateway's.
        let fakes = [&[("order", Fake::Ok(10, 404, "gone"))], &others[..]].concat();
        let (status, body, _) = run(details(), &fakes, id()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        // 401 and 403 pass through the same way.
        let fakes = [&[("order", Fake::Ok(10, 403, ""))], &others[..]].concat();
        let (status, body, _) = run(details(), &fakes, id()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["code"], "forbidden");
    }

    #[tokio::test(start_paused = true)]
    async fn a_required_part_that_fails_fails_the_answer_at_once() {
        let start = Instant::now();
        let (status, body, _) = run(
            details(),
            &[
                ("order", Fake::Ok(5_000, 200, "{}")),
                ("customer", Fake::Ok(10, 200, "{}")),
                ("shipment", Fake::Ok(10, 200, "{}")),
            ],
            id(),
        )
        .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["error"]["code"], "upstream_timeout");
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(2000),
            "the part's timeout"
        );

        for (fake, want, code) in [
            (Fake::Ok(100, 500, "{}"), 502, "upstream_unavailable"),
            (Fake::Ok(100, 200, "nope"), 502, "upstream_unavailable"),
            (Fake::Ok(100, 400, "{}"), 502, "upstream_unavailable"),
            (
                Fake::Fail(100, ErrorKind::Unavailable),
                502,
                "upstream_unavailable",
            ),
            (Fake::Fail(100, ErrorKind::Timeout), 504, "upstream_timeout"),
            (Fake::Fail(100, ErrorKind::CircuitOpen), 503, "circuit_open"),
        ] {
            let start = Instant::now();
            let (status, body, _) = run(
                details(),
                &[
                    ("order", fake),
                    // Still running when the answer is decided.
                    ("customer", Fake::Ok(900, 200, "{}")),
                    ("shipment", Fake::Ok(10, 200, "{}")),
                ],
                id(),
            )
            .await;
            assert_eq!(status.as_u16(), want, "{code}");
            assert_eq!(body["error"]["code"], code);
            assert_eq!(start.elapsed(), Duration::from_millis(100), "{code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn parts_run_in_parallel() {
        let start = Instant::now();
        let (status, _, _) = run(
            details(),
            &[
                ("order", Fake::Ok(1_000, 200, "{}")),
                ("customer", Fake::Ok(1_000, 200, "{}")),
                ("shipment", Fake::Ok(1_000, 200, "{}")),
            ],
            id(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        // Paused time advances only as timers fire: exactly one second, not three.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn parameters_cannot_change_a_parts_path() {
        let parts = vec![part("order", "/orders/{id}/lines?sku={sku}", 100, true)];
        let fakes = [("order", Fake::Ok(1, 200, "{}"))];
        let (status, _, called) = run(
            parts.clone(),
            &fakes,
            params(&[("id", "../admin/x?y=1#z%2F"), ("sku", "a&b=c d.é")]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            called,
            ["/orders/..%2Fadmin%2Fx%3Fy%3D1%23z%252F/lines?sku=a%26b%3Dc%20d.%C3%A9"]
        );
        // A whole segment of dots, or nothing, is refused before any call.
        for id in ["..", ".", ""] {
            let (status, body, called) =
                run(parts.clone(), &fakes, params(&[("id", id), ("sku", "s")])).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{id:?}");
            assert_eq!(body["error"]["code"], "bad_request");
            assert!(called.is_empty());
        }
    }

    #[test]
    fn config_is_checked() {
        let ok = AggregateConfig { parts: details() };
        assert!(ok.validate("r.aggregate", &["id"]).is_ok());
        let toml_ok: AggregateConfig = toml::from_str(
            r#"parts = [{ name = "order", service = "orders", path = "/orders/{id}", timeout_ms = 5, required = true }]"#,
        )
        .unwrap();
        assert!(toml_ok.parts[0].required);
        assert!(toml::from_str::<AggregateConfig>(
            r#"parts = [{ name = "o", service = "o", path = "/", timeout_ms = 5, retries = 1 }]"#
        )
        .is_err());

        let with = |f: &dyn Fn(&mut PartConfig)| {
            let mut parts = details();
            f(&mut parts[1]);
            AggregateConfig { parts }
        };
        let cases: Vec<(AggregateConfig, &str)> = vec![
            (AggregateConfig { parts: vec![] }, "parts"),
            (
                AggregateConfig {
                    parts: (0..17)
                        .map(|i| part(&format!("p{i}"), "/x", 5, false))
                        .collect(),
                },
                "parts",
            ),
            (with(&|p| p.name = "order".into()), "parts[1].name"),
            (with(&|p| p.name = "degraded".into()), "parts[1].name"),
            (with(&|p| p.name = "1st".into()), "parts[1].name"),
            (with(&|p| p.name = "a-b".into()), "parts[1].name"),
            (with(&|p| p.name = "a\"b".into()), "parts[1].name"),
            (with(&|p| p.name = String::new()), "parts[1].name"),
            (with(&|p| p.service = "Orders".into()), "parts[1].service"),
            (with(&|p| p.path = "/x/{other}".into()), "parts[1].path"),
            (with(&|p| p.path = "x/{id}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/{id".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/id}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/{}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/../{id}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x//{id}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/%2F{id}".into()), "parts[1].path"),
            (with(&|p| p.path = "/x/{id}#f".into()), "parts[1].path"),
            (with(&|p| p.path = "/x /{id}".into()), "parts[1].path"),
            (with(&|p| p.timeout_ms = 0), "parts[1].timeout_ms"),
            (with(&|p| p.timeout_ms = 60_001), "parts[1].timeout_ms"),
        ];
        for (cfg, key) in cases {
            let e = cfg
                .validate("r.aggregate", &["id"])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("r.aggregate.{key}:")), "{key}: {e}");
        }
        // Parameters next to literals and in a query are fine.
        let fine = with(&|p| p.path = "/x/v{id}.json?o={id}".into());
        assert!(fine.validate("r.aggregate", &["id"]).is_ok());
    }
}
