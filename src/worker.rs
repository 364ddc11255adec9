//! The manager's handle on a worker, and how workers are started.

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::WorkerChannel;
use crate::connection::{self, Launch, Signal};
use crate::error::{Error, RemoteException, Result};
use crate::host::wasm::ARTIFACT_LOAD_FAILED;
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
/// Default cap on the output of one request.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 16 << 20;
/// Default cap on requests waiting for a reply on one worker.
pub const DEFAULT_MAX_PENDING: usize = 1 << 20;
/// Largest worker channel capacity.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 20;
/// Default time a worker gets to start.
pub const DEFAULT_SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Worker::stop`] waits after the stop message, then after
/// SIGTERM, before escalating.
const STOP_STEP: Duration = Duration::from_secs(2);

static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

/// The embedded script guest (built by build.rs).
const SCRIPT_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/malt_script.wasm"));
const SCRIPT_SHA256: &str = include_str!(concat!(env!("OUT_DIR"), "/malt_script.sha256"));

#[derive(Debug, Clone)]
enum GuestSource {
    /// The embedded script guest as a wasm component.
    Script,
    /// A wasm component file.
    Wasm(PathBuf),
    /// The script guest compiled into the host (no wasm).
    NativeScript,
    /// A program serving its own native guest.
    NativeProgram(PathBuf),
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
    in_process: bool,
    output_limit: u64,
    max_pending: usize,
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
            in_process: false,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            max_pending: DEFAULT_MAX_PENDING,
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

    /// Caps what one request may print (default 16 MiB); the rest is
    /// dropped and a notice goes to the worker's stderr. A guest printing
    /// forever cannot make the manager hold more.
    pub fn output_limit(mut self, bytes: u64) -> Self {
        self.output_limit = bytes;
        self
    }

    /// Caps the requests waiting for a reply on this worker (default
    /// 2^20); past it, new requests fail with [`Error::LimitExceeded`]
    /// (`Limit::PendingRequests`) instead of growing memory without bound.
    pub fn max_pending(mut self, requests: usize) -> Self {
        self.max_pending = requests;
        self
    }

    /// Runs the guest on a thread of this process instead of a process of
    /// its own: the wasm sandbox is the only wall, and a start costs no
    /// process. Same API and semantics (interrupts included). Wasm guests
    /// only.
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
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

    /// The program to run as the worker's host: any program that links
    /// this same version of malt (the `malt` CLI, say). By default a
    /// worker's host is this program itself, re-executed (see the crate
    /// docs); a host of another version is refused at start.
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
        let (kind, guest, program) = match &self.guest {
            GuestSource::Script | GuestSource::Wasm(_) => {
                let artifact = prepare_artifact(self.guest.clone(), fuel)
                    .await
                    .map_err(|e| spawn_error(e.to_string(), String::new()))?;
                let spec = GuestSpec::Artifact {
                    path: artifact.to_string_lossy().into_owned(),
                };
                let program = if self.in_process {
                    None
                } else {
                    Some(
                        process::host_program(self.host_program.as_deref())
                            .map_err(|m| spawn_error(m, String::new()))?,
                    )
                };
                let kind = if self.in_process {
                    "in-process"
                } else {
                    "wasm"
                };
                (kind, spec, program)
            }
            GuestSource::NativeScript | GuestSource::NativeProgram(_) if self.in_process => {
                return Err(spawn_error(
                    "an in-process worker runs wasm guests only".into(),
                    String::new(),
                ));
            }
            GuestSource::NativeScript => {
                let program = process::host_program(self.host_program.as_deref())
                    .map_err(|m| spawn_error(m, String::new()))?;
                ("native", GuestSpec::NativeScript, Some(program))
            }
            GuestSource::NativeProgram(path) => (
                "native",
                GuestSpec::Native,
                Some(process::HostProgram::Chosen(path.clone())),
            ),
        };

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
        let mut launch = Launch {
            program,
            config: HostConfig {
                version: PROTOCOL_VERSION,
                malt_version: crate::protocol::MALT_VERSION.to_string(),
                name: label.to_string(),
                guest,
                memory_limit: self.memory_limit,
                interrupt_grace: self.interrupt_grace,
                call_timeout: self.call_timeout,
                max_frame: self.max_frame,
                fuel: self.fuel,
                output_limit: self.output_limit,
                env: self.env.clone(),
                dirs: self.dirs.clone(),
            },
            output: Arc::new(Mutex::new(output)),
            stderr_tail: Arc::new(Mutex::new(String::new())),
        };
        let conn = match connection::connect(&launch).await {
            Err(e) if e.message.contains(ARTIFACT_LOAD_FAILED) => {
                // A damaged cached artifact: compile again, once.
                if let GuestSpec::Artifact { path } = &launch.config.guest {
                    cache::discard(Path::new(path));
                }
                tracing::warn!("{label}: recompiling after: {}", e.message);
                let artifact = prepare_artifact(self.guest.clone(), fuel)
                    .await
                    .map_err(|e| spawn_error(e.to_string(), String::new()))?;
                launch.config.guest = GuestSpec::Artifact {
                    path: artifact.to_string_lossy().into_owned(),
                };
                connection::connect(&launch).await
            }
            other => other,
        }
        .map_err(|e| spawn_error(e.message, e.stderr))?;

        let (exit, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            name: format!("{label} ({kind})"),
            number,
            kind,
            pending: Mutex::new(Pending {
                waiting: BTreeMap::new(),
                closed: false,
                frames: conn.frames,
                signals: conn.signals,
            }),
            pid: AtomicU32::new(conn.pid),
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(true),
            exit,
            restartable: kind == "native",
            max_pending: self.max_pending,
            launch,
        });
        tokio::spawn(read_frames(inner.clone(), conn.reader, conn.exited));
        Ok(Worker {
            inner,
            output: Mutex::new(captured),
        })
    }
}

/// The compiled artifact of a wasm guest (compiling it if the cache does
/// not have it).
async fn prepare_artifact(source: GuestSource, fuel: bool) -> Result<PathBuf> {
    tokio::task::spawn_blocking(move || match source {
        GuestSource::Wasm(path) => {
            let what = path.display().to_string();
            let bytes = std::fs::read(&path)
                .map_err(|e| Error::io(format!("cannot read the component {what}"), e))?;
            cache::check_component(&bytes, &what)?;
            cache::artifact(&bytes, &cache::sha256_hex(&bytes), &what, fuel)
        }
        _ => cache::artifact(SCRIPT_WASM, SCRIPT_SHA256, "the script guest", fuel),
    })
    .await
    .map_err(|e| Error::Component(format!("preparing the guest panicked: {e}")))?
}

/// Reads the host's frames until the worker is gone; restarts a native
/// host that asked for it.
async fn read_frames(
    inner: Arc<Inner>,
    mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut exited: tokio::sync::oneshot::Receiver<std::process::ExitStatus>,
) {
    loop {
        let mut restart = false;
        let broken = loop {
            let body =
                match connection::read_body(&mut *reader, inner.launch.config.max_frame).await {
                    Ok(Some(body)) => body,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                };
            match protocol::decode::<FromHost>(&body) {
                Ok(FromHost::Reply { id, result }) => inner.resolve(id, result),
                Ok(FromHost::Output { stream, data }) => inner.output().write(stream, &data),
                Ok(FromHost::Restart) if inner.restartable => restart = true,
                Ok(FromHost::Fatal { message }) => break Some(message),
                Ok(other) => break Some(format!("unexpected message {other:?}")),
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(reason) = &broken {
            tracing::warn!(worker = %inner.name, "killing the worker: {reason}");
            inner.signal(Signal::Kill);
        }
        if restart && broken.is_none() && inner.running.load(Ordering::Acquire) {
            let _ = (&mut exited).await;
            match connection::connect(&inner.launch).await {
                Ok(conn) => {
                    reader = conn.reader;
                    exited = conn.exited;
                    inner.reconnect(conn.frames, conn.signals, conn.pid);
                    continue;
                }
                Err(e) => tracing::warn!(worker = %inner.name, "cannot restart: {}", e.message),
            }
        }
        inner.terminate();
        inner.output().finish();
        let status = match tokio::time::timeout(Duration::from_secs(2), &mut exited).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                // The stream closed but the host lingers: make sure.
                inner.signal(Signal::Kill);
                tokio::time::timeout(Duration::from_secs(5), exited)
                    .await
                    .ok()
                    .and_then(|s| s.ok())
            }
        };
        inner.exit.send_replace(Some(status));
        return;
    }
}

type Reply = std::result::Result<Option<serde_bytes::ByteBuf>, Error>;

/// A request not answered yet.
struct Waiting {
    /// Where the answer goes (`None` for `remote_do`).
    tx: Option<oneshot::Sender<Reply>>,
    /// The request, kept to send again to a restarted native host.
    resend: Option<Vec<u8>>,
}

struct Pending {
    waiting: BTreeMap<u64, Waiting>,
    /// Set once the worker is gone: new requests fail at once.
    closed: bool,
    /// The current connection's outgoing frames and control.
    frames: mpsc::UnboundedSender<Vec<u8>>,
    signals: mpsc::UnboundedSender<Signal>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    number: u64,
    kind: &'static str,
    pending: Mutex<Pending>,
    pid: AtomicU32,
    next_id: AtomicU64,
    running: AtomicBool,
    /// The exit status once the worker is gone for good.
    exit: watch::Sender<Option<Option<std::process::ExitStatus>>>,
    restartable: bool,
    max_pending: usize,
    launch: Launch,
}

impl Inner {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn output(&self) -> std::sync::MutexGuard<'_, OutputSink> {
        self.launch.output.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, signal: Signal) {
        let _ = self.lock_pending().signals.send(signal);
    }

    /// Switches to a restarted host and sends it every unanswered request,
    /// in order.
    fn reconnect(
        &self,
        frames: mpsc::UnboundedSender<Vec<u8>>,
        signals: mpsc::UnboundedSender<Signal>,
        pid: u32,
    ) {
        let mut pending = self.lock_pending();
        for waiting in pending.waiting.values() {
            if let Some(frame) = &waiting.resend {
                let _ = frames.send(frame.clone());
            }
        }
        pending.frames = frames;
        pending.signals = signals;
        self.pid.store(pid, Ordering::Release);
        if !self.running.load(Ordering::Acquire) {
            // Killed while restarting.
            let _ = pending.signals.send(Signal::Kill);
        }
    }

    /// Marks the worker gone and fails every pending request.
    fn terminate(&self) {
        self.running.store(false, Ordering::Release);
        let waiting = {
            let mut pending = self.lock_pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiting)
        };
        for (_, waiting) in waiting {
            if let Some(tx) = waiting.tx {
                let _ = tx.send(Err(Error::TerminatedWorker));
            }
        }
    }

    fn resolve(&self, id: u64, result: std::result::Result<Option<serde_bytes::ByteBuf>, Failure>) {
        let Some(Waiting { tx: Some(tx), .. }) = self.lock_pending().waiting.remove(&id) else {
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
        let (tx, rx) = oneshot::channel();
        self.submit(message, Some(tx))?;
        Ok(rx)
    }

    /// Sends a request whose reply is awaited by `tx` (or by nobody).
    fn submit(
        &self,
        message: impl FnOnce(u64) -> ToHost,
        tx: Option<oneshot::Sender<Reply>>,
    ) -> Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.frame(&message(id))?;
        let mut pending = self.lock_pending();
        if pending.closed {
            return Err(Error::TerminatedWorker);
        }
        if pending.waiting.len() >= self.max_pending {
            return Err(Error::LimitExceeded {
                worker: self.name.clone(),
                limit: protocol::Limit::PendingRequests,
                message: format!(
                    "{} requests are already waiting for a reply",
                    self.max_pending
                ),
            });
        }
        let resend = self.restartable.then(|| frame.clone());
        // Sent under the lock, so a restart sends every request once:
        // either from this queue or from its own list, never both.
        let _ = pending.frames.send(frame);
        pending.waiting.insert(id, Waiting { tx, resend });
        Ok(())
    }

    /// Sends a message that gets no reply.
    fn send(&self, message: &ToHost) -> Result<()> {
        if !self.running.load(Ordering::Acquire) {
            return Err(Error::TerminatedWorker);
        }
        let frame = self.frame(message)?;
        self.lock_pending()
            .frames
            .send(frame)
            .map_err(|_| Error::TerminatedWorker)
    }

    fn frame(&self, message: &ToHost) -> Result<Vec<u8>> {
        let frame = protocol::encode(message);
        if frame.len() - protocol::HEADER_LEN > self.launch.config.max_frame {
            return Err(Error::LimitExceeded {
                worker: self.name.clone(),
                limit: protocol::Limit::FrameSize,
                message: format!(
                    "the request is {} bytes, over the {} byte frame cap",
                    frame.len() - protocol::HEADER_LEN,
                    self.launch.config.max_frame
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
    protocol::from_msgpack(bytes).map_err(|e| Error::Decode {
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

    /// A builder for a native worker: a separate process serving the
    /// script guest natively (no wasm: the process is the only wall).
    pub fn native() -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::NativeScript)
    }

    /// A builder for a native worker running your own program, which
    /// serves its guest with [`crate::host::main_if_host_with`].
    pub fn native_program(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::NativeProgram(path.as_ref().to_path_buf()))
    }

    /// The worker's name, e.g. `worker 3 (pid 4242)`, as used in errors.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The worker's number in this manager (1, 2, …).
    pub fn number(&self) -> u64 {
        self.inner.number
    }

    /// The host process id (this process's own for an in-process worker;
    /// a native worker gets a new one when a hard interrupt restarts it).
    pub fn pid(&self) -> u32 {
        self.inner.pid.load(Ordering::Acquire)
    }

    /// What kind of worker this is: `wasm`, `native` or `in-process`.
    pub fn kind(&self) -> &'static str {
        self.inner.kind
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
        self.inner.submit(
            |id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::None,
            },
            None,
        )
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

    /// Interrupts the request the worker is running; if it is between
    /// requests, the next one to begin, if it was sent before this call
    /// (so `let p = w.remote_eval(..); w.interrupt()` interrupts `p` even
    /// if it has not started yet). A request sent later is never hit.
    ///
    /// The request fails with [`Error::Interrupted`]. A guest that stops by
    /// itself within the grace period keeps its state (`state_lost:
    /// false`); one that does not is killed and restarted fresh
    /// (`state_lost: true`). Either way the worker keeps running, and
    /// queued requests run afterwards.
    pub async fn interrupt(&self) -> Result<()> {
        let up_to = self.inner.next_id.load(Ordering::Relaxed) - 1;
        self.inner.send(&ToHost::Interrupt { up_to })
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
        let mut exit = self.inner.exit.subscribe();
        for escalation in [Some(Signal::Term), Some(Signal::Kill), None] {
            let exited = tokio::time::timeout(STOP_STEP, exit.wait_for(|s| s.is_some())).await;
            if matches!(exited, Ok(Ok(_)) | Ok(Err(_))) {
                break;
            }
            match escalation {
                Some(signal) => self.inner.signal(signal),
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
        self.inner.signal(Signal::Kill);
    }

    /// Waits until the worker process has exited.
    pub async fn wait(&self) -> Option<std::process::ExitStatus> {
        let mut exit = self.inner.exit.subscribe();
        exit.wait_for(|s| s.is_some())
            .await
            .ok()
            .and_then(|s| s.flatten())
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
            .launch
            .stderr_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
