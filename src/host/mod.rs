//! The worker side: the process that runs a guest and serves the protocol.
//!
//! A host process is the `malt` binary started with [`HOST_ARG`] as its
//! first argument (or any program that calls [`main_if_host`] first thing
//! in `main`). It reads frames on stdin and writes frames on stdout. Its
//! threads:
//!
//! - the **reader** (the main thread) decodes requests; calls and evals
//!   go to the guest thread's queue, while interrupts, channel operations
//!   and stop are served at once, even while the guest is busy;
//! - the **guest** thread owns the guest (for wasm: the `Store`) and runs
//!   one request at a time, in arrival order;
//! - the **writer** thread owns stdout and writes every outgoing frame
//!   (replies and guest output), so frames never interleave;
//! - the **timer** thread enforces the call timeout and the interrupt
//!   grace period; when a guest ignores a cooperative interrupt it kills
//!   the running request (wasm: epoch interruption).

mod channels;
mod control;
mod harden;
mod native;
pub(crate) mod wasm;

use std::io::{BufReader, Write};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use crate::protocol::{
    self, Failure, FrameError, FromHost, HostConfig, PROTOCOL_VERSION, ReplyMode, Stream, ToHost,
};

pub(crate) use channels::Channels;
pub(crate) use control::Control;

/// Stack of the thread that runs the guest.
const GUEST_STACK: usize = 64 << 20;

/// First argument that turns the `malt` binary (or a program calling
/// [`main_if_host`]) into a worker host.
pub const HOST_ARG: &str = "__malt-host";

/// Serves as a worker host if this process was started as one.
///
/// Call it first thing in `main` of a program that should be able to act
/// as its own worker host (see `WorkerBuilder::host_program`), before any
/// async runtime starts. When the first argument is [`HOST_ARG`] this
/// never returns; otherwise it returns at once.
pub fn main_if_host() {
    if is_host() {
        std::process::exit(run_process(None));
    }
}

/// Like [`main_if_host`], for a program that also offers a native guest
/// of its own (`Worker::native_program`): `guest` makes a fresh guest
/// whenever one is needed (at start, and after a guest panicked).
pub fn main_if_host_with<G: NativeGuest + 'static>(
    guest: impl Fn(GuestContext) -> G + Send + Sync + 'static,
) {
    if is_host() {
        let factory: NativeFactory = Arc::new(move |cx| Box::new(guest(cx)));
        std::process::exit(run_process(Some(factory)));
    }
}

fn is_host() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == HOST_ARG)
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
pub(crate) type NativeFactory = Arc<dyn Fn(GuestContext) -> Box<dyn NativeGuest> + Send + Sync>;

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

/// The script guest (Rhai) as a native guest, for a program that serves
/// it, perhaps next to functions of its own (see `examples/native_guest.rs`).
pub struct ScriptGuest(malt_script::Session);

impl ScriptGuest {
    /// A fresh script session whose built-ins reach this worker's host.
    pub fn new(context: GuestContext) -> Self {
        ScriptGuest(malt_script::Session::new(std::rc::Rc::new(context)))
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Its own process (stdin/stdout carry the protocol).
    Process,
    /// Threads of the manager's process (an in-process worker).
    InProcess,
}

/// Runs a host process on stdin/stdout; returns its exit code.
fn run_process(native: Option<NativeFactory>) -> i32 {
    ignore_sigint();
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
pub(crate) fn serve(
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

    let (kind, guest, kill): (&str, GuestMaker, Killer) = match (&config.guest, place) {
        (protocol::GuestSpec::Artifact { .. }, _) => {
            // A wasm host runs untrusted code: lock the process first (its
            // own process only; an in-process worker shares the manager's).
            if place == Place::Process
                && let Err(e) = harden::apply()
            {
                return fatal(
                    &mut output,
                    &format!("cannot harden the host: {e}"),
                    exit::START_FAILED,
                );
            }
            match wasm::WasmGuest::load(&config, shared.clone()) {
                Ok(g) => {
                    // Loaded: from now on the process needs no file but
                    // those beneath the guest's grants.
                    if place == Place::Process
                        && let Err(e) = harden::restrict_files(&config.dirs)
                    {
                        return fatal(
                            &mut output,
                            &format!("cannot harden the host: {e}"),
                            exit::START_FAILED,
                        );
                    }
                    let kill = g.killer();
                    (
                        "wasm",
                        Box::new(move || Box::new(g) as Box<dyn Guest>),
                        kill,
                    )
                }
                Err(e) => return fatal(&mut output, &format!("{e:#}"), exit::START_FAILED),
            }
        }
        (protocol::GuestSpec::NativeScript, Place::Process) => {
            let factory: NativeFactory =
                Arc::new(|cx: GuestContext| Box::new(ScriptGuest::new(cx)) as Box<dyn NativeGuest>);
            match native::prepare(&config, &shared, factory) {
                Ok(prepared) => prepared,
                Err(e) => return fatal(&mut output, &e, exit::START_FAILED),
            }
        }
        (protocol::GuestSpec::Native, Place::Process) => match native {
            Some(factory) => match native::prepare(&config, &shared, factory) {
                Ok(prepared) => prepared,
                Err(e) => return fatal(&mut output, &e, exit::START_FAILED),
            },
            None => {
                return fatal(
                    &mut output,
                    "this program serves no native guest (it calls malt::host::main_if_host, \
                     not main_if_host_with)",
                    exit::START_FAILED,
                );
            }
        },
        (_, Place::InProcess) => {
            return fatal(
                &mut output,
                "an in-process worker runs wasm guests only",
                exit::START_FAILED,
            );
        }
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
pub(crate) type Killer = Box<dyn Fn(u64, control::Reason) + Send + Sync>;

/// Asks for SIGKILL when the manager dies, then checks that it has not
/// died already (the manager passes its pid as the second argument).
fn die_with_parent() {
    let expected: Option<i32> = std::env::args().nth(2).and_then(|p| p.parse().ok());
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if expected.is_some_and(|pid| libc::getppid() != pid) {
            std::process::exit(exit::START_FAILED);
        }
    }
}

fn ignore_sigint() {
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
        Ok(ToHost::Init(config)) if config.version == PROTOCOL_VERSION => Ok(*config),
        Ok(ToHost::Init(config)) => Err(format!(
            "the manager speaks protocol version {}, this host speaks {PROTOCOL_VERSION}",
            config.version
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
            ToHost::Interrupt => shared.control.interrupt(&shared.channels),
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
        if !shared.control.begin(id) {
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
