//! Connecting to a worker host: starting it (a process, or threads of this
//! process), the handshake, and the tasks that move its bytes.

use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::ChildStderr;
use tokio::sync::{mpsc, oneshot};

use crate::host_child::HostChild;

use crate::launcher::Launch as LaunchHost;
use crate::output::OutputSink;
use crate::process::{self, HostProgram};
use crate::protocol::{
    self, FatalKind, FromHost, GuestSpec, Hardening, HostConfig, MALT_VERSION, PROTOCOL_VERSION,
    ToHost,
};
use crate::worker::GuestSource;

/// Bytes of a host's own stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// How a host is started.
pub(crate) enum Via {
    /// A host program on this machine.
    Program(HostProgram),
    /// Threads of this process.
    InProcess,
    /// A launcher's command (the host may be on another machine).
    Launcher(Arc<dyn LaunchHost>),
}

/// Everything needed to start a worker's host, again if need be (a
/// native worker's host restarts after a hard interrupt).
pub(crate) struct Launch {
    pub via: Via,
    pub config: HostConfig,
    /// Where the bytes of a [`GuestSpec::Component`] come from, when the
    /// host asks for them.
    pub component: Option<GuestSource>,
    pub output: Arc<Mutex<OutputSink>>,
    pub stderr_tail: Arc<Mutex<String>>,
}

/// What the manager asks of the task that owns a host.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Signal {
    Term,
    Kill,
}

/// A frame on its way to the host: whole, or a head and a large value
/// written after it from where it lies (shared, not copied, when kept
/// for resending).
#[derive(Debug, Clone)]
pub(crate) enum Frame {
    Whole(Vec<u8>),
    Split(Vec<u8>, Arc<Vec<u8>>),
}

/// A live connection to a host.
pub(crate) struct Connection {
    pub frames: mpsc::UnboundedSender<Frame>,
    pub signals: mpsc::UnboundedSender<Signal>,
    pub pid: u32,
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Resolves with the host's exit status once it is gone.
    pub exited: oneshot::Receiver<ExitStatus>,
    /// What the host process locked down, if it is a hardened wasm host.
    pub hardening: Option<Hardening>,
    /// The host's process id on its own machine.
    pub host_pid: u32,
}

/// What kind of start failure, for the manager to act on (it never
/// matches an error's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartFailure {
    /// The host could not be run, or exited before its hello.
    Exited,
    /// The host gave up and said why.
    Fatal(FatalKind),
    /// The host is another malt version.
    Version,
    /// The host's answer is not malt's protocol.
    Protocol,
    /// This process could not set the worker up (pipes, threads).
    Local,
}

/// Why a host could not be started.
pub(crate) struct StartError {
    pub failure: StartFailure,
    pub message: String,
    pub stderr: String,
}

impl StartError {
    fn new(failure: StartFailure, message: impl Into<String>) -> Self {
        StartError {
            failure,
            message: message.into(),
            stderr: String::new(),
        }
    }
}

fn status_from_code(code: i32) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw((code & 0xff) << 8)
}

/// What a host says in its hello that the manager keeps.
struct Hello {
    hardening: Option<Hardening>,
    pid: u32,
}

/// Sends the configuration and waits for the host's hello, sending the
/// component on the way if the host asks for it.
async fn handshake(
    writer: &mut (impl AsyncWrite + Unpin),
    reader: &mut (impl AsyncRead + Unpin),
    config: &HostConfig,
    component: Option<&GuestSource>,
) -> Result<Hello, StartError> {
    let exited = |e: std::io::Error| {
        StartError::new(
            StartFailure::Exited,
            format!("the host process exited during startup ({e})"),
        )
    };
    writer
        .write_all(&protocol::encode(&ToHost::Init(Box::new(config.clone()))))
        .await
        .map_err(exited)?;
    writer.flush().await.map_err(exited)?;
    let mut message = read_message(reader, protocol::HANDSHAKE_MAX_FRAME).await;
    if let Ok(Some(FromHost::NeedComponent { sha256 })) = &message {
        let bytes = component_bytes(config, component, sha256)
            .map_err(|e| StartError::new(StartFailure::Local, e))?;
        writer
            .write_all(&protocol::encode(&ToHost::Component(bytes)))
            .await
            .map_err(exited)?;
        writer.flush().await.map_err(exited)?;
        message = read_message(reader, protocol::HANDSHAKE_MAX_FRAME).await;
    }
    match message {
        Ok(Some(FromHost::Hello {
            version,
            malt_version,
            hardening,
            pid,
            ..
        })) if version == PROTOCOL_VERSION && malt_version == MALT_VERSION => {
            Ok(Hello { hardening, pid })
        }
        Ok(Some(FromHost::Hello {
            version,
            malt_version,
            ..
        })) => Err(StartError::new(
            StartFailure::Version,
            version_mismatch(&malt_version, version),
        )),
        Ok(Some(FromHost::Fatal { kind, message })) => {
            Err(StartError::new(StartFailure::Fatal(kind), message))
        }
        Ok(Some(other)) => Err(StartError::new(
            StartFailure::Protocol,
            format!("unexpected first message {other:?}"),
        )),
        Ok(None) => Err(StartError::new(
            StartFailure::Exited,
            "the host process exited during startup",
        )),
        Err(e) => Err(StartError::new(StartFailure::Protocol, e)),
    }
}

/// The bytes of the component a host asked for: only the one this worker
/// runs, and only if they still have the hash the manager announced.
fn component_bytes(
    config: &HostConfig,
    component: Option<&GuestSource>,
    asked: &str,
) -> Result<Vec<u8>, String> {
    let GuestSpec::Component { sha256, .. } = &config.guest else {
        return Err("the host asked for a component it was not given by hash".into());
    };
    if asked != sha256 {
        return Err(format!(
            "the host asked for component {asked}, not this worker's ({sha256})"
        ));
    }
    let source = component.ok_or("this worker has no component to send")?;
    let bytes = crate::worker::component_bytes(source).map_err(|e| e.to_string())?;
    if crate::cache::sha256_hex(&bytes) != *sha256 {
        return Err("the component file changed since the worker was started".into());
    }
    Ok(bytes.into_owned())
}

fn version_mismatch(host: &str, protocol: u32) -> String {
    format!(
        "version mismatch: the host program is malt {host} (protocol {protocol}), this \
         manager is malt {MALT_VERSION} (protocol {PROTOCOL_VERSION}); use a host of the \
         same version, or leave the host program unset (every program linking malt is its \
         own host)"
    )
}

/// Starts a host and completes the handshake.
pub(crate) async fn connect(launch: &Launch) -> Result<Connection, StartError> {
    // A native guest program serves behind its own argument, so that a
    // program that links malt (and so serves wasm guests before `main`)
    // can also be a native guest.
    let arg = match launch.config.guest {
        GuestSpec::Native => malt_host::NATIVE_HOST_ARG,
        _ => malt_host::HOST_ARG,
    };
    match &launch.via {
        Via::Program(program) => {
            let parent = std::process::id().to_string();
            let path = program.path();
            // The zygote is this program started once: another host
            // program (of another version, maybe) is always exec'd.
            let this_program = matches!(program, HostProgram::ThisProgram(_));
            let forked = match this_program {
                true => crate::zygote::fork(path, arg, &launch.config).await,
                false => None,
            };
            let taken = match forked {
                Some(child) => Some(child),
                None => crate::spare_host::take(path, arg).await,
            };
            let child = match taken {
                Some(child) => child,
                None => process::spawn_host(path, &[arg.into(), parent.into()])
                    .await
                    .map(HostChild::from)
                    .map_err(|e| {
                        StartError::new(
                            StartFailure::Exited,
                            format!("cannot run {}: {e}", path.display()),
                        )
                    })?,
            };
            let chosen = matches!(program, HostProgram::Chosen(_)).then(|| path.display());
            let connected = connect_child(launch, child, chosen.map(|p| p.to_string())).await;
            if connected.is_ok() {
                crate::spare_host::started(path, arg, this_program);
            }
            connected
        }
        Via::InProcess => connect_in_process(launch).await,
        Via::Launcher(launcher) => {
            let command = launcher.command(&[arg]);
            let shown = shell_words(&command);
            let child = process::spawn_launcher(command).await.map_err(|e| {
                StartError::new(StartFailure::Exited, format!("cannot run {shown}: {e}"))
            })?;
            let mut conn = connect_child(
                launch,
                child.into(),
                Some(format!("the host behind `{shown}`")),
            )
            .await?;
            if let Some(interval) = launch.config.heartbeat {
                conn.reader = crate::heartbeat::watch(
                    conn.reader,
                    interval,
                    conn.frames.clone(),
                    conn.signals.clone(),
                );
            }
            Ok(conn)
        }
    }
}

/// A command as a shell would read it (for messages).
fn shell_words(command: &std::process::Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| {
            let word = word.to_string_lossy();
            let plain = !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c));
            match plain {
                true => word.into_owned(),
                false => format!("'{}'", word.replace('\'', r"'\''")),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Completes the handshake with a started host process; `chosen` names a
/// host the user chose (so that a failure can ask whether it is one).
async fn connect_child(
    launch: &Launch,
    mut child: HostChild,
    chosen: Option<String>,
) -> Result<Connection, StartError> {
    let pid = child.id().unwrap_or(0);
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = BufReader::with_capacity(64 << 10, child.stdout.take().expect("piped stdout"));
    // Until the host is up, what it writes on stderr belongs in the start
    // error, not in the manager's output.
    let started = Arc::new(AtomicBool::new(false));
    let stderr_task = tokio::spawn(read_host_stderr(
        child.stderr.take().expect("piped stderr"),
        launch.stderr_tail.clone(),
        launch.output.clone(),
        started.clone(),
    ));
    let handshake = handshake(
        &mut stdin,
        &mut stdout,
        &launch.config,
        launch.component.as_ref(),
    )
    .await;
    let hello = match handshake {
        Ok(hello) => hello,
        Err(error) => return Err(start_failed(launch, child, stderr_task, error, chosen).await),
    };
    started.store(true, Ordering::Release);
    let (frames, frames_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_frames(stdin, frames_rx, None));
    let (signals, signals_rx) = mpsc::unbounded_channel();
    let (exit_tx, exited) = oneshot::channel();
    let group = matches!(launch.via, Via::Launcher(_));
    tokio::spawn(supervise_process(child, signals_rx, exit_tx, group));
    Ok(Connection {
        frames,
        signals,
        pid,
        reader: Box::new(stdout),
        exited,
        hardening: hello.hardening,
        host_pid: hello.pid,
    })
}

/// Ends a host that failed its handshake and completes the error with
/// what it said on stderr.
async fn start_failed(
    launch: &Launch,
    mut child: HostChild,
    stderr_task: tokio::task::JoinHandle<()>,
    mut error: StartError,
    chosen: Option<String>,
) -> StartError {
    let _ = child.start_kill();
    let status = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
    let not_a_host = matches!(error.failure, StartFailure::Exited | StartFailure::Protocol)
        || error.failure == StartFailure::Fatal(FatalKind::Handshake);
    if let Some(chosen) = chosen.filter(|_| not_a_host) {
        error.message = format!(
            "{} (is {chosen} a malt host? this manager is malt {MALT_VERSION}, protocol \
             {PROTOCOL_VERSION})",
            error.message,
        );
    }
    if let Ok(Ok(status)) = status
        && !status.success()
        && error.failure == StartFailure::Exited
    {
        error.message = format!("{} ({status})", error.message);
    }
    error.stderr = launch
        .stderr_tail
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    error
}

/// An in-process worker: the host runs on threads of this process and
/// speaks the same protocol over a pair of pipes.
async fn connect_in_process(launch: &Launch) -> Result<Connection, StartError> {
    let io = |e: std::io::Error| {
        StartError::new(StartFailure::Local, format!("cannot create pipes: {e}"))
    };
    let (to_host_r, to_host_w) = malt_host::pipe().map_err(io)?;
    let (from_host_r, from_host_w) = malt_host::pipe().map_err(io)?;
    let (exit_tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name("malt-in-process".into())
        .spawn(move || {
            let code = malt_host::serve(
                std::fs::File::from(to_host_r),
                std::fs::File::from(from_host_w),
                malt_host::Place::InProcess,
                None,
            );
            let _ = exit_tx.send(status_from_code(code));
        })
        .map_err(|e| {
            StartError::new(
                StartFailure::Local,
                format!("cannot start the host thread: {e}"),
            )
        })?;
    let mut writer = tokio::net::unix::pipe::Sender::from_owned_fd(to_host_w).map_err(io)?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(from_host_r).map_err(io)?;
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let hello = handshake(&mut writer, &mut reader, &launch.config, None).await?;
    let (frames, frames_rx) = mpsc::unbounded_channel();
    let (close_tx, close_rx) = oneshot::channel();
    tokio::spawn(write_frames(writer, frames_rx, Some(close_rx)));
    let (signals, mut signals_rx) = mpsc::unbounded_channel::<Signal>();
    // Killing an in-process worker closes its stream: the host winds
    // down, killing the running request.
    tokio::spawn(async move {
        if signals_rx.recv().await.is_some() {
            let _ = close_tx.send(());
        }
    });
    Ok(Connection {
        frames,
        signals,
        pid: std::process::id(),
        reader: Box::new(reader),
        exited,
        hardening: hello.hardening,
        host_pid: hello.pid,
    })
}

/// Reads one message; `Ok(None)` at a clean end of stream.
async fn read_message(
    reader: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Option<FromHost>, String> {
    match read_body(reader, max).await? {
        None => Ok(None),
        Some(body) => protocol::decode(&body).map(Some).map_err(|e| e.to_string()),
    }
}

/// Reads one frame body; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_body(
    reader: &mut (impl AsyncRead + Unpin + ?Sized),
    max: usize,
) -> Result<Option<Vec<u8>>, String> {
    let mut header = [0u8; protocol::HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = protocol::body_len(header, max).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("truncated frame: {e}"))?;
    Ok(Some(body))
}

async fn read_host_stderr(
    mut stderr: ChildStderr,
    tail: Arc<Mutex<String>>,
    output: Arc<Mutex<OutputSink>>,
    started: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                {
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    tail.push_str(&text);
                    if tail.len() > STDERR_TAIL {
                        let mut cut = tail.len() - STDERR_TAIL;
                        while !tail.is_char_boundary(cut) {
                            cut += 1;
                        }
                        tail.drain(..cut);
                    }
                }
                if started.load(Ordering::Acquire) {
                    output
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .write(protocol::Stream::Stderr, &buf[..n]);
                }
            }
        }
    }
}

/// Writes queued frames to the host, flushing when the queue runs dry so
/// that pipelined requests go out in few writes. Ends (closing the
/// stream) when the queue closes or `close` fires.
async fn write_frames(
    out: impl AsyncWrite + Unpin,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    close: Option<oneshot::Receiver<()>>,
) {
    let mut out = tokio::io::BufWriter::with_capacity(64 << 10, out);
    let mut close = close;
    loop {
        let frame = match close.as_mut() {
            Some(close) => tokio::select! {
                frame = frames.recv() => frame,
                _ = close => None,
            },
            None => frames.recv().await,
        };
        let Some(frame) = frame else {
            let _ = out.shutdown().await;
            return;
        };
        if write_frame(&mut out, &frame).await.is_err() {
            return;
        }
        while let Ok(frame) = frames.try_recv() {
            if write_frame(&mut out, &frame).await.is_err() {
                return;
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

async fn write_frame(out: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    match frame {
        Frame::Whole(bytes) => out.write_all(bytes).await,
        Frame::Split(head, value) => {
            out.write_all(head).await?;
            out.write_all(value).await
        }
    }
}

/// Owns a host process (or a launcher's, which leads its own process
/// `group`): delivers signals, and reports its exit.
async fn supervise_process(
    mut child: HostChild,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    exited: oneshot::Sender<ExitStatus>,
    group: bool,
) {
    let mut signals_open = true;
    // Inside the loop the child is not reaped yet, so its pid (and the
    // group it leads) is ours; after it, only a group is signalled, whose
    // id stays reserved while it has members.
    let signaller = child.signaller(group);
    let send = |signal: libc::c_int| signaller.send(signal);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.unwrap_or_else(|_| status_from_code(255)),
            signal = signals.recv(), if signals_open => match signal {
                Some(Signal::Kill) => send(libc::SIGKILL),
                Some(Signal::Term) => send(libc::SIGTERM),
                None => signals_open = false,
            },
        }
    };
    if group {
        // What the launcher left behind goes with it (an empty group
        // fails harmlessly).
        send(libc::SIGKILL);
    }
    let _ = exited.send(status);
}
