//! Request latency over the last minute, for `status`: a histogram per
//! second, 60 of them in a ring. Each is an `hdrhistogram` histogram with
//! its bounds fixed up front (0 to 2^36 µs ≈ 19 hours, larger values
//! counted at the top; one significant figure: 16 buckets per power of two,
//! so a reported percentile is at most 6.25% above the true value) and
//! auto-resize off, so recording allocates nothing and costs a few
//! instructions. The ring, the exact maximum and the rank of a percentile are
//! ours.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ipc_core::status::LatencyStatus;

/// Seconds in the window.
const WINDOW: usize = 60;
/// The largest value told apart, in microseconds (2^36 µs ≈ 19 hours).
const HIGHEST_US: u64 = 1 << 36;
/// Significant figures kept: 1 gives 16 buckets per power of two.
const SIGNIFICANT_FIGURES: u8 = 1;

/// An empty histogram with the window's fixed bounds.
fn histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_FIGURES).expect("valid fixed bounds")
}

/// One second of samples.
#[derive(Debug, Clone)]
struct Second {
    /// Which second (since the window's start) this slot holds.
    at: u64,
    /// The slowest, exact (the histogram keeps only its bucket).
    max: u64,
    samples: Histogram<u32>,
}

/// The last minute of latencies.
#[derive(Debug)]
pub struct LatencyWindow {
    start: Instant,
    seconds: Box<[Second]>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow::new()
    }
}

impl LatencyWindow {
    pub fn new() -> LatencyWindow {
        let empty = Second {
            at: u64::MAX,
            max: 0,
            samples: histogram(),
        };
        LatencyWindow {
            start: Instant::now(),
            seconds: vec![empty; WINDOW].into_boxed_slice(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Records one request that took `took`, finishing at `now`.
    pub fn record(&mut self, took: Duration, now: Instant) {
        let at = self.second(now);
        let slot = &mut self.seconds[(at % WINDOW as u64) as usize];
        if slot.at != at {
            slot.at = at;
            slot.max = 0;
            slot.samples.reset();
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        slot.max = slot.max.max(us);
        // In range (bounds fixed, counts saturate), above it at the top.
        slot.samples.saturating_record(us);
    }

    /// Percentiles over the seconds of the last minute, as of `now`.
    pub fn report(&self, now: Instant) -> LatencyStatus {
        let current = self.second(now);
        let live = |s: &&Second| s.at <= current && current - s.at < WINDOW as u64;
        let mut merged = histogram();
        let mut max = 0;
        for s in self.seconds.iter().filter(live) {
            merged.add(&s.samples).expect("same bounds");
            max = max.max(s.max);
        }
        let count = merged.len();
        let pct = |p: u64| {
            if count == 0 {
                return 0;
            }
            // The rank-th smallest sample (rank = ⌈count·p/100⌉). Asked as
            // a quantile half a sample below it, so the float product the
            // crate rounds up cannot reach the next rank.
            let rank = (count * p).div_ceil(100).max(1);
            let quantile = (rank as f64 - 0.5) / count as f64;
            merged.value_at_quantile(quantile).min(max)
        };
        LatencyStatus {
            window_s: WINDOW as u64,
            count,
            p50_us: pct(50),
            p90_us: pct(90),
            p99_us: pct(99),
            max_us: max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let h = histogram();
        let upper = |us| h.highest_equivalent(us);
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 30, (1 << 36) - 1]) {
            let b = upper(us);
            assert!(b >= last, "{us} -> {b}");
            last = b;
            assert!(upper(us) >= us, "{us} above its bucket's top {}", upper(us));
            assert!(
                upper(us) - us <= us / 8,
                "{us}: bucket top {} too far",
                upper(us)
            );
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut w = LatencyWindow::new();
        let now = w.start;
        for us in 1..=1000u64 {
            w.record(Duration::from_micros(us), now);
        }
        let r = w.report(now);
        assert_eq!((r.count, r.max_us), (1000, 1000));
        for (got, want) in [(r.p50_us, 500), (r.p90_us, 900), (r.p99_us, 990)] {
            assert!(got >= want && got <= want + want / 8, "{got} vs {want}");
        }
    }

    #[test]
    fn any_value_is_recorded_without_growing_the_histogram() {
        let mut w = LatencyWindow::new();
        let now = w.start;
        let len = histogram().distinct_values();
        for took in [Duration::ZERO, Duration::from_secs(1 << 40), Duration::MAX] {
            w.record(took, now);
        }
        // Bounds fixed, auto-resize off: nothing was reallocated.
        assert!(w.seconds.iter().all(|s| s.samples.distinct_values() == len));
        let r = w.report(now);
        assert_eq!(
            (r.count, r.max_us, r.p50_us),
            (3, u64::MAX, HIGHEST_US * 17 / 16 - 1)
        );
        assert!(r.p90_us >= HIGHEST_US && r.p99_us >= HIGHEST_US, "{r:?}");
    }

    #[test]
    fn samples_older_than_a_minute_drop_out() {
        let mut w = LatencyWindow::new();
        let t0 = w.start;
        w.record(Duration::from_millis(900), t0);
        w.record(Duration::from_micros(100), t0 + Duration::from_secs(30));
        let at_40 = w.report(t0 + Duration::from_secs(40));
        assert_eq!((at_40.count, at_40.max_us), (2, 900_000));
        let at_70 = w.report(t0 + Duration::from_secs(70));
        assert_eq!((at_70.count, at_70.max_us), (1, 100));
        // The slot of second 0 is reused at second 60 without mixing.
        w.record(Duration::from_micros(5), t0 + Duration::from_secs(60));
        let r = w.report(t0 + Duration::from_secs(60));
        assert_eq!((r.count, r.max_us), (2, 100));
        assert_eq!(w.report(t0 + Duration::from_secs(200)).count, 0);
    }
}
