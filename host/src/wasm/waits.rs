//! WASI waits that an interrupt cuts short: the cooperative tier for a
//! guest blocked in WASI rather than in malt's own `sleep`.
//!
//! wasmtime-wasi's blocking calls are async host functions: a wait is a
//! future. These wrappers race that future against an interrupt, so the
//! guest wakes at once and can check `interrupted()`, its state intact:
//!
//! - `wasi:io/poll.poll` and `pollable.block` return as if ready (a
//!   spurious wake-up, which a guest must handle anyway): this covers
//!   clock waits (`std::thread::sleep`) and every poll;
//! - `input-stream.blocking-read` and `blocking-skip` fail with an error
//!   whose text is `interrupted` (a blocking read of a pipe or FIFO).
//!
//! Anything else that blocks, and a guest that goes on waiting after an
//! interrupt, meets the hard tier: the kill drops the whole call future.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_io::bindings::wasi::io::{poll, streams};
use wasmtime_wasi_io::poll::DynPollable;
use wasmtime_wasi_io::streams::{DynInputStream, StreamError};

use super::State;
use crate::control::Stop;

/// The version wasmtime-wasi defines these interfaces at; guests that
/// import any 0.2.x version link to it.
const POLL: &str = "wasi:io/poll@0.2.12";
const STREAMS: &str = "wasi:io/streams@0.2.12";

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
                let all = (0..pollables.len() as u32).collect::<Vec<_>>();
                tokio::select! {
                    ready = poll::Host::poll(&mut state.table, pollables) => Ok((ready?,)),
                    () = shared.control.until_stopped(Stop::Interrupted) => Ok((all,)),
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
    let mut io = linker.instance(STREAMS)?;
    io.func_wrap_async(
        "[method]input-stream.blocking-read",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let shared = state.services.shared.clone();
                let result = tokio::select! {
                    read = streams::HostInputStream::blocking_read(&mut state.table, stream, len) => read,
                    () = shared.control.until_stopped(Stop::Interrupted) => Err(interrupted()),
                };
                Ok((lower(&mut state.table, result)?,))
            })
        },
    )?;
    io.func_wrap_async(
        "[method]input-stream.blocking-skip",
        |mut store, (stream, len): (Resource<DynInputStream>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let shared = state.services.shared.clone();
                let result = tokio::select! {
                    skipped = streams::HostInputStream::blocking_skip(&mut state.table, stream, len) => skipped,
                    () = shared.control.until_stopped(Stop::Interrupted) => Err(interrupted()),
                };
                Ok((lower(&mut state.table, result)?,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn interrupted() -> StreamError {
    StreamError::LastOperationFailed(wasmtime::format_err!("interrupted"))
}

/// A stream result as the guest sees it (errors become resources).
fn lower<T>(
    table: &mut wasmtime::component::ResourceTable,
    result: Result<T, StreamError>,
) -> wasmtime::Result<Result<T, streams::StreamError>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => Ok(Err(streams::Host::convert_stream_error(table, e)?)),
    }
}
