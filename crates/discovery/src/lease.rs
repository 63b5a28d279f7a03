use crate::RegistryClient;
use shoal_core::registry::Registration;
use shoal_core::Error;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Keeps one instance registered for as long as it lives.
///
/// Heartbeats at the interval the registry asks for. If the registry no longer knows
/// the instance (its lease lapsed while the registry was unreachable, or the registry
/// lost its state) the lease registers again under the same id. Registry outages are
/// ridden out with capped backoff; the service keeps serving meanwhile.
pub struct Lease {
    id: String,
    client: RegistryClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    /// Register `reg` (with a fixed id, made here when absent) and start heartbeating.
    /// Fails only if the first registration fails.
    pub async fn start(client: RegistryClient, mut reg: Registration) -> Result<Self, Error> {
        let id = reg
            .id
            .get_or_insert_with(|| format!("{}-{}", reg.service, &uuid_like()))
            .clone();
        let first = client.register(&reg).await?;
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = {
            let client = client.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut interval = Duration::from_millis(first.heartbeat_interval_ms);
                let mut backoff = Duration::from_millis(100);
                // After a failure the next try comes after the backoff, not a whole
                // interval, so a short registry outage does not cost the lease.
                let mut wait = interval;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    let outcome = match client.heartbeat(&id).await {
                        Ok(true) => Ok(None),
                        Ok(false) => {
                            tracing::warn!(id = %id, "registry forgot this instance; registering again");
                            client.register(&reg).await.map(Some)
                        }
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(again) => {
                            if let Some(r) = again {
                                interval = Duration::from_millis(r.heartbeat_interval_ms);
                            }
                            backoff = Duration::from_millis(100);
                            wait = interval;
                        }
                        Err(e) => {
                            tracing::warn!(id = %id, error = %e, "heartbeat failed");
                            wait = backoff;
                            backoff = (backoff * 2).min(interval);
                        }
                    }
                }
            })
        };
        Ok(Self {
            id,
            client,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stop heartbeating and deregister.
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.stop_heartbeats().await;
        self.client.deregister(&self.id).await
    }

    async fn stop_heartbeats(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn uuid_like() -> String {
    (0..12)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect()
}
