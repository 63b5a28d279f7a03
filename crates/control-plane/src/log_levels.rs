//! Run-time log levels (`shoal log-level`): the control plane's table of desired log
//! filters, one per service, and its HTTP API (`/v1/log-levels`, documented in
//! `docs/observability.md`).
//!
//! It follows the fault table's pattern: every process already watches the control
//! plane, so a level set here reaches every replica of the service at once through a
//! long poll, and each applies it to its own filter without a restart. The table is
//! kept in memory only, like the fault table: turning on debug logs is a session's
//! experiment, and a restarted control plane must not bring a noisy level back. (Its
//! index starts at the wall clock, so after such a restart every watcher sees a new
//! index and an empty table, and goes back to its configured level.)

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use shoal_core::log_levels::{limits, LogLevel, LogLevelList, SetLogLevel};
use shoal_core::ApiError;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// Largest `PUT` body: a directive is at most 512 bytes, plus its JSON.
const MAX_BODY_BYTES: usize = 4 * 1024;
/// Longest a watch waits before answering unchanged (as the fault table's).
const MAX_WAIT_MS: u64 = 60_000;
/// How long a watch waits when it does not say.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// Why the log-level table refused an operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogLevelError {
    /// Not a service name.
    #[error("service: {0}")]
    Service(String),
    /// Not a filter directive (or an empty or too long one); the message says why.
    #[error("invalid log level: {0}")]
    Invalid(String),
    /// The table holds its maximum number of entries.
    #[error("the log-level table is full ({0} services); reset some first (DELETE /v1/log-levels/{{service}})")]
    Full(usize),
}

impl IntoResponse for LogLevelError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Service(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_log_level"),
            // Not a 503: trying again does not help until someone resets entries.
            Self::Full(_) => (StatusCode::CONFLICT, "log_level_table_full"),
        };
        ApiError::new(status, code, self.to_string()).into_response()
    }
}

struct TableState {
    levels: BTreeMap<String, String>,
    index: u64,
}

struct Inner {
    state: Mutex<TableState>,
    changes: watch::Sender<u64>,
}

/// The log-level table: cheap to clone, shared by the HTTP API's handlers.
#[derive(Clone)]
pub struct LogLevelTable {
    inner: Arc<Inner>,
}

impl Default for LogLevelTable {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LogLevelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("LogLevelTable")
            .field("index", &state.index)
            .field("levels", &state.levels.len())
            .finish()
    }
}

/// Check a directive as every process will parse it (`EnvFilter`), within the
/// table's bounds.
fn check_level(level: &str) -> Result<(), LogLevelError> {
    if level.trim().is_empty() {
        return Err(LogLevelError::Invalid(
            "empty; give a level such as debug or info,sqlx=warn".into(),
        ));
    }
    if level.len() > limits::MAX_DIRECTIVE_LEN {
        return Err(LogLevelError::Invalid(format!(
            "longer than {} bytes",
            limits::MAX_DIRECTIVE_LEN
        )));
    }
    shoal_telemetry::logging::check_filter(level)
        .map_err(|e| LogLevelError::Invalid(e.message().to_string()))
}

impl LogLevelTable {
    /// An empty table. Its index starts at the wall clock's milliseconds (see the
    /// module's documentation).
    pub fn new() -> Self {
        Self::with_index(shoal_core::unix_ms())
    }

    fn with_index(index: u64) -> Self {
        let (changes, _) = watch::channel(index);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(TableState {
                    levels: BTreeMap::new(),
                    index,
                }),
                changes,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        // Every change is one insert or remove plus a counter step: a panic while
        // holding the lock cannot leave the table half-changed.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self, state: &mut TableState) {
        state.index += 1;
        self.inner.changes.send_replace(state.index);
    }

    /// Set `service`'s level. Setting the level it has already changes nothing
    /// (watchers sleep on).
    pub fn set(&self, service: &str, level: &str) -> Result<LogLevel, LogLevelError> {
        shoal_core::names::validate_service_name(service).map_err(LogLevelError::Service)?;
        check_level(level)?;
        let mut state = self.lock();
        if !state.levels.contains_key(service) && state.levels.len() >= limits::MAX_ENTRIES {
            return Err(LogLevelError::Full(limits::MAX_ENTRIES));
        }
        if state.levels.get(service).map(String::as_str) != Some(level) {
            state.levels.insert(service.to_string(), level.to_string());
            tracing::info!(service, level, "log level set");
            self.changed(&mut state);
        }
        Ok(LogLevel {
            service: service.to_string(),
            level: level.to_string(),
        })
    }

    /// Forget `service`'s level, so its processes go back to their configured one.
    /// Answers whether it had one.
    pub fn reset(&self, service: &str) -> Result<bool, LogLevelError> {
        shoal_core::names::validate_service_name(service).map_err(LogLevelError::Service)?;
        let mut state = self.lock();
        let had = state.levels.remove(service).is_some();
        if had {
            tracing::info!(service, "log level reset");
            self.changed(&mut state);
        }
        Ok(had)
    }

    /// The levels set (of `service` only, when given), by service name.
    pub fn list(&self, service: Option<&str>) -> LogLevelList {
        let state = self.lock();
        LogLevelList {
            index: state.index,
            levels: state
                .levels
                .iter()
                .filter(|(s, _)| service.is_none_or(|name| name == s.as_str()))
                .map(|(s, l)| LogLevel {
                    service: s.clone(),
                    level: l.clone(),
                })
                .collect(),
        }
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.lock().index
    }

    /// The levels once the index differs from `index`, or unchanged after `wait`
    /// (at most 60 s). The index covers the whole table, so a watch on one service
    /// also wakes for changes to others.
    pub async fn wait_for_change(
        &self,
        index: u64,
        wait: Duration,
        service: Option<&str>,
    ) -> LogLevelList {
        shoal_core::longpoll::wait_for_change(
            self.inner.changes.subscribe(),
            index,
            wait.min(Duration::from_millis(MAX_WAIT_MS)),
        )
        .await;
        self.list(service)
    }
}

/// The log-level table's routes, to be merged into the control plane's router.
pub(crate) fn router(table: LogLevelTable) -> Router {
    Router::new()
        .route("/v1/log-levels", get(list))
        .route("/v1/log-levels/{service}", put(set).delete(reset))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(table)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this service's level.
    service: Option<String>,
    /// Last index the client saw; absent answers at once.
    index: Option<u64>,
    /// How long to wait for a change (capped at `MAX_WAIT_MS`).
    wait_ms: Option<u64>,
}

async fn list(State(t): State<LogLevelTable>, Query(q): Query<ListQuery>) -> Response {
    let service = q.service.as_deref();
    if let Some(Err(e)) = service.map(shoal_core::names::validate_service_name) {
        return LogLevelError::Service(e).into_response();
    }
    let levels = match q.index {
        Some(index) => {
            let wait = Duration::from_millis(q.wait_ms.unwrap_or(DEFAULT_WAIT_MS));
            t.wait_for_change(index, wait, service).await
        }
        None => t.list(service),
    };
    Json(levels).into_response()
}

async fn set(State(t): State<LogLevelTable>, Path(service): Path<String>, body: Bytes) -> Response {
    // Parsed by hand (not the Json extractor) so every malformed body gets one clear
    // 400 that says what is wrong, whatever the content type.
    let req: SetLogLevel = match serde_json::from_slice(&body) {
        Ok(req) => req,
        Err(e) => return LogLevelError::Invalid(e.to_string()).into_response(),
    };
    match t.set(&service, &req.level) {
        Ok(level) => Json(level).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn reset(State(t): State<LogLevelTable>, Path(service): Path<String>) -> Response {
    match t.reset(&service) {
        Ok(had) => Json(serde_json::json!({ "reset": had })).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use http_body_util::BodyExt;
    use tokio::time::Instant;
    use tower::ServiceExt;

    fn app(table: &LogLevelTable) -> Router {
        router(table.clone())
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
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        (status, json)
    }

    #[tokio::test]
    async fn set_list_and_reset() {
        let t = LogLevelTable::with_index(10);
        let app = app(&t);
        let (status, body) = send(
            &app,
            "PUT",
            "/v1/log-levels/catalog",
            r#"{"level":"debug"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["level"], "debug");
        send(
            &app,
            "PUT",
            "/v1/log-levels/orders",
            r#"{"level":"info,sqlx=warn"}"#,
        )
        .await;
        // The same level again changes nothing.
        send(
            &app,
            "PUT",
            "/v1/log-levels/orders",
            r#"{"level":"info,sqlx=warn"}"#,
        )
        .await;
        assert_eq!(t.index(), 12);
        let (_, all) = send(&app, "GET", "/v1/log-levels", "").await;
        let all: LogLevelList = serde_json::from_value(all).unwrap();
        assert_eq!(all.index, 12);
        assert_eq!(all.level_of("catalog"), Some("debug"));
        assert_eq!(all.level_of("orders"), Some("info,sqlx=warn"));
        let (_, one) = send(&app, "GET", "/v1/log-levels?service=orders", "").await;
        let one: LogLevelList = serde_json::from_value(one).unwrap();
        assert_eq!(one.levels.len(), 1);

        let (status, body) = send(&app, "DELETE", "/v1/log-levels/catalog", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["reset"], true);
        let (_, body) = send(&app, "DELETE", "/v1/log-levels/catalog", "").await;
        assert_eq!(body["reset"], false);
        assert_eq!(t.index(), 13);
        assert_eq!(t.list(None).level_of("catalog"), None);
    }

    #[tokio::test]
    async fn bad_levels_and_names_are_400s() {
        let t = LogLevelTable::new();
        let app = app(&t);
        let long = format!(
            r#"{{"level":"{}"}}"#,
            "a".repeat(limits::MAX_DIRECTIVE_LEN + 1)
        );
        for (uri, body, code) in [
            (
                "/v1/log-levels/catalog",
                r#"{"level":"info,sqlx=loud"}"#,
                "invalid_log_level",
            ),
            (
                "/v1/log-levels/catalog",
                r#"{"level":""}"#,
                "invalid_log_level",
            ),
            (
                "/v1/log-levels/catalog",
                r#"{"level":"debug","x":1}"#,
                "invalid_log_level",
            ),
            ("/v1/log-levels/catalog", "not json", "invalid_log_level"),
            ("/v1/log-levels/catalog", long.as_str(), "invalid_log_level"),
            (
                "/v1/log-levels/Bad_Name",
                r#"{"level":"debug"}"#,
                "bad_request",
            ),
        ] {
            let (status, err) = send(&app, "PUT", uri, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err["error"]["code"], code, "{body}");
        }
        assert!(t.list(None).levels.is_empty());
        let (status, _) = send(&app, "GET", "/v1/log-levels?service=Bad_Name", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_table_is_bounded() {
        let t = LogLevelTable::new();
        for n in 0..limits::MAX_ENTRIES {
            t.set(&format!("svc-{n}"), "debug").unwrap();
        }
        assert_eq!(
            t.set("one-more", "debug"),
            Err(LogLevelError::Full(limits::MAX_ENTRIES))
        );
        // An entry already there may still change.
        t.set("svc-0", "trace").unwrap();
        t.reset("svc-1").unwrap();
        t.set("one-more", "debug").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_wakes_on_change_and_times_out_unchanged() {
        let t = LogLevelTable::with_index(5);
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
        t.set("cart", "debug").unwrap();
        let got = waiter.await.unwrap();
        assert_eq!(got.index, 6);
        assert_eq!(got.level_of("cart"), Some("debug"));
        assert!(start.elapsed() < Duration::from_secs(1));
        let start = Instant::now();
        let got = t.wait_for_change(6, Duration::from_secs(3600), None).await;
        assert_eq!(got.index, 6);
        assert_eq!(start.elapsed(), Duration::from_millis(MAX_WAIT_MS));
    }
}
