//! Interrupts, timeouts and kills of the request now running.
//!
//! Flags belong to one request id: [`Control::begin`] resets them, so an
//! interrupt aimed at one request can never hit the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Channels;
use malt_protocol::Failure;

/// Why the running request is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Interrupt,
    Timeout,
}

impl Reason {
    pub fn failure(self, state_lost: bool) -> Failure {
        match self {
            Reason::Interrupt => Failure::Interrupted { state_lost },
            Reason::Timeout => Failure::Timeout { state_lost },
        }
    }
}

/// How the request that just ended was treated.
pub(crate) struct Ended {
    pub interrupted: Option<Reason>,
    pub killed: bool,
    pub shut_down: bool,
}

#[derive(Default)]
struct Timer {
    /// The running request (0: none).
    id: u64,
    reason: Option<Reason>,
    killed: bool,
    timeout_at: Option<Instant>,
    kill_at: Option<Instant>,
    give_up_at: Option<Instant>,
    shut_down: bool,
}

pub(crate) struct Control {
    /// Polled by the guest (every ~1000 Rhai operations): kept outside the
    /// lock so polling costs one atomic load.
    interrupted: AtomicBool,
    /// Checked by the wasm epoch callback.
    killed: AtomicBool,
    timer: Mutex<Timer>,
    wake_timer: Condvar,
    grace: Duration,
    timeout: Option<Duration>,
}

/// How long a killed request may take to unwind before the host gives up
/// on it and exits.
const UNWIND_LIMIT: Duration = Duration::from_secs(2);

impl Control {
    pub fn new(grace: Duration, timeout: Option<Duration>) -> Self {
        Control {
            interrupted: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            timer: Mutex::new(Timer::default()),
            wake_timer: Condvar::new(),
            grace,
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Timer> {
        self.timer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// A request starts running; false if the host is shutting down and
    /// it must not.
    pub fn begin(&self, id: u64) -> bool {
        let mut t = self.lock();
        if t.shut_down {
            return false;
        }
        *t = Timer {
            id,
            timeout_at: self.timeout.map(|d| Instant::now() + d),
            shut_down: t.shut_down,
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        // Only a deadline needs the timer; waking it for every request
        // would cost a context switch on the hot path.
        if t.timeout_at.is_some() {
            self.wake_timer.notify_one();
        }
        true
    }

    /// The running request ended.
    pub fn end(&self) -> Ended {
        let mut t = self.lock();
        let ended = Ended {
            interrupted: t.reason,
            killed: t.killed,
            shut_down: t.shut_down,
        };
        *t = Timer {
            shut_down: t.shut_down,
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        ended
    }

    /// The manager asked to interrupt whatever runs now.
    pub fn interrupt(&self, channels: &Channels) {
        let mut t = self.lock();
        if t.id == 0 || t.reason.is_some() {
            return;
        }
        self.start_stopping(&mut t, Reason::Interrupt, channels);
    }

    fn start_stopping(&self, t: &mut Timer, reason: Reason, channels: &Channels) {
        t.reason = Some(reason);
        t.timeout_at = None;
        t.kill_at = Some(Instant::now() + self.grace);
        self.interrupted.store(true, Ordering::Release);
        // Wake a guest blocked in sleep or a channel operation.
        channels.wake_all();
        self.wake_timer.notify_one();
    }

    /// Kills whatever runs and makes the timer return (an in-process
    /// worker winding down).
    pub fn shut_down(&self, channels: &Channels, kill: &(dyn Fn(u64, Reason) + Send + Sync)) {
        let mut t = self.lock();
        t.shut_down = true;
        if t.id != 0 {
            t.reason.get_or_insert(Reason::Interrupt);
            t.killed = true;
            self.interrupted.store(true, Ordering::Release);
            self.killed.store(true, Ordering::Release);
            kill(t.id, Reason::Interrupt);
        }
        channels.wake_all();
        self.wake_timer.notify_one();
    }

    /// Enforces timeouts and grace periods. Returns true when a killed
    /// request failed to unwind (the host must give up on the guest),
    /// false once shut down.
    pub fn timer_loop(
        &self,
        channels: &Channels,
        kill: &(dyn Fn(u64, Reason) + Send + Sync),
    ) -> bool {
        let mut t = self.lock();
        loop {
            let now = Instant::now();
            if t.shut_down {
                return false;
            }
            if t.id != 0 {
                if t.timeout_at.is_some_and(|at| now >= at) {
                    self.start_stopping(&mut t, Reason::Timeout, channels);
                    continue;
                }
                if t.kill_at.is_some_and(|at| now >= at) {
                    t.kill_at = None;
                    t.killed = true;
                    t.give_up_at = Some(now + UNWIND_LIMIT.max(self.grace));
                    self.killed.store(true, Ordering::Release);
                    kill(t.id, t.reason.unwrap_or(Reason::Interrupt));
                    channels.wake_all();
                    continue;
                }
                if t.give_up_at.is_some_and(|at| now >= at) {
                    return true;
                }
            }
            let next = [t.timeout_at, t.kill_at, t.give_up_at]
                .into_iter()
                .flatten()
                .min();
            t = match next {
                Some(at) => {
                    self.wake_timer
                        .wait_timeout(t, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake_timer.wait(t).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}
