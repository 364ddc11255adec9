//! Loading a compiled component and linking it: once per host process,
//! and once per artifact in the manager's process for in-process workers.
//!
//! A host process serves one worker, so it loads its component once
//! anyway. In the manager's process every in-process worker would load
//! and link the same artifact again (for the Python guest, 36 MB and
//! about 4 ms); they share it instead. They share its engine too: a kill
//! bumps that engine's epoch for every store in it, and each store's
//! epoch callback lets its own request go on unless its own worker's kill
//! flag is set.

use std::sync::Mutex;
use std::thread::JoinHandle;

use malt_protocol::{ArtifactIdentity, FatalKind, GuestSpec, HostConfig};
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use super::{Bindings, BindingsPre, State, engine_config, memory, waits};
use crate::StartFailed;

/// The artifacts kept: the most recently used ones. A program that cycles
/// through more components than this loads some again; none is kept past
/// its usefulness forever.
const KEPT: usize = 8;

/// What identifies a loaded artifact: the file, as the manager verified
/// it, and the engine configuration it was compiled for.
#[derive(PartialEq, Eq)]
struct Key {
    path: String,
    identity: ArtifactIdentity,
    fuel: bool,
}

/// An engine and a component linked in it, ready to instantiate.
type Linked = (Engine, BindingsPre<State>);

static LOADED: Mutex<Vec<(Key, Linked)>> = Mutex::new(Vec::new());

/// The engine and linked component for `config`, shared by the in-process
/// workers of this process. An artifact without a verified identity is
/// loaded each time: nothing says that it is still the same file.
pub(super) fn get_or_load(config: &HostConfig) -> Result<Linked, StartFailed> {
    let GuestSpec::Artifact {
        path,
        identity: Some(identity),
    } = &config.guest
    else {
        return load_linked(config, None);
    };
    let key = Key {
        path: path.clone(),
        identity: *identity,
        fuel: config.fuel.is_some(),
    };
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = loaded.iter().position(|(k, _)| *k == key) {
        // The most recently used last.
        let entry = loaded.remove(at);
        let linked = entry.1.clone();
        loaded.push(entry);
        return Ok(linked);
    }
    // Loaded under the lock: two workers starting together load it once.
    let linked = load_linked(config, None)?;
    if loaded.len() >= KEPT {
        loaded.remove(0);
    }
    loaded.push((key, linked.clone()));
    Ok(linked)
}

/// An engine (without fuel, as most workers have) and a linker in it,
/// made by a host process while it waits for its `Init`.
pub(crate) type Ahead = Option<(Engine, Linker<State>)>;

/// What [`start_ahead`] or [`make_ahead_here`] started or made.
enum Making {
    Thread(JoinHandle<Ahead>),
    Made(Box<Ahead>),
}

static AHEAD: Mutex<Option<Making>> = Mutex::new(None);

fn ahead() -> std::sync::MutexGuard<'static, Option<Making>> {
    AHEAD.lock().unwrap_or_else(|e| e.into_inner())
}

fn make_ahead() -> Ahead {
    let engine = Engine::new(&engine_config(false)).ok()?;
    let linker = linker(&engine).ok()?;
    Some((engine, linker))
}

/// Starts making the engine and linker a host process will most likely
/// need, on a thread of their own, before the host has read its `Init`:
/// a host started ahead of its worker (a spare) then has them ready, and
/// a fresh one makes them while the manager writes the `Init`. They are
/// about half a millisecond of a start, and depend on nothing the `Init`
/// says but whether the guest meters fuel. A host forked from a zygote has
/// them already.
pub(crate) fn start_ahead() {
    let mut ahead = ahead();
    if ahead.is_some() {
        return;
    }
    let made = std::thread::Builder::new()
        .name("malt-ahead".into())
        .spawn(make_ahead);
    if let Ok(made) = made {
        *ahead = Some(Making::Thread(made));
    }
}

/// Makes the engine and linker on this thread, for the hosts a zygote
/// forks (which must not start a thread).
pub(crate) fn make_ahead_here() {
    *ahead() = Some(Making::Made(Box::new(make_ahead())));
}

/// Waits for what [`start_ahead`] made, if it ran: the engine and linker
/// if they fit `fuel`. The thread has ended when this returns, as locking
/// the process down needs (Landlock binds only the threads that exist
/// from then on).
pub(crate) fn take_ahead(fuel: bool) -> Ahead {
    let made = match ahead().take()? {
        Making::Thread(thread) => thread.join().ok().flatten(),
        Making::Made(made) => *made,
    };
    made.filter(|_| !fuel)
}

/// The artifact a zygote loaded before its last fork, for the host it
/// forked (which takes it if its `Init` names the same verified file):
/// the child skips deserializing it, and shares its pages.
static PRELOADED: Mutex<Option<(Key, Linked)>> = Mutex::new(None);

/// Loads the artifact at `path`, verified by the manager as `identity`,
/// in a zygote, with the engine and linker made ahead, unless it is loaded
/// already: the hosts it forks next find it with [`take_preloaded`]. A
/// failure is left for the host to meet and report. Returns whether it
/// loaded one now.
pub(crate) fn preload(path: String, identity: ArtifactIdentity) -> bool {
    let key = Key {
        path,
        identity,
        fuel: false,
    };
    let mut preloaded = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    if preloaded.as_ref().is_some_and(|(k, _)| *k == key) {
        return false;
    }
    *preloaded = None;
    let made = match &*ahead() {
        Some(Making::Made(made)) => made.as_ref().clone(),
        _ => None,
    };
    if made.is_none() {
        return true;
    }
    if let Ok(linked) = load_linked_file(&key.path, Some(&key.identity), false, made) {
        *preloaded = Some((key, linked));
    }
    true
}

/// Whether the file the zygote preloaded is still the one it loaded (or
/// none is). One changed in place (truncated, overwritten) may fault on
/// any page of its mapping, in the zygote or in a host forked from it: a
/// zygote finding it changed must go, not fork or even unload it.
pub(crate) fn preloaded_intact() -> bool {
    let preloaded = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    preloaded.as_ref().is_none_or(|(key, _)| {
        std::fs::symlink_metadata(&key.path)
            .is_ok_and(|meta| ArtifactIdentity::of(&meta) == key.identity)
    })
}

/// What the zygote preloaded, if it is what `config` asks for.
pub(crate) fn take_preloaded(config: &HostConfig) -> Option<Linked> {
    let GuestSpec::Artifact {
        path,
        identity: Some(identity),
    } = &config.guest
    else {
        return None;
    };
    let key = Key {
        path: path.clone(),
        identity: *identity,
        fuel: config.fuel.is_some(),
    };
    let mut preloaded = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    match preloaded.take() {
        Some((k, linked)) if k == key => Some(linked),
        _ => None,
    }
}

/// Loads the precompiled component of `config` and links it: the engine
/// and the component ready to instantiate. `ahead` is an engine and
/// linker made before (for the same fuel setting).
pub(super) fn load_linked(config: &HostConfig, ahead: Ahead) -> Result<Linked, StartFailed> {
    let GuestSpec::Artifact { path, identity } = &config.guest else {
        return Err("not a wasm guest".into());
    };
    load_linked_file(path, identity.as_ref(), config.fuel.is_some(), ahead)
}

fn load_linked_file(
    path: &str,
    identity: Option<&ArtifactIdentity>,
    fuel: bool,
    ahead: Ahead,
) -> Result<Linked, StartFailed> {
    let (engine, linker) = match ahead {
        Some(made) => made,
        None => {
            let engine = Engine::new(&engine_config(fuel))
                .map_err(|e| format!("cannot create the wasm engine: {e:#}"))?;
            let linker = linker(&engine).map_err(|e| format!("{e:#}"))?;
            (engine, linker)
        }
    };
    let load_failed = |e: String| {
        StartFailed::new(
            FatalKind::ArtifactLoad,
            format!("cannot load the compiled component {path}: {e}"),
        )
    };
    let artifact = open_artifact(path, identity).map_err(load_failed)?;
    // SAFETY: the artifact is a regular file of this user that nobody
    // else may write (checked on the open file), the very file whose
    // bytes the manager verified against its cache's MAC, unchanged
    // since (or a file the manager's user chose); deserialize checks
    // the header, the wasmtime version and the engine configuration.
    // It is mapped through the descriptor just checked, not its path.
    let component = unsafe { Component::deserialize_file(&engine, fd_path(&artifact)) }
        .map_err(|e| load_failed(format!("{e:#}")))?;
    drop(artifact);
    let pre = link(&linker, &component).map_err(|e| format!("{e:#}"))?;
    Ok((engine, pre))
}

/// Opens a compiled artifact for loading: never through a symlink, only a
/// regular file owned by this user that no one else may write, and, given
/// the identity under which the manager verified its bytes, only that file
/// unchanged since. A failure makes the manager compile it again, never
/// run it.
#[doc(hidden)]
pub fn open_artifact(
    path: &str,
    identity: Option<&malt_protocol::ArtifactIdentity>,
) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open it (a symlink is refused): {e}"))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "refusing it: not a regular file of this user that only it can write \
             (owner {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    if identity.is_some_and(|verified| *verified != malt_protocol::ArtifactIdentity::of(&meta)) {
        return Err("refusing it: it was replaced or written since the manager verified it".into());
    }
    Ok(file)
}

/// The path through which the kernel reopens exactly this open file (or
/// directory), whatever has become of its path since.
#[doc(hidden)]
pub fn fd_path(file: &impl std::os::fd::AsRawFd) -> String {
    format!("/proc/self/fd/{}", file.as_raw_fd())
}

/// WASI (async, with interruptible waits) and the malt host interface.
fn linker(engine: &Engine) -> wasmtime::Result<Linker<State>> {
    let mut linker = Linker::<State>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    waits::add_to_linker(&mut linker)?;
    Bindings::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
    linker
        .allow_shadowing(true)
        .instance("malt:worker/host@0.1.0")?
        .func_wrap("use-memory-interrupt", memory::use_memory_interrupt)?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Links the component, once: every instance starts from this.
fn link(linker: &Linker<State>, component: &Component) -> wasmtime::Result<BindingsPre<State>> {
    let pre = linker.instantiate_pre(component).map_err(|e| {
        e.context(
            "the component's imports cannot be satisfied (does it target the malt:worker world?)",
        )
    })?;
    BindingsPre::new(pre)
        .map_err(|e| e.context("the component does not implement the malt:worker world"))
}
