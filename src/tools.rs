//! Component tools behind the `malt` CLI: inspect, compile, run.
//!
//! These work on wasm files directly (no worker): components, and core
//! modules such as WASI preview 1 programs (Rust's `wasm32-wasip1`, TinyGo,
//! Zig), which `run` runs under the same sandbox through wasmtime-wasi's
//! preview 1 layer. Compiling goes through the same private artifact cache
//! the workers use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{self, WasmKind};
use crate::error::{Error, Result};
use crate::protocol::{DirGrant, HostConfig};

/// One import or export of a component.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    /// Its name, e.g. `malt:worker/host@0.1.0` or `call`.
    pub name: String,
    /// What it is: `func`, `instance`, `type`, ...
    pub kind: String,
    /// For an instance, the names it holds.
    pub members: Vec<String>,
}

/// What `malt inspect` reports about a component or core module.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    /// The file.
    pub path: PathBuf,
    /// Whether it is a core module (e.g. WASI preview 1), not a component.
    pub core_module: bool,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256 (hex): the cache key.
    pub sha256: String,
    /// What it imports.
    pub imports: Vec<Item>,
    /// What it exports.
    pub exports: Vec<Item>,
    /// Whether it implements the `malt:worker` world (can be a worker guest).
    pub is_worker: bool,
    /// Whether it is a WASI command (can be `malt run`): a component
    /// exporting `wasi:cli/run`, or a core module exporting `_start` and
    /// importing only WASI preview 1.
    pub is_command: bool,
    /// Whether the compiled artifact was in the cache before this call.
    pub was_cached: bool,
    /// Where the compiled artifact is.
    pub artifact: PathBuf,
}

fn read_wasm(path: &Path) -> Result<(Vec<u8>, String, WasmKind)> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read the component {what}"), e))?;
    let kind = cache::wasm_kind(&bytes, &what)?;
    let sha = cache::sha256_hex(&bytes);
    Ok((bytes, sha, kind))
}

/// A compiled component.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Where the artifact is.
    pub artifact: PathBuf,
    /// Whether the cache had it already (always false for a file of its own).
    pub was_cached: bool,
}

/// Compiles a component or core module into the artifact cache (or, with
/// `out`, into a file of its own).
pub fn compile(path: &Path, out: Option<&Path>, fuel: bool) -> Result<Compiled> {
    let (bytes, sha, _) = read_wasm(path)?;
    let what = path.display().to_string();
    match out {
        Some(out) => {
            cache::compile_to_file(&bytes, &what, out, fuel)?;
            Ok(Compiled {
                artifact: out.to_path_buf(),
                was_cached: false,
            })
        }
        None => {
            let (artifact, was_cached) = cache::artifact_status(&bytes, &sha, &what, fuel)?;
            Ok(Compiled {
                artifact,
                was_cached,
            })
        }
    }
}

fn new_engine(fuel: bool) -> Result<Engine> {
    Engine::new(&crate::host::wasm::engine_config(fuel))
        .map_err(|e| Error::Component(format!("cannot create the wasm engine: {e:#}")))
}

fn load_error(artifact: &Path, e: wasmtime::Error) -> Error {
    Error::Component(format!("cannot load {}: {e:#}", artifact.display()))
}

fn load(artifact: &Path, fuel: bool) -> Result<(Engine, Component)> {
    let engine = new_engine(fuel)?;
    // SAFETY: the artifact comes from malt's private cache.
    let component = unsafe { Component::deserialize_file(&engine, artifact) }
        .map_err(|e| load_error(artifact, e))?;
    Ok((engine, component))
}

fn load_module(artifact: &Path, fuel: bool) -> Result<(Engine, Module)> {
    let engine = new_engine(fuel)?;
    // SAFETY: the artifact comes from malt's private cache.
    let module = unsafe { Module::deserialize_file(&engine, artifact) }
        .map_err(|e| load_error(artifact, e))?;
    Ok((engine, module))
}

/// The WASI preview 1 import module.
const WASI_P1: &str = "wasi_snapshot_preview1";

fn inspect_module(
    path: &Path,
    bytes: &[u8],
    sha: String,
    artifact: PathBuf,
    was_cached: bool,
) -> Result<ComponentInfo> {
    let (_, module) = load_module(&artifact, false)?;
    let mut imports: Vec<Item> = Vec::new();
    for import in module.imports() {
        match imports.iter_mut().find(|i| i.name == import.module()) {
            Some(item) => item.members.push(import.name().to_string()),
            None => imports.push(Item {
                name: import.module().to_string(),
                kind: "module".into(),
                members: vec![import.name().to_string()],
            }),
        }
    }
    let exports: Vec<Item> = module
        .exports()
        .map(|e| Item {
            name: e.name().to_string(),
            kind: match e.ty() {
                wasmtime::ExternType::Func(_) => "func",
                wasmtime::ExternType::Memory(_) => "memory",
                wasmtime::ExternType::Table(_) => "table",
                wasmtime::ExternType::Global(_) => "global",
                wasmtime::ExternType::Tag(_) => "tag",
            }
            .into(),
            members: Vec::new(),
        })
        .collect();
    let is_command = exports
        .iter()
        .any(|e| e.name == "_start" && e.kind == "func")
        && imports.iter().all(|i| i.name == WASI_P1);
    Ok(ComponentInfo {
        path: path.to_path_buf(),
        core_module: true,
        size: bytes.len() as u64,
        sha256: sha,
        imports,
        exports,
        is_worker: false,
        is_command,
        was_cached,
        artifact,
    })
}

fn item(engine: &Engine, name: &str, ty: &ComponentItem) -> Item {
    let (kind, members) = match ty {
        ComponentItem::ComponentFunc(_) => ("func", Vec::new()),
        ComponentItem::CoreFunc(_) => ("core func", Vec::new()),
        ComponentItem::Module(_) => ("module", Vec::new()),
        ComponentItem::Component(_) => ("component", Vec::new()),
        ComponentItem::ComponentInstance(i) => (
            "instance",
            i.exports(engine).map(|(n, _)| n.to_string()).collect(),
        ),
        ComponentItem::Type(_) => ("type", Vec::new()),
        ComponentItem::Resource(_) => ("resource", Vec::new()),
    };
    Item {
        name: name.to_string(),
        kind: kind.to_string(),
        members,
    }
}

/// Describes a component or core module: its imports and exports, whether
/// it is a worker guest or a command, and whether it is cached. Compiles
/// it into the cache if needed.
pub fn inspect(path: &Path) -> Result<ComponentInfo> {
    let (bytes, sha, kind) = read_wasm(path)?;
    let (artifact, was_cached) =
        cache::artifact_status(&bytes, &sha, &path.display().to_string(), false)?;
    if kind == WasmKind::CoreModule {
        return inspect_module(path, &bytes, sha, artifact, was_cached);
    }
    let (engine, component) = load(&artifact, false)?;
    let ty = component.component_type();
    let imports: Vec<Item> = ty
        .imports(&engine)
        .map(|(n, e)| item(&engine, n, &e.ty))
        .collect();
    let exports: Vec<Item> = ty
        .exports(&engine)
        .map(|(n, e)| item(&engine, n, &e.ty))
        .collect();
    let exported_func = |name: &str| exports.iter().any(|e| e.name == name && e.kind == "func");
    let is_worker = exported_func("call")
        && exported_func("eval")
        && imports
            .iter()
            .all(|i| i.name.starts_with("wasi:") || i.name.starts_with("malt:worker/host"));
    let is_command = exports
        .iter()
        .any(|e| e.name.starts_with("wasi:cli/run@") && e.kind == "instance");
    Ok(ComponentInfo {
        path: path.to_path_buf(),
        core_module: false,
        size: bytes.len() as u64,
        sha256: sha,
        imports,
        exports,
        is_worker,
        is_command,
        was_cached,
        artifact,
    })
}

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
    /// itself (no_new_privs, rlimits, seccomp: no exec, no new processes,
    /// no sockets; Landlock: no file outside the granted directories).
    /// Irreversible: for a process that does nothing else afterwards, like
    /// the CLI's `malt run`.
    pub harden: bool,
}

fn harden(options: &RunOptions) -> Result<()> {
    if options.harden {
        crate::host::harden_process(&options.dirs)
            .map_err(|e| Error::Component(format!("cannot harden this process: {e}")))?;
    }
    Ok(())
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
    let fuel = options.fuel.is_some();
    let (bytes, sha, kind) = read_wasm(path)?;
    let what = path.display().to_string();
    let (artifact, _) = cache::artifact_status(&bytes, &sha, &what, fuel)?;
    drop(bytes);
    let config = HostConfig {
        version: crate::protocol::PROTOCOL_VERSION,
        malt_version: crate::protocol::MALT_VERSION.to_string(),
        name: "run".into(),
        guest: crate::protocol::GuestSpec::Artifact {
            path: artifact.to_string_lossy().into_owned(),
        },
        memory_limit: options.memory_limit.unwrap_or(crate::DEFAULT_MEMORY_LIMIT),
        interrupt_grace: Duration::ZERO,
        call_timeout: options.timeout,
        max_frame: 0,
        fuel: options.fuel,
        output_limit: u64::MAX,
        env: options.env.clone(),
        dirs: options.dirs.clone(),
    };
    let mut wasi =
        crate::host::wasm::sandbox(&config).map_err(|e| Error::Component(format!("{e:#}")))?;
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
    artifact: &Path,
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
    artifact: &Path,
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
