//! What a pool reports about itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A snapshot of a pool (see [`Pool::stats`](super::Pool::stats)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Workers the pool keeps.
    pub size: usize,
    /// Workers running now.
    pub alive: usize,
    /// Workers running a request now.
    pub busy: usize,
    /// Requests waiting for a worker.
    pub queued: usize,
    /// Workers started to replace one that died.
    pub restarts: u64,
    /// Times a worker's state was reset and the setup code ran again.
    pub resets: u64,
    /// Requests retried on another worker after theirs died.
    pub retries: u64,
    /// Requests that returned a value.
    pub done: u64,
    /// Requests that failed (each attempt).
    pub failed: u64,
    /// Median time a worker took for a request, over the last 4096.
    pub p50: Option<Duration>,
    /// 99th percentile of the same.
    pub p99: Option<Duration>,
}

/// Latencies kept for the percentiles.
const WINDOW: usize = 4096;

#[derive(Default)]
pub(super) struct Recorder {
    restarts: AtomicU64,
    resets: AtomicU64,
    retries: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    /// The last `WINDOW` latencies, as a ring.
    latencies: Mutex<(Vec<Duration>, usize)>,
}

impl Recorder {
    pub(super) fn record(&self, latency: Duration, ok: bool) {
        let counter = if ok { &self.done } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut ring = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let (samples, next) = &mut *ring;
        if samples.len() < WINDOW {
            samples.push(latency);
        } else {
            samples[*next] = latency;
        }
        *next = (*next + 1) % WINDOW;
    }

    pub(super) fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn stats(&self, size: usize, alive: usize, busy: usize, queued: usize) -> PoolStats {
        let mut samples = self
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        samples.sort_unstable();
        let at = |q: f64| {
            (!samples.is_empty())
                .then(|| samples[((samples.len() - 1) as f64 * q).round() as usize])
        };
        PoolStats {
            size,
            alive,
            busy,
            queued,
            restarts: self.restarts.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let r = Recorder::default();
        assert_eq!(r.stats(1, 1, 0, 0).p50, None);
        for ms in 1..=100 {
            r.record(Duration::from_millis(ms), ms % 10 != 0);
        }
        let s = r.stats(2, 2, 1, 3);
        assert_eq!((s.done, s.failed), (90, 10));
        assert_eq!(s.p50, Some(Duration::from_millis(51)));
        assert_eq!(s.p99, Some(Duration::from_millis(99)));
        assert_eq!((s.size, s.alive, s.busy, s.queued), (2, 2, 1, 3));
    }
}
