//! `run`: a WASI command (a component or a preview 1 module) in the
//! sandbox, with this process's stdio.

use super::*;

/// How `malt run` sandboxes a WASI command.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment variables the program sees (it inherits none).
    pub env: Vec<(String, String)>,
    /// Directories the program sees.
    pub dirs: Vec<DirGrant>,
    /// Cap on linear memory, in bytes.
    pub memory_limit: Option<u64>,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
    /// Fuel limit.
    pub fuel: Option<u64>,
    /// Whether the program may read this process's stdin.
    pub inherit_stdin: bool,
    /// Lock this process before the program runs, as a worker host locks
    /// itself (every descriptor above 2 closed first; no_new_privs,
    /// rlimits, the seccomp allowlist: no exec, no new processes, no
    /// sockets; Landlock: no file outside the granted directories).
    /// Irreversible: for a process that does nothing else afterwards, like
    /// the CLI's `malt run`.
    pub harden: bool,
    /// Refuse to run unless `harden` put every layer in force (seccomp and
    /// all of Landlock): see [`WorkerBuilder::require_hardening`].
    ///
    /// [`WorkerBuilder::require_hardening`]: crate::WorkerBuilder::require_hardening
    pub require_hardening: bool,
}

fn harden(options: &RunOptions) -> Result<()> {
    let hardening = match options.harden {
        true => Some(
            crate::host::harden_process(
                &options.dirs,
                options.memory_limit.unwrap_or(crate::DEFAULT_MEMORY_LIMIT),
            )
            .map_err(|e| Error::Component(format!("cannot harden this process: {e}")))?,
        ),
        false => None,
    };
    match crate::worker::hardening_shortfall(hardening).filter(|_| options.require_hardening) {
        Some(message) => Err(Error::Spawn {
            worker: "run".into(),
            message,
            stderr: String::new(),
        }),
        None => Ok(()),
    }
}

struct RunState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: wasmtime::StoreLimits,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Runs a WASI command in the same sandbox as a worker guest, with this
/// process's stdout and stderr: a component (its `wasi:cli/run` export) or
/// a WASI preview 1 core module (its `_start`). Returns the program's exit
/// code.
pub fn run(path: &Path, options: &RunOptions) -> Result<i32> {
    if options.harden {
        crate::host::close_inherited_files();
    }
    let fuel = options.fuel.is_some();
    cache::check_grants(&options.dirs).map_err(|message| Error::Spawn {
        worker: "run".into(),
        message,
        stderr: String::new(),
    })?;
    let (bytes, sha, kind) = read_wasm(path)?;
    let what = path.display().to_string();
    let (artifact, _) = cache::artifact_status(&bytes, &sha, &what, fuel)?;
    drop(bytes);
    let config = HostConfig {
        version: crate::protocol::PROTOCOL_VERSION,
        malt_version: crate::protocol::MALT_VERSION.to_string(),
        name: "run".into(),
        guest: crate::protocol::GuestSpec::Artifact {
            path: artifact.path.to_string_lossy().into_owned(),
            identity: Some(artifact.identity),
        },
        memory_limit: options.memory_limit.unwrap_or(crate::DEFAULT_MEMORY_LIMIT),
        interrupt_grace: Duration::ZERO,
        call_timeout: options.timeout,
        start_timeout: Duration::from_secs(30),
        max_frame: 0,
        fuel: options.fuel,
        output_limit: u64::MAX,
        env: options.env.clone(),
        dirs: options.dirs.clone(),
        heartbeat: None,
        warm_up: None,
        rollback: false,
    };
    let mut wasi = crate::host::wasm::Grants::open(&config.dirs)
        .and_then(|grants| crate::host::wasm::sandbox(&config, &grants))
        .map_err(|e| Error::Component(format!("{e:#}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "main".into());
    wasi.arg(name)
        .args(&options.args)
        .inherit_stdout()
        .inherit_stderr();
    if options.inherit_stdin {
        wasi.inherit_stdin();
    }
    let limits = wasmtime::StoreLimitsBuilder::new()
        .memory_size(usize::try_from(config.memory_limit).unwrap_or(usize::MAX))
        .build();
    let timed_out = Arc::new(AtomicBool::new(false));
    let outcome = match kind {
        WasmKind::Component => run_component(path, &artifact, wasi, limits, options, &timed_out),
        WasmKind::CoreModule => run_module(path, &artifact, wasi, limits, options, &timed_out),
    }?;
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                return Ok(exit.0);
            }
            if timed_out.load(Ordering::Acquire) {
                return Err(Error::Timeout);
            }
            let trap = e.downcast_ref::<wasmtime::Trap>().copied();
            if trap == Some(wasmtime::Trap::OutOfFuel) {
                return Err(Error::LimitExceeded {
                    worker: "run".into(),
                    limit: crate::Limit::Fuel,
                    message: "the program used up its fuel".into(),
                });
            }
            Err(Error::Trap {
                worker: "run".into(),
                message: match trap {
                    Some(t) => t.to_string(),
                    None => format!("{e:#}"),
                },
            })
        }
    }
}

/// Applies fuel and the wall-clock limit to a store (the limit bumps the
/// epoch from a timer thread).
fn limit_store<T>(
    store: &mut Store<T>,
    options: &RunOptions,
    timed_out: &Arc<AtomicBool>,
) -> Result<()> {
    if let Some(fuel) = options.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| Error::Component(format!("{e:#}")))?;
    }
    store.set_epoch_deadline(1);
    if let Some(timeout) = options.timeout {
        let (engine, timed_out) = (store.engine().clone(), timed_out.clone());
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            timed_out.store(true, Ordering::Release);
            engine.increment_epoch();
        });
    }
    Ok(())
}

/// The program's own outcome: an exit code, or how it failed.
type Outcome = std::result::Result<i32, wasmtime::Error>;

fn run_component(
    path: &Path,
    artifact: &cache::Artifact,
    mut wasi: WasiCtxBuilder,
    limits: wasmtime::StoreLimits,
    options: &RunOptions,
    timed_out: &Arc<AtomicBool>,
) -> Result<Outcome> {
    let (engine, component) = load(artifact, options.fuel.is_some())?;
    let mut linker = Linker::<RunState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| Error::Component(format!("{e:#}")))?;
    let pre = linker
        .instantiate_pre(&component)
        .and_then(wasmtime_wasi::p2::bindings::sync::CommandPre::new)
        .map_err(|e| {
            Error::Component(format!(
                "{} is not a WASI command (no wasi:cli/run export, or imports beyond WASI): {e:#}",
                path.display()
            ))
        })?;
    let mut store = Store::new(
        &engine,
        RunState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
        },
    );
    store.limiter(|s| &mut s.limits);
    limit_store(&mut store, options, timed_out)?;
    harden(options)?;
    let command = pre
        .instantiate(&mut store)
        .map_err(|e| Error::Component(format!("cannot instantiate {}: {e:#}", path.display())))?;
    Ok(match command.wasi_cli_run().call_run(&mut store) {
        Ok(Ok(())) => Ok(0),
        Ok(Err(())) => Ok(1),
        Err(e) => Err(e),
    })
}

struct ModuleState {
    wasi: WasiP1Ctx,
    limits: wasmtime::StoreLimits,
}

fn run_module(
    path: &Path,
    artifact: &cache::Artifact,
    mut wasi: WasiCtxBuilder,
    limits: wasmtime::StoreLimits,
    options: &RunOptions,
    timed_out: &Arc<AtomicBool>,
) -> Result<Outcome> {
    let (engine, module) = load_module(artifact, options.fuel.is_some())?;
    let mut linker = wasmtime::Linker::<ModuleState>::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| &mut s.wasi)
        .map_err(|e| Error::Component(format!("{e:#}")))?;
    let not_a_command = |e: wasmtime::Error| {
        Error::Component(format!(
            "{} is not a WASI preview 1 command (no _start export, or imports beyond \
             wasi_snapshot_preview1): {e:#}",
            path.display()
        ))
    };
    let pre = linker.instantiate_pre(&module).map_err(not_a_command)?;
    let mut store = Store::new(
        &engine,
        ModuleState {
            wasi: wasi.build_p1(),
            limits,
        },
    );
    store.limiter(|s| &mut s.limits);
    limit_store(&mut store, options, timed_out)?;
    harden(options)?;
    let instance = pre
        .instantiate(&mut store)
        .map_err(|e| Error::Component(format!("cannot instantiate {}: {e:#}", path.display())))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(not_a_command)?;
    Ok(start.call(&mut store, ()).map(|()| 0))
}
