//! Interrupts, timeouts and kills of the request now running.
//!
//! Flags belong to one request id: [`Control::begin`] resets them, so an
//! interrupt aimed at one request can never hit the next. An interrupt
//! that arrives between requests is kept for the next request to begin,
//! and applies to it only if the manager sent that request before the
//! interrupt (its id is at most the interrupt's `up_to`).
//!
//! Starting a guest (and resetting it after a trap or kill) runs under the
//! same timer as a pseudo-request ([`Control::begin_start`]): a start that
//! takes longer than the start timeout is killed, never interrupted.
//!
//! Blocked guest calls learn of an interrupt or a kill in two ways: the
//! condition variable of [`Channels`] (malt's own host calls, which block
//! their thread) and [`Control::until_stopped`] (async waits: WASI calls of
//! a wasm guest, and the whole call future, which a kill drops).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

#[cfg(feature = "wasm")]
use tokio::sync::Notify;

use super::{Channels, Killer};
use malt_protocol::Failure;

mod memory;
use memory::Delivery;
#[cfg_attr(not(feature = "wasm"), allow(unused_imports))]
pub(crate) use memory::MemoryInterrupt;

/// The id the start (or a reset) runs under: above every request id, so
/// no interrupt aimed at requests can hit it.
const START: u64 = u64::MAX;

/// How far a stop has gone.
#[cfg(feature = "wasm")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Asked to stop cooperatively (an interrupt, a timeout), or killed.
    Interrupted,
    /// Killed: the request is abandoned wherever it is.
    Killed,
}

/// Why the running request is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Interrupt,
    Timeout,
}

impl Reason {
    pub fn failure(self, state_lost: bool) -> Failure {
        match self {
            Reason::Interrupt => Failure::Interrupted {
                state_lost,
                rolled_back: false,
            },
            Reason::Timeout => Failure::Timeout {
                state_lost,
                rolled_back: false,
            },
        }
    }

    /// The request was killed and the guest rolled back to before it.
    pub fn rolled_back(self) -> Failure {
        match self {
            Reason::Interrupt => Failure::Interrupted {
                state_lost: false,
                rolled_back: true,
            },
            Reason::Timeout => Failure::Timeout {
                state_lost: false,
                rolled_back: true,
            },
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
    /// An interrupt that arrived while no request ran: applies to the
    /// next request to begin if its id is at most this.
    pending_up_to: Option<u64>,
    /// When the replies held back must be written (see `Shared::answer`).
    flush_at: Option<Instant>,
    /// The guest's memory interrupt: kept across requests.
    delivery: Delivery,
}

pub(crate) struct Control {
    /// Polled by the guest (every ~1000 Rhai operations): kept outside the
    /// lock so polling costs one atomic load.
    interrupted: AtomicBool,
    /// Checked by the wasm epoch callback.
    killed: AtomicBool,
    timer: Mutex<Timer>,
    wake_timer: Condvar,
    /// Wakes async waits when a stop begins or turns into a kill.
    #[cfg(feature = "wasm")]
    stopped: Notify,
    /// How the backend kills a request (wasm: an epoch bump; native: a
    /// restart); set once the backend exists.
    killer: OnceLock<Killer>,
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
            #[cfg(feature = "wasm")]
            stopped: Notify::new(),
            killer: OnceLock::new(),
            grace,
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Timer> {
        self.timer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the timer's lock (taken before a fork, so that no other
    /// thread holds it in the copy), or `None` if another thread has it.
    pub fn try_hold(&self) -> Option<impl Sized + '_> {
        self.timer.try_lock().ok()
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    // Read by the wasm backend (its epoch callback); a native guest is
    // killed with its process.
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Wakes the async waits (the wasm backend's; native guests have none,
    /// and a native guest's host builds without tokio).
    fn wake_async(&self) {
        #[cfg(feature = "wasm")]
        self.stopped.notify_waiters();
    }

    /// Sets how a request is killed (once; later calls are ignored).
    pub fn set_killer(&self, killer: Killer) {
        let _ = self.killer.set(killer);
    }

    /// Resolves once the running request is asked to stop (`Interrupted`:
    /// an interrupt, a timeout or a kill) or killed (`Killed`).
    #[cfg(feature = "wasm")]
    pub async fn until_stopped(&self, level: Stop) {
        loop {
            let notified = self.stopped.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a stop between the two is
            // not missed.
            notified.as_mut().enable();
            let stopped = match level {
                Stop::Interrupted => self.interrupted() || self.killed(),
                Stop::Killed => self.killed(),
            };
            if stopped {
                return;
            }
            notified.await;
        }
    }

    /// The guest starts (or restarts after a trap or kill): killed if it
    /// takes longer than `timeout`. Ends with [`Control::end`]. An
    /// interrupt that arrives meanwhile is kept for the next request.
    pub fn begin_start(&self, timeout: Duration) {
        let mut t = self.lock();
        if t.shut_down {
            return;
        }
        let delivery = std::mem::take(&mut t.delivery);
        *t = Timer {
            id: START,
            reason: Some(Reason::Timeout),
            kill_at: Instant::now().checked_add(timeout),
            pending_up_to: t.pending_up_to,
            delivery,
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        self.wake_timer.notify_one();
    }

    /// A request starts running; false if the host is shutting down and
    /// it must not.
    pub fn begin(&self, id: u64, channels: &Channels) -> bool {
        let mut t = self.lock();
        if t.shut_down {
            return false;
        }
        let pending = t.pending_up_to;
        let delivery = std::mem::take(&mut t.delivery);
        *t = Timer {
            id,
            timeout_at: self.timeout.map(|d| Instant::now() + d),
            shut_down: t.shut_down,
            flush_at: t.flush_at,
            delivery,
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        if pending.is_some_and(|up_to| id <= up_to) {
            // Sent before an interrupt that arrived while it was queued.
            self.start_stopping(&mut t, Reason::Interrupt, channels);
            return true;
        }
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
        // Disarmed, anything raised and not taken taken back.
        let mut delivery = std::mem::take(&mut t.delivery);
        delivery.reset();
        *t = Timer {
            shut_down: t.shut_down,
            pending_up_to: if t.id == START { t.pending_up_to } else { None },
            flush_at: t.flush_at,
            delivery,
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        ended
    }

    /// Replies were held back: the timer writes them (calls its `flush`)
    /// within `limit` unless the guest thread does first.
    pub fn flush_within(&self, limit: Duration) {
        let mut t = self.lock();
        if t.flush_at.is_none() {
            t.flush_at = Some(Instant::now() + limit);
            self.wake_timer.notify_one();
        }
    }

    /// The manager asked to interrupt whatever runs now; `up_to` is the
    /// last request id it had sent.
    pub fn interrupt(&self, up_to: u64, channels: &Channels) {
        let mut t = self.lock();
        if t.id == 0 || t.id == START {
            // Between requests: the one sent before this interrupt may not
            // have begun yet.
            t.pending_up_to = Some(up_to);
            return;
        }
        if t.reason.is_some() || t.id > up_to {
            return;
        }
        self.start_stopping(&mut t, Reason::Interrupt, channels);
    }

    fn start_stopping(&self, t: &mut Timer, reason: Reason, channels: &Channels) {
        t.reason = Some(reason);
        t.timeout_at = None;
        t.kill_at = Some(Instant::now() + self.grace);
        self.interrupted.store(true, Ordering::Release);
        t.delivery.raise();
        // Wake a guest blocked in sleep, a channel operation or a WASI wait.
        channels.wake_all();
        self.wake_async();
        self.wake_timer.notify_one();
    }

    /// Kills the running request: the flag first (the wasm epoch callback
    /// and blocked host calls check it), then the backend's killer.
    fn kill(&self, t: &mut Timer, channels: &Channels) {
        t.killed = true;
        self.killed.store(true, Ordering::Release);
        self.wake_async();
        channels.wake_all();
        if let Some(kill) = self.killer.get() {
            kill(t.id, t.reason.unwrap_or(Reason::Interrupt));
        }
    }

    /// Kills whatever runs and makes the timer return (an in-process
    /// worker winding down).
    pub fn shut_down(&self, channels: &Channels) {
        let mut t = self.lock();
        t.shut_down = true;
        if t.id != 0 {
            t.reason.get_or_insert(Reason::Interrupt);
            self.interrupted.store(true, Ordering::Release);
            self.kill(&mut t, channels);
        }
        channels.wake_all();
        self.wake_timer.notify_one();
    }

    /// Enforces timeouts and grace periods. Returns true when a killed
    /// request failed to unwind (the host must give up on the guest),
    /// false once shut down.
    pub fn timer_loop(&self, channels: &Channels, flush: &dyn Fn()) -> bool {
        let mut t = self.lock();
        loop {
            let now = Instant::now();
            if t.shut_down {
                return false;
            }
            if t.flush_at.is_some_and(|at| now >= at) {
                t.flush_at = None;
                // Not under this lock: the guest thread takes the stream's
                // lock, then this one.
                drop(t);
                flush();
                t = self.lock();
                continue;
            }
            if t.id != 0 {
                if t.timeout_at.is_some_and(|at| now >= at) {
                    self.start_stopping(&mut t, Reason::Timeout, channels);
                    continue;
                }
                if t.kill_at.is_some_and(|at| now >= at) {
                    t.kill_at = None;
                    t.give_up_at = Some(now + UNWIND_LIMIT.max(self.grace));
                    self.kill(&mut t, channels);
                    continue;
                }
                if t.give_up_at.is_some_and(|at| now >= at) {
                    return true;
                }
                if !t.killed && t.delivery.again_at.is_some_and(|at| now >= at) {
                    t.delivery.raise_again(now);
                    continue;
                }
            }
            // A killed request's memory is about to go: nothing raised
            // there again.
            let again_at = t.delivery.again_at.filter(|_| !t.killed);
            let next = [t.timeout_at, t.kill_at, t.give_up_at, t.flush_at, again_at]
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

#[cfg(test)]
mod tests;
