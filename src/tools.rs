//! Component tools behind the `malt` CLI: inspect, compile, run.
//!
//! These work on component files directly (no worker). Compiling goes
//! through the same private artifact cache the workers use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::cache;
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

/// What `malt inspect` reports about a component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    /// The file.
    pub path: PathBuf,
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
    /// Whether it is a WASI command (can be `malt run`).
    pub is_command: bool,
    /// Whether the compiled artifact was in the cache before this call.
    pub was_cached: bool,
    /// Where the compiled artifact is.
    pub artifact: PathBuf,
}

fn read_component(path: &Path) -> Result<(Vec<u8>, String)> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read the component {what}"), e))?;
    cache::check_component(&bytes, &what)?;
    let sha = cache::sha256_hex(&bytes);
    Ok((bytes, sha))
}

/// A compiled component.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Where the artifact is.
    pub artifact: PathBuf,
    /// Whether the cache had it already (always false for a file of its own).
    pub was_cached: bool,
}

/// Compiles a component into the artifact cache (or, with `out`, into a
/// file of its own).
pub fn compile(path: &Path, out: Option<&Path>, fuel: bool) -> Result<Compiled> {
    let (bytes, sha) = read_component(path)?;
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

fn load(artifact: &Path, fuel: bool) -> Result<(Engine, Component)> {
    let engine = Engine::new(&crate::host::wasm::engine_config(fuel))
        .map_err(|e| Error::Component(format!("cannot create the wasm engine: {e:#}")))?;
    // SAFETY: the artifact comes from malt's private cache.
    let component = unsafe { Component::deserialize_file(&engine, artifact) }
        .map_err(|e| Error::Component(format!("cannot load {}: {e:#}", artifact.display())))?;
    Ok((engine, component))
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

/// Describes a component: its imports and exports, whether it is a
/// worker guest or a command, and whether it is cached. Compiles it into
/// the cache if needed.
pub fn inspect(path: &Path) -> Result<ComponentInfo> {
    let (bytes, sha) = read_component(path)?;
    let (artifact, was_cached) =
        cache::artifact_status(&bytes, &sha, &path.display().to_string(), false)?;
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

/// Runs a WASI command component (its `wasi:cli/run` export) in the same
/// sandbox as a worker guest, with this process's stdout and stderr.
/// Returns the program's exit code.
pub fn run(path: &Path, options: &RunOptions) -> Result<i32> {
    let fuel = options.fuel.is_some();
    let artifact = compile(path, None, fuel)?.artifact;
    let (engine, component) = load(&artifact, fuel)?;
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
    let config = HostConfig {
        version: crate::protocol::PROTOCOL_VERSION,
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
    let mut store = Store::new(
        &engine,
        RunState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
        },
    );
    store.limiter(|s| &mut s.limits);
    if let Some(fuel) = options.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| Error::Component(format!("{e:#}")))?;
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    store.set_epoch_deadline(1);
    if let Some(timeout) = options.timeout {
        let (engine, timed_out) = (engine.clone(), timed_out.clone());
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            timed_out.store(true, Ordering::Release);
            engine.increment_epoch();
        });
    }
    let command = pre
        .instantiate(&mut store)
        .map_err(|e| Error::Component(format!("cannot instantiate {}: {e:#}", path.display())))?;
    match command.wasi_cli_run().call_run(&mut store) {
        Ok(Ok(())) => Ok(0),
        Ok(Err(())) => Ok(1),
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
