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
#[cfg(feature = "wasm")]
mod harden;
mod native;
#[cfg(feature = "wasm")]
#[doc(hidden)]
pub mod wasm;

use std::io::{BufReader, Write};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use malt_protocol::{
    self as protocol, Failure, FrameError, FromHost, HostConfig, PROTOCOL_VERSION, ReplyMode,
    Stream, ToHost,
};

pub(crate) use channels::Channels;
pub(crate) use control::Control;

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

/// Whether this process was started with `arg` as its first argument.
#[doc(hidden)]
pub fn first_arg_is(arg: &str) -> bool {
    process_args().get(1).is_some_and(|a| a == arg)
}

/// This process's arguments, read from the kernel: before `main` (where
/// malt's start-up hook runs) std's own list may not be set up yet.
fn process_args() -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::read("/proc/self/cmdline") {
        Ok(bytes) => bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
            .collect(),
        Err(_) => std::env::args_os().collect(),
    }
}

/// Exit codes of a host process.
pub(crate) mod exit {
    pub const OK: i32 = 0;
    pub const START_FAILED: i32 = 2;
    pub const PROTOCOL: i32 = 3;
    pub const UNKILLABLE: i32 = 4;
    pub const RESTART: i32 = 5;
}

/// What a guest is asked to do.
pub(crate) enum Work {
    Call { name: String, args: Vec<u8> },
    Eval { code: String },
}

/// How a guest request ended, short of success.
pub(crate) enum GuestError {
    /// The guest returned an error; its state is intact.
    Error(String),
    /// The guest trapped; it has already reset itself to a fresh state.
    Trap {
        message: String,
        memory_limit_hit: bool,
        out_of_fuel: bool,
    },
}

/// A guest served by a host: a wasm component, or a native guest.
pub(crate) trait Guest {
    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError>;
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

/// What a native guest can ask of its host: the `host` interface of the
/// `malt:worker` world.
#[derive(Clone)]
pub struct GuestContext {
    shared: Arc<Shared>,
}

impl GuestContext {
    /// True once the manager asked to interrupt the request now running.
    pub fn interrupted(&self) -> bool {
        self.shared.control.interrupted()
    }

    /// Sleeps unless interrupted; false when an interrupt cut it short.
    pub fn sleep(&self, duration: std::time::Duration) -> bool {
        self.shared.channels.sleep(&self.shared.control, duration)
    }

    /// Appends a MessagePack value to a worker channel (waits while full).
    pub fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String> {
        self.shared.channels.guest_put(&self.shared, name, value)
    }

    /// Takes the oldest MessagePack value of a worker channel (waits while empty).
    pub fn channel_take(&self, name: &str) -> Result<Vec<u8>, String> {
        self.shared.channels.guest_take(&self.shared, name)
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

/// State shared by the host's threads.
pub(crate) struct Shared {
    /// The protocol stream out. Whoever has a frame writes it (one
    /// `write` per frame, under the lock, so frames never interleave):
    /// no hop through a writer thread on the way back to the manager.
    /// `None` once closed.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    pub control: Control,
    pub channels: Channels,
    pub max_frame: usize,
    output_limit: u64,
    /// Output bytes of the running request; past the limit, the rest is
    /// dropped (one notice).
    output_used: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Writes a frame. A failed write means the manager is gone: the
    /// stream is dropped and later frames go nowhere.
    pub fn send(&self, message: &FromHost) {
        let frame = protocol::encode(message);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut()
            && w.write_all(&frame).and_then(|()| w.flush()).is_err()
        {
            *out = None;
        }
    }

    /// Exits the host process once every frame written so far is out.
    pub fn exit(&self, code: i32) -> ! {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut() {
            let _ = w.flush();
        }
        std::process::exit(code)
    }

    /// Closes the stream (an in-process worker winding down).
    fn close(&self) {
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn reply(&self, id: u64, result: Result<Option<Vec<u8>>, Failure>) {
        let result = result.map(|v| v.map(serde_bytes::ByteBuf::from));
        self.send(&FromHost::Reply { id, result });
    }

    pub fn output(&self, stream: Stream, data: &[u8]) {
        use std::sync::atomic::Ordering;
        let len = data.len() as u64;
        let used = self.output_used.fetch_add(len, Ordering::Relaxed);
        if used + len > self.output_limit {
            if used <= self.output_limit {
                let notice = format!(
                    "\n[malt: output limit of {} bytes reached; the rest of this request's output is dropped]\n",
                    self.output_limit
                );
                self.send(&FromHost::Output {
                    stream: Stream::Stderr,
                    data: notice.into_bytes(),
                });
            }
            return;
        }
        for chunk in data.chunks(self.max_frame.saturating_sub(64).max(1)) {
            self.send(&FromHost::Output {
                stream,
                data: chunk.to_vec(),
            });
        }
    }
}

/// Where a host runs.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its own process (stdin/stdout carry the protocol).
    Process,
    /// Threads of the manager's process (an in-process worker).
    InProcess,
}

/// Runs a host process on stdin/stdout and returns its exit code: the
/// entry point behind [`HOST_ARG`] and [`main_if_host_with`].
#[doc(hidden)]
pub fn run_process(native: Option<NativeFactory>) -> i32 {
    ignore_signals();
    die_with_parent();
    // The protocol gets its own descriptor; fd 1 and 2 become pipes whose
    // contents are forwarded as output frames, so nothing a guest (or a
    // library) prints can corrupt the protocol.
    let protocol_out = match take_stdout() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("malt host: cannot set up the protocol stream: {e}");
            return exit::START_FAILED;
        }
    };
    let input = std::io::stdin().lock();
    serve(input, protocol_out, Place::Process, native)
}

/// Duplicates fd 1 for the protocol and points fd 1 at /dev/null until
/// output forwarding replaces it.
fn take_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: dup/dup2 on descriptors this process owns; the duplicate is
    // owned by the returned File alone.
    unsafe {
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        if libc::dup2(null.as_raw_fd(), 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Serves one worker on a byte stream until the stream ends or the
/// manager says stop; returns the exit code.
#[doc(hidden)]
pub fn serve(
    input: impl std::io::Read,
    output: impl Write + Send + 'static,
    place: Place,
    native: Option<NativeFactory>,
) -> i32 {
    let mut input = BufReader::with_capacity(64 << 10, input);
    let mut output = output;
    let config = match read_init(&mut input) {
        Ok(c) => c,
        Err(message) => return fatal(&mut output, &message, exit::PROTOCOL),
    };
    let shared = Arc::new(Shared {
        out: Mutex::new(None),
        output_limit: config.output_limit,
        output_used: std::sync::atomic::AtomicU64::new(0),
        control: Control::new(config.interrupt_grace, config.call_timeout),
        channels: Channels::default(),
        max_frame: config.max_frame,
    });

    let (kind, guest, kill) = match prepare(&config, &shared, place, native) {
        Ok(prepared) => prepared,
        Err(message) => return fatal(&mut output, &message, exit::START_FAILED),
    };
    *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(output));
    let (work_tx, work_rx) = std::sync::mpsc::channel();
    let s = shared.clone();
    let guest_thread = std::thread::Builder::new()
        .name("malt-guest".into())
        // Native guests recurse on this stack (a wasm guest's own stack is
        // capped by wasmtime); address space only, touched as used.
        .stack_size(GUEST_STACK)
        .spawn(move || guest_loop(guest(), work_rx, &s))
        .expect("spawn guest thread");
    let s = shared.clone();
    let kill = Arc::new(kill);
    let k = kill.clone();
    std::thread::Builder::new()
        .name("malt-timer".into())
        .spawn(move || {
            if s.control.timer_loop(&s.channels, &**k) {
                // The guest ignored both the interrupt and the kill (it is
                // blocked in the host outside wasm): give up on it, so the
                // manager sees the worker terminate instead of a hang.
                let message = "the guest did not stop after being killed".to_string();
                eprintln!("malt host: {message}");
                s.send(&FromHost::Fatal { message });
                if place == Place::Process {
                    s.exit(exit::UNKILLABLE);
                }
                s.close();
            }
        })
        .expect("spawn timer thread");

    shared.send(&FromHost::Hello {
        version: PROTOCOL_VERSION,
        malt_version: protocol::MALT_VERSION.to_string(),
        kind: kind.into(),
        pid: std::process::id(),
    });

    let code = read_loop(&mut input, &shared, &work_tx);
    if place == Place::Process {
        // Stop or end of stream: the process exits with the other threads
        // wherever they are; the guest may be in the middle of a request.
        return code;
    }
    // In-process: wind the threads down. A running request is killed; the
    // guest thread ends when its queue closes, the timer when told to,
    // and the writer (closing the stream) once nobody can send.
    drop(work_tx);
    shared.control.shut_down(&shared.channels, &**kill);
    let _ = guest_thread.join();
    shared.close();
    code
}

type GuestMaker = Box<dyn FnOnce() -> Box<dyn Guest> + Send>;

/// Makes the guest a configuration asks for: its kind, a maker for the
/// guest thread, and how to kill a request.
fn prepare(
    config: &HostConfig,
    shared: &Arc<Shared>,
    place: Place,
    native: Option<NativeFactory>,
) -> Result<(&'static str, GuestMaker, Killer), String> {
    match (&config.guest, place) {
        (protocol::GuestSpec::Artifact { .. }, _) => prepare_wasm(config, shared, place),
        (protocol::GuestSpec::NativeScript, Place::Process) => {
            #[cfg(feature = "script")]
            {
                let factory: NativeFactory = Arc::new(|cx: GuestContext| {
                    Box::new(ScriptGuest::new(cx)) as Box<dyn NativeGuest>
                });
                native::prepare(config, shared, factory)
            }
            #[cfg(not(feature = "script"))]
            {
                let _ = native;
                Err("this host was built without the native script guest \
                     (malt-host's `script` feature)"
                    .into())
            }
        }
        (protocol::GuestSpec::Native, Place::Process) => match native {
            Some(factory) => native::prepare(config, shared, factory),
            None => Err(
                "this program serves no native guest of its own (start a native \
                 guest program, one that calls malt::host::main_if_host_with)"
                    .into(),
            ),
        },
        (_, Place::InProcess) => Err("an in-process worker runs wasm guests only".into()),
    }
}

#[cfg(feature = "wasm")]
fn prepare_wasm(
    config: &HostConfig,
    shared: &Arc<Shared>,
    place: Place,
) -> Result<(&'static str, GuestMaker, Killer), String> {
    // A wasm host runs untrusted code: lock the process first (its own
    // process only; an in-process worker shares the manager's).
    if place == Place::Process {
        harden::apply().map_err(|e| format!("cannot harden the host: {e}"))?;
    }
    let guest = wasm::WasmGuest::load(config, shared.clone()).map_err(|e| format!("{e:#}"))?;
    // Loaded: from now on the process needs no file but those beneath the
    // guest's grants.
    if place == Place::Process {
        harden::restrict_files(&config.dirs).map_err(|e| format!("cannot harden the host: {e}"))?;
    }
    let kill = guest.killer();
    Ok((
        "wasm",
        Box::new(move || Box::new(guest) as Box<dyn Guest>),
        kill,
    ))
}

#[cfg(not(feature = "wasm"))]
fn prepare_wasm(
    _: &HostConfig,
    _: &Arc<Shared>,
    _: Place,
) -> Result<(&'static str, GuestMaker, Killer), String> {
    Err("this host was built without wasm support (malt-host's `wasm` feature)".into())
}

/// Locks this process the way a wasm host process locks itself before
/// guest code runs: no_new_privs, rlimits, a seccomp filter (no exec, no
/// new processes, no sockets) and, where the kernel has Landlock, no file
/// but those beneath `dirs`. For a process that does nothing afterwards but
/// run a guest (`malt run`); irreversible.
#[cfg(feature = "wasm")]
#[doc(hidden)]
pub fn harden_process(dirs: &[malt_protocol::DirGrant]) -> Result<(), String> {
    harden::apply()?;
    harden::restrict_files(dirs).map(|_| ())
}

/// A pipe whose two ends close on exec: (read end, write end).
#[doc(hidden)]
pub fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}
pub(crate) type Killer = Box<dyn Fn(u64, control::Reason) + Send + Sync>;

/// Asks for SIGKILL when the manager dies, then checks that it has not
/// died already (the manager passes its pid as the second argument).
fn die_with_parent() {
    let expected: Option<i32> = process_args().get(2).and_then(|p| p.to_str()?.parse().ok());
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if expected.is_some_and(|pid| libc::getppid() != pid) {
            std::process::exit(exit::START_FAILED);
        }
    }
}

fn ignore_signals() {
    // A write to a manager that is gone must fail (and end the host
    // cleanly), not kill it; before `main`, std has not set this up yet.
    // SAFETY: as below.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // The manager decides what an interrupt means. A Ctrl-C in the
    // manager's terminal reaches the whole process group, and must not
    // kill its workers.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

fn read_init(input: &mut impl std::io::Read) -> Result<HostConfig, String> {
    // The Init frame is small; cap it before the configured cap is known.
    let body = protocol::read_frame(input, 1 << 20).map_err(|e| format!("reading init: {e}"))?;
    match protocol::decode::<ToHost>(&body) {
        Ok(ToHost::Init(config))
            if config.version == PROTOCOL_VERSION
                && config.malt_version == protocol::MALT_VERSION =>
        {
            Ok(*config)
        }
        Ok(ToHost::Init(config)) => Err(format!(
            "version mismatch: the manager is malt {} (protocol {}), this host is malt {} \
             (protocol {PROTOCOL_VERSION}); use a host of the manager's version",
            config.malt_version,
            config.version,
            protocol::MALT_VERSION
        )),
        Ok(other) => Err(format!("expected Init as the first frame, got {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn fatal(out: &mut impl Write, message: &str, code: i32) -> i32 {
    eprintln!("malt host: {message}");
    let frame = protocol::encode(&FromHost::Fatal {
        message: message.to_string(),
    });
    let _ = out.write_all(&frame).and_then(|_| out.flush());
    code
}

/// Reads and dispatches requests until the stream ends or a Stop arrives.
fn read_loop(
    input: &mut impl std::io::Read,
    shared: &Shared,
    work: &std::sync::mpsc::Sender<(u64, Work, ReplyMode)>,
) -> i32 {
    loop {
        let body = match protocol::read_frame(input, shared.max_frame) {
            Ok(body) => body,
            // The manager is gone: a worker dies with its manager.
            Err(FrameError::Eof) => return exit::OK,
            Err(e) => {
                shared.send(&FromHost::Fatal {
                    message: format!("bad frame from the manager: {e}"),
                });
                eprintln!("malt host: bad frame from the manager: {e}");
                return exit::PROTOCOL;
            }
        };
        let message = match protocol::decode::<ToHost>(&body) {
            Ok(m) => m,
            Err(e) => {
                shared.send(&FromHost::Fatal {
                    message: format!("bad frame from the manager: {e}"),
                });
                eprintln!("malt host: bad frame from the manager: {e}");
                return exit::PROTOCOL;
            }
        };
        match message {
            ToHost::Call {
                id,
                name,
                args,
                reply,
            } => {
                let _ = work.send((id, Work::Call { name, args }, reply));
            }
            ToHost::Eval { id, code, reply } => {
                let _ = work.send((id, Work::Eval { code }, reply));
            }
            ToHost::Interrupt { up_to } => shared.control.interrupt(up_to, &shared.channels),
            ToHost::ChannelOpen { id, name, capacity } => {
                let result = shared.channels.open(&name, capacity as usize);
                shared.reply(id, result.map(|()| None).map_err(Failure::Invalid));
            }
            ToHost::ChannelPut { id, name, value } => {
                shared.channels.manager_put(shared, id, &name, value)
            }
            ToHost::ChannelTake { id, name } => shared.channels.manager_take(shared, id, &name),
            ToHost::ChannelIsReady { id, name } => {
                let ready = shared.channels.is_ready(&name);
                shared.reply(id, Ok(Some(rmp_serde::to_vec(&ready).unwrap_or_default())));
            }
            ToHost::Stop => return exit::OK,
            ToHost::Init(_) => {
                eprintln!("malt host: a second Init frame");
                return exit::PROTOCOL;
            }
        }
    }
}

/// Runs requests one at a time, in arrival order.
fn guest_loop(mut guest: Box<dyn Guest>, work: Receiver<(u64, Work, ReplyMode)>, shared: &Shared) {
    while let Ok((id, work, mode)) = work.recv() {
        if !shared.control.begin(id, &shared.channels) {
            return;
        }
        shared
            .output_used
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let outcome = guest.run(&work);
        let ended = shared.control.end();
        if ended.shut_down {
            // An in-process worker winding down: the manager sees the
            // stream end, not a reply.
            return;
        }
        let result = match outcome {
            Ok(value) => Ok(value),
            Err(GuestError::Error(message)) => Err(match ended.interrupted {
                Some(reason) => reason.failure(false),
                None => Failure::Remote(message),
            }),
            Err(GuestError::Trap {
                message,
                memory_limit_hit,
                out_of_fuel,
            }) => Err(match ended.interrupted {
                Some(reason) if ended.killed => reason.failure(true),
                _ if out_of_fuel => Failure::Limit {
                    limit: protocol::Limit::Fuel,
                    message: "the request used up its fuel; the guest was reset".into(),
                },
                _ if memory_limit_hit => Failure::Limit {
                    limit: protocol::Limit::Memory,
                    message: format!("the guest ran out of its memory limit ({message})"),
                },
                _ => Failure::Trap(message),
            }),
        };
        match mode {
            ReplyMode::Value => match result {
                Ok(value) if value.len() + 64 > shared.max_frame => shared.reply(
                    id,
                    Err(Failure::Limit {
                        limit: protocol::Limit::FrameSize,
                        message: format!(
                            "the result is {} bytes, over the {} byte frame cap",
                            value.len(),
                            shared.max_frame
                        ),
                    }),
                ),
                Ok(value) => shared.reply(id, Ok(Some(value))),
                Err(f) => shared.reply(id, Err(f)),
            },
            ReplyMode::Ack => shared.reply(id, result.map(|_| None)),
            ReplyMode::None => {
                if let Err(failure) = result {
                    let what = match &work {
                        Work::Call { name, .. } => format!("remote_do({name})"),
                        Work::Eval { .. } => "remote_do(eval)".to_string(),
                    };
                    shared.output(
                        Stream::Stderr,
                        format!("{what} failed: {}\n", failure_text(&failure)).as_bytes(),
                    );
                }
                // No value, but the manager learns the request ran (a
                // restarted native host must not run it twice).
                shared.reply(id, Ok(None));
            }
        }
    }
}

fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Remote(m) | Failure::Trap(m) | Failure::Invalid(m) => m.clone(),
        Failure::Interrupted { .. } => "interrupted".into(),
        Failure::Timeout { .. } => "timed out".into(),
        Failure::Limit { limit, message } => format!("{limit} exceeded: {message}"),
    }
}
