//! The manager's handle on a worker: the API ([`Worker`]), how workers
//! are configured and started ([`WorkerBuilder`]), request handles
//! ([`CallHandle`]) and the per-worker state behind them.

mod builder;
mod handle;
mod inner;

pub use builder::{
    DEFAULT_INTERRUPT_GRACE, DEFAULT_MAX_PENDING, DEFAULT_MEMORY_LIMIT, DEFAULT_OUTPUT_LIMIT,
    DEFAULT_SPAWN_TIMEOUT, MAX_CHANNEL_CAPACITY, WorkerBuilder, WorkerKind,
};
pub(crate) use builder::{GuestSource, component_bytes};
pub use handle::CallHandle;
pub(crate) use handle::{encode_args, encode_value, reply_bytes};
pub(crate) use inner::Inner;

/// Why a host's lockdown falls short of what `require_hardening` asks,
/// if it does (`None`: it did not lock itself down at all).
pub(crate) fn hardening_shortfall(hardening: Option<crate::Hardening>) -> Option<String> {
    match hardening {
        Some(h) if h.is_complete() => None,
        Some(h) => Some(format!(
            "hardening is required, but the process locked down only partly ({h:?}); full \
             Landlock needs Linux 6.12 or later"
        )),
        None => Some("hardening is required, but the process is not locked down".into()),
    }
}

use builder::*;

use handle::*;

use inner::*;

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::WorkerChannel;
use crate::connection::{self, Launch, Signal, StartFailure, Via};
use crate::error::{Error, RemoteException, Result};
use crate::launcher::Launcher;
use crate::output::{OutputSink, WorkerOutput};
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, DirGrant, Failure, FatalKind, FromHost, GuestSpec, HostConfig,
    PROTOCOL_VERSION, ReplyMode, ToHost,
};
use crate::{cache, process};

/// A handle on a worker: a process running a guest, driven with Malt's API.
///
/// Dropping the handle kills the worker.
pub struct Worker {
    pub(crate) inner: Arc<Inner>,
    pub(crate) output: Mutex<Option<WorkerOutput>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.inner.name)
            .field("running", &self.is_running())
            .finish()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Worker {
    /// A builder for a worker running the built-in script guest (Rhai) in
    /// a wasm sandbox. Needs no file: the guest is embedded in malt.
    pub fn script() -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Script)
    }

    /// A builder for a worker running the wasm component at `path`, which
    /// must implement the `malt:worker` world (see `wit/`).
    pub fn wasm(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Wasm(path.as_ref().to_path_buf()))
    }

    /// A builder for a native worker: a separate process serving the
    /// script guest natively (no wasm: the process is the only wall).
    pub fn native() -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::NativeScript)
    }

    /// A builder for a worker running a Python session (CPython in wasm;
    /// see [`crate::python`]), from the component at
    /// [`python::component_path`](crate::python::component_path). Build it
    /// once with `malt build-python`; starting without it fails with what
    /// to run.
    pub fn python() -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Python(crate::python::component_path()))
    }

    /// Like [`python`](Self::python), from a Python guest component at
    /// `path` (as built by [`crate::python::build_component`]).
    pub fn python_component(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::Python(path.as_ref().to_path_buf()))
    }

    /// A builder for a native worker running your own program, which
    /// serves its guest with [`crate::host::main_if_host_with`].
    pub fn native_program(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder::new(GuestSource::NativeProgram(path.as_ref().to_path_buf()))
    }

    /// The worker's name, e.g. `worker 3 (pid 4242)`, as used in errors.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The worker's number in this manager (1, 2, …).
    pub fn number(&self) -> u64 {
        self.inner.number
    }

    /// The host process id (this process's own for an in-process worker;
    /// a native worker gets a new one when a hard interrupt restarts it).
    pub fn pid(&self) -> u32 {
        self.inner.pid.load(Ordering::Acquire)
    }

    /// The host's process id on the machine it runs on. The same as
    /// [`pid`](Worker::pid) but for a host behind a
    /// [`launcher`](WorkerBuilder::launcher), whose `pid` is the local
    /// launcher process (`ssh`) and this the host's, on its machine.
    pub fn host_pid(&self) -> u32 {
        self.inner.host_pid.load(Ordering::Acquire)
    }

    /// What the worker's host process locked down before it ran guest
    /// code (seccomp, Landlock and its ABI); `None` for an in-process or a
    /// native worker, which do not lock themselves. See
    /// [`WorkerBuilder::require_hardening`].
    pub fn hardening(&self) -> Option<crate::Hardening> {
        self.inner.hardening
    }

    /// What kind of worker this is.
    pub fn kind(&self) -> WorkerKind {
        self.inner.kind
    }

    /// Calls the guest function `name` with `args` (a tuple, sent as a
    /// MessagePack array; `()` for none) and returns a handle to await for
    /// its value. The request is already sent when this returns.
    pub fn remote_call<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> CallHandle<R> {
        let sent = encode_args(&args).and_then(|args| {
            self.inner.request(|id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::Value,
            })
        });
        CallHandle::new(&self.inner, sent)
    }

    /// [`remote_call`](Self::remote_call) with arguments already encoded
    /// (a MessagePack array).
    pub(crate) fn call_encoded<R: DeserializeOwned>(
        &self,
        name: &str,
        args: Vec<u8>,
        reply: ReplyMode,
    ) -> CallHandle<R> {
        let sent = self.inner.request(|id| ToHost::Call {
            id,
            name: name.to_string(),
            args,
            reply,
        });
        CallHandle::new(&self.inner, sent)
    }

    /// Calls `name` once per input (encoded argument arrays) in one
    /// request: the host runs them back to back. The results may be fewer
    /// than the inputs: the batch stops after an input that trapped, was
    /// interrupted or hit a limit (see `ToHost::CallBatch`).
    pub(crate) async fn call_batch<R: DeserializeOwned>(
        &self,
        name: &str,
        args: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<R>>> {
        let sent = self.inner.request(|id| ToHost::CallBatch {
            id,
            name: name.to_string(),
            args: args.into_iter().map(serde_bytes::ByteBuf::from).collect(),
        });
        let items: Vec<std::result::Result<serde_bytes::ByteBuf, Failure>> =
            CallHandle::new(&self.inner, sent).await?;
        Ok(items
            .into_iter()
            .map(|item| match item {
                Ok(bytes) => self.inner.decode(&bytes),
                Err(failure) => Err(self.inner.failure(failure)),
            })
            .collect())
    }

    /// Calls the guest function `name` and waits for its value.
    pub async fn remote_call_fetch<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> Result<R> {
        self.remote_call(name, args).await
    }

    /// Calls the guest function `name` and waits for it to finish; the
    /// worker sends no value back.
    pub async fn remote_call_wait(&self, name: &str, args: impl Serialize) -> Result<()> {
        let sent = encode_args(&args).and_then(|args| {
            self.inner.request(|id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::Ack,
            })
        });
        CallHandle::<()>::new(&self.inner, sent).await
    }

    /// Calls the guest function `name` without waiting and without any
    /// reply; returns once the request is sent. A failure is reported on
    /// the worker's stderr.
    pub fn remote_do(&self, name: &str, args: impl Serialize) -> Result<()> {
        let args = encode_args(&args)?;
        self.inner.submit(
            |id| ToHost::Call {
                id,
                name: name.to_string(),
                args,
                reply: ReplyMode::None,
            },
            None,
        )
    }

    /// Evaluates `code` in the guest's persistent session and returns a
    /// handle to await for its value. The request is already sent.
    pub fn remote_eval<R: DeserializeOwned>(&self, code: &str) -> CallHandle<R> {
        let sent = self.inner.request(|id| ToHost::Eval {
            id,
            code: code.to_string(),
            reply: ReplyMode::Value,
        });
        CallHandle::new(&self.inner, sent)
    }

    /// Evaluates `code` and waits for its value.
    pub async fn remote_eval_fetch<R: DeserializeOwned>(&self, code: &str) -> Result<R> {
        self.remote_eval(code).await
    }

    /// Evaluates `code` and waits for it to finish, without its value.
    pub async fn remote_eval_wait(&self, code: &str) -> Result<()> {
        let sent = self.inner.request(|id| ToHost::Eval {
            id,
            code: code.to_string(),
            reply: ReplyMode::Ack,
        });
        CallHandle::<()>::new(&self.inner, sent).await
    }

    /// Opens the worker channel `name` (creating it with `capacity` if it
    /// does not exist yet) and returns a handle on it. The guest reaches
    /// the same queue by name; calling this twice with the same name gives
    /// two handles on one queue.
    pub async fn worker_channel<T>(&self, name: &str, capacity: usize) -> Result<WorkerChannel<T>>
    where
        T: Serialize + DeserializeOwned,
    {
        if capacity == 0 || capacity > MAX_CHANNEL_CAPACITY {
            return Err(Error::Invalid {
                worker: self.inner.name.clone(),
                message: format!(
                    "a worker channel needs a capacity between 1 and {}, got {capacity}",
                    u32::MAX
                ),
            });
        }
        let sent = self.inner.request(|id| ToHost::ChannelOpen {
            id,
            name: name.to_string(),
            capacity: capacity as u32,
        });
        CallHandle::<()>::new(&self.inner, sent).await?;
        Ok(WorkerChannel::new(self.inner.clone(), name))
    }

    /// Interrupts the request the worker is running; if it is between
    /// requests, the next one to begin, if it was sent before this call
    /// (so `let p = w.remote_eval(..); w.interrupt()` interrupts `p` even
    /// if it has not started yet). A request sent later is never hit.
    ///
    /// The request fails with [`Error::Interrupted`]. A guest that stops by
    /// itself within the grace period keeps its state (`state_lost:
    /// false`); one that does not is killed and restarted fresh
    /// (`state_lost: true`). Either way the worker keeps running, and
    /// queued requests run afterwards.
    pub fn interrupt(&self) -> Result<()> {
        let up_to = self.inner.next_id.load(Ordering::Relaxed) - 1;
        self.inner.send(&ToHost::Interrupt { up_to })
    }

    /// Whether the worker process is running.
    pub fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Stops the worker: asks it to shut down, then escalates to SIGTERM
    /// and SIGKILL if it does not. Requests still pending fail with
    /// [`Error::TerminatedWorker`]. Returns whether the worker was running.
    pub async fn stop(&self) -> Result<bool> {
        if !self.is_running() {
            return Ok(false);
        }
        let _ = self.inner.send(&ToHost::Stop);
        let mut exit = self.inner.exit.subscribe();
        for escalation in [Some(Signal::Term), Some(Signal::Kill), None] {
            let exited = tokio::time::timeout(STOP_STEP, exit.wait_for(|s| s.is_some())).await;
            if matches!(exited, Ok(Ok(_)) | Ok(Err(_))) {
                break;
            }
            match escalation {
                Some(signal) => self.inner.signal(signal),
                None => {
                    return Err(Error::io(
                        format!("stopping {}", self.inner.name),
                        std::io::Error::other("the process did not exit after SIGKILL"),
                    ));
                }
            }
        }
        self.inner.terminate();
        Ok(true)
    }

    /// Kills the worker process at once (SIGKILL). Pending requests fail
    /// with [`Error::TerminatedWorker`].
    pub fn kill(&self) {
        self.inner.running.store(false, Ordering::Release);
        self.inner.signal(Signal::Kill);
        // A line the guest printed without its end is not held back for
        // an end that will not come (a program that kills its worker and
        // exits would lose it). Not waited for: if the reader is writing
        // output now, it writes the rest when the stream ends.
        if let Ok(mut output) = self.inner.launch.output.try_lock() {
            output.finish();
        }
    }

    /// Waits until the worker process has exited.
    pub async fn wait(&self) -> Option<std::process::ExitStatus> {
        let mut exit = self.inner.exit.subscribe();
        exit.wait_for(|s| s.is_some())
            .await
            .ok()
            .and_then(|s| s.flatten())
    }

    /// The output of a worker spawned with
    /// [`monitor_output(false)`](WorkerBuilder::monitor_output); `None` if
    /// output is forwarded or was already taken.
    pub fn take_output(&self) -> Option<WorkerOutput> {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Why the worker ended, if it ended on its own rather than by
    /// [`stop`](Self::stop) or [`kill`](Self::kill): e.g. its guest could
    /// not restart after a trap, or its host sent a frame that could not be
    /// read. `None` while it runs.
    pub fn termination_reason(&self) -> Option<String> {
        self.inner
            .ended_because
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last bytes the host process itself wrote to stderr (wasmtime
    /// and host diagnostics, not guest output).
    pub fn host_stderr(&self) -> String {
        self.inner
            .launch
            .stderr_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
