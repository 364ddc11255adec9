//! Interrupts, timeouts and kills of the request now running.
//!
//! Flags belong to one request id: [`Control::begin`] resets them, so an
//! interrupt aimed at one request can never hit the next. An interrupt
//! that arrives between requests is kept for the next request to begin,
//! and applies to it only if the manager sent that request before the
//! interrupt (its id is at most the interrupt's `up_to`).

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
        if t.id == 0 {
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
        let (c, ch) = (c.clone(), ch.clone());
        let tx = Mutex::new(tx);
        let timer = std::thread::spawn(move || {
            c.timer_loop(&ch, &move |id, reason| {
                let _ = tx.lock().unwrap().send((id, reason));
            })
        });
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
        c.shut_down(&ch, &|_, _| {});
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
        c.shut_down(&ch, &|_, _| {});
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
        c.shut_down(&ch, &|_, _| {});
        timer.join().unwrap();
    }

    #[test]
    fn shutting_down_kills_the_running_request_and_refuses_more() {
        let (c, ch) = control(LONG, None);
        assert!(c.begin(1, &ch));
        let killed = Mutex::new(Vec::new());
        c.shut_down(&ch, &|id, reason| killed.lock().unwrap().push((id, reason)));
        assert_eq!(*killed.lock().unwrap(), vec![(1, Reason::Interrupt)]);
        assert!(c.killed());
        let ended = c.end();
        assert!(ended.shut_down);
        assert!(!c.begin(2, &ch));
    }
}
