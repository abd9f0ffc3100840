//! Request latency over the last minute, for `status`: a histogram per
//! second, 60 of them in a ring, with log-linear buckets (8 per power of
//! two: a reported percentile is at most 12.5% above the true value).
//! Fixed-size arrays: recording allocates nothing and costs a few
//! instructions.

use std::time::{Duration, Instant};

use ipc_core::status::LatencyStatus;

/// Seconds in the window.
const WINDOW: usize = 60;
/// Values below this many microseconds get a bucket each.
const EXACT: u64 = 16;
/// Buckets per power of two above `EXACT`.
const SUB_BITS: u32 = 3;
/// Largest power of two kept apart (2^36 µs ≈ 19 hours); above, one bucket.
const TOP_POWER: u32 = 36;
const BUCKETS: usize = EXACT as usize + ((TOP_POWER - 3) << SUB_BITS) as usize;

fn bucket(us: u64) -> usize {
    if us < EXACT {
        return us as usize;
    }
    let power = (63 - us.leading_zeros()).min(TOP_POWER);
    let sub = if power == TOP_POWER {
        (1 << SUB_BITS) - 1
    } else {
        (us >> (power - SUB_BITS)) & ((1 << SUB_BITS) - 1)
    };
    EXACT as usize + (((power - 4) << SUB_BITS) as usize) + sub as usize
}

/// The largest value that falls in bucket `b` (what a percentile reports).
fn upper(b: usize) -> u64 {
    if b < EXACT as usize {
        return b as u64;
    }
    let k = (b - EXACT as usize) as u64;
    let power = 4 + (k >> SUB_BITS);
    let sub = k & ((1 << SUB_BITS) - 1);
    let step = 1u64 << (power - u64::from(SUB_BITS));
    (1u64 << power) + (sub + 1) * step - 1
}

/// One second of samples.
#[derive(Debug, Clone)]
struct Second {
    /// Which second (since the window's start) this slot holds.
    at: u64,
    count: u64,
    max: u64,
    buckets: [u32; BUCKETS],
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
            count: 0,
            max: 0,
            buckets: [0; BUCKETS],
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
            slot.count = 0;
            slot.max = 0;
            slot.buckets.fill(0);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        slot.count += 1;
        slot.max = slot.max.max(us);
        let b = &mut slot.buckets[bucket(us)];
        *b = b.saturating_add(1);
    }

    /// Percentiles over the seconds of the last minute, as of `now`.
    pub fn report(&self, now: Instant) -> LatencyStatus {
        let current = self.second(now);
        let live = |s: &&Second| s.at <= current && current - s.at < WINDOW as u64;
        let mut merged = [0u64; BUCKETS];
        let (mut count, mut max) = (0u64, 0u64);
        for s in self.seconds.iter().filter(live) {
            count += s.count;
            max = max.max(s.max);
            for (m, &b) in merged.iter_mut().zip(s.buckets.iter()) {
                *m += u64::from(b);
            }
        }
        let pct = |p: u64| {
            if count == 0 {
                return 0;
            }
            let rank = (count * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (b, &n) in merged.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return upper(b).min(max);
                }
            }
            max
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
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 30, (1 << 36) - 1, 1 << 36, u64::MAX]) {
            let b = bucket(us);
            assert!(b >= last && b < BUCKETS, "{us} -> {b}");
            last = b;
            if us < 1 << 36 {
                assert!(upper(b) >= us, "{us} above its bucket's top {}", upper(b));
                assert!(
                    upper(b) - us <= us / 8,
                    "{us}: bucket top {} too far",
                    upper(b)
                );
            }
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
