//! Fault injection, switched at run time through the control plane (`shoal chaos`):
//! each process applies the rules for its own service to its incoming requests —
//! a delay, an error status, or an aborted connection — for a share of requests.
//! Health, metrics and `/ops` endpoints are never hit, so an injected fault tests
//! how callers cope with a failing service, not how the registry drops one.

use crate::metrics::ResilienceMetrics;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::Frame;
use shoal_core::resilience::{FaultAction, FaultRule};
use shoal_core::ApiError;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

/// The fault rules in force in this process; cheap to clone (the middleware's
/// state is cloned for every request).
#[derive(Clone)]
pub struct FaultInjector(Arc<Inner>);

struct Inner {
    service: String,
    rules: RwLock<Arc<Vec<FaultRule>>>,
    metrics: Option<ResilienceMetrics>,
}

impl FaultInjector {
    /// No rules yet, for the process of `service`.
    pub fn new(service: &str, metrics: Option<ResilienceMetrics>) -> Self {
        Self(Arc::new(Inner {
            service: service.to_string(),
            rules: RwLock::new(Arc::new(Vec::new())),
            metrics,
        }))
    }

    /// The service whose rules apply.
    pub fn service(&self) -> &str {
        &self.0.service
    }

    /// Replace the rules (those of other services and invalid ones are dropped).
    pub fn set(&self, rules: Vec<FaultRule>) {
        let mine: Vec<FaultRule> = rules
            .into_iter()
            .filter(|r| r.service == self.0.service && r.validate().is_ok())
            .collect();
        if !mine.is_empty() {
            tracing::warn!(rules = mine.len(), "fault injection active");
        }
        *self.0.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(mine);
    }

    /// The rules now.
    pub fn rules(&self) -> Arc<Vec<FaultRule>> {
        self.0
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The fault for a request to `path`, if a rule hits it (the first matching
    /// rule decides; its percentage is rolled once).
    pub fn decide(&self, path: &str) -> Option<FaultAction> {
        if exempt(path) {
            return None;
        }
        let rules = self.rules();
        if rules.is_empty() {
            return None;
        }
        let now = shoal_core::unix_ms();
        let rule = rules.iter().find(|r| r.matches(path, now))?;
        (fastrand::f64() * 100.0 < rule.percent).then(|| rule.action())
    }
}

fn exempt(path: &str) -> bool {
    path.starts_with("/health/")
        || path == "/metrics"
        || path.starts_with("/ops/")
        || path.starts_with("/admin/")
}

/// Axum middleware: `router.layer(from_fn_with_state(injector, fault::middleware))`.
pub async fn middleware(State(inj): State<FaultInjector>, req: Request, next: Next) -> Response {
    let Some(action) = inj.decide(req.uri().path()) else {
        return next.run(req).await;
    };
    let count = |kind| {
        if let Some(m) = &inj.0.metrics {
            m.fault_injected(kind);
        }
    };
    match action {
        FaultAction::Delay(d) => {
            count("delay");
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        FaultAction::Error(status) => {
            count("error");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            ApiError::new(status, "injected_fault", "fault injected by shoal chaos").into_response()
        }
        FaultAction::Abort => {
            count("abort");
            // A body that fails before its first byte makes the server drop the
            // connection without writing the response: what a caller sees when a
            // process dies mid-request. The JSON content type keeps the error
            // normaliser from reading (and replacing) the body.
            let mut res = Response::new(axum::body::Body::new(AbortBody));
            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
    }
}

struct AbortBody;

impl http_body::Body for AbortBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "connection aborted by an injected fault",
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::resilience::FaultKind;

    fn rule(service: &str, route: Option<&str>, percent: f64) -> FaultRule {
        FaultRule {
            id: "f-1".into(),
            service: service.into(),
            route: route.map(str::to_string),
            kind: FaultKind::Error,
            delay_ms: None,
            status: Some(503),
            percent,
            duration_ms: None,
            expires_at_ms: None,
        }
    }

    #[test]
    fn rules_of_other_services_and_ops_paths_are_left_alone() {
        let inj = FaultInjector::new("orders", None);
        inj.set(vec![rule("payment", None, 100.0)]);
        assert!(inj.rules().is_empty());
        inj.set(vec![rule("orders", Some("/api/orders"), 100.0)]);
        assert_eq!(inj.decide("/api/orders/1"), Some(FaultAction::Error(503)));
        assert_eq!(inj.decide("/api/other"), None);
        inj.set(vec![rule("orders", None, 100.0)]);
        assert_eq!(inj.decide("/health/ready"), None);
        assert_eq!(inj.decide("/metrics"), None);
        assert_eq!(inj.decide("/ops/breakers"), None);
        assert_eq!(inj.decide("/x"), Some(FaultAction::Error(503)));
    }

    #[test]
    fn percentage_hits_about_that_share() {
        let inj = FaultInjector::new("orders", None);
        inj.set(vec![rule("orders", None, 30.0)]);
        let hits = (0..10_000).filter(|_| inj.decide("/x").is_some()).count();
        // 30% of 10,000 with a generous margin (the standard deviation is about 46).
        assert!((2_700..3_300).contains(&hits), "{hits}");
        inj.set(vec![rule("orders", None, 0.0)]);
        assert!((0..1_000).all(|_| inj.decide("/x").is_none()));
    }
}
