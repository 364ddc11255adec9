//! WASI waits that an interrupt cuts short: the cooperative tier for a
//! guest blocked in WASI rather than in malt's own `sleep`.
//!
//! wasmtime-wasi's blocking calls are async host functions: a wait is a
//! future. These wrappers race that future against an interrupt, so the
//! guest wakes at once and can check `interrupted()`, its state intact:
//!
//! `wasi:io/poll.poll` and `pollable.block` return as if ready (a
//! spurious wake-up, which a guest must handle anyway). That covers every
//! wait a sandboxed guest can make: clock waits (`std::thread::sleep`) and
//! polls. Its stdin is empty, it has no sockets, and wasmtime-wasi reads
//! files (FIFOs too) without waiting. Anything that still blocks (a
//! blocking stream call waits on its stream directly, not through these),
//! and a guest that goes on waiting after an interrupt, meets the hard
//! tier: the kill drops the whole call future.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_io::bindings::wasi::io::poll;
use wasmtime_wasi_io::poll::DynPollable;

use super::State;
use crate::control::Stop;

/// The version wasmtime-wasi defines these interfaces at; guests that
/// import any 0.2.x version link to it.
const POLL: &str = "wasi:io/poll@0.2.12";

/// Replaces wasmtime-wasi's definitions of the blocking waits with
/// interruptible ones (call after `add_to_linker_async`).
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut io = linker.instance(POLL)?;
    io.func_wrap_async(
        "poll",
        |mut store, (pollables,): (Vec<Resource<DynPollable>>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let shared = state.services.shared.clone();
                let count = pollables.len() as u32;
                tokio::select! {
                    ready = poll::Host::poll(&mut state.table, pollables) => Ok((ready?,)),
                    () = shared.control.until_stopped(Stop::Interrupted) => {
                        Ok(((0..count).collect(),))
                    }
                }
            })
        },
    )?;
    io.func_wrap_async(
        "[method]pollable.block",
        |mut store, (pollable,): (Resource<DynPollable>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let shared = state.services.shared.clone();
                tokio::select! {
                    done = poll::HostPollable::block(&mut state.table, pollable) => done,
                    () = shared.control.until_stopped(Stop::Interrupted) => Ok(()),
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
