//! Wire types of resilience operations (documented in `docs/resilience.md`):
//! fault-injection rules, which the control plane holds and every process applies to
//! its own incoming requests, and circuit breaker listings.

use serde::{Deserialize, Serialize};

/// Limits that keep the fault table small: it is copied to every process.
pub mod limits {
    /// Most rules the control plane holds at once.
    pub const MAX_RULES: usize = 256;
    /// Longest delay a rule may add.
    pub const MAX_DELAY_MS: u64 = 600_000;
    /// Longest a rule may last.
    pub const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;
    /// Longest route prefix.
    pub const MAX_ROUTE_LEN: usize = 256;
}

/// What kind of fault a rule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Hold the request for `delay_ms`, then serve it normally.
    Delay,
    /// Answer at once with `status` (4xx or 5xx) and a JSON error body.
    Error,
    /// Close the connection without an answer, as a crashed process would.
    Abort,
}

/// What a fault does to a request it hits (a checked [`FaultRule`]'s action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Hold the request this long, then serve it.
    Delay(std::time::Duration),
    /// Answer with this status.
    Error(u16),
    /// Close the connection without an answer.
    Abort,
}

/// `POST /v1/faults`: a fault to inject into one service's incoming requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// Assigned by the control plane; ignored when sent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The service whose incoming requests are hit (`gateway` for the gateway).
    pub service: String,
    /// Only requests whose path starts with this prefix (whole segments); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// What happens to a hit request.
    pub kind: FaultKind,
    /// Added latency, for `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Status to answer with, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Share of matching requests hit, 0 to 100.
    #[serde(default = "full")]
    pub percent: f64,
    /// How long the rule lasts from when it is added; forever when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When the rule stops (Unix ms); set by the control plane from `duration_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

fn full() -> f64 {
    100.0
}

impl FaultRule {
    /// Check every field; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        crate::names::validate_service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        if let Some(route) = &self.route {
            if !route.starts_with('/') || route.len() > limits::MAX_ROUTE_LEN {
                return Err(format!(
                    "route: must start with '/' and be at most {} characters",
                    limits::MAX_ROUTE_LEN
                ));
            }
        }
        if !(0.0..=100.0).contains(&self.percent) {
            return Err("percent: must be between 0 and 100".into());
        }
        match (self.kind, self.delay_ms, self.status) {
            (FaultKind::Delay, Some(d), None) if (1..=limits::MAX_DELAY_MS).contains(&d) => {}
            (FaultKind::Delay, _, _) => {
                return Err(format!(
                    "delay_ms: a delay needs delay_ms of 1 to {} (and no status)",
                    limits::MAX_DELAY_MS
                ))
            }
            (FaultKind::Error, None, Some(s)) if (400..=599).contains(&s) => {}
            (FaultKind::Error, _, _) => {
                return Err("status: an error needs a 4xx or 5xx status (and no delay_ms)".into())
            }
            (FaultKind::Abort, None, None) => {}
            (FaultKind::Abort, _, _) => {
                return Err("kind: an abort takes neither delay_ms nor status".into())
            }
        }
        if let Some(d) = self.duration_ms {
            if d == 0 || d > limits::MAX_DURATION_MS {
                return Err(format!(
                    "duration_ms: must be 1 to {} ms",
                    limits::MAX_DURATION_MS
                ));
            }
        }
        Ok(())
    }

    /// The rule's action (for a rule that passed [`FaultRule::validate`]).
    pub fn action(&self) -> FaultAction {
        match self.kind {
            FaultKind::Delay => {
                FaultAction::Delay(std::time::Duration::from_millis(self.delay_ms.unwrap_or(0)))
            }
            FaultKind::Error => FaultAction::Error(self.status.unwrap_or(500)),
            FaultKind::Abort => FaultAction::Abort,
        }
    }

    /// Whether the rule applies to `path` at Unix time `now_ms`.
    pub fn matches(&self, path: &str, now_ms: u64) -> bool {
        if self.expires_at_ms.is_some_and(|t| now_ms >= t) {
            return false;
        }
        match &self.route {
            None => true,
            Some(prefix) if prefix == "/" => true,
            Some(prefix) => {
                path.starts_with(prefix.as_str())
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
        }
    }
}

/// `GET /v1/faults`: the rules in force, with the table's change index for watches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultList {
    /// Grows on every change; pass it back as `?index=` to wait for the next one.
    pub index: u64,
    /// The rules, oldest first.
    pub faults: Vec<FaultRule>,
}

/// A circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls fail fast without reaching the dependency.
    Open,
    /// A few probe calls test whether the dependency has healed.
    HalfOpen,
}

impl BreakerState {
    /// The state's name on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// One circuit breaker as a process reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerInfo {
    /// The process that owns it: a service instance id, or `gateway`.
    pub owner: String,
    /// The service it guards calls to.
    pub dependency: String,
    /// The route prefix it is scoped to, when it guards one route only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The policy that configured it.
    pub policy: String,
    /// Its state now.
    pub state: BreakerState,
    /// Calls counted in its window.
    pub calls: u64,
    /// Failure rate over the window, in percent.
    pub failure_rate: f64,
    /// Slow-call rate over the window, in percent.
    pub slow_call_rate: f64,
    /// Milliseconds since its last state change.
    pub since_ms: u64,
}

/// `GET /v1/breakers` (control plane), `GET /ops/breakers` (each process),
/// `GET /admin/breakers` (gateway).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BreakerList {
    /// Every breaker, ordered by owner, dependency and route.
    pub breakers: Vec<BreakerInfo>,
    /// Instances that did not answer (their breakers are missing from the list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_json_is_flat_and_checked() {
        let r: FaultRule = serde_json::from_str(
            r#"{"service":"payment","kind":"error","status":503,"percent":50}"#,
        )
        .unwrap();
        assert_eq!(r.action(), FaultAction::Error(503));
        assert!(r.validate().is_ok());
        let r: FaultRule = serde_json::from_str(r#"{"service":"payment","kind":"abort"}"#).unwrap();
        assert_eq!(r.percent, 100.0);
        for bad in [
            r#"{"service":"payment","kind":"error","status":200}"#,
            r#"{"service":"payment","kind":"delay","delay_ms":0}"#,
            r#"{"service":"payment","kind":"delay"}"#,
            r#"{"service":"payment","kind":"abort","status":500}"#,
            r#"{"service":"payment","kind":"abort","percent":101}"#,
            r#"{"service":"Pay ment","kind":"abort"}"#,
            r#"{"service":"payment","kind":"abort","route":"x"}"#,
        ] {
            let r: FaultRule = serde_json::from_str(bad).unwrap();
            assert!(r.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<FaultRule>(
            r#"{"service":"payment","kind":"abort","surprise":1}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<FaultRule>(r#"{"service":"payment","kind":"explode"}"#).is_err()
        );
    }

    #[test]
    fn routes_match_whole_segments_and_rules_expire() {
        let mut r: FaultRule =
            serde_json::from_str(r#"{"service":"a","kind":"abort","route":"/api/orders"}"#)
                .unwrap();
        assert!(r.matches("/api/orders", 0));
        assert!(r.matches("/api/orders/7", 0));
        assert!(!r.matches("/api/ordersx", 0));
        assert!(!r.matches("/api", 0));
        r.expires_at_ms = Some(100);
        assert!(r.matches("/api/orders", 99));
        assert!(!r.matches("/api/orders", 100));
    }
}
