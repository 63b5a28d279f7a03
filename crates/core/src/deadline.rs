//! Deadlines that travel with a request. A caller that will wait only so long says
//! so in `x-shoal-deadline-ms` (time left, relative, so clocks need not agree); the
//! callee stops working once it runs out and passes what is left on.

use crate::headers::X_SHOAL_DEADLINE_MS;
use http::{HeaderMap, HeaderValue};
use std::time::Duration;
use tokio::time::Instant;

/// The longest deadline accepted from a header (a day): anything longer is a
/// mistake, and huge values would overflow instant arithmetic.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// The instant by which a call must be done; kept in a request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// A deadline `after` from now.
    pub fn after(after: Duration) -> Self {
        Self(Instant::now() + after)
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// The sooner of two optional deadlines.
    pub fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) => a,
            (None, b) => b,
        }
    }

    /// Read `x-shoal-deadline-ms`; `None` when absent or not a number of ms.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let ms: u64 = headers
            .get(X_SHOAL_DEADLINE_MS)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Self::after(Duration::from_millis(ms.min(MAX_DEADLINE_MS))))
    }

    /// Write the time left into `x-shoal-deadline-ms`.
    pub fn to_headers(&self, headers: &mut HeaderMap) {
        headers.insert(
            X_SHOAL_DEADLINE_MS,
            HeaderValue::from(self.remaining().as_millis() as u64),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn header_round_trip_counts_down() {
        let d = Deadline::after(Duration::from_millis(1_000));
        tokio::time::advance(Duration::from_millis(300)).await;
        let mut h = HeaderMap::new();
        d.to_headers(&mut h);
        assert_eq!(h.get(X_SHOAL_DEADLINE_MS).unwrap(), "700");
        let back = Deadline::from_headers(&h).unwrap();
        assert_eq!(back, d);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert!(back.expired());
        assert_eq!(back.remaining(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_headers_are_ignored_and_huge_ones_capped() {
        let mut h = HeaderMap::new();
        h.insert(X_SHOAL_DEADLINE_MS, HeaderValue::from_static("soon"));
        assert!(Deadline::from_headers(&h).is_none());
        h.insert(X_SHOAL_DEADLINE_MS, HeaderValue::from_static("-5"));
        assert!(Deadline::from_headers(&h).is_none());
        h.insert(
            X_SHOAL_DEADLINE_MS,
            HeaderValue::from_static("99999999999999999"),
        );
        let d = Deadline::from_headers(&h).unwrap();
        assert_eq!(d.remaining(), Duration::from_millis(MAX_DEADLINE_MS));
        let a = Some(Deadline::after(Duration::from_secs(1)));
        let b = Some(Deadline::after(Duration::from_secs(2)));
        assert_eq!(Deadline::earliest(a, b), a);
        assert_eq!(Deadline::earliest(None, b), b);
    }
}
