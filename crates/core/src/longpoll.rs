//! The long poll behind every watch API (the registry's catalog, the fault table):
//! a change index that grows on every change, and a wait until it differs from the
//! index a client last saw, or a time limit passes.

use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Wait until `changes` holds an index other than `seen`, or `limit` passes
/// (whichever comes first); returns at once if it differs already.
pub async fn wait_for_change(mut changes: watch::Receiver<u64>, seen: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if *changes.borrow_and_update() != seen {
            return;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Time is up, or the table is gone: answer with what there is.
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_on_change_or_at_the_limit() {
        let (tx, rx) = watch::channel(3u64);
        let start = Instant::now();
        wait_for_change(rx.clone(), 2, Duration::from_secs(30)).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "already different");
        wait_for_change(rx.clone(), 3, Duration::from_secs(30)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(30),
            "no change: the limit"
        );
        let waiting = tokio::spawn(wait_for_change(rx, 3, Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(1)).await;
        tx.send_replace(4);
        waiting.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(31));
    }
}
