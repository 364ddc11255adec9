//! Serving one worker: the handshake, preparing the guest, and the
//! reader, guest and timer threads.

use super::*;
use crate::requests::{Job, StartError, under_start_timeout};

/// Where a host runs.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its own process (stdin/stdout carry the protocol).
    Process,
    /// Threads of the manager's process (an in-process worker).
    InProcess,
}

/// Serves one worker on a byte stream until the stream ends or the
/// manager says stop; returns the exit code.
#[doc(hidden)]
pub fn serve(
    input: impl std::io::Read + Send + 'static,
    output: impl Write + Send + 'static,
    place: Place,
    native: Option<NativeFactory>,
) -> i32 {
    serve_stream(Box::new(input), output, place, native, None)
}

/// The manager's stream, buffered.
pub(crate) type Stream = BufReader<crate::remote::Heard<Box<dyn std::io::Read + Send>>>;

/// The stream the reader thread reads: its own, or shared with the idle
/// guest thread.
enum Input {
    Own(Stream),
    Shared(Arc<crate::handoff::SharedInput<Stream>>),
}

/// A call, eval or batch, with its id and how to answer it.
pub(crate) type Request = (u64, Job, ReplyMode);

/// Serves one worker; with a `turn`, the guest thread reads the stream
/// itself while it is idle (see [`crate::handoff`]).
pub(crate) fn serve_stream(
    input: Box<dyn std::io::Read + Send>,
    output: impl Write + Send + 'static,
    place: Place,
    native: Option<NativeFactory>,
    turn: Option<Arc<crate::handoff::Turn>>,
) -> i32 {
    #[cfg(feature = "wasm")]
    if place == Place::Process {
        wasm::start_ahead();
    }
    let (input, heard) = crate::remote::Heard::new(input);
    let mut input: Stream = BufReader::with_capacity(64 << 10, input);
    let mut output = output;
    let mut config = match read_init(&mut input) {
        Ok(c) => c,
        Err(message) => return fatal(&mut output, FatalKind::Handshake, &message, exit::PROTOCOL),
    };
    // A component named by its hash (the manager is on another machine):
    // find or fetch it before the process is locked (compiling it takes a
    // child process).
    match crate::remote::resolve_component(&config, &mut input, &mut output) {
        Ok(guest) => config.guest = guest,
        Err(message) => {
            return fatal(
                &mut output,
                FatalKind::GuestStart,
                &message,
                exit::START_FAILED,
            );
        }
    }
    let shared = Shared::new(&config);
    // Rollback (a wasm guest's host process, whose stream can be taken
    // from the reader between frames): the keeper adopts the snapshot
    // that takes over, which it may only ask for before the lock-down.
    config.rollback &= place == Place::Process
        && turn.is_some()
        && matches!(config.guest, protocol::GuestSpec::Artifact { .. });
    if config.rollback
        && let Err(e) = crate::rollback::adopt_orphans()
    {
        return fatal(&mut output, FatalKind::Harden, &e, exit::START_FAILED);
    }
    // Everything that locks the process down happens in `prepare`, before
    // the host's other threads exist (Landlock binds a thread and the
    // threads it starts later; the thread making the engine ahead is
    // joined first) and before any guest code runs.
    let (kind, guest, hardening) = match prepare(&config, &shared, place, native) {
        Ok(prepared) => prepared,
        Err(e) => return fatal(&mut output, e.kind, &e.message, exit::START_FAILED),
    };
    // With rollback, `prepare` left the keeper behind: this process serves.
    let keeper = crate::rollback::keeper();
    // The timer also bounds the guest's start.
    let timer = spawn_timer(&shared, place);
    let (work_tx, work_rx) = std::sync::mpsc::channel();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut input = match turn {
        Some(turn) => Input::Shared(Arc::new(crate::handoff::SharedInput::new(input, turn))),
        None => Input::Own(input),
    };
    let idle = match &input {
        Input::Shared(input) => {
            let (input, s) = (input.clone(), shared.clone());
            Some(
                Box::new(move |work: &Receiver<Request>| read_while_idle(&input, &s, work)) as Idle,
            )
        }
        Input::Own(_) => None,
    };
    // With rollback, the guest thread gets its `Rollback` once the stream
    // out is open: a snapshot taken before could never answer.
    let (rollback_tx, rollback_rx) = match (&input, keeper) {
        (Input::Shared(input), Some(keeper)) => {
            let rollback = crate::rollback::Rollback::new(
                shared.clone(),
                keeper,
                input.clone(),
                config.heartbeat,
            );
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            (Some((tx, rollback)), Some(rx))
        }
        _ => (None, None),
    };
    let s = shared.clone();
    let guest_thread = std::thread::Builder::new()
        .name("malt-guest".into())
        // Native guests recurse on this stack (a wasm guest's own stack is
        // capped by wasmtime); address space only, touched as used.
        .stack_size(GUEST_STACK)
        .spawn(move || {
            let mut guest = guest();
            let started = under_start_timeout(&s, "start", || guest.start());
            let ok = started.is_ok();
            let _ = started_tx.send(started);
            if ok {
                let rollback = rollback_rx.and_then(|rx| rx.recv().ok());
                super::requests::guest_loop(guest, work_rx, &s, place, idle, rollback);
            }
        })
        .expect("spawn guest thread");
    let started = started_rx.recv().unwrap_or_else(|_| {
        Err(StartError::Failed(
            "the guest thread ended while starting".into(),
        ))
    });
    if let Err(e) = started {
        shared.control.shut_down(&shared.channels);
        let _ = guest_thread.join();
        let _ = timer.join();
        let message = match e {
            StartError::Failed(message) => message,
            StartError::ShutDown => "the host was stopped while the guest started".into(),
        };
        return fatal(
            &mut output,
            FatalKind::GuestStart,
            &message,
            exit::START_FAILED,
        );
    }
    shared.open(Box::new(output));
    if let Some((tx, rollback)) = rollback_tx {
        let _ = tx.send(rollback);
    }
    shared.send(&FromHost::Hello {
        version: PROTOCOL_VERSION,
        malt_version: protocol::MALT_VERSION.to_string(),
        kind,
        // The keeper's, with rollback: the process the worker keeps.
        pid: keeper.map_or_else(std::process::id, |pid| pid as u32),
        hardening,
    });

    if let Some(interval) = config.heartbeat.filter(|_| place == Place::Process) {
        heard.spawn(interval);
    }
    let code = match &mut input {
        Input::Shared(input) => read_loop_sharing(input, &shared, &work_tx),
        Input::Own(input) => read_loop(input, &shared, &work_tx),
    };
    if place == Place::Process {
        // Stop or end of stream: the process exits with the other threads
        // wherever they are; the guest may be in the middle of a request.
        return code;
    }
    // In-process: wind the threads down. A running request is killed; the
    // guest thread ends when its queue closes, the timer when told to,
    // and the writer (closing the stream) once nobody can send.
    drop(work_tx);
    shared.control.shut_down(&shared.channels);
    let _ = guest_thread.join();
    let _ = timer.join();
    shared.close();
    code
}

/// Starts the timer thread: call timeouts, grace periods, start timeouts.
pub(crate) fn spawn_timer(shared: &Arc<Shared>, place: Place) -> std::thread::JoinHandle<()> {
    let s = shared.clone();
    std::thread::Builder::new()
        .name("malt-timer".into())
        .spawn(move || {
            if s.control.timer_loop(&s.channels, &|| s.flush_held()) {
                // The guest ignored both the interrupt and the kill (a
                // native guest blocked outside the host's reach): give up
                // on it, so the manager sees the worker terminate instead
                // of a hang.
                let message = "the guest did not stop after being killed".to_string();
                s.end_worker(FatalKind::Unkillable, message, place, exit::UNKILLABLE);
            }
        })
        .expect("spawn timer thread")
}

pub(crate) type GuestMaker = Box<dyn FnOnce() -> Box<dyn Guest> + Send>;

/// Why a guest could not be prepared or started.
pub(crate) struct StartFailed {
    kind: FatalKind,
    message: String,
}

impl StartFailed {
    pub fn new(kind: FatalKind, message: impl Into<String>) -> Self {
        StartFailed {
            kind,
            message: message.into(),
        }
    }
}

impl From<String> for StartFailed {
    fn from(message: String) -> Self {
        StartFailed::new(FatalKind::GuestStart, message)
    }
}

impl From<&str> for StartFailed {
    fn from(message: &str) -> Self {
        StartFailed::new(FatalKind::GuestStart, message)
    }
}

/// What [`prepare`] makes: the guest's kind, a maker for the guest
/// thread, and what the process locked down. The backend has set its
/// killer in [`Control`].
pub(crate) type Prepared = (GuestKind, GuestMaker, Option<protocol::Hardening>);

/// Makes the guest a configuration asks for: its kind and a maker for the
/// guest thread.
fn prepare(
    config: &HostConfig,
    shared: &Arc<Shared>,
    place: Place,
    native: Option<NativeFactory>,
) -> Result<Prepared, StartFailed> {
    match (&config.guest, place) {
        (protocol::GuestSpec::Artifact { .. }, _) => prepare_wasm(config, shared, place),
        (protocol::GuestSpec::Component { .. }, _) => {
            Err("the component was not resolved to an artifact".into())
        }
        (protocol::GuestSpec::NativeScript, Place::Process) => {
            #[cfg(feature = "script")]
            {
                let factory: NativeFactory = Arc::new(|cx: GuestContext| {
                    Box::new(ScriptGuest::new(cx)) as Box<dyn NativeGuest>
                });
                Ok(native::prepare(config, shared, factory)?)
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
            Some(factory) => Ok(native::prepare(config, shared, factory)?),
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
) -> Result<Prepared, StartFailed> {
    let harden_failed =
        |e: String| StartFailed::new(FatalKind::Harden, format!("cannot harden the host: {e}"));
    // A wasm host runs untrusted code: lock the process first (its own
    // process only; an in-process worker shares the manager's).
    if place == Place::Process {
        let policy = match config.rollback {
            true => harden::Policy::Rollback,
            false => harden::Policy::Host,
        };
        harden::apply(policy).map_err(harden_failed)?;
        harden::limit_data(config.memory_limit, config.max_frame as u64).map_err(harden_failed)?;
    }
    // The engine made ahead, on a thread that the filter above covers too
    // and that has ended before Landlock (below) and any guest code.
    let ahead = match place {
        Place::Process => wasm::take_ahead(config.fuel.is_some()),
        Place::InProcess => None,
    };
    // One thread left, nothing of the guest's loaded yet (what the
    // serving host loads, such as its memory map, is its own): the keeper
    // stays behind here, and this process goes on to serve.
    if config.rollback && place == Place::Process {
        crate::rollback::split_keeper()
            .map_err(|e| format!("cannot start the keeper for rollback: {e}"))?;
    }
    let guest = wasm::WasmGuest::load(config, shared.clone(), place, ahead)?;
    // Loaded: from now on the process needs no file but those beneath the
    // guest's grants.
    let hardening = match place {
        Place::Process => Some(harden::restrict_files(&config.dirs).map_err(harden_failed)?),
        Place::InProcess => None,
    };
    Ok((
        GuestKind::Wasm,
        Box::new(move || Box::new(guest) as Box<dyn Guest>),
        hardening,
    ))
}

#[cfg(not(feature = "wasm"))]
fn prepare_wasm(_: &HostConfig, _: &Arc<Shared>, _: Place) -> Result<Prepared, StartFailed> {
    Err("this host was built without wasm support (malt-host's `wasm` feature)".into())
}

fn read_init(input: &mut impl std::io::Read) -> Result<HostConfig, String> {
    // The Init frame is small; cap it before the configured cap is known.
    let body = protocol::read_frame(input, protocol::HANDSHAKE_MAX_FRAME)
        .map_err(|e| format!("reading init: {e}"))?;
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

fn fatal(out: &mut impl Write, kind: FatalKind, message: &str, code: i32) -> i32 {
    eprintln!("malt host: {message}");
    let frame = protocol::encode(&FromHost::Fatal {
        kind,
        message: message.to_string(),
    });
    let _ = out.write_all(&frame).and_then(|_| out.flush());
    code
}

/// Hands a request to the guest thread.
fn queue(
    shared: &Shared,
    work: &std::sync::mpsc::Sender<(u64, Job, ReplyMode)>,
    job: (u64, Job, ReplyMode),
) {
    shared
        .queued
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    if work.send(job).is_err() {
        shared
            .queued
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What reading the next frame came to.
enum Next {
    /// A call, eval or batch to run.
    Request(Request),
    /// A message served at once (an interrupt, a channel operation, a ping).
    Served,
    /// The reader thread was asked for the stream, between frames.
    Yield,
    /// The host ends with this code (stop, end of stream, a bad frame).
    Exit(i32),
}

/// Reads the next frame and serves it, unless it is a request to run.
fn next(input: &mut Stream, shared: &Shared) -> Next {
    // Calls, the frequent request and the one that can be large, are
    // read in place.
    let body = match protocol::read_frame(input, shared.max_frame).map(protocol::decode_call) {
        Ok(Ok((id, name, args, reply))) => {
            return Next::Request((id, Job::One(Work::Call { name, args }), reply));
        }
        Ok(Err(body)) => Ok(body),
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return Next::Yield,
        Err(e) => Err(e),
    };
    let message = match body.and_then(|body| protocol::decode::<ToHost>(&body)) {
        Ok(m) => m,
        // The manager is gone: a worker dies with its manager.
        Err(FrameError::Eof) => return Next::Exit(exit::OK),
        Err(e) => {
            let message = format!("bad frame from the manager: {e}");
            eprintln!("malt host: {message}");
            shared.send(&FromHost::Fatal {
                kind: FatalKind::Protocol,
                message,
            });
            return Next::Exit(exit::PROTOCOL);
        }
    };
    match message {
        ToHost::Call {
            id,
            name,
            args,
            reply,
        } => {
            let args = args.into();
            Next::Request((id, Job::One(Work::Call { name, args }), reply))
        }
        ToHost::Eval { id, code, reply } => {
            Next::Request((id, Job::One(Work::Eval { code }), reply))
        }
        ToHost::CallBatch { id, name, args } => {
            let args = args
                .into_iter()
                .map(serde_bytes::ByteBuf::into_vec)
                .collect();
            Next::Request((id, Job::Batch { name, args }, ReplyMode::Value))
        }
        ToHost::Interrupt { up_to } => {
            shared.control.interrupt(up_to, &shared.channels);
            Next::Served
        }
        ToHost::ChannelOpen { id, name, capacity } => {
            let result = shared.channels.open(&name, capacity as usize);
            shared.reply(id, result.map(|()| None).map_err(Failure::Invalid));
            Next::Served
        }
        ToHost::ChannelPut { id, name, value } => {
            shared.channels.manager_put(shared, id, &name, value);
            Next::Served
        }
        ToHost::ChannelTake { id, name } => {
            shared.channels.manager_take(shared, id, &name);
            Next::Served
        }
        ToHost::ChannelIsReady { id, name } => {
            let ready = shared.channels.is_ready(&name);
            shared.reply(id, Ok(Some(rmp_serde::to_vec(&ready).unwrap_or_default())));
            Next::Served
        }
        ToHost::Stop => Next::Exit(exit::OK),
        ToHost::Ping => {
            shared.send(&FromHost::Pong);
            Next::Served
        }
        ToHost::Component(_) => {
            eprintln!("malt host: a component outside the handshake");
            Next::Exit(exit::PROTOCOL)
        }
        ToHost::Init(_) => {
            eprintln!("malt host: a second Init frame");
            Next::Exit(exit::PROTOCOL)
        }
    }
}

/// Reads and dispatches requests until the stream ends or a Stop arrives.
fn read_loop(input: &mut Stream, shared: &Shared, work: &std::sync::mpsc::Sender<Request>) -> i32 {
    loop {
        match next(input, shared) {
            Next::Request(request) => queue(shared, work, request),
            Next::Served | Next::Yield => {}
            Next::Exit(code) => return code,
        }
    }
}

/// As [`read_loop`], on a stream the idle guest thread may ask for.
pub(crate) fn read_loop_sharing(
    input: &crate::handoff::SharedInput<Stream>,
    shared: &Shared,
    work: &std::sync::mpsc::Sender<Request>,
) -> i32 {
    let mut stream = input.reader_takes();
    loop {
        input.turn().at_frame_boundary(stream.buffer().is_empty());
        match next(&mut stream, shared) {
            Next::Request(request) => queue(shared, work, request),
            Next::Served => {}
            Next::Yield => stream = input.reader_yields(stream),
            Next::Exit(code) => return code,
        }
    }
}

/// How the idle guest thread waits for its next request: reading the
/// stream itself (`None` when it is not worth it: then from the queue).
/// `true` with a request taken from the queue.
pub(crate) type Idle = Box<dyn FnMut(&Receiver<Request>) -> Option<(Request, bool)> + Send>;

/// The guest thread, idle, takes the stream and reads until a request
/// to run: one the reader thread queued meanwhile, or one it reads. It
/// gives the stream back before it returns. The host's end (stop, end of
/// stream) ends the process from here.
pub(crate) fn read_while_idle(
    input: &crate::handoff::SharedInput<Stream>,
    shared: &Shared,
    work: &Receiver<Request>,
) -> Option<(Request, bool)> {
    if !input.worth_taking(0) {
        return None;
    }
    let mut stream = input.guest_takes();
    loop {
        if let Ok(request) = work.try_recv() {
            input.guest_gives_back(stream);
            return Some((request, true));
        }
        match next(&mut stream, shared) {
            Next::Request(request) => {
                input.guest_gives_back(stream);
                return Some((request, false));
            }
            Next::Served | Next::Yield => {}
            Next::Exit(code) => std::process::exit(code),
        }
    }
}
