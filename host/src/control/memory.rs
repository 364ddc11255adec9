//! Interrupts raised in the guest's own memory.
//!
//! An interpreter checks a word of pending events on every loop jump and
//! call anyway (CPython: its eval breaker). A guest that tells the host
//! where that word is gets an interrupt as its own asynchronous exception,
//! catchable where it lands and free until it comes: nothing to poll.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{Control, START};

/// How often a memory interrupt the guest has not taken is raised again:
/// a store of the guest's own to the word can overwrite the host's bits.
const RAISE_AGAIN_EVERY: Duration = Duration::from_millis(1);

/// Where and how to raise an interrupt in a guest's linear memory.
#[derive(Debug)]
pub(crate) struct MemoryInterrupt {
    word: *const AtomicU32,
    bits: u32,
    slot: *const AtomicU32,
    value: u32,
}

// SAFETY: the pointers are only dereferenced under the control's lock,
// while the memory they point into is alive (see `MemoryInterrupt::new`).
unsafe impl Send for MemoryInterrupt {}
unsafe impl Sync for MemoryInterrupt {}

impl MemoryInterrupt {
    /// # Safety
    /// `word` and `slot` are 4-byte aligned host addresses inside a linear
    /// memory that stays mapped there (a wasm memory that never moves)
    /// until this value is dropped or replaced through
    /// [`Control::use_memory_interrupt`](super::Control::use_memory_interrupt).
    ///
    /// The guest reads and writes these words with plain loads and stores
    /// while the host writes them atomically from another thread, as a
    /// signal handler would: a store of the guest's may overwrite the
    /// host's bits, which is why [`raise`](Self::raise) is repeated until
    /// the guest takes the interrupt.
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    pub unsafe fn new(word: *mut u8, bits: u32, slot: *mut u8, value: u32) -> Self {
        debug_assert!(word.addr().is_multiple_of(4) && slot.addr().is_multiple_of(4));
        MemoryInterrupt {
            word: word.cast(),
            bits,
            slot: slot.cast(),
            value,
        }
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: aligned and alive (the contract of `new`).
        unsafe { &*self.word }
    }

    fn slot(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.slot }
    }

    /// The value first, so that a guest seeing the bits finds it.
    pub fn raise(&self) {
        self.slot().store(self.value, Ordering::SeqCst);
        self.word().fetch_or(self.bits, Ordering::SeqCst);
    }

    /// Sets the bits again unless the guest took the interrupt; false
    /// once it did. Never the value again: a guest that took it between
    /// the check and the store would take a second one. Bits with nothing
    /// in the slot cost the guest one look.
    pub fn raise_again(&self) -> bool {
        if self.slot().load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.word().fetch_or(self.bits, Ordering::SeqCst);
        true
    }

    /// Raised and not yet taken by the guest.
    pub fn pending(&self) -> bool {
        self.slot().load(Ordering::SeqCst) != 0
    }

    /// Takes back a raised interrupt the guest has not taken.
    pub fn clear(&self) {
        self.slot().store(0, Ordering::SeqCst);
        self.word().fetch_and(!self.bits, Ordering::SeqCst);
    }
}

/// The state of the memory interrupt, kept across requests.
#[derive(Default)]
pub(super) struct Delivery {
    pub memory: Option<MemoryInterrupt>,
    /// The guest runs code that can take it.
    pub armed: bool,
    /// Raised in memory and not yet taken or taken back: when to raise it
    /// again.
    pub again_at: Option<Instant>,
    /// This request's interrupt reached the guest (in memory or through a
    /// host call): never raised again.
    pub delivered: bool,
}

impl Delivery {
    /// Raises the interrupt if it can and has not yet.
    pub fn raise(&mut self) {
        if let Some(memory) = &self.memory
            && self.armed
            && !self.delivered
        {
            memory.raise();
            self.again_at = Some(Instant::now() + RAISE_AGAIN_EVERY);
        }
    }

    /// Raises a raised interrupt again, unless the guest took it.
    pub fn raise_again(&mut self, now: Instant) {
        if self.memory.as_ref().is_some_and(|m| m.raise_again()) {
            self.again_at = Some(now + RAISE_AGAIN_EVERY);
        } else {
            self.again_at = None;
            self.delivered = true;
        }
    }

    /// Takes back a raised interrupt the guest has not taken.
    pub fn take_back(&mut self) {
        if self.again_at.take().is_some()
            && let Some(memory) = &self.memory
        {
            if !memory.pending() {
                // Taken already: never raised again in this request.
                self.delivered = true;
            }
            memory.clear();
        }
    }

    /// The interrupt was reported to the guest some other way.
    pub fn delivered_otherwise(&mut self) {
        self.take_back();
        self.delivered = true;
    }

    /// Between requests: disarmed, nothing raised, the memory kept.
    pub fn reset(&mut self) {
        self.take_back();
        self.armed = false;
        self.delivered = false;
    }
}

impl Control {
    /// Where the guest takes interrupts in its memory (`None`: nowhere,
    /// as before that memory is freed).
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    pub fn use_memory_interrupt(&self, memory: Option<MemoryInterrupt>) {
        let mut t = self.lock();
        t.delivery.reset();
        t.delivery.memory = memory;
    }

    /// Forgets where the guest takes interrupts in its memory, and says
    /// where that was (a spare's, for the worker that takes the spare).
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    pub fn take_memory_interrupt(&self) -> Option<MemoryInterrupt> {
        let mut t = self.lock();
        t.delivery.reset();
        t.delivery.memory.take()
    }

    /// The guest arms or disarms its memory interrupt (see the WIT's
    /// `arm-memory-interrupt`).
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    pub fn arm_memory_interrupt(&self, armed: bool) {
        let mut t = self.lock();
        if armed {
            t.delivery.armed = true;
            if t.reason.is_some() && !t.killed && t.id != START {
                t.delivery.raise();
                self.wake_timer.notify_one();
            }
        } else {
            t.delivery.take_back();
            t.delivery.armed = false;
        }
    }

    /// A host call told the guest of the interrupt (a sleep cut short, a
    /// channel's error, `interrupted()`): it is not raised in memory too.
    pub fn interrupt_delivered(&self) {
        self.lock().delivery.delivered_otherwise();
    }
}
