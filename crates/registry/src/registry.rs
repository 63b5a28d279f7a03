use crate::config::RegistryConfig;
use crate::store::{self, Persisted};
use shoal_core::registry::{Catalog, Instance, Registered, Registration, ServiceEntry};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Why the registry refused an operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The registration broke a rule; the message names the field.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// No instance has that id (expired, deregistered, or never registered).
    #[error("no instance with id {0:?}")]
    UnknownInstance(String),
    /// The registry holds its maximum number of instances.
    #[error("the registry is full ({0} instances)")]
    Full(usize),
}

struct Entry {
    instance: Instance,
    ttl: Duration,
    expires_at: Instant,
    /// Consecutive failed probes.
    fails: u32,
    /// Consecutive passed probes.
    passes: u32,
}

#[derive(Default)]
struct State {
    /// Instances registered here.
    entries: BTreeMap<String, Entry>,
    /// Instances other control planes registered, as etcd has them (etcd mode
    /// only; `crate::etcd`). An id registered here shadows the same id there.
    remote: BTreeMap<String, Instance>,
    index: u64,
}

struct Inner {
    cfg: RegistryConfig,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    /// Wakes the writer of the state file.
    dirty: Notify,
    /// Clients for instances that serve mutual TLS only (`tls = "mutual"` in their
    /// metadata), with the control plane's own identity; set once at start.
    probe_tls: std::sync::OnceLock<ProbeClients>,
}

/// The TLS clients probes (and the control plane's fan-outs) use.
pub type ProbeClients = shoal_tls::TlsClients<http_body_util::Empty<bytes::Bytes>>;

/// One instance as the prober sees it.
pub(crate) struct Target {
    pub(crate) id: String,
    pub(crate) service: String,
    pub(crate) addr: std::net::SocketAddr,
    /// It serves mutual TLS only.
    pub(crate) tls: bool,
}

/// The registry: cheap to clone, shared by the HTTP API, the sweeper and the prober.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    /// A registry with the given settings, restoring instances from the state file
    /// when there is one. Restored instances get a fresh lease: those still alive
    /// heartbeat within it, the others expire.
    pub fn new(cfg: RegistryConfig) -> Result<Self, shoal_core::Error> {
        cfg.validate()?;
        let mut state = State::default();
        if let Some(path) = &cfg.state_file {
            if let Some(p) = store::load(path)? {
                let now = Instant::now();
                // The index only grows, even across restarts, so a client's last
                // index never looks newer than ours.
                state.index = p.index + 1;
                for (instance, ttl_ms) in p.instances {
                    let ttl = Duration::from_millis(ttl_ms);
                    state.entries.insert(
                        instance.id.clone(),
                        Entry {
                            instance,
                            ttl,
                            expires_at: now + ttl,
                            fails: 0,
                            passes: 0,
                        },
                    );
                }
                tracing::info!(
                    restored = state.entries.len(),
                    index = state.index,
                    "registry state restored"
                );
            }
        }
        let (changes, _) = watch::channel(state.index);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(state),
                changes,
                dirty: Notify::new(),
                probe_tls: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    /// Probe instances that serve mutual TLS with these clients (the control
    /// plane's identity). Without them such instances fail their probes. Only the
    /// first call takes effect.
    pub fn set_probe_tls(&self, clients: ProbeClients) {
        let _ = self.inner.probe_tls.set(clients);
    }

    /// The clients of [`Registry::set_probe_tls`], if set.
    pub fn probe_tls(&self) -> Option<&ProbeClients> {
        self.inner.probe_tls.get()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-changed (every
        // change is one insert or remove), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self, state: &mut State) {
        state.index += 1;
        self.inner.changes.send_replace(state.index);
        self.inner.dirty.notify_one();
    }

    /// Register (or re-register) an instance.
    pub fn register(&self, reg: Registration) -> Result<Registered, RegistryError> {
        reg.validate().map_err(RegistryError::Invalid)?;
        let ttl_ms = reg.ttl_ms.unwrap_or(self.inner.cfg.default_ttl_ms);
        let ttl = Duration::from_millis(ttl_ms);
        let id = reg.id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                reg.service,
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )
        });
        let mut state = self.lock();
        if !state.entries.contains_key(&id) && state.entries.len() >= self.inner.cfg.max_instances {
            return Err(RegistryError::Full(self.inner.cfg.max_instances));
        }
        let instance = Instance {
            id: id.clone(),
            service: reg.service,
            version: reg.version,
            addr: reg.addr,
            pid: reg.pid,
            metadata: reg.metadata,
            // An instance registers once it is ready to serve; probes take it out
            // if that stops being true.
            healthy: true,
            registered_at_ms: shoal_core::unix_ms(),
        };
        tracing::info!(id = %id, service = %instance.service, addr = %instance.addr, "instance registered");
        state.entries.insert(
            id.clone(),
            Entry {
                instance,
                ttl,
                expires_at: Instant::now() + ttl,
                fails: 0,
                passes: 0,
            },
        );
        self.changed(&mut state);
        Ok(Registered {
            id,
            ttl_ms,
            heartbeat_interval_ms: (ttl_ms / 3).max(1),
        })
    }

    /// Renew an instance's lease.
    pub fn heartbeat(&self, id: &str) -> Result<u64, RegistryError> {
        let mut state = self.lock();
        let entry = state
            .entries
            .get_mut(id)
            .ok_or_else(|| RegistryError::UnknownInstance(id.to_string()))?;
        entry.expires_at = Instant::now() + entry.ttl;
        Ok(entry.ttl.as_millis() as u64)
    }

    /// Remove an instance (graceful shutdown).
    pub fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let mut state = self.lock();
        match state.entries.remove(id) {
            Some(e) => {
                tracing::info!(id = %id, service = %e.instance.service, "instance deregistered");
                self.changed(&mut state);
                Ok(())
            }
            None => Err(RegistryError::UnknownInstance(id.to_string())),
        }
    }

    /// Remove every instance whose lease ran out; returns their ids.
    pub fn expire(&self) -> Vec<String> {
        let now = Instant::now();
        let mut state = self.lock();
        let gone: Vec<String> = state
            .entries
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(e) = state.entries.remove(id) {
                tracing::warn!(id = %id, service = %e.instance.service, "instance lease expired");
            }
        }
        if !gone.is_empty() {
            self.changed(&mut state);
        }
        gone
    }

    /// Record one probe result; flips health after the configured number of
    /// consecutive results. Returns the new health when it changed.
    pub fn record_probe(&self, id: &str, passed: bool) -> Option<bool> {
        let h = &self.inner.cfg.health;
        let mut state = self.lock();
        let entry = state.entries.get_mut(id)?;
        if passed {
            entry.passes += 1;
            entry.fails = 0;
        } else {
            entry.fails += 1;
            entry.passes = 0;
        }
        let flip = if entry.instance.healthy && entry.fails >= h.unhealthy_threshold {
            Some(false)
        } else if !entry.instance.healthy && entry.passes >= h.healthy_threshold {
            Some(true)
        } else {
            None
        };
        if let Some(healthy) = flip {
            entry.instance.healthy = healthy;
            let (service, id) = (entry.instance.service.clone(), entry.instance.id.clone());
            if healthy {
                tracing::info!(id = %id, service = %service, "instance healthy again");
            } else {
                tracing::warn!(id = %id, service = %service, "instance failed health checks");
            }
            self.changed(&mut state);
        }
        flip
    }

    /// Every instance, for the prober.
    pub(crate) fn targets(&self) -> Vec<Target> {
        self.lock()
            .entries
            .values()
            .map(|e| Target {
                id: e.instance.id.clone(),
                service: e.instance.service.clone(),
                addr: e.instance.addr,
                tls: shoal_tls::serves_mutual_tls(&e.instance.metadata),
            })
            .collect()
    }

    /// Instances registered here, with their leases (what etcd mode writes out).
    pub(crate) fn local_instances(&self) -> Vec<(Instance, Duration)> {
        self.lock()
            .entries
            .values()
            .map(|e| (e.instance.clone(), e.ttl))
            .collect()
    }

    /// A receiver of every new index.
    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Replace every remote instance (after a full read of etcd).
    pub(crate) fn replace_remote(&self, mut remote: BTreeMap<String, Instance>) {
        let max = self.inner.cfg.max_instances;
        if remote.len() > max {
            tracing::warn!(
                remote = remote.len(),
                max,
                "more remote instances than max_instances; the rest are left out"
            );
            remote = remote.into_iter().take(max).collect();
        }
        let mut state = self.lock();
        if state.remote != remote {
            state.remote = remote;
            self.changed(&mut state);
        }
    }

    /// Add or change one remote instance.
    pub(crate) fn upsert_remote(&self, instance: Instance) {
        let mut state = self.lock();
        if state.remote.get(&instance.id) == Some(&instance) {
            return;
        }
        if !state.remote.contains_key(&instance.id)
            && state.remote.len() >= self.inner.cfg.max_instances
        {
            tracing::warn!(id = %instance.id, "remote instance left out: max_instances reached");
            return;
        }
        tracing::debug!(id = %instance.id, service = %instance.service, "remote instance");
        state.remote.insert(instance.id.clone(), instance);
        self.changed(&mut state);
    }

    /// Remove one remote instance.
    pub(crate) fn remove_remote(&self, id: &str) {
        let mut state = self.lock();
        if state.remote.remove(id).is_some() {
            self.changed(&mut state);
        }
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.lock().index
    }

    /// One instance (registered here, or through another control plane in etcd mode).
    pub fn instance(&self, id: &str) -> Option<Instance> {
        let state = self.lock();
        state
            .entries
            .get(id)
            .map(|e| e.instance.clone())
            .or_else(|| state.remote.get(id).cloned())
    }

    /// The whole catalog now.
    pub fn catalog(&self) -> Catalog {
        let state = self.lock();
        let mut services: BTreeMap<&str, Vec<Instance>> = BTreeMap::new();
        for e in state.entries.values() {
            services
                .entry(e.instance.service.as_str())
                .or_default()
                .push(e.instance.clone());
        }
        for i in state.remote.values() {
            if !state.entries.contains_key(&i.id) {
                services
                    .entry(i.service.as_str())
                    .or_default()
                    .push(i.clone());
            }
        }
        for instances in services.values_mut() {
            instances.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Catalog {
            index: state.index,
            services: services
                .into_iter()
                .map(|(name, instances)| ServiceEntry {
                    name: name.to_string(),
                    instances,
                })
                .collect(),
        }
    }

    /// The catalog once its index differs from `index`, or unchanged after `wait`.
    ///
    /// A client passes the last index it saw. An index other than the current one
    /// (older, or from before a restart) answers at once.
    pub async fn wait_for_change(&self, index: u64, wait: Duration) -> Catalog {
        shoal_core::longpoll::wait_for_change(
            self.inner.changes.subscribe(),
            index,
            wait.min(Duration::from_millis(self.inner.cfg.max_wait_ms)),
        )
        .await;
        self.catalog()
    }

    /// Run the lease sweeper, the prober and the state writer until `shutdown` resolves,
    /// then write the state one last time.
    pub async fn run_background(&self, shutdown: impl std::future::Future<Output = ()>) {
        let sweep = {
            let reg = self.clone();
            async move {
                let mut tick =
                    tokio::time::interval(Duration::from_millis(reg.inner.cfg.sweep_interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    reg.expire();
                }
            }
        };
        let probe = crate::health::run(self.clone());
        let persist = self.run_writer();
        let etcd = {
            let reg = self.clone();
            async move {
                match reg.inner.cfg.etcd.clone() {
                    Some(cfg) => crate::etcd::run(reg, cfg).await,
                    None => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            _ = sweep => {}
            _ = probe => {}
            _ = persist => {}
            _ = etcd => {}
            _ = shutdown => {}
        }
        if let Err(e) = self.write_state().await {
            tracing::error!(error = %e, "writing registry state at shutdown failed");
        }
    }

    async fn run_writer(&self) {
        if self.inner.cfg.state_file.is_none() {
            return std::future::pending().await;
        }
        loop {
            self.inner.dirty.notified().await;
            if let Err(e) = self.write_state().await {
                // Serving goes on; the next change tries again.
                tracing::error!(error = %e, "writing registry state failed");
            }
        }
    }

    /// Write the state file now (no-op without one).
    pub async fn write_state(&self) -> Result<(), shoal_core::Error> {
        let Some(path) = self.inner.cfg.state_file.clone() else {
            return Ok(());
        };
        let snapshot = {
            let state = self.lock();
            Persisted {
                index: state.index,
                instances: state
                    .entries
                    .values()
                    .map(|e| (e.instance.clone(), e.ttl.as_millis() as u64))
                    .collect(),
            }
        };
        tokio::task::spawn_blocking(move || store::save(&path, &snapshot))
            .await
            .map_err(|e| shoal_core::Error::internal("state writer panicked").with_source(e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(service: &str, port: u16) -> Registration {
        Registration {
            service: service.into(),
            version: "1.0.0".into(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            id: None,
            pid: Some(42),
            metadata: Default::default(),
            ttl_ms: Some(3_000),
        }
    }

    fn registry() -> Registry {
        Registry::new(RegistryConfig::default()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_without_heartbeat_and_lives_with_it() {
        let r = registry();
        let a = r.register(reg("catalog", 1)).unwrap();
        let b = r.register(reg("catalog", 2)).unwrap();
        assert_eq!(a.heartbeat_interval_ms, 1_000);
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(1_000)).await;
            r.heartbeat(&a.id).unwrap();
            r.expire();
        }
        // b missed its 3 s lease; a kept renewing.
        assert!(r.instance(&a.id).is_some());
        assert!(r.instance(&b.id).is_none());
        assert_eq!(
            r.heartbeat(&b.id),
            Err(RegistryError::UnknownInstance(b.id.clone()))
        );
        tokio::time::advance(Duration::from_millis(2_999)).await;
        assert!(r.expire().is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.expire(), vec![a.id]);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_expires_on_its_own() {
        let r = registry();
        let a = r.register(reg("catalog", 1)).unwrap();
        let bg = {
            let r = r.clone();
            tokio::spawn(async move { r.run_background(std::future::pending()).await })
        };
        tokio::time::sleep(Duration::from_millis(3_300)).await;
        assert!(r.instance(&a.id).is_none());
        bg.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_answers_on_change_and_times_out_unchanged() {
        let r = registry();
        let idx = r.index();
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_for_change(idx, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        r.register(reg("catalog", 1)).unwrap();
        let c = waiter.await.unwrap();
        assert_eq!(c.index, idx + 1);
        assert_eq!(c.instances("catalog").len(), 1);

        let start = Instant::now();
        let c = r.wait_for_change(c.index, Duration::from_secs(5)).await;
        assert_eq!(c.index, idx + 1);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // An index we never had (a client from before a restart) answers at once.
        let start = Instant::now();
        r.wait_for_change(c.index + 100, Duration::from_secs(5))
            .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn health_flips_after_thresholds() {
        let r = registry(); // unhealthy after 2 fails, healthy after 1 pass
        let a = r.register(reg("catalog", 1)).unwrap();
        let i0 = r.index();
        assert_eq!(r.record_probe(&a.id, false), None);
        assert_eq!(r.record_probe(&a.id, true), None);
        assert_eq!(r.record_probe(&a.id, false), None);
        assert_eq!(r.record_probe(&a.id, false), Some(false));
        assert!(!r.instance(&a.id).unwrap().healthy);
        assert_eq!(r.index(), i0 + 1);
        assert_eq!(r.record_probe(&a.id, true), Some(true));
        assert!(r.instance(&a.id).unwrap().healthy);
    }

    #[test]
    fn re_registering_an_id_replaces_it_and_limits_hold() {
        let r = Registry::new(RegistryConfig {
            max_instances: 2,
            ..Default::default()
        })
        .unwrap();
        let mut x = reg("catalog", 1);
        x.id = Some("catalog-x".into());
        r.register(x.clone()).unwrap();
        x.addr = "127.0.0.1:9".parse().unwrap();
        r.register(x).unwrap();
        assert_eq!(r.catalog().instances("catalog").len(), 1);
        assert_eq!(r.instance("catalog-x").unwrap().addr.port(), 9);
        r.register(reg("catalog", 2)).unwrap();
        assert_eq!(r.register(reg("catalog", 3)), Err(RegistryError::Full(2)));
        let mut bad = reg("catalog", 4);
        bad.version = String::new();
        assert!(
            matches!(r.register(bad), Err(RegistryError::Invalid(m)) if m.starts_with("version"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("shoal-reg-{}", uuid::Uuid::new_v4()));
        let cfg = RegistryConfig {
            state_file: Some(dir.join("registry.json")),
            ..Default::default()
        };
        let r = Registry::new(cfg.clone()).unwrap();
        let a = r.register(reg("catalog", 1)).unwrap();
        r.write_state().await.unwrap();
        let idx = r.index();
        drop(r);
        let r2 = Registry::new(cfg).unwrap();
        assert!(r2.index() > idx);
        assert_eq!(r2.instance(&a.id).unwrap().addr.port(), 1);
        // The restored lease is fresh, and heartbeats keep it.
        tokio::time::advance(Duration::from_millis(2_000)).await;
        r2.heartbeat(&a.id).unwrap();
        tokio::time::advance(Duration::from_millis(2_000)).await;
        assert!(r2.expire().is_empty());
        std::fs::remove_dir_all(dir).ok();
    }
}
