//! What happens to a request the gateway does not answer itself, in order:
//! source address (trusted proxies, allow and deny lists), path normalisation,
//! route lookup, CORS preflight, token, rate limit, scopes, cache, body limit and
//! schema, then forwarding (or composing) and the answer back.

use crate::cache::{self, CachedResponse};
use crate::gateway::Gateway;
use crate::guard;
use crate::table::{normalize_path, BadPath, Lookup, Matched, Route};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use shoal_auth::{Claims, TokenError};
use shoal_core::headers::{X_SHOAL_SCOPES, X_SHOAL_SUBJECT};
use shoal_core::{ApiError, Error, ErrorKind};
use shoal_discovery::UpstreamVersion;
use shoal_telemetry::http::RouteLabel;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and are never
/// forwarded.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers only the gateway may set: a client's own are removed.
const GATEWAY_ONLY: &[&str] = &[X_SHOAL_SUBJECT, X_SHOAL_SCOPES, "forwarded", "x-real-ip"];

/// Largest answer of one aggregate part.
const MAX_PART_BYTES: usize = 1024 * 1024;

/// The fallback handler: every path the gateway's own router does not take.
pub(crate) async fn dispatch(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let start = Instant::now();
    // What the access line needs, taken only when there is one.
    let access = gw
        .inner
        .cfg
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let mut route_name: Option<Arc<str>> = None;
    let client = guard::client_ip(peer.ip(), req.headers(), &gw.inner.trusted);
    // On the heap once: the handler's future is large, and the layers around it
    // move it several times per request.
    let mut res = Box::pin(handle(&gw, peer, client, req, &mut route_name)).await;
    if let Some(name) = &route_name {
        res.extensions_mut().insert(RouteLabel(name.clone()));
    }
    let Some((method, raw_path)) = access else {
        return res;
    };
    tracing::info!(
        target: "shoal::access",
        %client,
        method = %method,
        path = %raw_path,
        route = route_name.as_deref().unwrap_or("-"),
        status = res.status().as_u16(),
        duration_us = start.elapsed().as_micros() as u64,
        "access"
    );
    res
}

async fn handle(
    gw: &Gateway,
    peer: SocketAddr,
    client: IpAddr,
    req: Request,
    route_name: &mut Option<Arc<str>>,
) -> Response {
    let inner = &gw.inner;
    if !inner.ip.permits(client) {
        return guard::forbidden();
    }
    let path = match normalize_path(req.uri().path()) {
        Ok(p) => p,
        Err(BadPath::TooLong) => {
            return ApiError::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "the path is too long",
            )
            .into_response()
        }
        Err(BadPath::Invalid(why)) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "bad_path", why).into_response()
        }
    };
    // Operators' paths spelled another way never reach a route.
    if crate::config::RESERVED_PREFIXES.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }) {
        return ApiError::not_found("no route for this path").into_response();
    }
    let host = request_host(&req);
    let table = gw.table();
    let Matched { route, params } = match table.lookup(req.method(), host.as_deref(), &path) {
        Lookup::Found(m) => m,
        Lookup::MethodNotAllowed(allow) => {
            let mut res = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not served on this path", req.method()),
            )
            .into_response();
            let list: Vec<&str> = allow.iter().map(http::Method::as_str).collect();
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                res.headers_mut().insert(http::header::ALLOW, v);
            }
            return res;
        }
        Lookup::NotFound => return ApiError::not_found("no route for this path").into_response(),
    };
    *route_name = Some(route.label.clone());
    if !route.cfg.ip.permits(client) {
        return guard::forbidden();
    }
    let (parts, body) = req.into_parts();
    if let Some(cors) = &route.cors {
        if let Some(res) = cors.preflight(&parts) {
            return res;
        }
    }
    let origin_headers = route.cors.as_ref().map(|_| parts.headers.clone());
    let mut res = route_request(gw, &route, &params, peer, client, parts, body, &path).await;
    if let (Some(cors), Some(h)) = (&route.cors, origin_headers) {
        cors.apply(&h, res.headers_mut());
    }
    res
}

/// Token, limits, cache, body, then the upstream.
#[allow(clippy::too_many_arguments)]
async fn route_request(
    gw: &Gateway,
    route: &Route,
    params: &std::collections::HashMap<String, String>,
    peer: SocketAddr,
    client: IpAddr,
    parts: http::request::Parts,
    body: Body,
    path: &str,
) -> Response {
    let inner = &gw.inner;
    let cfg = &route.cfg;
    // A token is checked when the route asks for one, or may take one and got one.
    let auth_header = parts.headers.get(http::header::AUTHORIZATION);
    let claims: Option<Claims> = match (&inner.verifier, cfg.auth, auth_header) {
        (Some(v), crate::config::AuthMode::Required, _)
        | (Some(v), crate::config::AuthMode::Optional, Some(_)) => {
            match v.verify_bearer(auth_header).await {
                Ok(c) => Some(c),
                Err(e) => return token_refused(&e),
            }
        }
        (Some(v), crate::config::AuthMode::None, _) if !cfg.scopes.is_empty() => {
            match v.verify_bearer(auth_header).await {
                Ok(c) => Some(c),
                Err(e) => return token_refused(&e),
            }
        }
        _ => None,
    };
    // One bucket per client: its subject when signed in, else its address.
    let key = match &claims {
        Some(c) => guard::ClientKey::Subject(&c.sub),
        None => guard::ClientKey::Address(client),
    };
    let limiter = match (&route.limiter, &claims) {
        (Some(l), _) => l,
        (None, Some(_)) => &inner.authenticated,
        (None, None) => &inner.anonymous,
    };
    let limited = limiter.check(&key);
    if let Err(retry_after) = limited {
        return guard::too_many(retry_after);
    }
    if let Some(c) = &claims {
        if let Some(missing) = cfg.scopes.iter().find(|s| !c.has_scope(s)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("the token lacks the scope {missing:?} this route needs"),
            )
            .into_response();
        }
    }

    // The cache: only for GET and HEAD, and only what no one signed in asked.
    let cache_key = match &cfg.cache {
        Some(c)
            if (parts.method == http::Method::GET || parts.method == http::Method::HEAD)
                && !cache::request_bypasses(&parts.headers) =>
        {
            let key = cache::key(&parts, &route.name, &c.vary);
            if let Some(hit) = inner.cache.get(&key, std::time::Instant::now()) {
                return hit.to_response(std::time::Instant::now());
            }
            Some((key, c.ttl()))
        }
        _ => None,
    };

    let limit = cfg.body_limit_bytes.unwrap_or(inner.body_limit);
    let body = match read_body(&parts.headers, body, limit).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    if let Some(schema) = &route.schema {
        if parts.method != http::Method::GET && parts.method != http::Method::HEAD {
            if !is_json(&parts.headers) {
                return ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "this route takes a JSON body (content-type: application/json)",
                )
                .into_response();
            }
            if let Err(res) = schema.validate(&body) {
                return res;
            }
        }
    }

    if let Some(agg) = &cfg.aggregate {
        return compose(gw, agg, params, &parts.headers, claims.as_ref()).await;
    }
    let Some(service) = cfg.service.as_deref() else {
        return ApiError::internal("route without upstream").into_response();
    };

    let upstream_path = route.upstream_path(path, params);
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path,
    };
    let mut out = match http::Request::builder()
        .method(parts.method.clone())
        .uri(&path_and_query)
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(_) => return ApiError::bad_request("invalid request target").into_response(),
    };
    let headers = out.headers_mut();
    // What the gateway sets itself is not copied: the upstream's host and length,
    // the identity and forwarding headers.
    copy_end_to_end(&parts.headers, headers, |name| {
        name == http::header::HOST
            || name == http::header::CONTENT_LENGTH
            || name.as_str() == "x-forwarded-for"
            || GATEWAY_ONLY.contains(&name.as_str())
    });
    if let Some(c) = &claims {
        set_identity(headers, c);
    }
    append_forwarded(headers, &parts.headers, peer, client, &inner.trusted);

    // A weighted route picks the version first, among those with a healthy instance.
    let discovery = inner.caller.balancer().discovery();
    let catalog = discovery.catalog();
    let has_version = |v: &str| {
        catalog
            .instances(service)
            .iter()
            .any(|i| i.healthy && i.version == v)
    };
    match route.pick_version(has_version) {
        Ok(Some(v)) => {
            out.extensions_mut()
                .insert(UpstreamVersion(Arc::from(v.as_str())));
        }
        Ok(None) => {}
        Err(()) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_upstream",
                format!("no healthy instance of {service} in a version with weight"),
            )
            .into_response()
        }
    }

    let sent = match &cfg.policy {
        Some(p) => {
            let scope = inner
                .caller
                .resilience()
                .route_scope(service, &route.name, p);
            inner.caller.send_in(scope, out).await
        }
        None => inner.caller.send(service, out).await,
    };
    match sent {
        Ok(res) => {
            let (mut rparts, rbody) = res.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            if let Some((key, ttl)) = cache_key {
                return store_in_cache(gw, key, ttl, rparts, Body::new(rbody)).await;
            }
            Response::from_parts(rparts, Body::new(rbody))
        }
        Err(e) => {
            let none_healthy = discovery.healthy(service).is_empty();
            upstream_error(service, &e, none_healthy).into_response()
        }
    }
}

/// Forward the answer, keeping a copy when it may be cached and is small enough
/// (its length known and within the entry limit); others stream through uncached.
async fn store_in_cache(
    gw: &Gateway,
    key: cache::CacheKey,
    ttl: Duration,
    mut parts: http::response::Parts,
    body: Body,
) -> Response {
    let Some(fresh) = cache::freshness(ttl, parts.status, &parts.headers) else {
        return Response::from_parts(parts, body);
    };
    let len = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if len.is_none_or(|n| n > gw.inner.cfg.cache.max_entry_bytes) {
        return Response::from_parts(parts, body);
    }
    let bytes = match cache::collect_bounded(body, gw.inner.cfg.cache.max_entry_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the answer broke off",
            )
            .into_response()
        }
    };
    let stored = gw.inner.cache.put(
        key,
        CachedResponse::new(
            parts.status,
            parts.headers.clone(),
            bytes.clone(),
            std::time::Instant::now(),
            fresh,
        ),
    );
    if stored {
        parts.headers.insert(cache::X_SHOAL_CACHE, cache::MISS);
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The composed answer of an aggregate route: its parts called in parallel with
/// the caller's identity.
async fn compose(
    gw: &Gateway,
    agg: &crate::aggregate::AggregateConfig,
    params: &std::collections::HashMap<String, String>,
    original: &HeaderMap,
    claims: Option<&Claims>,
) -> Response {
    let caller = gw.inner.caller.clone();
    let mut base = HeaderMap::new();
    for h in [http::header::AUTHORIZATION, http::header::ACCEPT_LANGUAGE] {
        if let Some(v) = original.get(&h) {
            base.insert(h, v.clone());
        }
    }
    if let Some(c) = claims {
        set_identity(&mut base, c);
    }
    crate::aggregate::compose(agg, params, move |part, path| {
        let caller = caller.clone();
        let headers = base.clone();
        Box::pin(async move {
            let mut req = http::Request::get(&path)
                .body(Full::new(Bytes::new()))
                .map_err(|e| Error::internal("bad part path").with_source(e))?;
            *req.headers_mut() = headers;
            let res = caller.send(&part.service, req).await?;
            let status = res.status();
            let body = http_body_util::Limited::new(res.into_body(), MAX_PART_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    Error::unavailable(format!("{}: answer unreadable: {e}", part.service))
                })?
                .to_bytes();
            Ok((status, body))
        })
    })
    .await
}

fn set_identity(headers: &mut HeaderMap, c: &Claims) {
    if let Ok(v) = HeaderValue::from_str(&c.sub) {
        headers.insert(HeaderName::from_static(X_SHOAL_SUBJECT), v);
    }
    if let Ok(v) = HeaderValue::from_str(&c.scopes.join(" ")) {
        headers.insert(HeaderName::from_static(X_SHOAL_SCOPES), v);
    }
}

/// 401 for a missing or bad token (503 when no keys can be had to check it).
pub(crate) fn token_refused(e: &TokenError) -> Response {
    if matches!(e, TokenError::KeysUnavailable) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "keys_unavailable",
            "tokens cannot be checked right now",
        )
        .into_response();
    }
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.message()).into_response();
    let challenge = if matches!(e, TokenError::Missing) {
        "Bearer".to_string()
    } else {
        format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            e.code()
        )
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        res.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    res
}

/// The body, whole and within `limit` (413 beyond; told by `Content-Length`
/// before a byte is read, when the client sends one).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Response> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over {limit} bytes"),
        )
        .into_response()
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(_) => Err(ApiError::bad_request("the request body could not be read").into_response()),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// The host a request is for: HTTP/2's `:authority` or the `Host` header, lower
/// case, without port.
fn request_host(req: &Request) -> Option<String> {
    let raw = req.uri().host().map(str::to_string).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })?;
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]"))?
    } else {
        raw.split(':').next()?.to_string()
    };
    Some(host.to_ascii_lowercase())
}

/// The gateway's answer for a failed upstream call, by the error's kind.
fn upstream_error(service: &str, e: &Error, none_healthy: bool) -> ApiError {
    tracing::warn!(service, error = %e, "upstream call failed");
    let (status, code, message) = match e.kind() {
        ErrorKind::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("{service} did not answer in time"),
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
        ErrorKind::Unavailable if none_healthy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            format!("no healthy instance of {service}"),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("{service} could not be reached"),
        ),
    };
    ApiError::new(status, code, message)
}

/// Copy `from`'s end-to-end headers into `to`, but those `skip` names: one pass,
/// instead of a copy and a removal (a hash and a search) per header taken out.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap, skip: impl Fn(&HeaderName) -> bool) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    to.reserve(from.len());
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|c| c == n) || skip(name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most answers have none: look before removing, which hashes each name.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        return;
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// An address as a header value, IPv4 written by hand: the standard formatter
/// pads and aligns through a buffer of its own, a few hundred instructions a
/// request for the forwarding headers alone.
fn ip_header(ip: IpAddr) -> Option<HeaderValue> {
    match ip {
        IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + (octet / 10) % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            HeaderValue::from_bytes(&buf[..len]).ok()
        }
        IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()).ok(),
    }
}

/// `X-Forwarded-For`: a trusted proxy's chain is kept and the peer appended; from
/// anyone else the client's own header is dropped and the peer is the chain.
fn append_forwarded(
    headers: &mut HeaderMap,
    original: &HeaderMap,
    peer: SocketAddr,
    client: IpAddr,
    trusted: &[guard::IpNet],
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let peer_ip = ip_header(peer.ip());
    let peer_trusted = trusted.iter().any(|n| n.contains(&peer.ip()));
    let prior: Vec<&str> = if peer_trusted {
        original
            .get_all(&xff)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    // The client's own header was not copied; the chain is the peer alone unless
    // a trusted proxy sent one.
    let chain = if prior.is_empty() {
        peer_ip.clone()
    } else {
        HeaderValue::from_str(&format!("{}, {}", prior.join(", "), peer.ip())).ok()
    };
    if let Some(v) = chain {
        headers.insert(xff, v);
    }
    let real_ip = if client == peer.ip() {
        peer_ip
    } else {
        ip_header(client)
    };
    if let Some(v) = real_ip {
        headers.insert(HeaderName::from_static("x-real-ip"), v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(host) = original.get(http::header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        from.insert("connection", HeaderValue::from_static("close, x-secret"));
        from.insert("x-secret", HeaderValue::from_static("1"));
        from.insert("x-kept", HeaderValue::from_static("2"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        from.insert("host", HeaderValue::from_static("h"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to, |n| n == http::header::HOST);
        assert!(to.get("host").is_none(), "skipped");
        assert!(to.get("x-secret").is_none());
        assert!(to.get("transfer-encoding").is_none());
        assert_eq!(to.get("x-kept").unwrap(), "2");
    }

    #[test]
    fn addresses_are_written_as_the_standard_formatter_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.0.9",
            "1.100.10.199",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(ip).unwrap(), ip.to_string().as_str(), "{ip}");
        }
    }

    #[test]
    fn json_content_types_are_recognised() {
        for (ct, json) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).unwrap(),
            );
            assert_eq!(is_json(&h), json, "{ct}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
