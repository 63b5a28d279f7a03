use crate::Discovery;
use serde::Deserialize;
use shoal_core::registry::Instance;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::time::Instant;

/// How a [`Balancer`] chooses among healthy instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each instance in turn.
    RoundRobin,
    /// Two instances at random, the one with fewer outstanding requests: close to
    /// least-loaded without a global scan, and it steers away from a slow instance.
    #[default]
    PowerOfTwoChoices,
}

/// Passive outlier detection: an instance that fails several calls in a row is
/// left out for a while, before the registry's health check notices (or when the
/// health check passes but real calls fail). Ejections double with each repeat, up
/// to a cap, and never leave more than a share of a service's instances out.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (refused connection, failed call, 5xx answer) that eject
    /// an instance; 0 turns detection off.
    pub consecutive_failures: u32,
    /// First ejection's length; each further ejection of the same instance doubles it.
    pub base_ejection_ms: u64,
    /// Longest ejection.
    pub max_ejection_ms: u64,
    /// Most of a service's instances ejected at once, in percent.
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

/// One instance as the balancer tracks it.
#[derive(Debug)]
pub struct Endpoint {
    /// The registry's view of the instance.
    pub instance: Instance,
    inflight: AtomicUsize,
    /// Calls in a row that failed.
    failures: AtomicU32,
    /// Times it was ejected (sets the next ejection's length).
    ejections: AtomicU32,
    /// Ejected until this many milliseconds after [`epoch`]; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// The instance's address as a URI authority, parsed once rather than per call.
    authority: Option<http::uri::Authority>,
    /// The same as a `Host` header (which the client would otherwise format per call).
    host: Option<http::HeaderValue>,
}

/// The zero of the balancer's ejection clock (tokio's, so tests can pause it).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // At least 1, so 0 can mean "not ejected".
    (Instant::now().duration_since(epoch()).as_millis() as u64).max(1)
}

impl Endpoint {
    /// The instance's address as a URI authority (`None` only if it could not be
    /// parsed as one, which a socket address always can).
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.authority.as_ref()
    }

    /// The instance's address as a `Host` header value.
    pub fn host_header(&self) -> Option<&http::HeaderValue> {
        self.host.as_ref()
    }

    fn new(instance: Instance) -> Self {
        let addr = instance.addr.to_string();
        Self {
            host: http::HeaderValue::from_str(&addr).ok(),
            authority: http::uri::Authority::try_from(addr).ok(),
            instance,
            inflight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    /// Requests sent to this instance and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// True while passive outlier detection keeps it out.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }
}

/// Counts one outstanding request on an endpoint until dropped; hold it until the
/// response body is finished.
#[derive(Debug)]
pub struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    fn new(ep: Arc<Endpoint>) -> Self {
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        Self(ep)
    }

    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ServiceSet {
    index: u64,
    endpoints: Vec<Arc<Endpoint>>,
    next: usize,
}

/// Chooses a healthy instance of a service for each request.
#[derive(Clone)]
pub struct Balancer {
    discovery: Discovery,
    strategy: Strategy,
    outlier: Arc<OutlierConfig>,
    sets: Arc<Mutex<HashMap<String, ServiceSet>>>,
}

impl Balancer {
    /// A balancer over `discovery`'s catalog.
    pub fn new(discovery: Discovery, strategy: Strategy) -> Self {
        Self {
            discovery,
            strategy,
            outlier: Arc::new(OutlierConfig::default()),
            sets: Arc::default(),
        }
    }

    /// The same balancer with `cfg`'s outlier detection.
    pub fn with_outlier(mut self, cfg: OutlierConfig) -> Self {
        self.outlier = Arc::new(cfg);
        self
    }

    /// Report how a call to `ep` went; enough failures in a row eject it (see
    /// [`OutlierConfig`]), a success clears the count.
    pub fn report(&self, service: &str, ep: &Endpoint, ok: bool) {
        let cfg = &self.outlier;
        if ok {
            ep.failures.store(0, Ordering::Relaxed);
            return;
        }
        if cfg.consecutive_failures == 0 {
            return;
        }
        let failures = ep.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < cfg.consecutive_failures || ep.ejected() {
            return;
        }
        // Never eject past the share: a service whose instances all fail is better
        // served by trying them (and the breaker) than by having none.
        let sets = self
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(set) = sets.get(service) else { return };
        let total = set.endpoints.len().max(1);
        let ejected = set.endpoints.iter().filter(|e| e.ejected()).count();
        if (ejected + 1) * 100 > total * usize::from(cfg.max_ejected_percent) {
            return;
        }
        let n = ep.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let len = cfg
            .base_ejection_ms
            .saturating_mul(1u64 << n)
            .min(cfg.max_ejection_ms);
        ep.ejected_until_ms.store(now_ms() + len, Ordering::Relaxed);
        ep.failures.store(0, Ordering::Relaxed);
        tracing::warn!(
            service,
            instance = %ep.instance.id,
            ejection_ms = len,
            "instance ejected after {failures} failures in a row"
        );
    }

    /// The discovery cache it reads.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// A healthy instance of `service`, none of whose ids are in `exclude` (instances
    /// that already refused this request). `None` when there is no such instance.
    pub fn pick(&self, service: &str, exclude: &[String]) -> Option<InflightGuard> {
        self.pick_version(service, exclude, None)
    }

    /// Like [`Balancer::pick`], among the instances of `version` only when given
    /// (the gateway's weighted routes pick a version first).
    pub fn pick_version(
        &self,
        service: &str,
        exclude: &[String],
        version: Option<&str>,
    ) -> Option<InflightGuard> {
        let catalog = self.discovery.catalog();
        let mut sets = self
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = sets
            .entry(service.to_string())
            .or_insert_with(|| ServiceSet {
                index: u64::MAX,
                endpoints: Vec::new(),
                next: 0,
            });
        if set.index != catalog.index {
            // Keep the Endpoint (and its outstanding count) of instances that stay.
            let old: HashMap<&str, &Arc<Endpoint>> = set
                .endpoints
                .iter()
                .map(|e| (e.instance.id.as_str(), e))
                .collect();
            let endpoints = catalog
                .instances(service)
                .iter()
                .filter(|i| i.healthy)
                .map(|i| match old.get(i.id.as_str()) {
                    Some(e) if e.instance == *i => Arc::clone(e),
                    _ => Arc::new(Endpoint::new(i.clone())),
                })
                .collect();
            set.endpoints = endpoints;
            set.index = catalog.index;
        }
        let mut candidates: Vec<&Arc<Endpoint>> = set
            .endpoints
            .iter()
            .filter(|e| !exclude.contains(&e.instance.id))
            .filter(|e| version.is_none_or(|v| e.instance.version == v))
            .collect();
        if candidates.iter().any(|e| !e.ejected()) {
            candidates.retain(|e| !e.ejected());
        }
        let chosen = match (candidates.len(), self.strategy) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (n, Strategy::RoundRobin) => {
                set.next = set.next.wrapping_add(1);
                candidates[set.next % n]
            }
            (n, Strategy::PowerOfTwoChoices) => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (candidates[a], candidates[b]);
                if eb.outstanding() < ea.outstanding() {
                    eb
                } else {
                    ea
                }
            }
        };
        Some(InflightGuard::new(Arc::clone(chosen)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::registry::{Catalog, ServiceEntry};

    fn inst(id: &str, port: u16, healthy: bool) -> Instance {
        Instance {
            id: id.into(),
            service: "catalog".into(),
            version: "1".into(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            pid: None,
            metadata: Default::default(),
            healthy,
            registered_at_ms: 0,
        }
    }

    fn balancer(strategy: Strategy, instances: Vec<Instance>) -> Balancer {
        let d = Discovery::fixed(Catalog {
            index: 1,
            services: vec![ServiceEntry {
                name: "catalog".into(),
                instances,
            }],
        });
        Balancer::new(d, strategy)
    }

    #[test]
    fn round_robin_alternates_and_skips_unhealthy() {
        let b = balancer(
            Strategy::RoundRobin,
            vec![inst("a", 1, true), inst("b", 2, true), inst("c", 3, false)],
        );
        let mut counts = HashMap::new();
        for _ in 0..100 {
            let g = b.pick("catalog", &[]).unwrap();
            *counts.entry(g.endpoint().instance.id.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.get("a"), Some(&50));
        assert_eq!(counts.get("b"), Some(&50));
        assert_eq!(counts.get("c"), None);
        assert!(b.pick("orders", &[]).is_none());
        assert!(b.pick("catalog", &["a".into(), "b".into()]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failing_instances_are_ejected_for_a_while_but_never_all() {
        let b = balancer(
            Strategy::RoundRobin,
            vec![inst("a", 1, true), inst("b", 2, true)],
        )
        .with_outlier(OutlierConfig {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            max_ejection_ms: 10_000,
            max_ejected_percent: 50,
        });
        let a = || {
            let g = b.pick("catalog", &["b".into()]).unwrap();
            assert_eq!(g.endpoint().instance.id, "a");
            g
        };
        // Two failures, a success, two failures: not in a row, not ejected.
        for ok in [false, false, true, false, false] {
            b.report("catalog", a().endpoint(), ok);
        }
        assert!(!a().endpoint().ejected());
        b.report("catalog", a().endpoint(), false);
        assert!(a().endpoint().ejected());
        for _ in 0..10 {
            assert_eq!(b.pick("catalog", &[]).unwrap().endpoint().instance.id, "b");
        }
        // b fails too, but ejecting it would leave out more than half: it stays.
        let gb = b.pick("catalog", &[]).unwrap();
        for _ in 0..5 {
            b.report("catalog", gb.endpoint(), false);
        }
        assert!(!gb.endpoint().ejected());
        drop(gb);
        // The ejection ends by itself; a second one lasts twice as long.
        tokio::time::advance(std::time::Duration::from_millis(1_001)).await;
        assert!(!a().endpoint().ejected());
        for _ in 0..3 {
            b.report("catalog", a().endpoint(), false);
        }
        tokio::time::advance(std::time::Duration::from_millis(1_500)).await;
        assert!(a().endpoint().ejected());
        tokio::time::advance(std::time::Duration::from_millis(600)).await;
        assert!(!a().endpoint().ejected());
    }

    #[test]
    fn a_version_pins_the_instances_picked() {
        let mut v2 = inst("c", 3, true);
        v2.version = "2".into();
        let b = balancer(Strategy::RoundRobin, vec![inst("a", 1, true), v2]);
        for _ in 0..10 {
            let g = b.pick_version("catalog", &[], Some("2")).unwrap();
            assert_eq!(g.endpoint().instance.id, "c");
        }
        assert!(b.pick_version("catalog", &[], Some("3")).is_none());
    }

    #[test]
    fn power_of_two_steers_away_from_busy_instances() {
        let b = balancer(
            Strategy::PowerOfTwoChoices,
            vec![inst("a", 1, true), inst("b", 2, true)],
        );
        // Hold 5 requests on whichever instance comes first.
        let held: Vec<_> = (0..5).map(|_| b.pick("catalog", &[]).unwrap()).collect();
        let counts = held.iter().fold(HashMap::new(), |mut m, g| {
            *m.entry(g.endpoint().instance.id.clone()).or_insert(0) += 1;
            m
        });
        // With two instances, P2C always compares both: load stays within one.
        let a: usize = *counts.get("a").unwrap_or(&0);
        let b_ = *counts.get("b").unwrap_or(&0);
        assert!(a.abs_diff(b_) <= 1, "a={a} b={b_}");
        let busy = if a > b_ { "a" } else { "b" };
        for _ in 0..20 {
            let g = b.pick("catalog", &[]).unwrap();
            assert_ne!(g.endpoint().instance.id, busy);
            drop(g);
        }
        drop(held);
    }
}
