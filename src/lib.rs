//! Run code in isolated workers, and drive them with Malt's API.
//!
//! malt is [Malt.jl](https://github.com/JuliaPluto/Malt.jl) rebuilt in Rust:
//! a **manager** (your program) starts **workers**, calls functions and
//! evaluates code in them, gets values or remote errors back, interrupts
//! them, stops and kills them. A worker is a separate OS process running a
//! **guest**:
//!
//! - a *wasm worker* runs a WebAssembly component (wasmtime) inside its own
//!   host process: untrusted code meets two walls, the wasm sandbox and
//!   the process, plus a memory cap, a call timeout and interrupts that
//!   always work (a guest that ignores one is killed and reset);
//! - a *native worker* serves the same guest interface from a plain process
//!   ([`Worker::native`] for the script guest, [`Worker::native_program`]
//!   for your own program built on [`host::main_if_host_with`] or the
//!   `malt-guest` SDK);
//! - an *in-process worker* ([`WorkerBuilder::in_process`]) runs a wasm
//!   guest on a thread of the manager (the wasm wall only);
//! - the default guest is the built-in **script guest** ([Rhai]), embedded
//!   in malt, so evaluating code works out of the box; [`Worker::python`]
//!   runs a CPython session in the wasm sandbox instead (see [`python`]).
//!
//! Every kind has the same API and semantics. Programs without an async
//! runtime use [`blocking`].
//!
//! [Rhai]: https://rhai.rs
//!
//! # Concepts
//!
//! **Calls and evals.** [`Worker::remote_call`] calls a function the guest
//! defines, by name, with serde-typed arguments (a tuple) and result.
//! [`Worker::remote_eval`] evaluates source code in the guest's persistent
//! session: variables and functions defined by one eval are there for the
//! next. As in Malt each comes in four flavors: `remote_call` (returns a
//! [`CallHandle`] already sent; await it), `remote_call_fetch` (waits for
//! the value), `remote_call_wait` (waits, no value) and `remote_do` (sends,
//! no reply at all). Many requests may be in flight; the guest runs them
//! one at a time, in order.
//!
//! **Values** cross every boundary as MessagePack: anything `Serialize`
//! goes in, anything `DeserializeOwned` comes out. A value that does not
//! fit the requested type is an [`Error::Decode`], not a panic.
//!
//! **Errors.** An error raised by guest code comes back as
//! [`Error::Remote`] with the guest's message ([`RemoteException`]). A
//! worker that is gone fails every pending and later request with
//! [`Error::TerminatedWorker`], detected at once (end of stream or process
//! exit).
//!
//! **Interrupts** come in two tiers. [`Worker::interrupt`] first asks the
//! guest to stop (the script guest checks every ~1000 operations, and
//! blocking built-ins like `sleep` return at once): the request fails with
//! `Interrupted { state_lost: false }` and the session is intact. A guest
//! that does not stop within the grace period is killed (epoch
//! interruption) and restarted fresh: `Interrupted { state_lost: true }`;
//! or, with [`WorkerBuilder::rollback`], rolled back to where it was
//! before that request: `Interrupted { state_lost: false, rolled_back:
//! true }`. Either way the worker keeps running.
//!
//! **Worker channels** ([`Worker::worker_channel`]) are named queues kept
//! by the worker's host, shared by the manager and the guest, and usable
//! while the guest is busy.
//!
//! **Output.** What the guest prints reaches the manager's stdout/stderr,
//! each line prefixed with the worker; or, with output monitoring off, is
//! handed to the caller ([`Worker::take_output`]). It travels as protocol
//! frames, so printing can never corrupt the protocol.
//!
//! **Many workers, other machines.** A [`Pool`] keeps several workers of
//! one kind behind one handle, replaces the dead and maps inputs across
//! them in order. A [`Launcher`] starts a worker's host elsewhere: over
//! SSH or any command whose stdin and stdout reach a remote `malt` (see
//! [`launcher`]).
//!
//! **Lifetime.** A worker dies with its manager: its host exits when the
//! protocol stream closes and, on Linux, on the manager's death signal.
//! [`Worker::stop`] shuts it down gracefully (escalating to SIGTERM and
//! SIGKILL), [`Worker::kill`] at once; dropping the [`Worker`] kills it.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), malt::Error> {
//! use malt::Worker;
//!
//! let w = Worker::script().spawn().await?;
//! w.remote_eval_wait("fn add(a, b) { a + b }").await?;
//! let three: i64 = w.remote_call_fetch("add", (1, 2)).await?;
//! assert_eq!(three, 3);
//!
//! let err = w.remote_eval_fetch::<()>(r#"throw "boom""#).await.unwrap_err();
//! assert!(err.to_string().contains("boom"));
//! w.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # The host program
//!
//! A worker's host process is, by default, **your own program**: every
//! program that links malt can serve as a worker host. malt starts it again
//! (`/proc/self/exe`) with a marker argument, and a start-up hook in this
//! library (a constructor that runs before `main`, via the [`ctor`] crate)
//! sees the marker, serves the worker and exits, before your `main` or a
//! test harness ever runs. So a binary, its tests and its examples need no
//! `malt` binary, no environment variable and no call in `main`.
//!
//! The trade-offs, and why this design:
//!
//! - *No setup, no version skew*: the host is the same code as the manager,
//!   so the two always speak the same protocol. A separately installed
//!   host binary can be older or newer than the library.
//! - *Cost*: the hook runs in every process that links malt, and does one
//!   read of `/proc/self/cmdline` there. A host process maps your whole
//!   executable, but pages that are never touched cost nothing, and the
//!   wasm guest runs in the same sandbox either way (the host hardens
//!   itself before guest code runs).
//! - *Code before `main`*: the hook runs before std's runtime setup. It only
//!   does work when the marker is present, in a process started by malt.
//! - *Limits*: the hook needs the malt library to be part of an executable
//!   (not a plugin loaded with `dlopen` into another program); there, and to
//!   use a host of your choice, set [`WorkerBuilder::host_program`] or
//!   `$MALT_HOST_PROGRAM` (e.g. to the `malt` CLI of the same version). A
//!   host of another version is refused at start, with both versions named.
//!
//! A native guest program of your own ([`Worker::native_program`]) serves
//! its guest by calling [`host::main_if_host_with`] first thing in `main`.
//!
//! Compiled components are cached in `$MALT_CACHE_DIR` (default
//! `~/.cache/malt`), a directory only its owner may write.
//!
//! # Debug builds
//!
//! The first start of a worker compiles the script guest with wasmtime's
//! compiler (Cranelift) into the cache. In a debug build whose dependencies
//! are not optimized that takes tens of seconds instead of about two; later
//! starts load the cached artifact in milliseconds. To make it fast, give
//! dependencies optimization in your `Cargo.toml`:
//!
//! ```toml
//! [profile.dev.package."*"]
//! opt-level = 2
//! ```

#![deny(missing_docs)]

pub mod blocking;
mod cache;
mod channel;
mod compiler;
mod connection;
mod error;
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::fuzz::{frames, values};
}
#[doc(hidden)]
pub mod __testing {
    pub use crate::spare_host::{spare_host_pid, spare_hosts_taken};
    pub use crate::zygote::zygote_pid;
    pub use malt_host::wasm::spares_taken;
}
mod forked_host;
mod fuzz;
mod heartbeat;
mod host_child;
pub mod launcher;
mod output;
pub mod pool;
mod process;
pub mod python;
mod spare_host;
pub mod tools;
mod worker;
mod zygote;

/// The worker side: serving a guest over the protocol (re-exported from
/// `malt-host`), for programs that serve a native guest of their own.
pub use malt_host as host;
/// The protocol between a manager and its hosts (re-exported from
/// `malt-protocol`).
pub use malt_protocol as protocol;

pub use cache::{CACHE_DIR_ENV, WASMTIME_VERSION, cache_dir};
pub use compiler::{COMPILE_MEMORY_ENV, COMPILE_TIMEOUT_ENV};

/// This version of malt. A worker host must be the same version exactly.
pub const VERSION: &str = malt_protocol::MALT_VERSION;
pub use channel::WorkerChannel;
pub use error::{Error, Limit, RemoteException, Result};
pub use forked_host::fork_host_ahead;
pub use launcher::Launcher;
pub use output::{OutputChunk, Stream, WorkerOutput};
pub use pool::{Pool, PoolBuilder, PoolCall, PoolStats, RestartPolicy};
pub use process::HOST_PROGRAM_ENV;
pub use protocol::{DirGrant, Hardening};
pub use worker::{
    CallHandle, DEFAULT_INTERRUPT_GRACE, DEFAULT_MAX_PENDING, DEFAULT_MEMORY_LIMIT,
    DEFAULT_OUTPUT_LIMIT, DEFAULT_SPAWN_TIMEOUT, MAX_CHANNEL_CAPACITY, Worker, WorkerBuilder,
    WorkerKind,
};

/// The README's Rust examples, compiled and run as doc tests so that they
/// never drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
