//! Per-syscall counters and time histograms (`assure-vmm run --stats`): which syscalls a
//! server makes and where its time goes. Time is the handler's wall time, including any
//! time blocked on the host (an `epoll_wait` that sleeps counts its sleep).

use std::fmt::Write;
use std::time::Duration;

/// Histogram buckets: bucket `i` counts durations in [2^i, 2^(i+1)) ns.
const BUCKETS: usize = 40;

/// Statistics of one syscall number.
#[derive(Debug, Clone)]
pub struct SyscallStat {
    /// Calls.
    pub calls: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Total handler time.
    pub total: Duration,
    histogram: [u64; BUCKETS],
}

impl Default for SyscallStat {
    fn default() -> Self {
        SyscallStat {
            calls: 0,
            errors: 0,
            total: Duration::ZERO,
            histogram: [0; BUCKETS],
        }
    }
}

impl SyscallStat {
    /// The duration below which `q` (0..=1) of the calls completed, to the bucket's upper
    /// bound.
    pub fn quantile(&self, q: f64) -> Duration {
        let target = ((self.calls as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.histogram.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Duration::from_nanos(1u64 << (i + 1).min(63));
            }
        }
        Duration::from_nanos(1u64 << BUCKETS)
    }
}

/// Statistics of every syscall of a process.
#[derive(Debug, Default, Clone)]
pub struct SyscallStats {
    by_nr: Vec<SyscallStat>,
    /// Exits that were CPU exceptions (demand faults and signals).
    pub exceptions: u64,
}

impl SyscallStats {
    /// Record one call.
    pub fn record(&mut self, nr: u64, elapsed: Duration, failed: bool) {
        let Ok(i) = usize::try_from(nr) else { return };
        if i >= 1024 {
            return;
        }
        if self.by_nr.len() <= i {
            self.by_nr.resize(i + 1, SyscallStat::default());
        }
        let s = &mut self.by_nr[i];
        s.calls += 1;
        s.errors += u64::from(failed);
        s.total += elapsed;
        let ns = elapsed.as_nanos().max(1) as u64;
        let bucket = (63 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        s.histogram[bucket] += 1;
    }

    /// The statistic of `nr`, if it was called.
    pub fn get(&self, nr: u64) -> Option<&SyscallStat> {
        self.by_nr
            .get(usize::try_from(nr).ok()?)
            .filter(|s| s.calls > 0)
    }

    /// Total syscalls.
    pub fn total_calls(&self) -> u64 {
        self.by_nr.iter().map(|s| s.calls).sum()
    }

    /// A table sorted by total time, with `name` naming each number.
    pub fn report(&self, name: impl Fn(u64) -> &'static str) -> String {
        let mut rows: Vec<(u64, &SyscallStat)> = self
            .by_nr
            .iter()
            .enumerate()
            .filter(|(_, s)| s.calls > 0)
            .map(|(i, s)| (i as u64, s))
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.total));
        let total: Duration = rows.iter().map(|(_, s)| s.total).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>8} {:>12} {:>7} {:>10} {:>10} {:>10}",
            "syscall", "calls", "errors", "total ms", "share", "mean us", "p50 us", "p99 us"
        );
        for (nr, s) in rows {
            let share = if total.is_zero() {
                0.0
            } else {
                s.total.as_secs_f64() / total.as_secs_f64() * 100.0
            };
            let _ = writeln!(
                out,
                "{:<20} {:>10} {:>8} {:>12.3} {:>6.1}% {:>10.2} {:>10.2} {:>10.2}",
                name(nr),
                s.calls,
                s.errors,
                s.total.as_secs_f64() * 1e3,
                share,
                s.total.as_secs_f64() * 1e6 / s.calls as f64,
                s.quantile(0.5).as_secs_f64() * 1e6,
                s.quantile(0.99).as_secs_f64() * 1e6,
            );
        }
        let _ = writeln!(
            out,
            "{} syscalls, {} CPU exceptions",
            self.total_calls(),
            self.exceptions
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_quantiles() {
        let mut s = SyscallStats::default();
        for _ in 0..99 {
            s.record(0, Duration::from_nanos(1500), false);
        }
        s.record(0, Duration::from_millis(3), true);
        let r = s.get(0).expect("recorded");
        assert_eq!((r.calls, r.errors), (100, 1));
        assert_eq!(r.quantile(0.5), Duration::from_nanos(2048));
        assert!(r.quantile(1.0) >= Duration::from_millis(3));
        assert!(s.get(1).is_none());
        s.record(u64::MAX, Duration::ZERO, false);
        assert_eq!(s.total_calls(), 100);
        let text = s.report(|_| "read");
        assert!(
            text.contains("read") && text.contains("100 syscalls"),
            "{text}"
        );
    }
}
