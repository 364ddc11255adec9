//! The interrupt state machine, transition by transition.

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
    let timer = std::thread::spawn(move || c.timer_loop(&ch, &|| ()));
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

#[cfg(feature = "wasm")]
/// Polls a future once with a no-op waker.
fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx).is_ready()
}

#[cfg(feature = "wasm")]
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

/// A guest's memory interrupt: two words of a stand-in memory.
struct Words(Box<[std::sync::atomic::AtomicU32; 2]>);

impl Words {
    const BITS: u32 = 0b1000;
    const VALUE: u32 = 0xfeed;

    fn new(c: &Control) -> Words {
        let words = Words(Box::default());
        let at = |i: usize| words.0[i].as_ptr().cast::<u8>();
        // SAFETY: aligned words that outlive the control's use of them
        // (each test forgets them before they are dropped).
        c.use_memory_interrupt(Some(unsafe {
            MemoryInterrupt::new(at(0), Self::BITS, at(1), Self::VALUE)
        }));
        words
    }

    fn raised(&self) -> (bool, bool) {
        (
            self.0[0].load(Ordering::SeqCst) & Self::BITS != 0,
            self.0[1].load(Ordering::SeqCst) == Self::VALUE,
        )
    }

    /// What the guest does when it takes it.
    fn take(&self) {
        self.0[1].store(0, Ordering::SeqCst);
        self.0[0].fetch_and(!Self::BITS, Ordering::SeqCst);
    }
}

#[test]
fn a_memory_interrupt_is_raised_only_while_armed_and_once() {
    let (c, ch) = control(LONG, None);
    let words = Words::new(&c);
    // Not armed: only the flag.
    assert!(c.begin(1, &ch));
    c.interrupt(1, &ch);
    assert_eq!(words.raised(), (false, false));
    // Arming with an interrupt pending raises it at once.
    c.arm_memory_interrupt(true);
    assert_eq!(words.raised(), (true, true));
    words.take();
    c.arm_memory_interrupt(false);
    c.arm_memory_interrupt(true);
    assert_eq!(words.raised(), (false, false), "taken: never raised again");
    c.end();

    // Armed before the interrupt: raised as it comes; disarming takes
    // back what the guest has not taken.
    assert!(c.begin(2, &ch));
    c.arm_memory_interrupt(true);
    c.interrupt(2, &ch);
    assert_eq!(words.raised(), (true, true));
    c.arm_memory_interrupt(false);
    assert_eq!(words.raised(), (false, false));
    c.end();

    // A host call that reports the interrupt takes it back, and it is
    // not raised again in that request.
    assert!(c.begin(3, &ch));
    c.arm_memory_interrupt(true);
    c.interrupt(3, &ch);
    c.interrupt_delivered();
    assert_eq!(words.raised(), (false, false));
    c.arm_memory_interrupt(true);
    assert_eq!(words.raised(), (false, false));
    // The end of a request takes back anything left, and disarms.
    c.end();
    assert!(c.begin(4, &ch));
    c.arm_memory_interrupt(true);
    c.interrupt(4, &ch);
    c.end();
    assert_eq!(words.raised(), (false, false));
    assert!(c.begin(5, &ch));
    c.interrupt(5, &ch);
    assert_eq!(
        words.raised(),
        (false, false),
        "the next request starts disarmed"
    );
    c.end();
    c.use_memory_interrupt(None);
}

#[test]
fn a_memory_interrupt_is_raised_again_until_taken() {
    let (c, ch) = control(LONG, None);
    let (_kills, timer) = run_timer(&c, &ch);
    let words = Words::new(&c);
    assert!(c.begin(1, &ch));
    c.arm_memory_interrupt(true);
    c.interrupt(1, &ch);
    // A store of the guest's own overwrites the bits; the timer sets them
    // again while the value waits in the slot.
    words.0[0].store(0, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while words.raised() != (true, true) {
        assert!(Instant::now() < deadline, "the bits were never set again");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Taken: the timer stops. (It may set the bits once more if it looked
    // just before: bits with an empty slot cost the guest one look.)
    words.take();
    std::thread::sleep(Duration::from_millis(20));
    words.take();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(words.raised(), (false, false));
    c.end();
    c.use_memory_interrupt(None);
    c.shut_down(&ch);
    assert!(!timer.join().unwrap());
}
