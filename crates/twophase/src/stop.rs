//! A stop signal for the crate's background tasks: the handle the caller keeps owns
//! the sender, so dropping the last clone of a coordinator or participant stops its
//! tasks even though they hold the shared state themselves.

use std::time::Duration;
use tokio::sync::watch;

/// The sending half, held by the public handle; dropping it stops the tasks.
pub(crate) type StopGuard = watch::Sender<()>;

/// The receiving half, cloned into every task.
#[derive(Clone)]
pub(crate) struct Stop(watch::Receiver<()>);

pub(crate) fn channel() -> (StopGuard, Stop) {
    let (tx, rx) = watch::channel(());
    (tx, Stop(rx))
}

impl Stop {
    /// Whether the handle is gone.
    pub(crate) fn is_stopped(&self) -> bool {
        self.0.has_changed().is_err()
    }

    /// Resolves once the handle is gone.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.0.clone();
        // Nothing is ever sent: `changed` returns only when the sender is dropped.
        while rx.changed().await.is_ok() {}
    }

    /// Sleep for `d`; false if stopped first.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_stopped(),
            _ = self.stopped() => false,
        }
    }
}
