use crate::Discovery;
use shoal_core::registry::Instance;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// One instance as the balancer tracks it.
#[derive(Debug)]
pub struct Endpoint {
    /// The registry's view of the instance.
    pub instance: Instance,
    inflight: AtomicUsize,
}

impl Endpoint {
    /// Requests sent to this instance and not yet finished.
    pub fn outstanding(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
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
    sets: Arc<Mutex<HashMap<String, ServiceSet>>>,
}

impl Balancer {
    /// A balancer over `discovery`'s catalog.
    pub fn new(discovery: Discovery, strategy: Strategy) -> Self {
        Self {
            discovery,
            strategy,
            sets: Arc::default(),
        }
    }

    /// The discovery cache it reads.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// A healthy instance of `service`, none of whose ids are in `exclude` (instances
    /// that already refused this request). `None` when there is no such instance.
    pub fn pick(&self, service: &str, exclude: &[String]) -> Option<InflightGuard> {
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
                    _ => Arc::new(Endpoint {
                        instance: i.clone(),
                        inflight: AtomicUsize::new(0),
                    }),
                })
                .collect();
            set.endpoints = endpoints;
            set.index = catalog.index;
        }
        let candidates: Vec<&Arc<Endpoint>> = set
            .endpoints
            .iter()
            .filter(|e| !exclude.contains(&e.instance.id))
            .collect();
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
