//! The response cache: answers to GET (and HEAD) requests of routes with `cache`, kept
//! in memory for their freshness lifetime and served without calling the service.
//!
//! It is a shared cache in RFC 9111's sense, made conservative where the RFC allows a
//! choice, because a wrong hit (one client's answer served to another, or a stale
//! one) is worse than a miss:
//! - [`request_bypasses`]: requests carrying credentials (`Authorization`, `Cookie`)
//!   or asking for a fresh answer are neither served from nor stored in the cache;
//! - [`freshness`]: only answers that say nothing against it are stored, for the
//!   route's TTL or their own `s-maxage` / `max-age`;
//! - [`ResponseCache`]: a bounded LRU (entries and bytes); an entry is never served
//!   past its lifetime (there is no revalidation and no stale serving).
//!
//! The caller stores only answers whose `Content-Length` is known and at most
//! [`CacheLimits::max_entry_bytes`]; larger answers, and answers of unknown length,
//! stream back uncached, so the cache never makes a client wait for a body it would
//! not keep. [`collect_bounded`] reads the ones it keeps.
//!
//! How the caller uses it, on a route with `cache`, for GET and HEAD:
//! 1. skip all of this when [`request_bypasses`];
//! 2. [`key`], then [`ResponseCache::get`]: a hit is [`CachedResponse::to_response`];
//! 3. on a miss forward; when [`freshness`] gives a lifetime and the length fits,
//!    collect the body, [`ResponseCache::put`] a [`CachedResponse`] and answer with
//!    [`X_SHOAL_CACHE`]: [`MISS`] (a HEAD miss is forwarded and not stored: its
//!    answer has no body to replay to a GET).
//!
//! Unsafe methods on a cached route may call [`ResponseCache::invalidate_prefix`] so
//! a client sees its own write at once rather than after the TTL.

use axum::body::{Body, HttpBody};
use axum::response::Response;
use bytes::Bytes;
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, COOKIE, EXPIRES, HOST, PRAGMA,
    SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use shoal_core::headers::{TRACEPARENT, X_REQUEST_ID};
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Says whether an answer came from the cache ([`HIT`]) or was stored by it ([`MISS`]).
pub(crate) const X_SHOAL_CACHE: HeaderName = HeaderName::from_static("x-shoal-cache");
/// [`X_SHOAL_CACHE`] of an answer served from the cache.
pub(crate) const HIT: HeaderValue = HeaderValue::from_static("hit");
/// [`X_SHOAL_CACHE`] of an answer fetched and stored; the caller adds it.
pub(crate) const MISS: HeaderValue = HeaderValue::from_static("miss");

/// Longest any answer is kept, whatever it or the route says: the cache holds
/// answers in memory, and a day is long past any reason to not ask again.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(86_400);
/// Most request headers a route's `vary` may name.
const MAX_ROUTE_VARY: usize = 8;
/// Most header names an answer's `Vary` may list and still be stored.
const MAX_RESPONSE_VARY: usize = 16;
/// Bytes counted for each entry on top of what it holds (map and order nodes, the
/// shared key, the header map's table), so many tiny answers cannot exceed
/// `max_bytes` in practice while staying under it on paper.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// Statuses stored (RFC 9110 §15.1's heuristically cacheable ones, less those the
/// gateway has no use for keeping: 206 needs range handling, 405/414/501/308 are rare).
const STORABLE: &[u16] = &[200, 203, 204, 300, 301, 404, 410];

/// Hop-by-hop headers describe one connection, never an answer: not kept.
use crate::proxy::HOP_BY_HOP;

/// Headers of one exchange rather than of the answer: replaying them would tie a
/// client's answer to another client's request (its id, its trace).
const PER_REQUEST: &[&str] = &[X_REQUEST_ID, TRACEPARENT, "tracestate"];

/// A route's `cache` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an answer stays fresh when it does not say itself (`s-maxage`, then
    /// `max-age`, win), in milliseconds; at most a day.
    pub ttl_ms: u64,
    /// Request headers that select among answers (`accept-language`), part of the
    /// key besides those the answer's own `Vary` names. Authorization and cookies
    /// cannot be listed: requests with them are never cached.
    #[serde(default)]
    pub vary: Vec<String>,
}

impl CacheConfig {
    /// Refuse a table that cannot work, naming the config key `at`.
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        let bad = |what: &str, why: String| Err(Error::config(format!("{at}.{what}: {why}")));
        if self.ttl_ms == 0 || u128::from(self.ttl_ms) > MAX_TTL.as_millis() {
            return bad(
                "ttl_ms",
                format!("must be 1 to {} (a day)", MAX_TTL.as_millis()),
            );
        }
        if self.vary.len() > MAX_ROUTE_VARY {
            return bad("vary", format!("at most {MAX_ROUTE_VARY} headers"));
        }
        let mut seen = Vec::with_capacity(self.vary.len());
        for v in &self.vary {
            let name = match HeaderName::from_bytes(v.as_bytes()) {
                Ok(n) => n,
                Err(_) => return bad("vary", format!("{v:?} is not a header name")),
            };
            if name == AUTHORIZATION || name == COOKIE {
                return bad(
                    "vary",
                    format!("{v:?}: requests carrying it are never cached, so it cannot vary"),
                );
            }
            if HOP_BY_HOP.contains(&name.as_str()) {
                return bad("vary", format!("{v:?} is a hop-by-hop header"));
            }
            if seen.contains(&name) {
                return bad("vary", format!("{v:?} is listed twice"));
            }
            seen.push(name);
        }
        Ok(())
    }

    /// The route's default freshness lifetime.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// The `[gateway.cache]` table: bounds of the one cache all routes share.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheLimits {
    /// Most answers kept; the least recently used goes first.
    pub max_entries: usize,
    /// Most bytes kept (bodies, headers, keys and a fixed overhead per entry).
    pub max_bytes: usize,
    /// Largest body kept; larger answers stream through uncached.
    pub max_entry_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
        }
    }
}

impl CacheLimits {
    /// Refuse bounds that cannot work, naming the config key `at`.
    pub(crate) fn validate(&self, at: &str) -> Result<(), Error> {
        if self.max_entries == 0 || self.max_bytes == 0 || self.max_entry_bytes == 0 {
            return Err(Error::config(format!(
                "{at}: max_entries, max_bytes and max_entry_bytes must be positive"
            )));
        }
        if self.max_entry_bytes > self.max_bytes {
            return Err(Error::config(format!(
                "{at}.max_entry_bytes: must not exceed max_bytes ({})",
                self.max_bytes
            )));
        }
        Ok(())
    }
}

/// What identifies a stored answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct KeyId {
    route: String,
    /// Lowercase, with the port as sent.
    host: String,
    path: String,
    /// As sent: `?a=1&b=2` and `?b=2&a=1` are different keys (a service may read
    /// order), and query strings are not normalised.
    query: Option<String>,
    /// The route's `vary` headers' values in config order (`None`: not sent, which is
    /// not the same as sent empty).
    vary: Vec<Option<Vec<u8>>>,
}

impl KeyId {
    fn bytes(&self) -> usize {
        self.route.len()
            + self.host.len()
            + self.path.len()
            + self.query.as_ref().map_or(0, String::len)
            + self.vary.iter().flatten().map(Vec::len).sum::<usize>()
    }
}

/// The cache key of one request, from [`key`].
#[derive(Clone, Debug)]
pub(crate) struct CacheKey {
    id: Arc<KeyId>,
    method: Kind,
    /// The request's headers, for the request headers a stored answer's `Vary`
    /// names (known only once an answer is stored).
    headers: HeaderMap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Get,
    /// Served from GET's entry; never stored (its answer has no body).
    Head,
    /// Neither served nor stored.
    Other,
}

/// The key of a request on route `route_name` whose `cache.vary` is `vary`. GET and
/// HEAD share an entry.
pub(crate) fn key(parts: &http::request::Parts, route_name: &str, vary: &[String]) -> CacheKey {
    let method = match parts.method {
        Method::GET => Kind::Get,
        Method::HEAD => Kind::Head,
        _ => Kind::Other,
    };
    // An absolute URI's authority wins over `Host` (RFC 9112 §3.2.2, and HTTP/2's
    // `:authority`, which hyper puts in the URI).
    let host = match parts.uri.authority() {
        Some(a) => a.as_str().to_ascii_lowercase(),
        None => parts
            .headers
            .get(HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).to_ascii_lowercase())
            .unwrap_or_default(),
    };
    let vary = vary
        .iter()
        .map(|name| match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => joined(&parts.headers, &name),
            // Validated at start; an invalid name can match no header.
            Err(_) => None,
        })
        .collect();
    CacheKey {
        id: Arc::new(KeyId {
            route: route_name.to_string(),
            host,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            vary,
        }),
        method,
        headers: parts.headers.clone(),
    }
}

/// All values of `name`, joined as one list (`None` when absent).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in headers.get_all(name) {
        let o = out.get_or_insert_with(Vec::new);
        if !o.is_empty() {
            o.extend_from_slice(b", ");
        }
        o.extend_from_slice(v.as_bytes());
    }
    out
}

/// Whether a request must neither be answered from nor stored in the cache: it
/// carries credentials (a shared cache must not hand one user's answer to another,
/// and telling which answers depend on them is the service's business, not ours),
/// or it asks for a fresh answer (`Cache-Control: no-cache` / `no-store`, `Pragma:
/// no-cache`).
pub(crate) fn request_bypasses(headers: &HeaderMap) -> bool {
    if headers.contains_key(AUTHORIZATION) || headers.contains_key(COOKIE) {
        return true;
    }
    let cache_control = match directives(headers, &CACHE_CONTROL) {
        Some(d) => d,
        // Unreadable: do not guess what it asked for.
        None => return true,
    };
    if cache_control
        .iter()
        .any(|(n, _)| n == "no-cache" || n == "no-store")
    {
        return true;
    }
    match directives(headers, &PRAGMA) {
        Some(p) => p.iter().any(|(n, _)| n == "no-cache"),
        None => true,
    }
}

/// How long an answer may be kept, or `None` when it must not be stored.
///
/// Not stored: statuses other than 200, 203, 204, 300, 301, 404 and 410; answers with
/// `Cache-Control` `no-store`, `no-cache` or `private` (qualified forms too: the
/// fields they name are not stripped, the answer is just not kept); `Set-Cookie`;
/// `Vary: *` (or a `Vary` that cannot be read); an unreadable `Cache-Control` or
/// `Age`; a `max-age` / `s-maxage` that is not a number of seconds.
///
/// The lifetime is `s-maxage`, else `max-age`, else `route_ttl`, less the answer's
/// `Age` (time it already spent in caches upstream), at most [`MAX_TTL`]; none left
/// (`max-age=0`) is `None`.
///
/// `Expires` is not parsed (that needs the service's clock to agree with ours, and
/// shoal's services say `max-age`): an answer with `Expires` and neither `max-age`
/// nor `s-maxage` is not stored, since the route's TTL could outlive what it says.
/// With either, `Expires` is overridden anyway (RFC 9111 §5.3).
pub(crate) fn freshness(
    route_ttl: Duration,
    status: StatusCode,
    headers: &HeaderMap,
) -> Option<Duration> {
    if !STORABLE.contains(&status.as_u16()) || headers.contains_key(SET_COOKIE) {
        return None;
    }
    vary_names(headers)?;
    let mut s_maxage = None;
    let mut max_age = None;
    for (name, value) in directives(headers, &CACHE_CONTROL)? {
        match name.as_str() {
            "no-store" | "no-cache" | "private" => return None,
            // The first of repeated directives counts (RFC 9111 §4.2.1).
            "s-maxage" if s_maxage.is_none() => s_maxage = Some(seconds(value.as_deref())?),
            "max-age" if max_age.is_none() => max_age = Some(seconds(value.as_deref())?),
            _ => {}
        }
    }
    let lifetime = match s_maxage.or(max_age) {
        Some(s) => Duration::from_secs(s),
        None if headers.contains_key(EXPIRES) => return None,
        None => route_ttl,
    };
    let age = match headers.get(AGE) {
        Some(v) => age_seconds(v)?,
        None => 0,
    };
    let left = lifetime.checked_sub(Duration::from_secs(age))?.min(MAX_TTL);
    (!left.is_zero()).then_some(left)
}

/// A delta-seconds value (RFC 9111 §1.2.2); quoted is accepted, as recipients should.
fn seconds(value: Option<&str>) -> Option<u64> {
    let v = value?;
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Too large to represent is "a very long time" (RFC 9111 §1.2.2); MAX_TTL caps it.
    Some(v.parse().unwrap_or(u64::MAX))
}

/// An `Age` value; a list counts by its first member (RFC 9111 §5.1).
fn age_seconds(v: &HeaderValue) -> Option<u64> {
    let first = v.to_str().ok()?.split(',').next()?.trim();
    seconds(Some(first))
}

/// The directives of every `name` header, names lowercase, quotes kept on values;
/// `None` when a value is not visible ASCII.
fn directives(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let value = value.to_str().ok()?;
        for item in split_list(value) {
            let (n, v) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
                None => (item, None),
            };
            if !n.is_empty() {
                out.push((n.to_ascii_lowercase(), v));
            }
        }
    }
    Some(out)
}

/// A comma-separated list's trimmed members; commas inside quoted strings do not
/// split (`no-cache="a, b"` is one member).
fn split_list(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The request headers an answer's `Vary` names, lowercase; `None` for `*`, a name
/// that is not one, or too many to keep.
fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        for item in split_list(value.to_str().ok()?) {
            if item == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(item.as_bytes()).ok()?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    (names.len() <= MAX_RESPONSE_VARY).then_some(names)
}

/// An answer as stored: end-to-end headers only, the whole body, and how long it
/// stays fresh from when it was stored.
#[derive(Clone, Debug)]
pub(crate) struct CachedResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    ttl: Duration,
}

impl CachedResponse {
    /// An answer to keep for `ttl` (from [`freshness`]) from `stored_at`.
    ///
    /// Hop-by-hop headers (and those `Connection` names), per-exchange headers
    /// (`x-request-id`, trace context) and any `x-shoal-cache` are dropped;
    /// `Content-Length` is set to the body's.
    pub(crate) fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        stored_at: Instant,
        ttl: Duration,
    ) -> Self {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        for name in HOP_BY_HOP.iter().chain(PER_REQUEST) {
            headers.remove(*name);
        }
        headers.remove(X_SHOAL_CACHE);
        // A 204 has no Content-Length (RFC 9110 §8.6); any other answer replays with
        // the length of what was actually kept.
        if status == StatusCode::NO_CONTENT {
            headers.remove(CONTENT_LENGTH);
        } else {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Self {
            status,
            headers,
            body,
            stored_at,
            ttl: ttl.min(MAX_TTL),
        }
    }

    /// The stored body.
    #[cfg(test)]
    pub(crate) fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether it may still be served at `now`.
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored_at) < self.ttl
    }

    /// Its age at `now` in whole seconds: the `Age` it came with plus the time kept.
    pub(crate) fn age(&self, now: Instant) -> u64 {
        let upstream = self.headers.get(AGE).and_then(age_seconds).unwrap_or(0);
        upstream.saturating_add(now.saturating_duration_since(self.stored_at).as_secs())
    }

    /// The answer to a request served from the cache at `now`, with `Age` and
    /// `x-shoal-cache: hit`.
    pub(crate) fn to_response(&self, now: Instant) -> Response {
        let mut res = Response::new(Body::from(self.body.clone()));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(AGE, HeaderValue::from(self.age(now)));
        headers.insert(X_SHOAL_CACHE, HIT);
        res
    }

    /// Bytes counted for it in the cache under `key`.
    fn size(&self, key: &KeyId, vary: &[(HeaderName, Option<Vec<u8>>)]) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let vary: usize = vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        ENTRY_OVERHEAD_BYTES + self.body.len() + headers + key.bytes() + vary
    }
}

/// The shared, bounded response cache (cheap to clone; clones share the entries).
///
/// One answer is kept per key: when the answer's own `Vary` names request headers,
/// the entry serves only requests whose values for them match the request that
/// stored it, and a request with other values misses and replaces it. That never
/// serves a wrong variant; clients alternating variants of one URL just miss more.
#[derive(Clone, Debug)]
pub(crate) struct ResponseCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: CacheLimits,
    store: Mutex<Store>,
}

#[derive(Debug, Default)]
struct Store {
    entries: HashMap<Arc<KeyId>, Entry>,
    /// Entries by last use, oldest first: the eviction order.
    order: BTreeMap<u64, Arc<KeyId>>,
    /// The last use stamp given out; only grows.
    clock: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    response: CachedResponse,
    /// The request headers the answer's `Vary` names, with the storing request's
    /// values: the entry serves only requests that send the same.
    vary: Vec<(HeaderName, Option<Vec<u8>>)>,
    last_use: u64,
    size: usize,
}

impl Store {
    fn remove(&mut self, id: &KeyId) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.order.remove(&entry.last_use);
        self.bytes -= entry.size;
        Some(entry)
    }

    fn touch(&mut self, id: &Arc<KeyId>) {
        self.clock += 1;
        let now = self.clock;
        if let Some(entry) = self.entries.get_mut(id) {
            self.order.remove(&entry.last_use);
            entry.last_use = now;
            self.order.insert(now, id.clone());
        }
    }
}

impl ResponseCache {
    /// An empty cache within `limits`.
    pub(crate) fn new(limits: CacheLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                store: Mutex::new(Store::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // No code path panics while holding the lock with the store half-updated
        // (only allocation could), so a poisoned lock still guards a coherent store.
        self.inner.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fresh answer stored for `key` at `now`, if any; an expired one is dropped.
    /// Only GET and HEAD requests are answered.
    pub(crate) fn get(&self, key: &CacheKey, now: Instant) -> Option<CachedResponse> {
        if key.method == Kind::Other {
            return None;
        }
        let mut store = self.lock();
        let entry = store.entries.get(&*key.id)?;
        if !entry.response.is_fresh(now) {
            store.remove(&key.id);
            return None;
        }
        if entry
            .vary
            .iter()
            .any(|(name, value)| joined(&key.headers, name) != *value)
        {
            return None;
        }
        let response = entry.response.clone();
        store.touch(&key.id);
        Some(response)
    }

    /// Keep `response` under `key`, replacing what was there and evicting the least
    /// recently used entries to stay within the limits. Returns whether it was kept:
    /// not for a HEAD request's answer (no body to replay to a GET) or another
    /// method's, a body over `max_entry_bytes`, or a `Vary` that cannot be honoured.
    pub(crate) fn put(&self, key: CacheKey, response: CachedResponse) -> bool {
        let limits = &self.inner.limits;
        if key.method != Kind::Get || response.body.len() > limits.max_entry_bytes {
            return false;
        }
        let vary: Vec<_> = match vary_names(&response.headers) {
            Some(names) => names
                .into_iter()
                .map(|n| {
                    let v = joined(&key.headers, &n);
                    (n, v)
                })
                .collect(),
            None => return false,
        };
        let size = response.size(&key.id, &vary);
        if size > limits.max_bytes || limits.max_entries == 0 {
            return false;
        }
        let mut store = self.lock();
        store.remove(&key.id);
        store.clock += 1;
        let last_use = store.clock;
        store.order.insert(last_use, key.id.clone());
        store.entries.insert(
            key.id,
            Entry {
                response,
                vary,
                last_use,
                size,
            },
        );
        store.bytes += size;
        // The new entry is the most recent and fits alone, so it is never the one
        // evicted.
        while store.entries.len() > limits.max_entries || store.bytes > limits.max_bytes {
            let Some((_, oldest)) = store.order.pop_first() else {
                break;
            };
            if let Some(e) = store.entries.remove(&oldest) {
                store.bytes -= e.size;
            }
        }
        true
    }

    /// Drop every entry whose path is `path_prefix` or below it, on whole segments
    /// (`/api/products` drops `/api/products` and `/api/products/p-1`, not
    /// `/api/productsx`; `/` drops everything). Returns how many were dropped.
    pub(crate) fn invalidate_prefix(&self, path_prefix: &str) -> usize {
        let prefix = path_prefix.trim_end_matches('/');
        let under = |path: &str| {
            prefix.is_empty()
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let mut store = self.lock();
        let doomed: Vec<Arc<KeyId>> = store
            .entries
            .keys()
            .filter(|id| under(&id.path))
            .cloned()
            .collect();
        for id in &doomed {
            store.remove(id);
        }
        doomed.len()
    }

    /// Drop every entry.
    pub(crate) fn clear(&self) {
        let mut store = self.lock();
        let clock = store.clock;
        *store = Store {
            clock,
            ..Store::default()
        };
    }

    /// How many answers are kept (expired ones included until touched or evicted).
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// How many bytes are counted against `max_bytes`.
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Read `body` whole, refusing more than `limit` bytes: how the caller reads an
/// answer it will store (it already knows the length fits, so over the limit means
/// the upstream broke framing).
pub(crate) async fn collect_bounded<B>(body: B, limit: usize) -> Result<Bytes, Error>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::new(
            ErrorKind::Protocol,
            Origin::Upstream,
            format!("the answer's body is over {limit} bytes"),
        )),
        Err(e) => Err(Error::new(
            ErrorKind::Unavailable,
            Origin::Upstream,
            format!("the answer's body could not be read: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn get(uri: &str) -> CacheKey {
        key(&parts("GET", uri, &[("host", "shop.example")]), "r", &[])
    }

    fn answer(body: &'static str, at: Instant, ttl: Duration) -> CachedResponse {
        CachedResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(body.as_bytes()),
            at,
            ttl,
        )
    }

    fn limits(max_entries: usize, max_bytes: usize) -> CacheLimits {
        CacheLimits {
            max_entries,
            max_bytes,
            max_entry_bytes: max_bytes,
        }
    }

    #[test]
    fn least_recently_used_goes_first_by_count() {
        let now = Instant::now();
        let cache = ResponseCache::new(limits(2, 1 << 20));
        assert!(cache.put(get("/a"), answer("a", now, TTL)));
        assert!(cache.put(get("/b"), answer("b", now, TTL)));
        // Using /a makes /b the least recently used.
        assert!(cache.get(&get("/a"), now).is_some());
        assert!(cache.put(get("/c"), answer("c", now, TTL)));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&get("/b"), now).is_none());
        assert_eq!(cache.get(&get("/a"), now).unwrap().body(), "a");
        assert_eq!(cache.get(&get("/c"), now).unwrap().body(), "c");
        // Replacing a key does not grow the cache.
        assert!(cache.put(get("/c"), answer("C", now, TTL)));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&get("/c"), now).unwrap().body(), "C");
    }

    #[test]
    fn least_recently_used_goes_first_by_bytes() {
        let now = Instant::now();
        let body = "x".repeat(1000).leak();
        let one = {
            let k = get("/a");
            answer(body, now, TTL).size(&k.id, &[])
        };
        let cache = ResponseCache::new(limits(100, 3 * one));
        for p in ["/a", "/b", "/c"] {
            assert!(cache.put(get(p), answer(body, now, TTL)));
        }
        assert_eq!(cache.bytes(), 3 * one);
        assert!(cache.get(&get("/a"), now).is_some());
        assert!(cache.put(get("/d"), answer(body, now, TTL)));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.bytes(), 3 * one);
        assert!(cache.get(&get("/b"), now).is_none(), "the oldest unused");
        for p in ["/a", "/c", "/d"] {
            assert!(cache.get(&get(p), now).is_some(), "{p}");
        }
        // A body over max_entry_bytes is not kept and evicts nothing.
        let small = ResponseCache::new(CacheLimits {
            max_entries: 10,
            max_bytes: 1 << 20,
            max_entry_bytes: 999,
        });
        assert!(!small.put(get("/a"), answer(body, now, TTL)));
        assert_eq!((small.len(), small.bytes()), (0, 0));
    }

    #[test]
    fn entries_expire_at_their_ttl_and_are_dropped() {
        let t0 = Instant::now();
        let cache = ResponseCache::new(CacheLimits::default());
        assert!(cache.put(get("/a"), answer("a", t0, Duration::from_secs(10))));
        let hit = cache.get(&get("/a"), t0 + Duration::from_millis(9_999));
        assert!(hit.is_some());
        assert!(cache
            .get(&get("/a"), t0 + Duration::from_secs(10))
            .is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn directives_decide_what_is_stored_and_for_how_long() {
        let s = Duration::from_secs;
        // Status, answer headers, what `freshness` says.
        type Case = (
            u16,
            &'static [(&'static str, &'static str)],
            Option<Duration>,
        );
        let cases: &[Case] = &[
            (200, &[], Some(TTL)),
            (203, &[], Some(TTL)),
            (204, &[], Some(TTL)),
            (300, &[], Some(TTL)),
            (301, &[], Some(TTL)),
            (404, &[], Some(TTL)),
            (410, &[], Some(TTL)),
            (201, &[], None),
            (206, &[], None),
            (302, &[], None),
            (304, &[], None),
            (500, &[], None),
            (503, &[], None),
            (200, &[("cache-control", "no-store")], None),
            (200, &[("cache-control", "No-Cache")], None),
            (200, &[("cache-control", "private")], None),
            (
                200,
                &[("cache-control", "max-age=60, private=\"x-a, x-b\"")],
                None,
            ),
            (200, &[("cache-control", "no-cache=\"set-cookie\"")], None),
            (200, &[("set-cookie", "a=1")], None),
            (200, &[("vary", "*")], None),
            (200, &[("vary", "accept-language, *")], None),
            (200, &[("vary", "accept-language")], Some(TTL)),
            (200, &[("cache-control", "public, max-age=5")], Some(s(5))),
            (
                200,
                &[("cache-control", "max-age=5, s-maxage=7")],
                Some(s(7)),
            ),
            (
                200,
                &[
                    ("cache-control", "s-maxage=7"),
                    ("cache-control", "max-age=5"),
                ],
                Some(s(7)),
            ),
            (200, &[("cache-control", "max-age=\"9\"")], Some(s(9))),
            (200, &[("cache-control", "max-age=0")], None),
            (200, &[("cache-control", "s-maxage=0, max-age=60")], None),
            (200, &[("cache-control", "max-age=abc")], None),
            (200, &[("cache-control", "max-age=-1")], None),
            (
                200,
                &[("cache-control", "max-age=5, max-age=60")],
                Some(s(5)),
            ),
            (
                200,
                &[("cache-control", "max-age=99999999999999999999999")],
                Some(MAX_TTL),
            ),
            (
                200,
                &[("cache-control", "must-revalidate, max-age=5")],
                Some(s(5)),
            ),
            (
                200,
                &[("cache-control", "max-age=60"), ("age", "20")],
                Some(s(40)),
            ),
            (200, &[("cache-control", "max-age=60"), ("age", "60")], None),
            (200, &[("age", "10")], Some(s(50))),
            (200, &[("age", "x")], None),
            (200, &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")], None),
            (
                200,
                &[("expires", "0"), ("cache-control", "max-age=5")],
                Some(s(5)),
            ),
        ];
        for (status, headers, want) in cases {
            let mut h = HeaderMap::new();
            for (n, v) in *headers {
                h.append(*n, HeaderValue::from_static(v));
            }
            let status = StatusCode::from_u16(*status).unwrap();
            assert_eq!(freshness(TTL, status, &h), *want, "{status} {headers:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_bytes(b"max-age=5\xff").unwrap(),
        );
        assert_eq!(freshness(TTL, StatusCode::OK, &h), None, "unreadable");
    }

    #[test]
    fn requests_with_credentials_or_asking_fresh_bypass() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("accept", "application/json")], false),
            (&[("cache-control", "max-age=0")], false),
            (&[("authorization", "Bearer x")], true),
            (&[("cookie", "s=1")], true),
            (&[("cache-control", "no-cache")], true),
            (&[("cache-control", "max-stale, No-Store")], true),
            (&[("pragma", "no-cache")], true),
        ];
        for (headers, want) in cases {
            let p = parts("GET", "/", headers);
            assert_eq!(request_bypasses(&p.headers), *want, "{headers:?}");
        }
    }

    #[test]
    fn keys_separate_query_host_route_and_vary_headers() {
        let now = Instant::now();
        let cache = ResponseCache::new(CacheLimits::default());
        let vary = vec!["Accept-Language".to_string()];
        let k = |uri: &str, host: &str, route: &str, lang: Option<&str>| {
            let mut h = vec![("host", host)];
            if let Some(l) = lang {
                h.push(("accept-language", l));
            }
            key(&parts("GET", uri, &h), route, &vary)
        };
        assert!(cache.put(k("/p?page=1", "a", "r", Some("en")), answer("en", now, TTL)));
        let hit = |key: CacheKey| cache.get(&key, now).map(|r| r.body().clone());
        assert_eq!(hit(k("/p?page=1", "A", "r", Some("en"))).unwrap(), "en");
        assert!(hit(k("/p?page=2", "a", "r", Some("en"))).is_none());
        assert!(hit(k("/p", "a", "r", Some("en"))).is_none());
        assert!(hit(k("/p?page=1", "b", "r", Some("en"))).is_none());
        assert!(hit(k("/p?page=1", "a", "other", Some("en"))).is_none());
        assert!(hit(k("/p?page=1", "a", "r", Some("de"))).is_none());
        assert!(hit(k("/p?page=1", "a", "r", None)).is_none());
        assert!(cache.put(k("/p?page=1", "a", "r", Some("de")), answer("de", now, TTL)));
        assert_eq!(hit(k("/p?page=1", "a", "r", Some("de"))).unwrap(), "de");
        assert_eq!(hit(k("/p?page=1", "a", "r", Some("en"))).unwrap(), "en");
    }

    #[test]
    fn an_answers_own_vary_must_match_the_request() {
        let now = Instant::now();
        let cache = ResponseCache::new(CacheLimits::default());
        let k = |enc: &str| key(&parts("GET", "/p", &[("accept-encoding", enc)]), "r", &[]);
        let mut headers = HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        let gz = CachedResponse::new(StatusCode::OK, headers, Bytes::from_static(b"z"), now, TTL);
        assert!(cache.put(k("gzip"), gz));
        assert!(cache.get(&k("gzip"), now).is_some());
        assert!(cache.get(&k("br"), now).is_none());
        // A miss does not drop the entry; the next store replaces it.
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn head_is_served_from_get_and_never_stored() {
        let now = Instant::now();
        let cache = ResponseCache::new(CacheLimits::default());
        let head = || key(&parts("HEAD", "/p", &[]), "r", &[]);
        let get = || key(&parts("GET", "/p", &[]), "r", &[]);
        assert!(!cache.put(head(), answer("", now, TTL)));
        assert_eq!(cache.len(), 0);
        assert!(cache.put(get(), answer("body", now, TTL)));
        assert_eq!(cache.get(&head(), now).unwrap().body(), "body");
        let post = key(&parts("POST", "/p", &[]), "r", &[]);
        assert!(cache.get(&post, now).is_none());
        assert!(!cache.put(post, answer("x", now, TTL)));
    }

    #[test]
    fn hits_carry_age_and_the_hit_marker_but_no_per_hop_headers() {
        let t0 = Instant::now();
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("content-type", "application/json"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "req-1"),
            ("traceparent", "00-abc-def-01"),
            ("x-shoal-cache", "miss"),
            ("age", "3"),
        ] {
            h.insert(n, HeaderValue::from_static(v));
        }
        let stored = CachedResponse::new(StatusCode::OK, h, Bytes::from_static(b"{}"), t0, TTL);
        let res = stored.to_response(t0 + Duration::from_millis(2_500));
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers();
        assert_eq!(h["age"], "5");
        assert_eq!(h[X_SHOAL_CACHE], "hit");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["content-length"], "2");
        for gone in [
            "connection",
            "x-hop",
            "transfer-encoding",
            "x-request-id",
            "traceparent",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
        let no_content = CachedResponse::new(
            StatusCode::NO_CONTENT,
            HeaderMap::new(),
            Bytes::new(),
            t0,
            TTL,
        );
        assert!(no_content.headers.get(CONTENT_LENGTH).is_none());
    }

    #[test]
    fn invalidation_is_by_whole_segments() {
        let now = Instant::now();
        let cache = ResponseCache::new(CacheLimits::default());
        for p in [
            "/api/products",
            "/api/products/p-1?x=1",
            "/api/productsx",
            "/api/orders",
        ] {
            assert!(cache.put(get(p), answer("x", now, TTL)));
        }
        assert_eq!(cache.invalidate_prefix("/api/products/"), 2);
        assert!(cache.get(&get("/api/productsx"), now).is_some());
        assert!(cache.get(&get("/api/products"), now).is_none());
        assert_eq!(cache.invalidate_prefix("/"), 2);
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
        assert!(cache.put(get("/a"), answer("x", now, TTL)));
        cache.clear();
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn config_is_checked() {
        let ok = CacheConfig {
            ttl_ms: 1000,
            vary: vec!["accept-language".into()],
        };
        assert!(ok.validate("r.cache").is_ok());
        for (ttl_ms, vary, key) in [
            (0, vec![], "ttl_ms"),
            (86_400_001, vec![], "ttl_ms"),
            (1, vec!["bad header"], "vary"),
            (1, vec!["Authorization"], "vary"),
            (1, vec!["cookie"], "vary"),
            (1, vec!["connection"], "vary"),
            (1, vec!["x-a", "X-A"], "vary"),
        ] {
            let c = CacheConfig {
                ttl_ms,
                vary: vary.into_iter().map(String::from).collect(),
            };
            let e = c.validate("r.cache").unwrap_err().to_string();
            assert!(e.starts_with(&format!("r.cache.{key}")), "{e}");
        }
        let c: CacheConfig = toml::from_str("ttl_ms = 5").unwrap();
        assert!(c.vary.is_empty());
        assert!(toml::from_str::<CacheConfig>("ttl_ms = 5\nttl = 1").is_err());
        let l: CacheLimits = toml::from_str("max_entries = 5").unwrap();
        assert_eq!((l.max_bytes, l.max_entry_bytes), (64 << 20, 1 << 20));
        assert!(l.validate("gateway.cache").is_ok());
        assert!(limits(0, 1).validate("c").is_err());
        let big = CacheLimits {
            max_entry_bytes: 2,
            ..limits(1, 1)
        };
        assert!(big.validate("c").is_err());
    }

    #[tokio::test]
    async fn bodies_are_collected_within_the_limit() {
        let body = || Body::from("hello");
        assert_eq!(collect_bounded(body(), 5).await.unwrap(), "hello");
        let e = collect_bounded(body(), 4).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}
