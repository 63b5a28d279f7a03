//! Run-time fault injection ("chaos"): the control plane's table of fault rules and
//! its HTTP API (`/v1/faults`, documented in `docs/resilience.md`).
//!
//! The table lives here because a fault must reach every replica of a service at
//! once, and every process already watches the control plane. Processes watch
//! `GET /v1/faults` with the same long poll as the catalog and apply the rules to
//! their own incoming requests. The table is kept in memory only, on purpose: a fault
//! is an experiment, and a restarted control plane must not bring one back.

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use shoal_core::resilience::{limits, FaultKind, FaultList, FaultRule};
use shoal_core::ApiError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Largest `POST /v1/faults` body: a rule is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a watch waits before answering unchanged (as the registry's default).
const MAX_WAIT_MS: u64 = 60_000;
/// How long a watch waits when it does not say.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// Why the fault table refused an operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    /// The rule broke a rule of its own; the message names the field.
    #[error("invalid fault rule: {0}")]
    Invalid(String),
    /// No rule has that id (removed, expired, or never added).
    #[error("no fault with id {0:?}")]
    UnknownFault(String),
    /// The table holds its maximum number of rules.
    #[error("the fault table is full ({0} rules); remove some first (DELETE /v1/faults)")]
    Full(usize),
}

impl IntoResponse for FaultError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_fault"),
            Self::UnknownFault(_) => (StatusCode::NOT_FOUND, "unknown_fault"),
            // Not a 503: trying again does not help until someone removes rules.
            Self::Full(_) => (StatusCode::CONFLICT, "fault_table_full"),
        };
        ApiError::new(status, code, self.to_string()).into_response()
    }
}

/// The kind's name on the wire, for logs.
fn kind_name(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Delay => "delay",
        FaultKind::Error => "error",
        FaultKind::Abort => "abort",
    }
}

struct Stored {
    rule: FaultRule,
    /// When the sweep drops the rule. Kept on the runtime's clock (the wire's
    /// `expires_at_ms` is wall-clock time, for processes) so that a clock step
    /// does not end or stretch a rule, and tests can pause time.
    deadline: Option<Instant>,
}

struct TableState {
    /// Oldest first.
    rules: Vec<Stored>,
    index: u64,
    /// Last id number given out.
    last_id: u64,
}

struct Inner {
    state: Mutex<TableState>,
    changes: watch::Sender<u64>,
}

/// The fault table: cheap to clone, shared by the HTTP API and the expiry sweep.
#[derive(Clone)]
pub struct FaultTable {
    inner: Arc<Inner>,
}

impl Default for FaultTable {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FaultTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("FaultTable")
            .field("index", &state.index)
            .field("rules", &state.rules.len())
            .finish()
    }
}

impl FaultTable {
    /// An empty table.
    ///
    /// Its index starts at the wall clock's milliseconds rather than 0: the table is
    /// not kept across restarts, and a process that watched the previous control plane
    /// must see an index it has never seen, or it would wait on with stale rules.
    pub fn new() -> Self {
        Self::with_index(shoal_core::unix_ms())
    }

    fn with_index(index: u64) -> Self {
        let (changes, _) = watch::channel(index);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(TableState {
                    rules: Vec::new(),
                    index,
                    last_id: 0,
                }),
                changes,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        // Every change is one push, retain or counter step, so a panic while holding
        // the lock cannot leave the table half-changed: a poisoned lock is usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self, state: &mut TableState) {
        state.index += 1;
        self.inner.changes.send_replace(state.index);
    }

    /// Drop the rules whose time ran out, without bumping the index.
    fn drop_expired(state: &mut TableState, now: Instant) -> usize {
        let before = state.rules.len();
        state.rules.retain(|s| match s.deadline {
            Some(at) if at <= now => {
                tracing::info!(id = %s.rule.id, service = %s.rule.service, "fault expired");
                false
            }
            _ => true,
        });
        before - state.rules.len()
    }

    /// Add a rule. The table assigns its `id` (`f-<n>`) and, when it has a
    /// `duration_ms`, its `expires_at_ms`; both are ignored when sent.
    pub fn add(&self, mut rule: FaultRule) -> Result<FaultRule, FaultError> {
        rule.validate().map_err(FaultError::Invalid)?;
        let now = Instant::now();
        let mut state = self.lock();
        // Expired rules do not take room from new ones, sweep or not.
        Self::drop_expired(&mut state, now);
        if state.rules.len() >= limits::MAX_RULES {
            return Err(FaultError::Full(limits::MAX_RULES));
        }
        state.last_id += 1;
        rule.id = format!("f-{}", state.last_id);
        rule.expires_at_ms = rule
            .duration_ms
            .map(|d| shoal_core::unix_ms().saturating_add(d));
        let deadline = rule.duration_ms.map(|d| now + Duration::from_millis(d));
        tracing::info!(
            id = %rule.id,
            service = %rule.service,
            // Not `route`: the request's own route is logged under that name.
            fault_route = rule.route.as_deref().unwrap_or("*"),
            kind = kind_name(rule.kind),
            percent = rule.percent,
            duration_ms = rule.duration_ms,
            "fault added"
        );
        state.rules.push(Stored {
            rule: rule.clone(),
            deadline,
        });
        self.changed(&mut state);
        Ok(rule)
    }

    /// Remove one rule.
    pub fn remove(&self, id: &str) -> Result<(), FaultError> {
        let mut state = self.lock();
        let before = state.rules.len();
        state.rules.retain(|s| s.rule.id != id);
        if state.rules.len() == before {
            return Err(FaultError::UnknownFault(id.to_string()));
        }
        tracing::info!(id = %id, "fault removed");
        self.changed(&mut state);
        Ok(())
    }

    /// Remove every rule of `service`, or every rule at all; returns how many went.
    pub fn clear(&self, service: Option<&str>) -> u64 {
        let mut state = self.lock();
        let before = state.rules.len();
        state
            .rules
            .retain(|s| service.is_some_and(|name| s.rule.service != name));
        let removed = before - state.rules.len();
        if removed > 0 {
            tracing::info!(service = service.unwrap_or("*"), removed, "faults cleared");
            self.changed(&mut state);
        }
        removed as u64
    }

    /// Drop every rule whose time ran out; returns how many went. Watchers wake, so
    /// processes drop them too.
    pub fn expire(&self) -> usize {
        let mut state = self.lock();
        let gone = Self::drop_expired(&mut state, Instant::now());
        if gone > 0 {
            self.changed(&mut state);
        }
        gone
    }

    /// The rules in force now (of `service` only, when given), oldest first.
    pub fn list(&self, service: Option<&str>) -> FaultList {
        let mut state = self.lock();
        if Self::drop_expired(&mut state, Instant::now()) > 0 {
            self.changed(&mut state);
        }
        FaultList {
            index: state.index,
            faults: state
                .rules
                .iter()
                .filter(|s| service.is_none_or(|name| s.rule.service == name))
                .map(|s| s.rule.clone())
                .collect(),
        }
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.lock().index
    }

    /// The rules once the index differs from `index`, or unchanged after `wait`
    /// (at most 60 s). An index other than the current one answers at once.
    ///
    /// The index covers the whole table, so a watch on one service also wakes for
    /// changes to others.
    pub async fn wait_for_change(
        &self,
        index: u64,
        wait: Duration,
        service: Option<&str>,
    ) -> FaultList {
        shoal_core::longpoll::wait_for_change(
            self.inner.changes.subscribe(),
            index,
            wait.min(Duration::from_millis(MAX_WAIT_MS)),
        )
        .await;
        self.list(service)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().rules.iter().filter_map(|s| s.deadline).min()
    }

    /// Drop each rule when its time runs out, for as long as the future is polled.
    /// It sleeps until the next deadline, and wakes early when the table changes.
    pub async fn run_expiry(&self) {
        let mut rx = self.inner.changes.subscribe();
        loop {
            self.expire();
            // Seen up to here: a rule added from now on wakes the loop.
            rx.borrow_and_update();
            let changed = match self.next_deadline() {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => Ok(()),
                    r = rx.changed() => r,
                },
                None => rx.changed().await,
            };
            if changed.is_err() {
                // The table is gone; nothing left to expire.
                return;
            }
        }
    }
}

/// The fault table's routes, to be merged into the control plane's router.
pub(crate) fn router(table: FaultTable) -> Router {
    Router::new()
        .route("/v1/faults", get(list).post(add).delete(clear))
        .route("/v1/faults/{id}", delete(remove))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(table)
}

/// A `?service=` that is present must be a service name.
fn check_service(service: Option<&str>) -> Result<(), ApiError> {
    match service.map(shoal_core::names::validate_service_name) {
        Some(Err(e)) => Err(ApiError::bad_request(format!("service: {e}"))),
        _ => Ok(()),
    }
}

async fn add(State(t): State<FaultTable>, body: Bytes) -> Response {
    // Parsed by hand (not the Json extractor) so every malformed rule gets one clear
    // 400 that says what is wrong and where, whatever the content type.
    let rule: FaultRule = match serde_json::from_slice(&body) {
        Ok(rule) => rule,
        Err(e) => return FaultError::Invalid(e.to_string()).into_response(),
    };
    match t.add(rule) {
        Ok(rule) => (StatusCode::CREATED, Json(rule)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this service's rules.
    service: Option<String>,
    /// Last index the client saw; absent answers at once.
    index: Option<u64>,
    /// How long to wait for a change (capped at `MAX_WAIT_MS`).
    wait_ms: Option<u64>,
}

async fn list(State(t): State<FaultTable>, Query(q): Query<ListQuery>) -> Response {
    let service = q.service.as_deref();
    if let Err(e) = check_service(service) {
        return e.into_response();
    }
    let faults = match q.index {
        Some(index) => {
            let wait = Duration::from_millis(q.wait_ms.unwrap_or(DEFAULT_WAIT_MS));
            t.wait_for_change(index, wait, service).await
        }
        None => t.list(service),
    };
    Json(faults).into_response()
}

async fn remove(State(t): State<FaultTable>, Path(id): Path<String>) -> Response {
    match t.remove(&id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearQuery {
    /// Only this service's rules; all rules when absent.
    service: Option<String>,
}

async fn clear(State(t): State<FaultTable>, Query(q): Query<ClearQuery>) -> Response {
    let service = q.service.as_deref();
    if let Err(e) = check_service(service) {
        return e.into_response();
    }
    let removed = t.clear(service);
    Json(serde_json::json!({ "removed": removed })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn rule(service: &str) -> FaultRule {
        FaultRule {
            id: String::new(),
            service: service.into(),
            route: None,
            kind: FaultKind::Abort,
            delay_ms: None,
            status: None,
            percent: 100.0,
            duration_ms: None,
            expires_at_ms: None,
        }
    }

    /// The whole control plane router, so answers pass the same error normalisation
    /// as in production.
    fn app(table: &FaultTable) -> Router {
        let registry =
            shoal_registry::Registry::new(shoal_registry::RegistryConfig::default()).unwrap();
        crate::router(
            registry,
            table.clone(),
            shoal_telemetry::Metrics::new("control-plane"),
        )
    }

    async fn send(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, json)
    }

    #[tokio::test]
    async fn add_assigns_ids_and_expiry_and_lists_by_service() {
        let t = FaultTable::with_index(10);
        let app = app(&t);
        let before = shoal_core::unix_ms();
        let (status, added) = send(
            &app,
            "POST",
            "/v1/faults",
            r#"{"id":"mine","service":"payment","kind":"delay","delay_ms":200,
                "route":"/api/pay","percent":50,"duration_ms":30000,"expires_at_ms":1}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(added["id"], "f-1");
        let expires = added["expires_at_ms"].as_u64().unwrap();
        assert!(expires >= before + 30_000 && expires <= shoal_core::unix_ms() + 30_000);
        let (status, second) = send(
            &app,
            "POST",
            "/v1/faults",
            r#"{"service":"cart","kind":"error","status":503}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(second["id"], "f-2");
        assert!(second.get("expires_at_ms").is_none());

        let (status, all) = send(&app, "GET", "/v1/faults", "").await;
        assert_eq!(status, StatusCode::OK);
        let all: FaultList = serde_json::from_value(all).unwrap();
        assert_eq!(all.index, 12);
        let ids: Vec<_> = all.faults.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["f-1", "f-2"]);

        let (_, one) = send(&app, "GET", "/v1/faults?service=cart", "").await;
        let one: FaultList = serde_json::from_value(one).unwrap();
        assert_eq!(one.faults.len(), 1);
        assert_eq!(one.faults[0].service, "cart");
    }

    #[tokio::test]
    async fn bad_rules_and_queries_get_json_400s_naming_the_field() {
        let t = FaultTable::new();
        let app = app(&t);
        for (body, field) in [
            (
                r#"{"service":"payment","kind":"error","status":200}"#,
                "status",
            ),
            (
                r#"{"service":"payment","kind":"abort","percent":101}"#,
                "percent",
            ),
            (
                r#"{"service":"payment","kind":"abort","surprise":1}"#,
                "surprise",
            ),
            (r#"{"service":"payment","kind":"explode"}"#, "explode"),
            (r#"{"kind":"abort"}"#, "service"),
            ("not json", "expected"),
        ] {
            let (status, err) = send(&app, "POST", "/v1/faults", body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err["error"]["code"], "invalid_fault", "{body}");
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(msg.contains(field), "{body}: {msg}");
        }
        let (status, err) = send(&app, "GET", "/v1/faults?index=abc", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["error"]["code"], "bad_request");
        let (status, err) = send(&app, "GET", "/v1/faults?service=Bad_Name", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("service:"));
        let (status, _) = send(&app, "DELETE", "/v1/faults?surprise=1", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let big = format!(
            r#"{{"service":"payment","kind":"abort","route":"/{}"}}"#,
            "a".repeat(MAX_BODY_BYTES)
        );
        let (status, err) = send(&app, "POST", "/v1/faults", &big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err["error"]["code"], "payload_too_large");
        assert_eq!(t.list(None).faults.len(), 0);
    }

    #[tokio::test]
    async fn remove_and_clear() {
        let t = FaultTable::new();
        let app = app(&t);
        for s in ["payment", "payment", "cart", "orders"] {
            t.add(rule(s)).unwrap();
        }
        let (status, body) = send(&app, "DELETE", "/v1/faults/f-4", "").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(body, serde_json::Value::Null);
        let (status, err) = send(&app, "DELETE", "/v1/faults/f-4", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(err["error"]["code"], "unknown_fault");

        let index = t.index();
        let (status, body) = send(&app, "DELETE", "/v1/faults?service=payment", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({"removed": 2}));
        assert_eq!(t.index(), index + 1);
        // Nothing removed: nothing changed, so watchers sleep on.
        let (_, body) = send(&app, "DELETE", "/v1/faults?service=payment", "").await;
        assert_eq!(body, serde_json::json!({"removed": 0}));
        assert_eq!(t.index(), index + 1);
        let (_, body) = send(&app, "DELETE", "/v1/faults", "").await;
        assert_eq!(body, serde_json::json!({"removed": 1}));
        assert!(t.list(None).faults.is_empty());
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let t = FaultTable::new();
        let app = app(&t);
        for _ in 0..limits::MAX_RULES {
            t.add(rule("payment")).unwrap();
        }
        let (status, err) = send(
            &app,
            "POST",
            "/v1/faults",
            r#"{"service":"payment","kind":"abort"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(err["error"]["code"], "fault_table_full");
        assert!(err["error"]["message"].as_str().unwrap().contains("256"));
        t.remove("f-1").unwrap();
        assert_eq!(t.add(rule("payment")).unwrap().id, "f-257");
    }

    #[tokio::test(start_paused = true)]
    async fn watch_wakes_on_change_and_times_out_unchanged() {
        let t = FaultTable::with_index(5);
        // A stale index answers at once.
        let got = t.wait_for_change(4, Duration::from_secs(30), None).await;
        assert_eq!(got.index, 5);

        let start = Instant::now();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move {
                t.wait_for_change(5, Duration::from_secs(30), Some("cart"))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.add(rule("payment")).unwrap();
        t.add(rule("cart")).unwrap();
        let got = waiter.await.unwrap();
        assert!(got.index > 5);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(got.faults.iter().all(|f| f.service == "cart"));

        // Unchanged: answers after the wait, capped at 60 s.
        let index = t.index();
        let start = Instant::now();
        let got = t
            .wait_for_change(index, Duration::from_secs(3600), None)
            .await;
        assert_eq!(got.index, index);
        assert_eq!(start.elapsed(), Duration::from_millis(MAX_WAIT_MS));
    }

    #[tokio::test(start_paused = true)]
    async fn long_poll_over_http_waits_for_the_index() {
        let t = FaultTable::with_index(7);
        let app = app(&t);
        let watch = {
            let app = app.clone();
            tokio::spawn(
                async move { send(&app, "GET", "/v1/faults?index=7&wait_ms=20000", "").await },
            )
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watch.is_finished());
        t.add(rule("payment")).unwrap();
        let (status, body) = watch.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let list: FaultList = serde_json::from_value(body).unwrap();
        assert_eq!(list.index, 8);
        assert_eq!(list.faults.len(), 1);
        // wait_ms=0 answers at once, as the registry's watch does.
        let (_, body) = send(&app, "GET", "/v1/faults?index=8&wait_ms=0", "").await;
        assert_eq!(body["index"], 8);
    }

    #[tokio::test(start_paused = true)]
    async fn rules_expire_and_wake_watchers() {
        let t = FaultTable::new();
        let sweep = {
            let t = t.clone();
            tokio::spawn(async move { t.run_expiry().await })
        };
        let mut short = rule("payment");
        short.duration_ms = Some(1_000);
        let short = t.add(short).unwrap();
        let mut long = rule("payment");
        long.duration_ms = Some(5_000);
        t.add(long).unwrap();
        t.add(rule("payment")).unwrap();
        let index = t.index();

        let start = Instant::now();
        let got = t
            .wait_for_change(index, Duration::from_secs(30), None)
            .await;
        assert_eq!(start.elapsed(), Duration::from_millis(1_000));
        assert_eq!(got.index, index + 1);
        assert!(got.faults.iter().all(|f| f.id != short.id));
        assert_eq!(got.faults.len(), 2);

        let got = t
            .wait_for_change(got.index, Duration::from_secs(30), None)
            .await;
        assert_eq!(start.elapsed(), Duration::from_millis(5_000));
        assert_eq!(got.faults.len(), 1);
        assert_eq!(got.faults[0].expires_at_ms, None);
        sweep.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_rules_go_on_read_even_without_the_sweep() {
        let t = FaultTable::new();
        let mut r = rule("payment");
        r.duration_ms = Some(1_000);
        t.add(r).unwrap();
        let index = t.index();
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let got = t.list(None);
        assert!(got.faults.is_empty());
        assert_eq!(got.index, index + 1);
    }
}
