use crate::RegistryClient;
use shoal_core::registry::{Catalog, Instance};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long one watch request waits for a change before asking again.
pub(crate) const WATCH_WAIT: Duration = Duration::from_secs(30);

/// A local copy of the registry's catalog, kept current by a long-poll watch.
///
/// Reads never touch the network. While the registry is unreachable the last known
/// catalog stays in use (stale addresses are better than none; the caller skips
/// instances that refuse connections).
#[derive(Clone)]
pub struct Discovery {
    rx: watch::Receiver<Option<Arc<Catalog>>>,
    registry: Option<RegistryClient>,
    _task: Option<Arc<AbortOnDrop>>,
}

pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Discovery {
    /// Start watching the registry.
    pub fn start(client: RegistryClient) -> Self {
        let (tx, rx) = watch::channel(None);
        let registry = Some(client.clone());
        let task = crate::watch::spawn(
            "catalog",
            client.base().to_string(),
            move |index| {
                let client = client.clone();
                async move { client.catalog(index, WATCH_WAIT).await }
            },
            move |c: Catalog| {
                let index = c.index;
                tx.send_replace(Some(Arc::new(c)));
                index
            },
        );
        Self {
            rx,
            registry,
            _task: Some(Arc::new(AbortOnDrop(task))),
        }
    }

    /// A fixed catalog that never changes: static upstreams, and tests.
    pub fn fixed(catalog: Catalog) -> Self {
        let (_tx, rx) = watch::channel(Some(Arc::new(catalog)));
        Self {
            rx,
            registry: None,
            _task: None,
        }
    }

    /// The registry it watches (`None` for a fixed catalog).
    pub fn registry(&self) -> Option<&RegistryClient> {
        self.registry.as_ref()
    }

    /// The latest catalog (empty before the first answer).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.rx.borrow().clone().unwrap_or_default()
    }

    /// Whether the first catalog has arrived.
    pub fn is_loaded(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Wait (at most `limit`) for the first catalog. Returns whether it arrived.
    pub async fn loaded(&self, limit: Duration) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(limit, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Healthy instances of `service` in the latest catalog.
    pub fn healthy(&self, service: &str) -> Vec<Instance> {
        self.catalog()
            .instances(service)
            .iter()
            .filter(|i| i.healthy)
            .cloned()
            .collect()
    }

    /// A receiver that sees every new catalog.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Catalog>>> {
        self.rx.clone()
    }

    /// Wait (at most `limit`) until `pred` holds for the catalog. Returns whether it did.
    pub async fn wait_until(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&Catalog) -> bool,
    ) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(limit, rx.wait_for(|c| c.as_ref().is_some_and(|c| pred(c))))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
