//! The manager's handle on a worker, and how workers are started.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::WorkerChannel;
use crate::error::{Error, RemoteException, Result};
use crate::output::{OutputSink, WorkerOutput};
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, DirGrant, Failure, FromHost, GuestSpec, HostConfig, PROTOCOL_VERSION,
    ReplyMode, ToHost,
};
use crate::{cache, process};

/// Default cap on a wasm guest's linear memory.
pub const DEFAULT_MEMORY_LIMIT: u64 = 512 << 20;
/// Default time a guest gets to stop by itself after an interrupt.
pub const DEFAULT_INTERRUPT_GRACE: Duration = Duration::from_millis(100);
/// Default time a worker gets to start.
pub const DEFAULT_SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Worker::stop`] waits after the stop message, then after
/// SIGTERM, before escalating.
const STOP_STEP: Duration = Duration::from_secs(2);
/// Bytes of a host's own stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

/// The embedded script guest (built by build.rs).
const SCRIPT_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/malt_script.wasm"));
const SCRIPT_SHA256: &str = include_str!(concat!(env!("OUT_DIR"), "/malt_script.sha256"));

#[derive(Debug, Clone)]
enum GuestSource {
    Script,
    Wasm(PathBuf),
}

/// Configures and starts a worker; made by [`Worker::script`] or
/// [`Worker::wasm`], finished by [`spawn`](WorkerBuilder::spawn).
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .spawn().await"]
pub struct WorkerBuilder {
    guest: GuestSource,
    env: Vec<(String, String)>,
    dirs: Vec<DirGrant>,
    memory_limit: u64,
    call_timeout: Option<Duration>,
    interrupt_grace: Duration,
    monitor_output: bool,
    host_program: Option<PathBuf>,
    max_frame: usize,
    spawn_timeout: Duration,
    fuel: Option<u64>,
    prefix_output: bool,
}

impl WorkerBuilder {
    fn new(guest: GuestSource) -> Self {
        WorkerBuilder {
            guest,
            env: Vec::new(),
            dirs: Vec::new(),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            call_timeout: None,
            interrupt_grace: DEFAULT_INTERRUPT_GRACE,
            monitor_output: true,
            host_program: None,
            max_frame: DEFAULT_MAX_FRAME,
            spawn_timeout: DEFAULT_SPAWN_TIMEOUT,
            fuel: None,
            prefix_output: true,
        }
    }

    /// Sets an environment variable the guest sees. Workers inherit no
    /// environment: this is the only way a variable gets in.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Lets the guest read and write a host directory, seen as `guest_path`.
    pub fn dir(mut self, host_path: impl AsRef<Path>, guest_path: impl Into<String>) -> Self {
        self.dirs.push(DirGrant {
            host: host_path.as_ref().to_string_lossy().into_owned(),
            guest: guest_path.into(),
            read_only: false,
        });
        self
    }

    /// Lets the guest read (only) a host directory, seen as `guest_path`.
    pub fn dir_read_only(
        mut self,
        host_path: impl AsRef<Path>,
        guest_path: impl Into<String>,
    ) -> Self {
        self.dirs.push(DirGrant {
            host: host_path.as_ref().to_string_lossy().into_owned(),
            guest: guest_path.into(),
            read_only: true,
        });
        self
    }

    /// Caps the guest's linear memory (default 512 MiB). Going over it
    /// fails the request with [`Error::LimitExceeded`] and resets the guest.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Fails any call or eval that runs longer than this with
    /// [`Error::Timeout`] (default: no limit). The guest is interrupted
    /// like by [`Worker::interrupt`], then killed after the grace period.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// How long an interrupted guest may take to stop by itself (keeping
    /// its state) before it is killed and reset (default 100 ms).
    pub fn interrupt_grace(mut self, grace: Duration) -> Self {
        self.interrupt_grace = grace;
        self
    }

    /// Whether the worker's output is forwarded to this process's
    /// stdout/stderr, each line prefixed with the worker (default: on).
    /// When off, read it with [`Worker::take_output`].
    pub fn monitor_output(mut self, on: bool) -> Self {
        self.monitor_output = on;
        self
    }

    /// Limits each request to `fuel` units (about one per wasm
    /// instruction). A request that runs out fails with
    /// [`Error::LimitExceeded`] (`Limit::Fuel`) and the guest is reset.
    /// Metering costs speed, and the component is compiled separately
    /// for it.
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.fuel = Some(fuel);
        self
    }

    /// Whether forwarded output lines get the `[worker N] ` prefix
    /// (default: on). A program with a single worker may want its output
    /// as is.
    pub fn prefix_output(mut self, on: bool) -> Self {
        self.prefix_output = on;
        self
    }

    /// The program to run as the worker's host: `malt` itself, or any
    /// program that calls [`crate::host::main_if_host`] first thing in
    /// `main`. By default malt looks for `malt` (see the crate docs).
    pub fn host_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.host_program = Some(program.into());
        self
    }

    /// Caps one protocol frame (and so one value) in either direction
    /// (default 256 MiB).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How long starting the worker may take before [`Error::Spawn`]
    /// (default 30 s; compiling a component the first time is included).
    pub fn spawn_timeout(mut self, timeout: Duration) -> Self {
        self.spawn_timeout = timeout;
        self
    }

    /// Starts the worker and waits until it is ready.
    pub async fn spawn(self) -> Result<Worker> {
        let number = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
        let label = format!("worker {number}");
        let timeout = self.spawn_timeout;
        match tokio::time::timeout(timeout, self.spawn_inner(number, &label)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Spawn {
                worker: label,
                message: format!("the worker did not start within {timeout:?}"),
                stderr: String::new(),
            }),
        }
    }

    async fn spawn_inner(self, number: u64, label: &str) -> Result<Worker> {
        let spawn_error = |message: String, stderr: String| Error::Spawn {
            worker: label.to_string(),
            message,
            stderr,
        };
        let fuel = self.fuel.is_some();
        let artifact = match &self.guest {
            GuestSource::Script => {
                tokio::task::spawn_blocking(move || {
                    cache::artifact(SCRIPT_WASM, SCRIPT_SHA256, "the script guest", fuel)
                })
                .await
            }
            GuestSource::Wasm(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let what = path.display().to_string();
                    let bytes = std::fs::read(&path)
                        .map_err(|e| Error::io(format!("cannot read the component {what}"), e))?;
                    cache::check_component(&bytes, &what)?;
                    cache::artifact(&bytes, &cache::sha256_hex(&bytes), &what, fuel)
                })
                .await
            }
        }
        .map_err(|e| spawn_error(format!("preparing the guest panicked: {e}"), String::new()))?
        .map_err(|e| spawn_error(e.to_string(), String::new()))?;

        let program = process::host_program(self.host_program.as_deref())
            .map_err(|m| spawn_error(m, String::new()))?;
        let mut child = process::spawn_host(&program, &[crate::host::HOST_ARG.into()])
            .await
            .map_err(|e| {
                spawn_error(
                    format!("cannot run {}: {e}", program.display()),
                    String::new(),
                )
            })?;
        let pid = child.id().unwrap_or(0);
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout =
            BufReader::with_capacity(64 << 10, child.stdout.take().expect("piped stdout"));
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        let (output, captured) = if self.monitor_output {
            let prefix = if self.prefix_output {
                format!("[{label}] ")
            } else {
                String::new()
            };
            (OutputSink::forward(prefix), None)
        } else {
            let (sink, rx) = OutputSink::capture();
            (sink, Some(rx))
        };
        let output = Arc::new(Mutex::new(output));
        // Until the host is up, what it writes on stderr belongs in the
        // spawn error, not in the manager's output.
        let started = Arc::new(AtomicBool::new(false));
        let stderr_task = tokio::spawn(read_host_stderr(
            child.stderr.take().expect("piped stderr"),
            stderr_tail.clone(),
            output.clone(),
            started.clone(),
        ));

        let config = HostConfig {
            version: PROTOCOL_VERSION,
            name: label.to_string(),
            guest: GuestSpec::Artifact {
                path: artifact.to_string_lossy().into_owned(),
            },
            memory_limit: self.memory_limit,
            interrupt_grace: self.interrupt_grace,
            call_timeout: self.call_timeout,
            max_frame: self.max_frame,
            fuel: self.fuel,
            env: self.env.clone(),
            dirs: self.dirs.clone(),
        };
        let hello = async {
            stdin
                .write_all(&protocol::encode(&ToHost::Init(Box::new(config))))
                .await
                .map_err(|e| format!("the host process exited during startup ({e})"))?;
            stdin.flush().await.map_err(|e| e.to_string())?;
            match read_message(&mut stdout, 1 << 20).await {
                Ok(Some(FromHost::Hello { version, .. })) if version == PROTOCOL_VERSION => Ok(()),
                Ok(Some(FromHost::Hello { version, .. })) => Err(format!(
                    "the host speaks protocol version {version}, this manager {PROTOCOL_VERSION}"
                )),
                Ok(Some(FromHost::Fatal { message })) => Err(message),
                Ok(Some(other)) => Err(format!("unexpected first message {other:?}")),
                Ok(None) => Err("the host process exited during startup".to_string()),
                Err(e) => Err(e),
            }
        }
        .await;
        if let Err(message) = hello {
            let _ = child.start_kill();
            let status = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
            let mut message = message;
            if let Ok(Ok(status)) = status {
                if !status.success() && message.contains("exited") {
                    message = format!("{message} ({status})");
                }
            }
            let tail = stderr_tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(spawn_error(message, tail));
        }

        started.store(true, Ordering::Release);
        let name = format!("{label} (pid {pid})");
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            name: name.clone(),
            number,
            pid,
            frames: frames_tx,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(true),
            signals: signal_tx,
            exit: exit_rx,
            max_frame: self.max_frame,
            stderr_tail,
        });
        tokio::spawn(write_frames(stdin, frames_rx));
        tokio::spawn(read_frames(stdout, inner.clone(), output));
        tokio::spawn(watch_process(
            child,
            signal_rx,
            exit_tx,
            Arc::downgrade(&inner),
        ));
        Ok(Worker {
            inner,
            output: Mutex::new(captured),
        })
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
async fn read_message(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    max: usize,
) -> std::result::Result<Option<FromHost>, String> {
    match read_body(reader, max).await? {
        None => Ok(None),
        Some(body) => protocol::decode(&body).map(Some).map_err(|e| e.to_string()),
    }
}

async fn read_body(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    max: usize,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut header = [0u8; protocol::HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(format!("a frame of {len} bytes is over the {max} byte cap"));
    }
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
/// that pipelined requests go out in few writes.
async fn write_frames(
    stdin: tokio::process::ChildStdin,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut out = tokio::io::BufWriter::with_capacity(64 << 10, stdin);
    while let Some(frame) = frames.recv().await {
        if out.write_all(&frame).await.is_err() {
            return;
        }
        while let Ok(frame) = frames.try_recv() {
            if out.write_all(&frame).await.is_err() {
                return;
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

async fn read_frames(
    mut stdout: BufReader<ChildStdout>,
    inner: Arc<Inner>,
    output: Arc<Mutex<OutputSink>>,
) {
    let reason = loop {
        let body = match read_body(&mut stdout, inner.max_frame).await {
            Ok(Some(body)) => body,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        match protocol::decode::<FromHost>(&body) {
            Ok(FromHost::Reply { id, result }) => inner.resolve(id, result),
            Ok(FromHost::Output { stream, data }) => output
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(stream, &data),
            Ok(FromHost::Fatal { message }) => break Some(message),
            Ok(FromHost::Hello { .. }) => break Some("a second Hello".into()),
            Err(e) => break Some(e.to_string()),
        }
    };
    if let Some(reason) = &reason {
        tracing::warn!(worker = %inner.name, "killing the worker: {reason}");
        let _ = inner.signals.send(Signal::Kill);
    }
    inner.terminate();
    output.lock().unwrap_or_else(|e| e.into_inner()).finish();
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Term,
    Kill,
}

async fn watch_process(
    mut child: Child,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    exit: watch::Sender<Option<std::process::ExitStatus>>,
    inner: std::sync::Weak<Inner>,
) {
    let mut signals_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            signal = signals.recv(), if signals_open => match signal {
                Some(Signal::Kill) => { let _ = child.start_kill(); }
                Some(Signal::Term) => {
                    if let Some(pid) = child.id() {
                        // SAFETY: the child is not reaped yet (we own it
                        // and have not seen it exit), so the pid is ours.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                    }
                }
                None => signals_open = false,
            },
        }
    };
    if let Some(inner) = inner.upgrade() {
        inner.terminate();
    }
    let _ = exit.send(Some(status.unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        std::process::ExitStatus::from_raw(0)
    })));
}

type Reply = std::result::Result<Option<serde_bytes::ByteBuf>, Error>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the worker is gone: new requests fail at once.
    closed: bool,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    number: u64,
    pid: u32,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    running: AtomicBool,
    signals: mpsc::UnboundedSender<Signal>,
    exit: watch::Receiver<Option<std::process::ExitStatus>>,
    max_frame: usize,
    stderr_tail: Arc<Mutex<String>>,
}

impl Inner {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the worker gone and fails every pending request.
    fn terminate(&self) {
        self.running.store(false, Ordering::Release);
        let waiting = {
            let mut pending = self.lock_pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Err(Error::TerminatedWorker));
        }
    }

    fn resolve(&self, id: u64, result: std::result::Result<Option<serde_bytes::ByteBuf>, Failure>) {
        let Some(tx) = self.lock_pending().waiting.remove(&id) else {
            return;
        };
        let _ = tx.send(result.map_err(|f| self.failure(f)));
    }

    fn failure(&self, failure: Failure) -> Error {
        match failure {
            Failure::Remote(message) => Error::Remote(RemoteException {
                worker: self.name.clone(),
                message,
            }),
            Failure::Interrupted { state_lost } => Error::Interrupted { state_lost },
            Failure::Timeout { .. } => Error::Timeout,
            Failure::Trap(message) => Error::Trap {
                worker: self.name.clone(),
                message,
            },
            Failure::Limit { limit, message } => Error::LimitExceeded {
                worker: self.name.clone(),
                limit,
                message,
            },
            Failure::Invalid(message) => Error::Invalid {
                worker: self.name.clone(),
                message,
            },
        }
    }

    /// Sends a request; the receiver gets its reply.
    pub(crate) fn request(
        &self,
        message: impl FnOnce(u64) -> ToHost,
    ) -> Result<oneshot::Receiver<Reply>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.frame(&message(id))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.lock_pending();
            if pending.closed {
                return Err(Error::TerminatedWorker);
            }
            pending.waiting.insert(id, tx);
        }
        if self.frames.send(frame).is_err() {
            self.lock_pending().waiting.remove(&id);
            return Err(Error::TerminatedWorker);
        }
        Ok(rx)
    }

    /// Sends a message that gets no reply.
    fn send(&self, message: &ToHost) -> Result<()> {
        if !self.running.load(Ordering::Acquire) {
            return Err(Error::TerminatedWorker);
        }
        let frame = self.frame(message)?;
        self.frames.send(frame).map_err(|_| Error::TerminatedWorker)
    }

    fn frame(&self, message: &ToHost) -> Result<Vec<u8>> {
        let frame = protocol::encode(message);
        if frame.len() - protocol::HEADER_LEN > self.max_frame {
            return Err(Error::LimitExceeded {
                worker: self.name.clone(),
                limit: protocol::Limit::FrameSize,
                message: format!(
                    "the request is {} bytes, over the {} byte frame cap",
                    frame.len() - protocol::HEADER_LEN,
                    self.max_frame
                ),
            });
        }
        Ok(frame)
    }

    pub(crate) fn decode<R: DeserializeOwned>(&self, bytes: &[u8]) -> Result<R> {
        decode_value(&self.name, bytes)
    }
}

/// The bytes of a reply value; a reply without one reads as nil.
pub(crate) fn reply_bytes(value: &Option<serde_bytes::ByteBuf>) -> &[u8] {
    const NIL: &[u8] = &[0xc0];
    value.as_ref().map_or(NIL, |b| b.as_slice())
}

fn decode_value<R: DeserializeOwned>(worker: &str, bytes: &[u8]) -> Result<R> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        worker: worker.to_string(),
        type_name: std::any::type_name::<R>(),
        message: e.to_string(),
    })
}

/// Encodes call arguments as a MessagePack array: a tuple as its
/// elements, `()` as no arguments, any other single value as one argument.
pub(crate) fn encode_args(args: &impl Serialize) -> Result<Vec<u8>> {
    let bytes = encode_value(args)?;
    match bytes.first() {
        Some(0x90..=0x9f | 0xdc | 0xdd) => Ok(bytes),
        Some(0xc0) if bytes.len() == 1 => Ok(vec![0x90]),
        _ => {
            let mut wrapped = Vec::with_capacity(bytes.len() + 1);
            wrapped.push(0x91);
            wrapped.extend_from_slice(&bytes);
            Ok(wrapped)
        }
    }
}

pub(crate) fn encode_value(value: &impl Serialize) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
}

/// A request already sent to a worker; await it for the result.
///
/// Dropping the handle does not cancel the request: the worker still runs
/// it, and its result is discarded.
#[must_use = "the request runs anyway; await the handle to get its result"]
pub struct CallHandle<R> {
    state: CallState,
    worker: Arc<Inner>,
    _result: PhantomData<fn() -> R>,
}

enum CallState {
    Waiting(oneshot::Receiver<Reply>),
    Failed(Option<Error>),
}

impl<R> std::fmt::Debug for CallHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallHandle")
            .field("worker", &self.worker.name)
            .finish_non_exhaustive()
    }
}

impl<R> CallHandle<R> {
    fn new(worker: &Arc<Inner>, sent: Result<oneshot::Receiver<Reply>>) -> Self {
        CallHandle {
            state: match sent {
                Ok(rx) => CallState::Waiting(rx),
                Err(e) => CallState::Failed(Some(e)),
            },
            worker: worker.clone(),
            _result: PhantomData,
        }
    }
}

impl<R: DeserializeOwned> Future for CallHandle<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &mut this.state {
            CallState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(Error::TerminatedWorker))),
            CallState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Err(Error::TerminatedWorker)),
                Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(Ok(value))) => {
                    let bytes = reply_bytes(&value);
                    Poll::Ready(this.worker.decode(bytes))
                }
            },
        }
    }
}

/// A handle on a worker: a process running a guest, driven with Malt's API.
///
/// Dropping the handle kills the worker.
pub struct Worker {
    inner: Arc<Inner>,
    output: Mutex<Option<WorkerOutput>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.inner.name)
            .field("running", &self.is_running())
            .finish()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Worker {
    /// A builder for a worker running the built-in script guest (Rhai) in
    /// a wasm sandbox. Needs no file: the guest is embedded in malt.
    pub fn script() -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Script)
    }

    /// A builder for a worker running the wasm component at `path`, which
    /// must implement the `malt:worker` world (see `wit/`).
    pub fn wasm(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Wasm(path.as_ref().to_path_buf()))
    }

    /// The worker's name, e.g. `worker 3 (pid 4242)`, as used in errors.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The worker's number in this manager (1, 2, …).
    pub fn number(&self) -> u64 {
        self.inner.number
    }

    /// The host process id.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Calls the guest function `name` with `args` (a tuple, sent as a
    /// MessagePack array; `()` for none) and returns a handle to await for
    /// its value. The request is already sent when this returns.
    pub fn remote_call<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> CallHandle<R> {
        let sent = encode_args(&args).and_then(|args| {
            self.inner.request(|id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::Value,
            })
        });
        CallHandle::new(&self.inner, sent)
    }

    /// Calls the guest function `name` and waits for its value.
    pub async fn remote_call_fetch<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> Result<R> {
        self.remote_call(name, args).await
    }

    /// Calls the guest function `name` and waits for it to finish; the
    /// worker sends no value back.
    pub async fn remote_call_wait(&self, name: &str, args: impl Serialize) -> Result<()> {
        let sent = encode_args(&args).and_then(|args| {
            self.inner.request(|id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::Ack,
            })
        });
        CallHandle::<()>::new(&self.inner, sent).await
    }

    /// Calls the guest function `name` without waiting and without any
    /// reply; returns once the request is sent. A failure is reported on
    /// the worker's stderr.
    pub fn remote_do(&self, name: &str, args: impl Serialize) -> Result<()> {
        let args = encode_args(&args)?;
        self.inner.send(&ToHost::Call {
            id: 0,
            name: name.to_string(),
            args,
            reply: ReplyMode::None,
        })
    }

    /// Evaluates `code` in the guest's persistent session and returns a
    /// handle to await for its value. The request is already sent.
    pub fn remote_eval<R: DeserializeOwned>(&self, code: &str) -> CallHandle<R> {
        let sent = self.inner.request(|id| ToHost::Eval {
            id,
            code: code.to_string(),
            reply: ReplyMode::Value,
        });
        CallHandle::new(&self.inner, sent)
    }

    /// Evaluates `code` and waits for its value.
    pub async fn remote_eval_fetch<R: DeserializeOwned>(&self, code: &str) -> Result<R> {
        self.remote_eval(code).await
    }

    /// Evaluates `code` and waits for it to finish, without its value.
    pub async fn remote_eval_wait(&self, code: &str) -> Result<()> {
        let sent = self.inner.request(|id| ToHost::Eval {
            id,
            code: code.to_string(),
            reply: ReplyMode::Ack,
        });
        CallHandle::<()>::new(&self.inner, sent).await
    }

    /// Opens the worker channel `name` (creating it with `capacity` if it
    /// does not exist yet) and returns a handle on it. The guest reaches
    /// the same queue by name; calling this twice with the same name gives
    /// two handles on one queue.
    pub async fn worker_channel<T>(&self, name: &str, capacity: usize) -> Result<WorkerChannel<T>>
    where
        T: Serialize + DeserializeOwned,
    {
        if capacity == 0 || capacity > u32::MAX as usize {
            return Err(Error::Invalid {
                worker: self.inner.name.clone(),
                message: format!(
                    "a worker channel needs a capacity between 1 and {}, got {capacity}",
                    u32::MAX
                ),
            });
        }
        let sent = self.inner.request(|id| ToHost::ChannelOpen {
            id,
            name: name.to_string(),
            capacity: capacity as u32,
        });
        CallHandle::<()>::new(&self.inner, sent).await?;
        Ok(WorkerChannel::new(self.inner.clone(), name))
    }

    /// Interrupts the request the worker is running, if any.
    ///
    /// The request fails with [`Error::Interrupted`]. A guest that stops by
    /// itself within the grace period keeps its state (`state_lost:
    /// false`); one that does not is killed and restarted fresh
    /// (`state_lost: true`). Either way the worker keeps running, and
    /// queued requests run afterwards.
    pub async fn interrupt(&self) -> Result<()> {
        self.inner.send(&ToHost::Interrupt)
    }

    /// Whether the worker process is running.
    pub fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Stops the worker: asks it to shut down, then escalates to SIGTERM
    /// and SIGKILL if it does not. Requests still pending fail with
    /// [`Error::TerminatedWorker`]. Returns whether the worker was running.
    pub async fn stop(&self) -> Result<bool> {
        if !self.is_running() {
            return Ok(false);
        }
        let _ = self.inner.send(&ToHost::Stop);
        let mut exit = self.inner.exit.clone();
        for escalation in [Some(Signal::Term), Some(Signal::Kill), None] {
            let exited = tokio::time::timeout(STOP_STEP, exit.wait_for(|s| s.is_some())).await;
            if matches!(exited, Ok(Ok(_)) | Ok(Err(_))) {
                break;
            }
            match escalation {
                Some(signal) => {
                    let _ = self.inner.signals.send(signal);
                }
                None => {
                    return Err(Error::io(
                        format!("stopping {}", self.inner.name),
                        std::io::Error::other("the process did not exit after SIGKILL"),
                    ));
                }
            }
        }
        self.inner.terminate();
        Ok(true)
    }

    /// Kills the worker process at once (SIGKILL). Pending requests fail
    /// with [`Error::TerminatedWorker`].
    pub fn kill(&self) {
        self.inner.running.store(false, Ordering::Release);
        let _ = self.inner.signals.send(Signal::Kill);
    }

    /// Waits until the worker process has exited.
    pub async fn wait(&self) -> Option<std::process::ExitStatus> {
        let mut exit = self.inner.exit.clone();
        exit.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
    }

    /// The output of a worker spawned with
    /// [`monitor_output(false)`](WorkerBuilder::monitor_output); `None` if
    /// output is forwarded or was already taken.
    pub fn take_output(&self) -> Option<WorkerOutput> {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The last bytes the host process itself wrote to stderr (wasmtime
    /// and host diagnostics, not guest output).
    pub fn host_stderr(&self) -> String {
        self.inner
            .stderr_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
