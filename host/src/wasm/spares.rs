//! Spare instances for in-process workers: made in the background, so the
//! next worker of the same kind starts without instantiating.
//!
//! Instantiating a large component costs milliseconds (the Python guest:
//! about 1.5 ms, a third of its start). After an in-process worker starts,
//! a background thread makes one spare store and instance like it, for
//! the same loaded component and the same sandbox (memory cap, fuel,
//! environment, directories); the next such worker takes it and only
//! rebinds it (`State::adopt`), and a new spare is made behind it.
//!
//! Rules that keep a spare indistinguishable from an instance made for its
//! worker:
//! - A spare is made under the worker's start timeout, watched by its own
//!   timer: a start that loops is killed there, not left spinning.
//! - A spare whose start called a malt import or wrote output is thrown
//!   away, and no spare is made for that kind again: those calls would
//!   have gone to a worker that did not exist yet. The exception is where
//!   the guest takes interrupts in its own memory: the worker that takes
//!   the spare takes that over.
//! - A guest may name a warm-up function (`HostConfig::warm_up`) that
//!   leaves it as it was: the spare calls it, so that the worker's first
//!   request finds the guest's caches and pages warm. The Python guest's
//!   runs its start and a cell that counts nowhere: its first request then
//!   takes about a third of the time.
//! - Only a worker's first start takes a spare, never a reset: a reset
//!   opens the grants through the handles its worker opened when it
//!   started, so that its guest cannot have redirected them since; a
//!   spare opened them by path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use malt_protocol::{DirGrant, GuestSpec, HostConfig};
use wasmtime::{Engine, Store};

use super::{
    Bindings, BindingsPre, Grants, KILLED_IN_HOST_CALL, State, instantiate_in, new_store,
    unless_killed,
};
use crate::Shared;
use crate::requests::{StartError, under_start_timeout};

/// Kinds of worker with a spare at most: like the loaded artifacts.
const KEPT: usize = 8;

/// What a spare must share with the worker that takes it.
#[derive(Clone, PartialEq)]
struct Key {
    guest: GuestSpec,
    memory_limit: u64,
    fuel: Option<u64>,
    env: Vec<(String, String)>,
    dirs: Vec<DirGrant>,
    warm_up: Option<String>,
}

impl Key {
    /// `None` for a component loaded again for each worker (no verified
    /// identity): its workers share no engine, so no spare either.
    fn of(config: &HostConfig) -> Option<Key> {
        matches!(
            config.guest,
            GuestSpec::Artifact {
                identity: Some(_),
                ..
            }
        )
        .then(|| Key {
            guest: config.guest.clone(),
            memory_limit: config.memory_limit,
            fuel: config.fuel,
            env: config.env.clone(),
            dirs: config.dirs.clone(),
            warm_up: config.warm_up.clone(),
        })
    }
}

type Instance = (Store<State>, Bindings);

struct Entry {
    key: Key,
    engine: Engine,
    ready: Option<Instance>,
    making: bool,
    /// Its start touched the host: never made again.
    refused: bool,
}

static SPARES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

static TAKEN: AtomicU64 = AtomicU64::new(0);

/// How many workers of this process started from a spare (for tests).
#[doc(hidden)]
pub fn spares_taken() -> u64 {
    TAKEN.load(Ordering::Relaxed)
}

fn lock() -> MutexGuard<'static, Vec<Entry>> {
    SPARES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The entry of `key` in `engine`, if still kept.
fn entry<'a>(spares: &'a mut [Entry], key: &Key, engine: &Engine) -> Option<&'a mut Entry> {
    spares
        .iter_mut()
        .find(|e| e.key == *key && Engine::same(&e.engine, engine))
}

/// The spare made for a worker like `config` in `engine`, if one is ready.
pub(super) fn take(engine: &Engine, config: &HostConfig) -> Option<Instance> {
    let key = Key::of(config)?;
    let taken = entry(&mut lock(), &key, engine)?.ready.take();
    if taken.is_some() {
        TAKEN.fetch_add(1, Ordering::Relaxed);
    }
    taken
}

/// Makes a spare for the next worker like `config`, in the background,
/// unless one is ready or being made.
pub(super) fn make(engine: &Engine, pre: &BindingsPre<State>, config: &Arc<HostConfig>) {
    let Some(key) = Key::of(config) else {
        return;
    };
    {
        let mut spares = lock();
        // An engine loaded again (evicted, then reloaded) makes the old
        // entry useless.
        spares.retain(|e| e.key != key || Engine::same(&e.engine, engine));
        match spares.iter_mut().find(|e| e.key == key) {
            Some(e) if e.making || e.refused || e.ready.is_some() => return,
            Some(e) => e.making = true,
            None => {
                if spares.len() >= KEPT {
                    spares.remove(0);
                }
                spares.push(Entry {
                    key: key.clone(),
                    engine: engine.clone(),
                    ready: None,
                    making: true,
                    refused: false,
                });
            }
        }
    }
    let (key_made, engine_made) = (key.clone(), engine.clone());
    let (engine, pre, for_worker) = (engine.clone(), pre.clone(), config.clone());
    let spawned = std::thread::Builder::new()
        .name("malt-spare".into())
        .spawn(move || {
            // Only on a CPU nothing else wants: a spare must never slow
            // the workers that run (nor the first request of the worker
            // that just took the last one). Starved, it is simply not
            // ready for the next start, which then instantiates.
            let idle = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets this thread's own policy; no memory is passed
            // but a valid parameter. A failure leaves the normal policy.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
            let made = make_now(&engine, &pre, &for_worker);
            let mut spares = lock();
            let Some(entry) = entry(&mut spares, &key_made, &engine) else {
                return;
            };
            entry.making = false;
            // Why not is not reported: the next worker just instantiates,
            // and the next start tries again, unless this kind's start
            // touched the host.
            match made {
                Ok(instance) => entry.ready = Some(instance),
                Err(Unfit::TouchedHost) => entry.refused = true,
                Err(Unfit::Failed) => {}
            }
        });
    if spawned.is_err() {
        // No thread now: perhaps for the next worker.
        if let Some(e) = entry(&mut lock(), &key, &engine_made) {
            e.making = false;
        }
    }
}

/// Why no spare was made.
enum Unfit {
    /// Its start called a malt import or wrote output: never again.
    TouchedHost,
    /// It failed or took too long (a starved thread): perhaps next time.
    Failed,
}

/// Instantiates a spare on this thread, under the start timeout.
fn make_now(
    engine: &Engine,
    pre: &BindingsPre<State>,
    config: &HostConfig,
) -> Result<Instance, Unfit> {
    // A worker of its own until adopted: its frames go nowhere.
    let shared = Shared::new(config);
    let epoch = engine.clone();
    shared
        .control
        .set_killer(Box::new(move |_, _| epoch.increment_epoch()));
    let timer = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("malt-spare-timer".into())
            .spawn(move || {
                s.control.timer_loop(&s.channels, &|| {});
            })
            .map_err(|_| Unfit::Failed)?
    };
    let made = instantiate(engine, pre, config, &shared);
    shared.control.shut_down(&shared.channels);
    let _ = timer.join();
    let (store, bindings) = made.map_err(|_| Unfit::Failed)?;
    if store.data().used_host || shared.output_used.load(Ordering::Relaxed) > 0 {
        return Err(Unfit::TouchedHost);
    }
    Ok((store, bindings))
}

fn instantiate(
    engine: &Engine,
    pre: &BindingsPre<State>,
    config: &HostConfig,
    shared: &Arc<Shared>,
) -> Result<Instance, String> {
    let grants = Grants::open(&config.dirs).map_err(|e| format!("{e:#}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let mut made = None;
    let started = under_start_timeout(shared, "start", || {
        let mut store = new_store(engine, config, &grants, shared).map_err(|e| format!("{e:#}"))?;
        let bindings = instantiate_in(&runtime, pre, &mut store, shared)?;
        if let Some(name) = &config.warm_up {
            // No arguments: an empty MessagePack array.
            let warm = bindings.call_call(&mut store, name, &[0x90]);
            match unless_killed(&runtime, &shared.control, warm) {
                Some(Ok(Ok(_))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(trap)) => return Err(format!("{trap:#}")),
                None => return Err(KILLED_IN_HOST_CALL.into()),
            }
        }
        made = Some((store, bindings));
        Ok(())
    });
    match started {
        Ok(()) => made.ok_or_else(|| "no instance".into()),
        Err(StartError::Failed(why)) => Err(why),
        Err(StartError::ShutDown) => Err("shut down".into()),
    }
}
