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

use tokio::sync::Notify;

use super::{Channels, Killer};
use malt_protocol::Failure;

/// The id the start (or a reset) runs under: above every request id, so
/// no interrupt aimed at requests can hit it.
const START: u64 = u64::MAX;

/// How far a stop has gone.
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
    /// An interrupt that arrived while no request ran: applies to the
    /// next request to begin if its id is at most this.
    pending_up_to: Option<u64>,
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
            stopped: Notify::new(),
            killer: OnceLock::new(),
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

    /// Sets how a request is killed (once; later calls are ignored).
    pub fn set_killer(&self, killer: Killer) {
        let _ = self.killer.set(killer);
    }

    /// Resolves once the running request is asked to stop (`Interrupted`:
    /// an interrupt, a timeout or a kill) or killed (`Killed`).
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
        *t = Timer {
            id: START,
            reason: Some(Reason::Timeout),
            kill_at: Instant::now().checked_add(timeout),
            pending_up_to: t.pending_up_to,
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
        *t = Timer {
            id,
            timeout_at: self.timeout.map(|d| Instant::now() + d),
            shut_down: t.shut_down,
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
        *t = Timer {
            shut_down: t.shut_down,
            pending_up_to: if t.id == START { t.pending_up_to } else { None },
            ..Timer::default()
        };
        self.interrupted.store(false, Ordering::Release);
        self.killed.store(false, Ordering::Release);
        ended
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
        // Wake a guest blocked in sleep, a channel operation or a WASI wait.
        channels.wake_all();
        self.stopped.notify_waiters();
        self.wake_timer.notify_one();
    }

    /// Kills the running request: the flag first (the wasm epoch callback
    /// and blocked host calls check it), then the backend's killer.
    fn kill(&self, t: &mut Timer, channels: &Channels) {
        t.killed = true;
        self.killed.store(true, Ordering::Release);
        self.stopped.notify_waiters();
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
    pub fn timer_loop(&self, channels: &Channels) -> bool {
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
                    t.give_up_at = Some(now + UNWIND_LIMIT.max(self.grace));
                    self.kill(&mut t, channels);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    const LONG: Duration = Duration::from_secs(600);

    fn control(grace: Duration, timeout: Option<Duration>) -> (Arc<Control>, Arc<Channels>) {
        (
            Arc::new(Control::new(grace, timeout)),
            Arc::new(Channels::default()),
        )
    }

    /// Runs the timer loop on a thread; kills are reported on the channel.
    fn run_timer(
        c: &Arc<Control>,
        ch: &Arc<Channels>,
    ) -> (mpsc::Receiver<(u64, Reason)>, std::thread::JoinHandle<bool>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        c.set_killer(Box::new(move |id, reason| {
            let _ = tx.lock().unwrap().send((id, reason));
        }));
        let (c, ch) = (c.clone(), ch.clone());
        let timer = std::thread::spawn(move || c.timer_loop(&ch));
        (rx, timer)
    }

    #[test]
    fn cooperative_stop_within_the_grace_period_keeps_state() {
        let (c, ch) = control(LONG, None);
        assert!(c.begin(1, &ch));
        assert!(!c.interrupted());
        c.interrupt(1, &ch);
        assert!(c.interrupted());
        assert!(!c.killed());
        let ended = c.end();
        assert_eq!(ended.interrupted, Some(Reason::Interrupt));
        assert!(!ended.killed);
        // The flags belong to that request only.
        assert!(!c.interrupted());
        assert!(c.begin(2, &ch));
        assert!(!c.interrupted());
    }

    #[test]
    fn a_guest_that_ignores_the_interrupt_is_killed_after_the_grace_period() {
        let (c, ch) = control(Duration::from_millis(20), None);
        let (kills, timer) = run_timer(&c, &ch);
        assert!(c.begin(7, &ch));
        c.interrupt(7, &ch);
        assert_eq!(
            kills.recv_timeout(Duration::from_secs(10)).unwrap(),
            (7, Reason::Interrupt)
        );
        assert!(c.killed());
        let ended = c.end();
        assert_eq!(ended.interrupted, Some(Reason::Interrupt));
        assert!(ended.killed);
        c.shut_down(&ch);
        assert!(!timer.join().unwrap(), "the timer ends on shut down");
    }

    #[test]
    fn a_double_interrupt_is_one_interrupt() {
        let (c, ch) = control(Duration::from_millis(20), None);
        let (kills, timer) = run_timer(&c, &ch);
        assert!(c.begin(1, &ch));
        c.interrupt(1, &ch);
        c.interrupt(1, &ch);
        assert_eq!(
            kills.recv_timeout(Duration::from_secs(10)).unwrap(),
            (1, Reason::Interrupt)
        );
        // One kill only.
        assert!(kills.recv_timeout(Duration::from_millis(200)).is_err());
        c.end();
        c.shut_down(&ch);
        timer.join().unwrap();
    }

    #[test]
    fn an_interrupt_between_requests_applies_to_one_sent_before_it() {
        let (c, ch) = control(LONG, None);
        // Requests 4 and 5 are queued when the interrupt arrives.
        c.interrupt(5, &ch);
        assert!(c.begin(4, &ch));
        assert!(
            c.interrupted(),
            "the queued request sent before is interrupted"
        );
        assert_eq!(c.end().interrupted, Some(Reason::Interrupt));
        // Once: the next queued request runs normally.
        assert!(c.begin(5, &ch));
        assert!(!c.interrupted());
        assert_eq!(c.end().interrupted, None);
    }

    #[test]
    fn an_interrupt_never_hits_a_request_sent_after_it() {
        let (c, ch) = control(LONG, None);
        c.interrupt(2, &ch);
        assert!(c.begin(3, &ch));
        assert!(!c.interrupted());
        assert_eq!(c.end().interrupted, None);
        // While running, too.
        assert!(c.begin(9, &ch));
        c.interrupt(8, &ch);
        assert!(!c.interrupted());
        assert_eq!(c.end().interrupted, None);
    }

    #[test]
    fn a_timeout_stops_the_request_then_kills_it() {
        let (c, ch) = control(Duration::from_millis(10), Some(Duration::from_millis(20)));
        let (kills, timer) = run_timer(&c, &ch);
        assert!(c.begin(3, &ch));
        assert_eq!(
            kills.recv_timeout(Duration::from_secs(10)).unwrap(),
            (3, Reason::Timeout)
        );
        let ended = c.end();
        assert_eq!(ended.interrupted, Some(Reason::Timeout));
        assert!(ended.killed);
        c.shut_down(&ch);
        timer.join().unwrap();
    }

    #[test]
    fn shutting_down_kills_the_running_request_and_refuses_more() {
        let (c, ch) = control(LONG, None);
        assert!(c.begin(1, &ch));
        let killed = Arc::new(Mutex::new(Vec::new()));
        let k = killed.clone();
        c.set_killer(Box::new(move |id, reason| {
            k.lock().unwrap().push((id, reason))
        }));
        c.shut_down(&ch);
        assert_eq!(*killed.lock().unwrap(), vec![(1, Reason::Interrupt)]);
        assert!(c.killed());
        let ended = c.end();
        assert!(ended.shut_down);
        assert!(!c.begin(2, &ch));
    }

    #[test]
    fn a_start_that_overruns_is_killed_not_interrupted() {
        let (c, ch) = control(LONG, None);
        let (kills, timer) = run_timer(&c, &ch);
        c.begin_start(Duration::from_millis(20));
        assert_eq!(
            kills.recv_timeout(Duration::from_secs(10)).unwrap(),
            (START, Reason::Timeout)
        );
        assert!(c.killed());
        let ended = c.end();
        assert_eq!(ended.interrupted, Some(Reason::Timeout));
        assert!(ended.killed);
        c.shut_down(&ch);
        timer.join().unwrap();
    }

    #[test]
    fn an_interrupt_during_a_reset_is_kept_for_the_queued_request() {
        let (c, ch) = control(LONG, None);
        c.begin_start(LONG);
        // Request 3 was sent (and queued) before the interrupt.
        c.interrupt(3, &ch);
        assert!(!c.interrupted(), "the start itself is never interrupted");
        assert_eq!(c.end().interrupted, Some(Reason::Timeout));
        assert!(c.begin(3, &ch));
        assert!(c.interrupted());
        c.end();
        assert!(c.begin(4, &ch));
        assert!(!c.interrupted());
    }

    /// Polls a future once with a no-op waker.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx).is_ready()
    }

    #[test]
    fn async_waits_wake_on_interrupt_and_on_kill() {
        let (c, ch) = control(Duration::from_millis(20), None);
        let (kills, timer) = run_timer(&c, &ch);
        assert!(c.begin(1, &ch));
        let mut interrupted = std::pin::pin!(c.until_stopped(Stop::Interrupted));
        let mut killed = std::pin::pin!(c.until_stopped(Stop::Killed));
        assert!(!poll_once(interrupted.as_mut()));
        assert!(!poll_once(killed.as_mut()));
        c.interrupt(1, &ch);
        assert!(poll_once(interrupted.as_mut()));
        assert!(
            !poll_once(killed.as_mut()),
            "not killed before the grace period"
        );
        kills.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(poll_once(killed.as_mut()));
        c.end();
        c.shut_down(&ch);
        timer.join().unwrap();
    }
}
