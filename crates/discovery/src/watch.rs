//! The long-poll loop shared by every control-plane watch (catalog, fault rules):
//! ask with the last index, apply what changed, back off while the control plane
//! is away, and keep the last answer in force meanwhile.

use shoal_core::Error;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Longest pause between attempts while the control plane is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Spawn a watch: `fetch(last_index)` long-polls; `apply(answer)` installs an
/// answer and returns its index. Applied only when the index changed.
pub(crate) fn spawn<T, F, Fut, A>(
    what: &'static str,
    base: String,
    mut fetch: F,
    mut apply: A,
) -> JoinHandle<()>
where
    T: Send + 'static,
    F: FnMut(Option<u64>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send,
    A: FnMut(T) -> u64 + Send + 'static,
    T: Indexed,
{
    tokio::spawn(async move {
        let mut index: Option<u64> = None;
        let mut backoff = Duration::from_millis(50);
        let mut failing = false;
        loop {
            match fetch(index).await {
                Ok(answer) => {
                    if failing {
                        tracing::info!(control_plane = %base, what, "control plane reachable again");
                        failing = false;
                    }
                    backoff = Duration::from_millis(50);
                    if Some(answer.index()) != index {
                        index = Some(apply(answer));
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(control_plane = %base, what, error = %e, "watch failed; keeping the last answer");
                        failing = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    })
}

/// An answer with a change index.
pub(crate) trait Indexed {
    fn index(&self) -> u64;
}

impl Indexed for shoal_core::registry::Catalog {
    fn index(&self) -> u64 {
        self.index
    }
}

impl Indexed for shoal_core::resilience::FaultList {
    fn index(&self) -> u64 {
        self.index
    }
}
