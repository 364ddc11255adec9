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

mod run;
use crate::error::{Error, Result};
use crate::protocol::{DirGrant, HostConfig};
pub use run::{RunOptions, run};

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
                artifact: artifact.path,
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

/// Opens a cached artifact the way a host does: the very file whose bytes
/// were checked against the cache's seal, unchanged since.
fn open_checked(artifact: &cache::Artifact) -> Result<(std::fs::File, String)> {
    let path = artifact.path.to_string_lossy();
    let file = crate::host::wasm::open_artifact(&path, Some(&artifact.identity))
        .map_err(|e| Error::Component(format!("cannot load {path}: {e}")))?;
    let through = crate::host::wasm::fd_path(&file);
    Ok((file, through))
}

fn load(artifact: &cache::Artifact, fuel: bool) -> Result<(Engine, Component)> {
    let engine = new_engine(fuel)?;
    let (_file, through) = open_checked(artifact)?;
    // SAFETY: the artifact is the file of malt's private cache whose bytes
    // match the seal made when malt compiled it, opened as checked.
    let component = unsafe { Component::deserialize_file(&engine, through) }
        .map_err(|e| load_error(&artifact.path, e))?;
    Ok((engine, component))
}

fn load_module(artifact: &cache::Artifact, fuel: bool) -> Result<(Engine, Module)> {
    let engine = new_engine(fuel)?;
    let (_file, through) = open_checked(artifact)?;
    // SAFETY: as in `load`.
    let module = unsafe { Module::deserialize_file(&engine, through) }
        .map_err(|e| load_error(&artifact.path, e))?;
    Ok((engine, module))
}

/// The WASI preview 1 import module.
const WASI_P1: &str = "wasi_snapshot_preview1";

fn inspect_module(
    path: &Path,
    bytes: &[u8],
    sha: String,
    artifact: cache::Artifact,
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
        artifact: artifact.path,
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
        artifact: artifact.path,
    })
}
