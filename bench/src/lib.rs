//! Shared pieces of shoal's benchmark drivers: timing and the result line format
//! every bench script ends with.

use std::time::Duration;

/// Print one result line: `<metric>: ours <x> <unit>, reference <y> <unit>, ratio <x/y>`.
pub fn report(metric: &str, ours: f64, reference: f64, unit: &str) {
    let ratio = if reference > 0.0 {
        ours / reference
    } else {
        f64::NAN
    };
    println!("{metric}: ours {ours:.1} {unit}, reference {reference:.1} {unit}, ratio {ratio:.3}");
}

/// Nanoseconds per operation.
pub fn ns_per(elapsed: Duration, ops: u64) -> f64 {
    elapsed.as_nanos() as f64 / ops.max(1) as f64
}

/// Measure `ours` and `reference` in alternation, [`ROUNDS`] times each, and give
/// the median of each: on a shared machine a noisy stretch then hits both alike,
/// and one bad round does not decide a figure.
pub fn interleaved(
    mut ours: impl FnMut() -> f64,
    mut reference: impl FnMut() -> f64,
) -> (f64, f64) {
    let mut a = Vec::with_capacity(ROUNDS);
    let mut b = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        b.push(reference());
        a.push(ours());
    }
    (median(a), median(b))
}

/// Rounds per figure in [`interleaved`].
pub const ROUNDS: usize = 9;

/// The median of some measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
