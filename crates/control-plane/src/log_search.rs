//! `GET /v1/logs`: the log store of `shoal up` searched, for the dashboard. The same
//! reading, merging and filtering as `shoal logs` (`shoal_telemetry::logread`); the
//! answer is the last `limit` matching lines, oldest first, each as an object.

use crate::dashboard::SystemView;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use shoal_core::ApiError;
use shoal_telemetry::logread::{self, Filter};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Lines answered when the caller does not say.
const DEFAULT_LIMIT: usize = 200;
/// Most lines in one answer.
const MAX_LIMIT: usize = 2000;
/// Most bytes of log lines in one answer; beyond, the oldest are left out (and
/// `truncated` says so).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Longest value of a parameter.
const MAX_PARAM_BYTES: usize = 1024;
/// Searches that read the disk at once; more wait their turn. A search reads every
/// file of the store, so two at a time keep a small machine responsive.
const MAX_CONCURRENT: usize = 2;

#[derive(Clone)]
struct Search {
    dir: Option<PathBuf>,
    /// Service → the system file's entries that register as it.
    entries: Arc<BTreeMap<String, Vec<String>>>,
    permits: Arc<Semaphore>,
}

/// The log search's route.
pub(crate) fn router(view: &SystemView) -> Router {
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (entry, service) in &view.entries {
        entries
            .entry(service.clone())
            .or_default()
            .push(entry.clone());
    }
    Router::new()
        .route("/v1/logs", get(search))
        .with_state(Search {
            dir: view.log_dir.clone(),
            entries: Arc::new(entries),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        })
}

/// The query, checked. Empty values count as not given (the dashboard's form sends
/// every field).
#[derive(Debug, Default)]
struct Params {
    service: Option<String>,
    filter: Filter,
    limit: usize,
}

fn parse(q: &BTreeMap<String, String>, now_ms: u64) -> Result<Params, String> {
    let mut p = Params {
        limit: DEFAULT_LIMIT,
        ..Params::default()
    };
    for (k, v) in q {
        if v.len() > MAX_PARAM_BYTES {
            return Err(format!("{k}: at most {MAX_PARAM_BYTES} bytes"));
        }
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "service" => p.service = Some(v.clone()),
            "level" => {
                p.filter.min_level = Some(
                    logread::level_rank(v)
                        .ok_or("level: one of trace, debug, info, warn, error")?,
                )
            }
            "trace" => p.filter.trace = Some(v.clone()),
            "grep" => p.filter.grep = Some(v.clone()),
            "since" => {
                p.filter.since_ms =
                    Some(logread::parse_since(v, now_ms).map_err(|e| format!("since {e}"))?)
            }
            "limit" => {
                p.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or(format!("limit: a whole number from 1 to {MAX_LIMIT}"))?
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: give service, level, trace, grep, since, limit"
                ))
            }
        }
    }
    Ok(p)
}

/// One line of the answer: the stored object as it is, or the text of a line that
/// is not JSON.
fn line(r: &logread::Record) -> Value {
    match r.json() {
        Some(m) => json!({"ts_ms": r.ts_ms(), "process": r.process(), "line": m}),
        None => json!({"ts_ms": r.ts_ms(), "process": r.process(), "text": r.raw()}),
    }
}

async fn search(State(s): State<Search>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let Some(dir) = s.dir.clone() else {
        return ApiError::not_found(
            "no log store known: the control plane searches the log store of `shoal up` \
             (<state_dir>/logs of its system file); start it with `shoal up`, or \
             `shoal control-plane --system FILE`",
        )
        .into_response();
    };
    let p = match parse(&q, shoal_core::unix_ms()) {
        Ok(p) => p,
        Err(e) => return ApiError::bad_request(e).into_response(),
    };
    let Ok(_permit) = s.permits.acquire().await else {
        return ApiError::not_found("the log search is shutting down").into_response();
    };
    let entries = s.entries.clone();
    let run = tokio::task::spawn_blocking(move || {
        let service = p.service.clone();
        let entries: &[String] = service
            .as_deref()
            .and_then(|s| entries.get(s))
            .map_or(&[], Vec::as_slice);
        let mut streams = logread::streams(&dir, |process| {
            service
                .as_deref()
                .is_none_or(|s| logread::selected(process, s, entries))
        })
        .map_err(|e| format!("no logs in {}: {e}", dir.display()))?;
        let tail = logread::tail(&mut streams, &p.filter, true, p.limit);
        // Newest first until the byte bound, then back in time order.
        let mut bytes = 0;
        let mut lines = Vec::new();
        for r in tail.records.iter().rev() {
            bytes += r.raw().len();
            if bytes > MAX_ANSWER_BYTES && !lines.is_empty() {
                break;
            }
            lines.push(line(r));
        }
        let truncated = lines.len() < tail.records.len();
        lines.reverse();
        Ok::<_, String>(json!({
            "lines": lines,
            "limit": p.limit,
            "earlier": tail.earlier,
            "truncated": truncated,
            "hidden_text": tail.hidden_text,
            "processes": streams.iter().map(|s| s.process().to_string()).collect::<Vec<_>>(),
        }))
    });
    match run.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => ApiError::not_found(e).into_response(),
        Err(e) => ApiError::new(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("log search failed: {e}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_are_checked_and_empty_ones_ignored() {
        let p = parse(&q(&[]), 0).unwrap();
        assert_eq!(p.limit, DEFAULT_LIMIT);
        let p = parse(
            &q(&[
                ("service", "catalog"),
                ("level", "warn"),
                ("trace", ""),
                ("since", "10s"),
                ("limit", "2000"),
            ]),
            60_000,
        )
        .unwrap();
        assert_eq!(p.service.as_deref(), Some("catalog"));
        assert_eq!(p.filter.min_level, Some(3));
        assert_eq!(p.filter.trace, None);
        assert_eq!(p.filter.since_ms, Some(50_000));
        assert_eq!(p.limit, 2000);
        for (bad, says) in [
            (("limit", "0"), "limit"),
            (("limit", "2001"), "limit"),
            (("level", "loud"), "level"),
            (("since", "yesterday"), "since"),
            (("follow", "1"), "unknown parameter"),
        ] {
            let e = parse(&q(&[bad]), 0).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let long = "x".repeat(MAX_PARAM_BYTES + 1);
        assert!(parse(&q(&[("grep", &long)]), 0).is_err());
    }
}
