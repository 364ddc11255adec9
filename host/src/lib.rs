//! The worker side of malt: the process (or thread) that runs a guest and
//! serves the protocol.
//!
//! A host reads frames on one byte stream and writes frames on another
//! (a host process's stdin and stdout). It does not depend on the manager:
//! the manager crate (`malt-rt`) starts hosts, and the guest SDK
//! (`malt-guest`) serves native guests with this crate, without wasmtime
//! (the `wasm` feature adds the wasmtime backend).
//!
//! A host process is any program linking `malt-rt`, re-executed with
//! [`HOST_ARG`] (the library serves it before `main`), or a native guest
//! program started with [`NATIVE_HOST_ARG`] that calls
//! [`main_if_host_with`] first thing in `main`. Its threads:
//!
//! - the **reader** decodes requests; calls and evals go to the guest
//!   thread's queue, while interrupts, channel operations and stop are
//!   served at once, even while the guest is busy;
//! - the **guest** thread owns the guest (for wasm: the `Store`) and runs
//!   one request at a time, in arrival order; it writes its own replies;
//! - the **timer** thread enforces the call timeout and the interrupt
//!   grace period; when a guest ignores a cooperative interrupt it kills
//!   the running request (wasm: epoch interruption).
//!
//! Frames out are written by whichever thread has one, under a lock, so
//! frames never interleave and no writer thread adds a hop.

#![deny(missing_docs)]

mod channels;
mod control;
mod handoff;
#[cfg(feature = "wasm")]
mod harden;
mod native;
mod process;
mod remote;
mod requests;
mod rollback;
mod serve;
mod shared;
#[cfg(feature = "wasm")]
#[doc(hidden)]
pub mod wasm;
#[cfg(feature = "wasm")]
#[doc(hidden)]
pub mod zygote;

use std::io::{BufReader, Write};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use malt_protocol::{
    self as protocol, Failure, FatalKind, FrameError, FromHost, GuestKind, HostConfig,
    PROTOCOL_VERSION, ReplyMode, Stream, ToHost,
};

pub(crate) use channels::Channels;
pub(crate) use control::Control;
pub(crate) use process::exit;
#[cfg(feature = "wasm")]
pub use process::harden_process;
pub use process::{
    close_inherited_files, first_arg_is, fork_host, pipe, process_args, run_forked_process,
    run_process,
};
pub use remote::{ComponentRequest, ComponentStore, set_component_store};
#[cfg(feature = "wasm")]
pub(crate) use serve::StartFailed;
pub use serve::{Place, serve};
pub(crate) use shared::Shared;

/// Stack of the thread that runs the guest.
const GUEST_STACK: usize = 64 << 20;

/// First argument that makes a program linking `malt-rt` a worker host
/// (served before `main`; see [`run_process`]).
pub const HOST_ARG: &str = "__malt-host";

/// First argument that makes a native guest program a worker host (see
/// [`main_if_host_with`]).
pub const NATIVE_HOST_ARG: &str = "__malt-native-host";

/// Serves as a worker host with a native guest of this program, if this
/// process was started as one (`Worker::native_program`).
///
/// Call it first thing in `main`, before any async runtime starts: when
/// the first argument is [`NATIVE_HOST_ARG`] it never returns; otherwise it
/// returns at once. `guest` makes a fresh guest whenever one is needed (at
/// start, and after a guest panicked).
pub fn main_if_host_with<G: NativeGuest + 'static>(
    guest: impl Fn(GuestContext) -> G + Send + Sync + 'static,
) {
    if first_arg_is(NATIVE_HOST_ARG) {
        let factory: NativeFactory = Arc::new(move |cx| Box::new(guest(cx)));
        std::process::exit(run_process(Some(factory)));
    }
}

/// What a guest is asked to do.
pub(crate) enum Work {
    Call {
        name: String,
        /// Read in place from the request's frame.
        args: protocol::FrameBytes,
    },
    Eval {
        code: String,
    },
}

/// How a guest request ended, short of success.
pub(crate) enum GuestError {
    /// The guest returned an error; its state is intact.
    Error(String),
    /// The guest trapped or was killed; its state is gone and the host
    /// resets it before the next request.
    Trap {
        message: String,
        memory_limit_hit: bool,
        out_of_fuel: bool,
    },
}

/// A guest served by a host: a wasm component, or a native guest.
pub(crate) trait Guest {
    /// Starts the guest (for wasm: instantiates it, running its start
    /// function), on the guest thread, once the host is locked down (run
    /// under the start timeout).
    fn start(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Runs one request.
    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError>;
    /// Starts over with a fresh guest after a trap or a kill (run under
    /// the start timeout).
    fn reset(&mut self) -> Result<(), String>;
}

/// A guest written in Rust and served natively (no wasm): the script
/// guest in a native worker, or a program's own guest (see
/// [`main_if_host_with`]).
pub trait NativeGuest {
    /// Calls the function `name`; `args` and the result are MessagePack.
    fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String>;
    /// Evaluates code, if the guest can.
    fn eval(&mut self, code: &str) -> Result<Vec<u8>, String> {
        let _ = code;
        Err("this guest cannot evaluate code".into())
    }
}

/// Makes a native guest.
#[doc(hidden)]
pub type NativeFactory = Arc<dyn Fn(GuestContext) -> Box<dyn NativeGuest> + Send + Sync>;

/// The host services, what a guest can ask of its host: the `host`
/// interface of the `malt:worker` world. Implemented here once; the wasm
/// backend's imports, the script guest and the SDK's native guests are thin
/// adapters over it.
#[derive(Clone)]
pub struct GuestContext {
    shared: Arc<Shared>,
}

impl GuestContext {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        GuestContext { shared }
    }

    /// True once the manager asked to interrupt the request now running.
    pub fn interrupted(&self) -> bool {
        self.told(self.shared.control.interrupted())
    }

    /// Sleeps unless interrupted; false when an interrupt cut it short.
    pub fn sleep(&self, duration: std::time::Duration) -> bool {
        let slept = self.shared.channels.sleep(&self.shared.control, duration);
        !self.told(!slept)
    }

    /// Appends a MessagePack value to a worker channel (waits while full).
    pub fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String> {
        let put = self.shared.channels.guest_put(&self.shared, name, value);
        self.told(put.is_err() && self.shared.control.interrupted());
        put
    }

    /// Takes the oldest MessagePack value of a worker channel (waits while empty).
    pub fn channel_take(&self, name: &str) -> Result<Vec<u8>, String> {
        let taken = self.shared.channels.guest_take(&self.shared, name);
        self.told(taken.is_err() && self.shared.control.interrupted());
        taken
    }

    /// From now on interrupts are raised in the guest's memory, there.
    #[cfg(feature = "wasm")]
    pub(crate) fn use_memory_interrupt(&self, at: control::MemoryInterrupt) {
        self.shared.control.use_memory_interrupt(Some(at));
    }

    /// Forgets where the guest takes interrupts in its memory, and says
    /// where that was.
    #[cfg(feature = "wasm")]
    pub(crate) fn take_memory_interrupt(&self) -> Option<control::MemoryInterrupt> {
        self.shared.control.take_memory_interrupt()
    }

    /// The guest runs code that takes a memory interrupt (or stops).
    #[cfg(feature = "wasm")]
    pub(crate) fn arm_memory_interrupt(&self, armed: bool) {
        self.shared.control.arm_memory_interrupt(armed);
    }

    /// True once the running request (or start) is killed: wasm code must
    /// not go on.
    #[cfg(feature = "wasm")]
    pub(crate) fn killed(&self) -> bool {
        self.shared.control.killed()
    }

    /// Whether this call tells the guest of an interrupt: then it is not
    /// raised in the guest's memory too (one interrupt, one exception).
    fn told(&self, interrupted: bool) -> bool {
        if interrupted {
            self.shared.control.interrupt_delivered();
        }
        interrupted
    }

    /// Whether a take would not wait.
    pub fn channel_is_ready(&self, name: &str) -> bool {
        self.shared.channels.is_ready(name)
    }
}

#[cfg(feature = "script")]
impl malt_script::Host for GuestContext {
    fn interrupted(&self) -> bool {
        GuestContext::interrupted(self)
    }
    fn sleep(&self, ms: u64) -> bool {
        GuestContext::sleep(self, std::time::Duration::from_millis(ms))
    }
    fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String> {
        GuestContext::channel_put(self, name, value)
    }
    fn channel_take(&self, name: &str) -> Result<Vec<u8>, String> {
        GuestContext::channel_take(self, name)
    }
    fn channel_is_ready(&self, name: &str) -> bool {
        GuestContext::channel_is_ready(self, name)
    }
}

#[cfg(feature = "script")]
/// The script guest (Rhai) as a native guest, for a program that serves
/// it, perhaps next to functions of its own (see `examples/native_guest.rs`).
pub struct ScriptGuest(malt_script::Session);

#[cfg(feature = "script")]
impl ScriptGuest {
    /// A fresh script session whose built-ins reach this worker's host.
    pub fn new(context: GuestContext) -> Self {
        ScriptGuest(malt_script::Session::new(std::rc::Rc::new(context)))
    }
}

#[cfg(feature = "script")]
impl NativeGuest for ScriptGuest {
    fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String> {
        self.0.call(name, args)
    }
    fn eval(&mut self, code: &str) -> Result<Vec<u8>, String> {
        self.0.eval(code)
    }
}

pub(crate) type Killer = Box<dyn Fn(u64, control::Reason) + Send + Sync>;
