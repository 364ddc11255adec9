//! Configuring and starting a worker.

use std::borrow::Cow;

use super::*;

/// The kinds of worker: where the guest runs, and so which walls it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerKind {
    /// A wasm guest in a host process of its own (wasm + process walls).
    Wasm,
    /// Native code in a process of its own (the process wall).
    Native,
    /// A wasm guest on a thread of the manager (the wasm wall).
    InProcess,
}

impl std::fmt::Display for WorkerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerKind::Wasm => "wasm",
            WorkerKind::Native => "native",
            WorkerKind::InProcess => "in-process",
        })
    }
}

/// Default cap on a wasm guest's linear memory.
pub const DEFAULT_MEMORY_LIMIT: u64 = 512 << 20;
/// Default time a guest gets to stop by itself after an interrupt.
pub const DEFAULT_INTERRUPT_GRACE: Duration = Duration::from_millis(100);
/// Default cap on the output of one request.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 16 << 20;
/// Default cap on requests waiting for a reply on one worker.
pub const DEFAULT_MAX_PENDING: usize = 1 << 20;
/// Largest worker channel capacity (the host refuses more, too).
pub const MAX_CHANNEL_CAPACITY: usize = protocol::MAX_CHANNEL_CAPACITY;
/// Default time a worker gets to start.
pub const DEFAULT_SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Worker::stop`] waits after the stop message, then after
/// SIGTERM, before escalating.
pub(crate) const STOP_STEP: Duration = Duration::from_secs(2);

pub(crate) static NEXT_WORKER: AtomicU64 = AtomicU64::new(1);

/// Where a Python guest sees its `python_path` directories, and the
/// variable that lists them (read by the guest at its first request).
const PYTHON_PATH_DIR: &str = "/malt/python-path";
const PYTHON_PATH_ENV: &str = "MALT_PYTHON_PATH";
/// Where a Python guest sees the rest of the standard library, and the
/// variable that says so.
const PYTHON_STDLIB_DIR: &str = "/malt/python-stdlib";
const PYTHON_STDLIB_ENV: &str = "MALT_PYTHON_STDLIB";
/// What the Python guest runs in a spare made ahead for a worker: its
/// start, and a cell that counts nowhere (guest.py's `_warm`).
const PYTHON_WARM_UP: &str = "__malt_warm__";

/// The embedded script guest (built by build.rs).
pub(crate) const SCRIPT_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/malt_script.wasm"));
pub(crate) const SCRIPT_SHA256: &str =
    include_str!(concat!(env!("OUT_DIR"), "/malt_script.sha256"));

#[derive(Debug, Clone)]
pub(crate) enum GuestSource {
    /// The embedded script guest as a wasm component.
    Script,
    /// A wasm component file.
    Wasm(PathBuf),
    /// The Python guest component (a wasm component that may not be
    /// built yet).
    Python(PathBuf),
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
    require_hardening: bool,
    output_limit: u64,
    max_pending: usize,
    /// How the host is started: here, on threads of this process, or by a
    /// launcher's command.
    via: crate::launcher::Via,
    heartbeat: Option<Duration>,
    /// The guest's warm-up function (see `HostConfig::warm_up`).
    warm_up: Option<String>,
    rollback: bool,
}

impl WorkerBuilder {
    pub(crate) fn new(guest: GuestSource) -> Self {
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
            require_hardening: false,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            max_pending: DEFAULT_MAX_PENDING,
            via: crate::launcher::Via::Local,
            heartbeat: Some(crate::launcher::DEFAULT_HEARTBEAT),
            warm_up: None,
            rollback: false,
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

    /// Adds a host directory of pure-Python modules and packages to a
    /// Python guest's `sys.path` (read-only; seen as
    /// `/malt/python-path/N`). May be given several times: searched in
    /// order, before the standard library. For other guests it is only a
    /// read-only grant.
    pub fn python_path(mut self, dir: impl AsRef<Path>) -> Self {
        let n = self
            .dirs
            .iter()
            .filter(|d| d.guest.starts_with(PYTHON_PATH_DIR))
            .count();
        let guest = format!("{PYTHON_PATH_DIR}/{n}");
        self.dirs.push(DirGrant {
            host: dir.as_ref().to_string_lossy().into_owned(),
            guest: guest.clone(),
            read_only: true,
        });
        match self.env.iter_mut().find(|(k, _)| k == PYTHON_PATH_ENV) {
            Some((_, paths)) => {
                paths.push(':');
                paths.push_str(&guest);
            }
            None => self.env.push((PYTHON_PATH_ENV.into(), guest)),
        }
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

    /// Rolls the guest back instead of resetting it when a request has to
    /// be killed (it ignored an interrupt past the grace period, or ran
    /// past the call timeout): the session is as it was before that
    /// request, and the error says so
    /// ([`Error::Interrupted`] with `rolled_back: true`). Off by default.
    ///
    /// The host keeps a copy-on-write fork of itself taken between
    /// requests; a kill hands the stream over to it. That costs a fork
    /// between requests (about a millisecond for a Python session; taken
    /// while the worker is idle when it can be, else before the next
    /// request) and a second process per worker. Wasm workers in a
    /// process of their own only: [`spawn`](Self::spawn) refuses it for
    /// in-process and native workers. A trap, a memory or fuel limit still
    /// resets the guest.
    pub fn rollback(mut self, on: bool) -> Self {
        self.rollback = on;
        self
    }

    /// Runs the guest on a thread of this process instead of a process of
    /// its own: the wasm sandbox is the only wall, and a start costs no
    /// process. Same API and semantics (interrupts included). Wasm guests
    /// only.
    pub fn in_process(mut self) -> Self {
        self.via = crate::launcher::Via::InProcess;
        self
    }

    /// Starts the worker's host with a [`Launcher`] (over SSH, `kubectl
    /// exec`, any command) instead of as a process of this program on this
    /// machine: the host may be on another machine. The component then
    /// travels over the protocol by content, and heartbeats watch the link
    /// (see [`crate::launcher`]). The host must be this same malt version.
    pub fn launcher(mut self, launcher: impl Into<Launcher>) -> Self {
        self.via = launcher.into().0;
        self
    }

    /// How often the manager and a host behind a [launcher](Self::launcher)
    /// exchange signs of life (default 2 s); a link silent for three
    /// intervals is dead and the worker ends. `None` turns heartbeats off
    /// (a dead link is then noticed only when it closes).
    pub fn heartbeat(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat = interval.filter(|i| !i.is_zero());
        self
    }

    /// Refuses to start unless the worker's host process is fully locked
    /// down: a wasm worker in a process of its own, with the seccomp
    /// filter and every Landlock rule in force (a kernel with Landlock ABI
    /// 6 or later). Off by default: without Landlock the other layers
    /// still hold (see SECURITY.md). What a worker got: [`Worker::hardening`].
    pub fn require_hardening(mut self, on: bool) -> Self {
        self.require_hardening = on;
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

    /// Starts the host process of this builder's next worker now, in the
    /// background, so that [`spawn`](Self::spawn) finds it running: for a
    /// program with work of its own to do before it spawns its first
    /// worker (a command line tool parsing its arguments, say), whose
    /// host then starts meanwhile. `spawn` does this itself first thing.
    ///
    /// Call it from within the tokio runtime that will spawn the worker
    /// (the runtime reaps the process). It does nothing for a worker that
    /// has no host process of its own (in-process, native, or behind a
    /// launcher), or when a host started ahead is already waiting. A host
    /// nobody takes costs a waiting process until the program exits; it
    /// has not locked itself down, loaded or run anything, and dies with
    /// the program like every worker.
    pub fn start_host_ahead(&self) {
        let wasm = matches!(
            self.guest,
            GuestSource::Script | GuestSource::Wasm(_) | GuestSource::Python(_)
        );
        if wasm
            && matches!(self.via, crate::launcher::Via::Local)
            && let Ok(program) = process::host_program(self.host_program.as_deref())
        {
            // The zygote forks this program's hosts once it runs.
            let forked = matches!(program, process::HostProgram::ThisProgram(_))
                && crate::zygote::serves(program.path(), malt_host::HOST_ARG);
            if !forked {
                crate::spare_host::prepare(program.path(), malt_host::HOST_ARG);
            }
        }
    }

    /// Caps one protocol frame (and so one value) in either direction
    /// (default 256 MiB).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How long starting the worker may take before [`Error::Spawn`]
    /// (default 30 s). Compiling a component into the artifact cache the
    /// first time is not counted (see [`spawn`](WorkerBuilder::spawn)).
    /// The guest's own start (instantiation and its start function), and
    /// each restart after a trap or kill, is killed a little earlier (a
    /// quarter of this, at most 2 s), so that the error says why.
    pub fn spawn_timeout(mut self, timeout: Duration) -> Self {
        self.spawn_timeout = timeout;
        self
    }

    /// Starts the worker and waits until it is ready.
    ///
    /// The spawn timeout covers starting the worker, not compiling its
    /// component into the artifact cache the first time: that one-time cost
    /// is ~2 s, but a minute in a debug build whose dependencies are not
    /// optimized (see the crate docs), and a timeout there would only waste it.
    pub async fn spawn(mut self) -> Result<Worker> {
        let number = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
        let label = format!("worker {number}");
        let timeout = self.spawn_timeout;
        let refuse = |message: String| Error::Spawn {
            worker: label.clone(),
            message,
            stderr: String::new(),
        };
        if let GuestSource::Python(path) = &self.guest {
            if !path.is_file() {
                return Err(refuse(crate::python::missing(path)));
            }
            // The rest of the standard library, where the build put it; a
            // host on another machine has no such directory.
            let stdlib = crate::python::stdlib_dir(path);
            let remote = matches!(self.via, crate::launcher::Via::Command(_));
            if stdlib.is_dir() && !remote {
                self.dirs.push(DirGrant {
                    host: stdlib.to_string_lossy().into_owned(),
                    guest: PYTHON_STDLIB_DIR.into(),
                    read_only: true,
                });
                self.env
                    .push((PYTHON_STDLIB_ENV.into(), PYTHON_STDLIB_DIR.into()));
            }
            self.warm_up = Some(PYTHON_WARM_UP.into());
            self.guest = GuestSource::Wasm(path.clone());
        }
        cache::check_grants(&self.dirs).map_err(refuse)?;
        let wasm = matches!(
            self.guest,
            GuestSource::Script | GuestSource::Wasm(_) | GuestSource::Python(_)
        );
        let in_process = matches!(self.via, crate::launcher::Via::InProcess);
        let remote = matches!(self.via, crate::launcher::Via::Command(_));
        if self.require_hardening && (!wasm || in_process) {
            return Err(refuse(
                "hardening is required, but only a wasm worker in a process of its own \
                 locks itself down (this one is in-process or native)"
                    .into(),
            ));
        }
        if self.rollback && (!wasm || in_process) {
            return Err(refuse(
                "rollback needs a wasm worker in a process of its own (this one is \
                 in-process or native): the host forks itself to keep the state"
                    .into(),
            ));
        }
        // The host process starts while the artifact is looked up (or
        // compiled): `connect` takes it from there.
        self.start_host_ahead();
        // A host behind a launcher has its own cache: it gets the
        // component by hash (and its bytes only if it lacks them).
        let artifact = match (wasm, remote) {
            (true, false) => Some(Prepared::Artifact(
                prepare_artifact(self.guest.clone(), self.fuel.is_some())
                    .await
                    .map_err(|e| refuse(e.to_string()))?,
            )),
            (true, true) => Some(
                component_spec(self.guest.clone())
                    .await
                    .map_err(|e| refuse(e.to_string()))?,
            ),
            (false, _) => None,
        };
        match tokio::time::timeout(timeout, self.spawn_inner(number, &label, artifact)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Spawn {
                worker: label,
                message: format!("the worker did not start within {timeout:?}"),
                stderr: String::new(),
            }),
        }
    }

    pub(crate) async fn spawn_inner(
        self,
        number: u64,
        label: &str,
        artifact: Option<Prepared>,
    ) -> Result<Worker> {
        let spawn_error = |message: String, stderr: String| Error::Spawn {
            worker: label.to_string(),
            message,
            stderr,
        };
        let fuel = self.fuel.is_some();
        let in_process = matches!(self.via, crate::launcher::Via::InProcess);
        let (kind, guest) = match &self.guest {
            GuestSource::Script | GuestSource::Wasm(_) | GuestSource::Python(_) => {
                let spec = match artifact.expect("spawn prepares a wasm guest first") {
                    Prepared::Artifact(artifact) => GuestSpec::Artifact {
                        path: artifact.path.to_string_lossy().into_owned(),
                        identity: Some(artifact.identity),
                    },
                    Prepared::Component(spec) => spec,
                };
                let kind = match in_process {
                    true => WorkerKind::InProcess,
                    false => WorkerKind::Wasm,
                };
                (kind, spec)
            }
            GuestSource::NativeScript | GuestSource::NativeProgram(_) if in_process => {
                return Err(spawn_error(
                    "an in-process worker runs wasm guests only".into(),
                    String::new(),
                ));
            }
            GuestSource::NativeScript => (WorkerKind::Native, GuestSpec::NativeScript),
            GuestSource::NativeProgram(_) => (WorkerKind::Native, GuestSpec::Native),
        };
        let program = match &self.via {
            crate::launcher::Via::Command(launch) => Via::Launcher(launch.clone()),
            crate::launcher::Via::InProcess => Via::InProcess,
            crate::launcher::Via::Local => Via::Program(match &self.guest {
                // A native guest program is its own host.
                GuestSource::NativeProgram(path) => process::HostProgram::Chosen(path.clone()),
                _ => process::host_program(self.host_program.as_deref())
                    .map_err(|m| spawn_error(m, String::new()))?,
            }),
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
        let remote = matches!(program, Via::Launcher(_));
        let mut launch = Launch {
            via: program,
            component: Some(self.guest.clone()).filter(|_| remote),
            config: HostConfig {
                version: PROTOCOL_VERSION,
                malt_version: crate::protocol::MALT_VERSION.to_string(),
                name: label.to_string(),
                guest,
                memory_limit: self.memory_limit,
                interrupt_grace: self.interrupt_grace,
                call_timeout: self.call_timeout,
                // The host's own limit on the guest's start ends first, so
                // the spawn fails with its message (a start that loops or
                // blocks) rather than a bare timeout.
                start_timeout: self.spawn_timeout
                    - (self.spawn_timeout / 4).min(Duration::from_secs(2)),
                max_frame: self.max_frame,
                fuel: self.fuel,
                output_limit: self.output_limit,
                env: self.env.clone(),
                dirs: self.dirs.clone(),
                heartbeat: self.heartbeat.filter(|_| remote),
                warm_up: self.warm_up.clone(),
                rollback: self.rollback,
            },
            output: Arc::new(Mutex::new(output)),
            stderr_tail: Arc::new(Mutex::new(String::new())),
        };
        let conn = match connection::connect(&launch).await {
            Err(e) if e.failure == StartFailure::Fatal(FatalKind::ArtifactLoad) => {
                // A damaged cached artifact: compile again, once.
                if let GuestSpec::Artifact { path, .. } = &launch.config.guest {
                    cache::discard(Path::new(path));
                }
                tracing::warn!("{label}: recompiling after: {}", e.message);
                let artifact = prepare_artifact(self.guest.clone(), fuel)
                    .await
                    .map_err(|e| spawn_error(e.to_string(), String::new()))?;
                launch.config.guest = GuestSpec::Artifact {
                    path: artifact.path.to_string_lossy().into_owned(),
                    identity: Some(artifact.identity),
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
            host_pid: AtomicU32::new(conn.host_pid),
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(true),
            exit,
            // A native guest cannot be killed apart from its process: a
            // hard interrupt restarts the host.
            restartable: kind == WorkerKind::Native,
            max_pending: self.max_pending,
            launch,
            ended_because: Mutex::new(None),
            hardening: conn.hardening,
        });
        tokio::spawn(read_frames(inner.clone(), conn.reader, conn.exited));
        let worker = Worker {
            inner,
            output: Mutex::new(captured),
        };
        if let Some(why) = hardening_shortfall(conn.hardening).filter(|_| self.require_hardening) {
            worker.kill();
            return Err(spawn_error(why, String::new()));
        }
        Ok(worker)
    }
}

/// How a wasm guest reaches its host: a sealed artifact of this machine's
/// cache, or (for a host behind a launcher) its content hash.
pub(crate) enum Prepared {
    Artifact(cache::Artifact),
    Component(GuestSpec),
}

/// The bytes of a wasm guest (for a host that asks for them).
pub(crate) fn component_bytes(source: &GuestSource) -> Result<Cow<'static, [u8]>> {
    match source {
        GuestSource::Wasm(path) | GuestSource::Python(path) => {
            let mut file = std::fs::File::open(path).map_err(|e| {
                Error::io(format!("cannot read the component {}", path.display()), e)
            })?;
            cache::read_component(&mut file, &path.display().to_string()).map(Cow::Owned)
        }
        _ => Ok(Cow::Borrowed(SCRIPT_WASM)),
    }
}

/// A wasm guest named by its content, for a host with a cache of its own.
async fn component_spec(source: GuestSource) -> Result<Prepared> {
    tokio::task::spawn_blocking(move || {
        let (sha256, size) = match &source {
            GuestSource::Wasm(path) | GuestSource::Python(path) => {
                let digest = cache::component_digest(path)?;
                (digest.sha256, digest.size)
            }
            _ => (SCRIPT_SHA256.to_string(), SCRIPT_WASM.len() as u64),
        };
        Ok(Prepared::Component(GuestSpec::Component { sha256, size }))
    })
    .await
    .map_err(|e| Error::Component(format!("preparing the guest panicked: {e}")))?
}

/// The compiled artifact of a wasm guest (compiling it if the cache does
/// not have it).
pub(crate) async fn prepare_artifact(source: GuestSource, fuel: bool) -> Result<cache::Artifact> {
    tokio::task::spawn_blocking(move || match source {
        GuestSource::Wasm(path) | GuestSource::Python(path) => {
            cache::component_artifact(&path, fuel)
        }
        _ => cache::artifact(SCRIPT_WASM, SCRIPT_SHA256, "the script guest", fuel),
    })
    .await
    .map_err(|e| Error::Component(format!("preparing the guest panicked: {e}")))?
}
