//! Components loaded and linked once per process for in-process workers.
//!
//! A host process serves one worker, so it loads its component once
//! anyway. In the manager's process every in-process worker would load
//! and link the same artifact again (for the Python guest, 36 MB and
//! about 4 ms); they share it instead. They share its engine too: a kill
//! bumps that engine's epoch for every store in it, and each store's
//! epoch callback lets its own request go on unless its own worker's kill
//! flag is set.

use std::sync::Mutex;

use malt_protocol::{ArtifactIdentity, GuestSpec, HostConfig};
use wasmtime::Engine;

use super::{BindingsPre, State};
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
    identity: Option<ArtifactIdentity>,
    fuel: bool,
}

type Linked = (Engine, BindingsPre<State>);

static LOADED: Mutex<Vec<(Key, Engine, BindingsPre<State>)>> = Mutex::new(Vec::new());

/// The engine and linked component for `config`, loaded by `load` the
/// first time. An artifact without a verified identity is loaded each
/// time: nothing says that it is still the same file.
pub(super) fn get_or_load(
    config: &HostConfig,
    load: impl FnOnce(&HostConfig) -> Result<Linked, StartFailed>,
) -> Result<Linked, StartFailed> {
    let GuestSpec::Artifact { path, identity } = &config.guest else {
        return load(config);
    };
    if identity.is_none() {
        return load(config);
    }
    let key = Key {
        path: path.clone(),
        identity: *identity,
        fuel: config.fuel.is_some(),
    };
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = loaded.iter().position(|(k, ..)| *k == key) {
        let entry = loaded.remove(at);
        let linked = (entry.1.clone(), entry.2.clone());
        loaded.push(entry);
        return Ok(linked);
    }
    // Loaded under the lock: two workers starting together load it once.
    let (engine, pre) = load(config)?;
    if loaded.len() >= KEPT {
        loaded.remove(0);
    }
    loaded.push((key, engine.clone(), pre.clone()));
    Ok((engine, pre))
}
