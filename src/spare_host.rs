//! A host process started ahead, so that the next process worker skips
//! the start of a process.
//!
//! A host process costs about 2 ms before it reads its first byte (the
//! exec of a 40 MB program, the dynamic loader, the runtime's start):
//! half of a wasm worker's cold start. From the second process worker a
//! program starts on, the manager starts one more host process in the
//! background, which waits for its `Init` like any new host; the next
//! worker of the same host program takes it and sends its own `Init`. A
//! program that starts one worker (a CLI one-shot) never pays for a spare,
//! but its one worker's host is started the same way, first thing in
//! `spawn`: the process starts while the manager looks up the guest's
//! compiled artifact, and the connection takes it when it is ready.
//!
//! Nothing in a spare belongs to a worker until then: it has not hardened
//! itself, loaded a guest or run anything; it was started exactly as the
//! worker's own host would be (`process::spawn_host`). It dies with the
//! manager like any host (end of file on its stdin, and its death signal
//! from the spawner thread), and when a newer spare replaces it. Each
//! tokio runtime has its own (its driver reaps the child), four runtimes
//! at most.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::process::Child;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::host_child::HostChild;

/// The spare of one runtime: the runtime whose driver reaps a child is
/// the only one that may take it.
struct Spare {
    runtime: tokio::runtime::Id,
    /// The host program and its argument the child was started with (or
    /// is being started with).
    program: PathBuf,
    arg: &'static str,
    child: Option<Child>,
    /// Set while a child is being started; told when it is (or failed).
    making: Option<Arc<Notify>>,
}

/// Runtimes with a spare at most: a program usually has one; one that
/// makes many (a test harness) does not keep a process for each.
const KEPT: usize = 4;

static SPARES: Mutex<Vec<Spare>> = Mutex::new(Vec::new());
static STARTS: AtomicU64 = AtomicU64::new(0);
static TAKEN: AtomicU64 = AtomicU64::new(0);

fn lock() -> MutexGuard<'static, Vec<Spare>> {
    SPARES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host of `program` serving `arg` started ahead: the one forked at
/// the program's start ([`crate::fork_host_ahead`]), else this runtime's
/// spare if it is ready and alive, or being started (then it is waited
/// for: it is further along than a process started now would be).
pub(crate) async fn take(program: &Path, arg: &str) -> Option<HostChild> {
    if let Some(forked) = crate::forked_host::take(program, arg) {
        return Some(forked);
    }
    let runtime = Handle::try_current().ok()?.id();
    loop {
        let wait = {
            let mut spares = lock();
            let spare = spares.iter_mut().find(|s| s.runtime == runtime)?;
            if spare.program != program || spare.arg != arg {
                return None;
            }
            match (spare.child.take(), &spare.making) {
                (Some(child), _) => Err(child),
                // Made before the lock is released, so that the wake-up
                // cannot be missed.
                (None, Some(made)) => Ok(made.clone().notified_owned()),
                (None, None) => return None,
            }
        };
        match wait {
            Ok(made) => made.await,
            Err(mut child) => {
                // One that died meanwhile is dropped (and reaped).
                return match child.try_wait() {
                    Ok(None) => {
                        TAKEN.fetch_add(1, Ordering::Relaxed);
                        Some(child.into())
                    }
                    _ => None,
                };
            }
        }
    }
}

/// A worker's host of `program` started: from the second start on, a
/// spare is made for the next one of this runtime, unless one is ready or
/// being made, or the zygote forks the hosts of `this_program`. (The
/// first start of a program made its host ahead itself, with
/// [`prepare`].)
pub(crate) fn started(program: &Path, arg: &'static str, this_program: bool) {
    if STARTS.fetch_add(1, Ordering::Relaxed) == 0
        || (this_program && crate::zygote::serves(program, arg))
    {
        return;
    }
    prepare(program, arg);
}

/// Starts a host of `program` serving `arg` in the background for the
/// next worker of this runtime, unless one is ready or being made (or
/// forked). `spawn` calls it before it prepares the guest, so that the
/// host process starts while the guest's artifact is looked up.
pub(crate) fn prepare(program: &Path, arg: &'static str) {
    let Ok(handle) = Handle::try_current() else {
        return;
    };
    if crate::forked_host::waiting(program, arg) {
        return;
    }
    let runtime = handle.id();
    let made = Arc::new(Notify::new());
    {
        let mut spares = lock();
        match spares.iter_mut().find(|s| s.runtime == runtime) {
            Some(s) if s.making.is_some() => return,
            Some(s) if s.child.is_some() && s.program == program && s.arg == arg => return,
            Some(s) => {
                // Replaces (and so kills) a spare of another program.
                s.program = program.to_path_buf();
                s.arg = arg;
                s.child = None;
                s.making = Some(made.clone());
            }
            None => {
                if spares.len() >= KEPT {
                    // The oldest goes, and its child with it.
                    spares.remove(0);
                }
                spares.push(Spare {
                    runtime,
                    program: program.to_path_buf(),
                    arg,
                    child: None,
                    making: Some(made.clone()),
                });
            }
        }
    }
    let program = program.to_path_buf();
    handle.spawn(async move {
        let parent = std::process::id().to_string();
        let child = crate::process::spawn_host(&program, &[arg.into(), parent.into()]).await;
        {
            let mut spares = lock();
            if let Some(spare) = spares.iter_mut().find(|s| s.runtime == runtime)
                && spare.making.as_ref().is_some_and(|m| Arc::ptr_eq(m, &made))
            {
                spare.making = None;
                spare.child = child.ok();
            }
        }
        made.notify_waiters();
    });
}

/// How many workers of this process started on a spare host (for tests).
#[doc(hidden)]
pub fn spare_hosts_taken() -> u64 {
    TAKEN.load(Ordering::Relaxed)
}

/// The process id of the spare host waiting now that this runtime could
/// take (outside a runtime: any runtime's), if any (for tests).
#[doc(hidden)]
pub fn spare_host_pid() -> Option<u32> {
    let runtime = Handle::try_current().ok().map(|h| h.id());
    lock()
        .iter()
        .filter(|s| runtime.is_none_or(|r| r == s.runtime))
        .find_map(|s| s.child.as_ref()?.id())
}
