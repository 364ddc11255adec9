//! A wasm component as a guest, run by wasmtime on the host's guest thread.
//!
//! The guest thread owns the `Store` and drives each request as a future
//! (wasmtime's async API, on a single-threaded tokio runtime of its own):
//! WASI's blocking calls are async host functions, so a guest blocked in
//! one is a pending future, not a blocked thread. The other threads never
//! touch the store; the timer thread may write the two words of a memory
//! interrupt the guest asked for (`memory.rs`). A kill sets a flag, bumps
//! the engine's epoch (which traps running wasm code within microseconds)
//! and wakes the guest
//! thread, which drops the call future wherever it is (inside a host
//! call, too). Either way the store is gone with it: the guest gets a
//! fresh store and instance (from the pre-instantiated component: ~50 µs).

mod limits;
mod loaded;
pub(crate) use loaded::{make_ahead_here, preload, preloaded_intact, start_ahead, take_ahead};
mod memory;
mod output;
mod spares;
mod waits;

pub use loaded::{fd_path, open_artifact};
pub use spares::spares_taken;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{GuestContext, GuestError, Shared, StartFailed, Work};
use crate::control::Stop;
use limits::Limiter;
use malt_protocol::{HostConfig, Stream};
use output::{FrameOutput, OutputTo};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "worker",
        // Calls into the guest are futures (a kill drops them); malt's own
        // imports block their thread, and wake on an interrupt or kill.
        exports: { default: async },
    });
}

use bindings::Worker as Bindings;
use bindings::WorkerPre as BindingsPre;

/// The engine configuration shared by the compiler (manager side) and
/// every host: an artifact only loads into an engine configured alike.
///
/// Fuel metering changes the generated code, so a worker with a fuel
/// limit runs an artifact compiled for it.
pub fn engine_config(fuel: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.consume_fuel(fuel);
    config
}

/// Per-store state.
pub(crate) struct State {
    /// The host services: the one implementation every backend uses.
    services: GuestContext,
    /// Where the guest's stdout and stderr go.
    output_to: OutputTo,
    /// Whether the guest has called a malt import with effects beyond its
    /// own memory (a spare that did, while it started, is not handed out:
    /// see `spares.rs`).
    used_host: bool,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
}

impl State {
    fn services(&mut self) -> &GuestContext {
        self.used_host = true;
        &self.services
    }

    /// From now on this store serves the worker of `shared`: its host
    /// calls, output, kills, and interrupts raised in its memory.
    fn adopt(&mut self, shared: &Arc<Shared>) {
        shared
            .control
            .use_memory_interrupt(self.services.take_memory_interrupt());
        self.services = GuestContext::new(shared.clone());
        *self.output_to.lock().unwrap_or_else(|e| e.into_inner()) = shared.clone();
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The WIT imports, adapted to the host services.
impl bindings::malt::worker::host::Host for State {
    fn interrupted(&mut self) -> bool {
        self.services().interrupted()
    }

    fn sleep(&mut self, ms: u64) -> bool {
        self.services().sleep(Duration::from_millis(ms))
    }

    fn channel_put(&mut self, name: String, value: Vec<u8>) -> Result<(), String> {
        self.services().channel_put(&name, value)
    }

    fn channel_take(&mut self, name: String) -> Result<Vec<u8>, String> {
        self.services().channel_take(&name)
    }

    fn channel_is_ready(&mut self, name: String) -> bool {
        self.services().channel_is_ready(&name)
    }

    // Replaced in `link` by `use_memory_interrupt`, which sees where in
    // the guest's memory the probe lies (a `Vec` is a copy).
    fn use_memory_interrupt(
        &mut self,
        _: bindings::malt::worker::host::MemoryInterrupt,
        _: Vec<u8>,
        _: u32,
        _: Vec<(u32, u32)>,
    ) -> Result<(), String> {
        Err("the host cannot see the guest's memory".into())
    }

    fn arm_memory_interrupt(&mut self, armed: bool) {
        // Within the guest's own memory: a spare's warm-up may (see
        // `adopt`).
        self.services.arm_memory_interrupt(armed);
    }
}

/// Most host resources (open files and directories, streams, pollables) a
/// guest may hold at once: an in-process guest's files are descriptors of
/// the manager's process, and none may run it out of them.
pub const MAX_HOST_RESOURCES: usize = 1024;

pub(crate) struct WasmGuest {
    place: crate::Place,
    engine: Engine,
    pre: BindingsPre<State>,
    config: Arc<HostConfig>,
    grants: Grants,
    shared: Arc<Shared>,
    /// `None` only while being replaced or dropped.
    instance: Option<(Store<State>, Bindings)>,
    /// Runs the guest's futures on the guest thread; its blocking pool
    /// serves WASI file I/O. `None` only while dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl WasmGuest {
    /// Loads the precompiled component and links it (in the manager's
    /// process, once per artifact: in-process workers share it);
    /// [`start`] instantiates it.
    ///
    /// [`start`]: super::Guest::start
    pub(crate) fn load(
        config: &HostConfig,
        shared: Arc<Shared>,
        place: crate::Place,
        ahead: loaded::Ahead,
    ) -> Result<Self, StartFailed> {
        // Now: a host's sandbox closes the filesystem once it is loaded.
        memory::open_maps();
        let (engine, pre) = match place {
            crate::Place::Process => match loaded::take_preloaded(config) {
                Some(linked) => linked,
                None => loaded::load_linked(config, ahead)?,
            },
            crate::Place::InProcess => loaded::get_or_load(config)?,
        };
        // The timer's kill: the epoch bump traps running wasm code (the
        // kill flag, set before, makes the epoch callback refuse to extend
        // the deadline); a guest waiting in the host is woken by the flag.
        // Other stores of a shared engine see the bump, not the flag: they
        // go on.
        let epoch = engine.clone();
        shared
            .control
            .set_killer(Box::new(move |_, _| epoch.increment_epoch()));
        // Time only: WASI's file operations run on the blocking pool, and a
        // guest has no sockets.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .thread_name("malt-wasi")
            .build()
            .map_err(|e| format!("cannot start the guest's runtime: {e}"))?;
        let guest = WasmGuest {
            place,
            engine,
            pre,
            config: Arc::new(config.clone()),
            grants: Grants::open(&config.dirs).map_err(|e| format!("{e:#}"))?,
            shared,
            instance: None,
            runtime: Some(runtime),
        };
        Ok(guest)
    }

    /// A fresh store and instance, replacing the current ones: at a
    /// worker's first start (`first`), an in-process worker's may be a
    /// spare made ahead (never at a reset: see `spares.rs`). Fails when the
    /// start traps or is killed by the start timeout.
    fn instantiate(&mut self, first: bool) -> Result<(), String> {
        self.drop_instance();
        let in_process = self.place == crate::Place::InProcess;
        let spare = (first && in_process)
            .then(|| spares::take(&self.engine, &self.config))
            .flatten();
        let (store, bindings) = match spare {
            Some((mut store, bindings)) => {
                store.data_mut().adopt(&self.shared);
                (store, bindings)
            }
            None => {
                let mut store = new_store(&self.engine, &self.config, &self.grants, &self.shared)
                    .map_err(|e| format!("{e:#}"))?;
                let runtime = self
                    .runtime
                    .as_ref()
                    .expect("runtime lives as long as the guest");
                let bindings = instantiate_in(runtime, &self.pre, &mut store, &self.shared)?;
                (store, bindings)
            }
        };
        self.instance = Some((store, bindings));
        if first && in_process {
            // The next in-process worker like this one starts from a spare.
            spares::make(&self.engine, &self.pre, &self.config);
        }
        Ok(())
    }

    /// The store goes, and its memory with it: the control forgets where
    /// the guest took interrupts in that memory first.
    fn drop_instance(&mut self) {
        self.shared.control.use_memory_interrupt(None);
        self.instance = None;
    }
}

impl Drop for WasmGuest {
    fn drop(&mut self) {
        // The store first: its pending WASI tasks are cancelled. Then the
        // runtime, without waiting for a blocking file operation still
        // running on its pool: a worker never waits on its guest's I/O.
        self.drop_instance();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The granted directories, opened once when the guest is loaded. Every
/// store (the first, and each after a reset) opens them again through
/// these handles, never by path: a guest that swaps a directory inside one
/// grant for a symlink cannot redirect another grant at its next reset.
#[doc(hidden)]
pub struct Grants(Vec<(std::os::fd::OwnedFd, malt_protocol::DirGrant)>);

impl Grants {
    /// Opens each granted directory (`O_PATH`: a handle, not a read).
    pub fn open(dirs: &[malt_protocol::DirGrant]) -> wasmtime::Result<Grants> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut opened = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let handle = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&dir.host)
                .map_err(|e| {
                    wasmtime::format_err!("cannot open the granted directory {}: {e}", dir.host)
                })?;
            opened.push((handle.into(), dir.clone()));
        }
        Ok(Grants(opened))
    }
}

/// The WASI context every guest gets: nothing but what was granted. No
/// stdin, no network, no arguments; only the granted environment
/// variables and directories.
pub fn sandbox(config: &HostConfig, grants: &Grants) -> wasmtime::Result<WasiCtxBuilder> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (k, v) in &config.env {
        wasi.env(k, v);
    }
    for (handle, dir) in &grants.0 {
        let perms = if dir.read_only {
            wasmtime_wasi::FsPerms::ReadOnly
        } else {
            wasmtime_wasi::FsPerms::ReadWrite
        };
        // The very directory opened at load.
        wasi.preopened_dir(fd_path(handle), &dir.guest, perms)
            .map_err(|e| e.context(format!("cannot open the granted directory {}", dir.host)))?;
    }
    Ok(wasi)
}

/// A store with the guest's sandbox and limits, ready to instantiate in.
fn new_store(
    engine: &Engine,
    config: &HostConfig,
    grants: &Grants,
    shared: &Arc<Shared>,
) -> wasmtime::Result<Store<State>> {
    let mut wasi = sandbox(config, grants)?;
    let output_to = Arc::new(std::sync::Mutex::new(shared.clone()));
    wasi.stdout(FrameOutput {
        to: output_to.clone(),
        stream: Stream::Stdout,
    })
    .stderr(FrameOutput {
        to: output_to.clone(),
        stream: Stream::Stderr,
    });
    let state = State {
        services: GuestContext::new(shared.clone()),
        output_to,
        used_host: false,
        wasi: wasi.build(),
        table: {
            let mut table = ResourceTable::new();
            table.set_max_capacity(MAX_HOST_RESOURCES);
            table
        },
        limiter: Limiter::new(usize::try_from(config.memory_limit).unwrap_or(usize::MAX)),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // The epoch only moves when the timer kills a request; the flag makes
    // sure a late bump can never hit the request that follows. Read
    // through the store: a spare store changes workers once.
    store.epoch_deadline_callback(|store| {
        if store.data().services.killed() {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    store.set_epoch_deadline(1);
    if let Some(fuel) = config.fuel {
        // Instantiation runs guest code too.
        store.set_fuel(fuel)?;
    }
    Ok(store)
}

impl super::Guest for WasmGuest {
    fn start(&mut self) -> Result<(), String> {
        self.instantiate(true)
    }

    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError> {
        let Some((store, bindings)) = self.instance.as_mut() else {
            return Err(GuestError::Trap {
                message: "the guest is not running (its restart failed)".into(),
                memory_limit_hit: false,
                out_of_fuel: false,
            });
        };
        store.data_mut().limiter.memory_hit = false;
        store.set_epoch_deadline(1);
        if let Some(fuel) = self.config.fuel {
            store
                .set_fuel(fuel)
                .expect("fuel is enabled in the engine of a worker with a fuel limit");
        }
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the guest");
        let call = async {
            match work {
                Work::Call { name, args } => bindings.call_call(&mut *store, name, args).await,
                Work::Eval { code } => bindings.call_eval(&mut *store, code).await,
            }
        };
        let outcome = unless_killed(runtime, &self.shared.control, call);
        match outcome {
            Some(Ok(Ok(value))) => Ok(value),
            Some(Ok(Err(message))) => Err(GuestError::Error(message)),
            Some(Err(trap)) => Err(GuestError::Trap {
                memory_limit_hit: store.data().limiter.memory_hit,
                out_of_fuel: trap.downcast_ref::<wasmtime::Trap>()
                    == Some(&wasmtime::Trap::OutOfFuel),
                message: describe_trap(&trap),
            }),
            // Killed while waiting in the host: the future is dropped
            // mid-call, the store cannot be entered again.
            None => Err(GuestError::Trap {
                message: KILLED_IN_HOST_CALL.into(),
                memory_limit_hit: false,
                out_of_fuel: false,
            }),
        }
    }

    fn reset(&mut self) -> Result<(), String> {
        self.instantiate(false)
    }
}

/// Runs `future` on `runtime` unless `control`'s request is killed first:
/// `None` then (the future is dropped wherever it waits). Biased: a future
/// that finishes without waiting never polls (nor pays for) the kill.
fn unless_killed<F: Future>(
    runtime: &tokio::runtime::Runtime,
    control: &crate::control::Control,
    future: F,
) -> Option<F::Output> {
    drive(runtime, async {
        tokio::select! {
            biased;
            output = future => Some(output),
            () = control.until_stopped(Stop::Killed) => None,
        }
    })
}

/// Why a start or call ended with no result: killed.
const KILLED_IN_HOST_CALL: &str = "killed while blocked in a host call";

/// Instantiates `pre` in `store`, driven on `runtime`, unless the worker
/// of `shared` is killed first (the start timeout, a kill).
fn instantiate_in(
    runtime: &tokio::runtime::Runtime,
    pre: &BindingsPre<State>,
    store: &mut Store<State>,
    shared: &Shared,
) -> Result<Bindings, String> {
    unless_killed(runtime, &shared.control, pre.instantiate_async(store))
        .ok_or(KILLED_IN_HOST_CALL)?
        .map_err(|e| format!("{e:#}"))
}

/// Runs a guest future to completion on the guest thread's runtime. Most
/// requests never wait: they are polled once, in the runtime's context,
/// without the cost of entering its scheduler; one that waits is handed to
/// the runtime, which drives its timers and blocking tasks.
fn drive<F: Future>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output {
    let _context = runtime.enter();
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        // Polled again with the runtime's own waker, which replaces the
        // no-op one wherever the future registered it.
        std::task::Poll::Pending => runtime.block_on(future),
    }
}

fn describe_trap(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}
