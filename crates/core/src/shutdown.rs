//! Waiting for the signals that ask a process to stop.

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// If the handlers cannot be installed (which happens only when the process is
/// already out of resources), this never resolves rather than stopping at once.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
