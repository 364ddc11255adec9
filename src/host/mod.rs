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
pub(crate) mod wasm;

use std::io::{BufReader, BufWriter, Write};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

use crate::protocol::{
    self, Failure, FrameError, FromHost, HostConfig, PROTOCOL_VERSION, ReplyMode, Stream, ToHost,
};

pub(crate) use channels::Channels;
pub(crate) use control::Control;

/// First argument that turns the `malt` binary (or a program calling
/// [`main_if_host`]) into a worker host.
pub const HOST_ARG: &str = "__malt-host";

/// Outgoing frames waiting for the writer thread. Bounded so a guest that
/// prints faster than the manager reads is slowed down, not buffered
/// without limit.
const OUTGOING_FRAMES: usize = 1024;

/// Serves as a worker host if this process was started as one.
///
/// Call it first thing in `main` of a program that should be able to act
/// as its own worker host (see `WorkerBuilder::host_program`). When the
/// first argument is [`HOST_ARG`] this never returns; otherwise it returns
/// at once.
pub fn main_if_host() {
    if std::env::args_os().nth(1).is_some_and(|a| a == HOST_ARG) {
        std::process::exit(run());
    }
}

/// Exit codes of a host process.
mod exit {
    pub const OK: i32 = 0;
    pub const START_FAILED: i32 = 2;
    pub const PROTOCOL: i32 = 3;
    pub const UNKILLABLE: i32 = 4;
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

/// A guest served by a host: the wasm component, or (native) the script
/// session itself.
pub(crate) trait Guest {
    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError>;
}

/// State shared by the host's threads.
pub(crate) struct Shared {
    pub out: SyncSender<Vec<u8>>,
    pub control: Control,
    pub channels: Channels,
    pub max_frame: usize,
}

impl Shared {
    /// Queues a frame for the writer thread. Fails only once the writer is
    /// gone, i.e. the process is shutting down.
    pub fn send(&self, message: &FromHost) {
        let _ = self.out.send(protocol::encode(message));
    }

    pub fn reply(&self, id: u64, result: Result<Option<Vec<u8>>, Failure>) {
        let result = result.map(|v| v.map(serde_bytes::ByteBuf::from));
        self.send(&FromHost::Reply { id, result });
    }

    pub fn output(&self, stream: Stream, data: &[u8]) {
        for chunk in data.chunks(self.max_frame.saturating_sub(64).max(1)) {
            self.send(&FromHost::Output {
                stream,
                data: chunk.to_vec(),
            });
        }
    }
}

/// Runs a host process on stdin/stdout; returns its exit code.
pub fn run() -> i32 {
    ignore_sigint();
    let mut input = BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    let stdout = std::io::stdout();

    let config = match read_init(&mut input) {
        Ok(c) => c,
        Err(message) => return fatal(&mut stdout.lock(), &message, exit::PROTOCOL),
    };
    let (out_tx, out_rx) = std::sync::mpsc::sync_channel(OUTGOING_FRAMES);
    let shared = Arc::new(Shared {
        out: out_tx,
        control: Control::new(config.interrupt_grace, config.call_timeout),
        channels: Channels::default(),
        max_frame: config.max_frame,
    });
    let guest = match wasm::WasmGuest::load(&config, shared.clone()) {
        Ok(g) => g,
        Err(e) => {
            let message = format!("{e:#}");
            return fatal(&mut stdout.lock(), &message, exit::START_FAILED);
        }
    };
    let kill = guest.killer();

    std::thread::Builder::new()
        .name("malt-writer".into())
        .spawn(move || write_loop(out_rx, stdout))
        .expect("spawn writer thread");
    let (work_tx, work_rx) = std::sync::mpsc::channel();
    let s = shared.clone();
    std::thread::Builder::new()
        .name("malt-guest".into())
        .spawn(move || guest_loop(guest, work_rx, &s))
        .expect("spawn guest thread");
    let s = shared.clone();
    std::thread::Builder::new()
        .name("malt-timer".into())
        .spawn(move || {
            s.control.timer_loop(&s.channels, &*kill);
            // The guest ignored both the interrupt and the kill (it is
            // blocked in the host outside wasm): end the process so the
            // manager sees the worker terminate instead of a hang.
            eprintln!("malt host: the guest did not stop after being killed; exiting");
            std::process::exit(exit::UNKILLABLE);
        })
        .expect("spawn timer thread");

    shared.send(&FromHost::Hello {
        version: PROTOCOL_VERSION,
        kind: "wasm".into(),
        pid: std::process::id(),
    });

    // Stop or end of stream: the process exits with the other threads
    // wherever they are; the guest may be in the middle of a request.
    read_loop(&mut input, &shared, &work_tx)
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

fn write_loop(frames: Receiver<Vec<u8>>, stdout: std::io::Stdout) {
    let mut out = BufWriter::with_capacity(64 << 10, stdout.lock());
    while let Ok(frame) = frames.recv() {
        if out.write_all(&frame).is_err() {
            return;
        }
        // Batch what is already queued, then flush once.
        loop {
            match frames.try_recv() {
                Ok(frame) => {
                    if out.write_all(&frame).is_err() {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
    let _ = out.flush();
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
fn guest_loop(mut guest: impl Guest, work: Receiver<(u64, Work, ReplyMode)>, shared: &Shared) {
    while let Ok((id, work, mode)) = work.recv() {
        shared.control.begin(id);
        let outcome = guest.run(&work);
        let ended = shared.control.end();
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
