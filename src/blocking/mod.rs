//! The same API for programs without an async runtime.
//!
//! Every method blocks until done; the names are those of the async API.
//! The workers' I/O runs on one background thread shared by all blocking
//! workers. Do not call these from inside an async runtime (use the async
//! API there).
//!
//! ```no_run
//! # fn demo() -> Result<(), malt::Error> {
//! use malt::blocking::Worker;
//!
//! let w = Worker::script().spawn()?;
//! let three: i64 = w.remote_eval_fetch("1 + 2")?;
//! assert_eq!(three, 3);
//! w.stop()?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

mod pool;
pub use pool::{Pool, PoolBuilder};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("malt-blocking")
            .enable_all()
            .build()
            .expect("cannot start malt's background runtime")
    })
}

fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Configures and starts a worker (see [`crate::WorkerBuilder`] for what
/// each option does).
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .spawn()"]
pub struct WorkerBuilder(crate::WorkerBuilder);

macro_rules! forward {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            $(#[$doc])*
            pub fn $name(self, $($arg: $ty),*) -> Self {
                WorkerBuilder(self.0.$name($($arg),*))
            }
        )*
    };
}

impl WorkerBuilder {
    forward! {
        /// See [`crate::WorkerBuilder::memory_limit`].
        fn memory_limit(bytes: u64);
        /// See [`crate::WorkerBuilder::call_timeout`].
        fn call_timeout(timeout: Duration);
        /// See [`crate::WorkerBuilder::interrupt_grace`].
        fn interrupt_grace(grace: Duration);
        /// See [`crate::WorkerBuilder::monitor_output`].
        fn monitor_output(on: bool);
        /// See [`crate::WorkerBuilder::prefix_output`].
        fn prefix_output(on: bool);
        /// See [`crate::WorkerBuilder::max_frame_size`].
        fn max_frame_size(bytes: usize);
        /// See [`crate::WorkerBuilder::spawn_timeout`].
        fn spawn_timeout(timeout: Duration);
        /// See [`crate::WorkerBuilder::fuel`].
        fn fuel(fuel: u64);
        /// See [`crate::WorkerBuilder::require_hardening`].
        fn require_hardening(on: bool);
        /// See [`crate::WorkerBuilder::in_process`].
        fn in_process();
        /// See [`crate::WorkerBuilder::output_limit`].
        fn output_limit(bytes: u64);
        /// See [`crate::WorkerBuilder::max_pending`].
        fn max_pending(requests: usize);
        /// See [`crate::WorkerBuilder::rollback`].
        fn rollback(on: bool);
    }

    /// See [`crate::WorkerBuilder::env`].
    pub fn env(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        WorkerBuilder(self.0.env(key, value))
    }

    /// See [`crate::WorkerBuilder::dir`].
    pub fn dir(self, host_path: impl AsRef<Path>, guest_path: impl Into<String>) -> Self {
        WorkerBuilder(self.0.dir(host_path, guest_path))
    }

    /// See [`crate::WorkerBuilder::dir_read_only`].
    pub fn dir_read_only(self, host_path: impl AsRef<Path>, guest_path: impl Into<String>) -> Self {
        WorkerBuilder(self.0.dir_read_only(host_path, guest_path))
    }

    /// See [`crate::WorkerBuilder::host_program`].
    pub fn host_program(self, program: impl Into<PathBuf>) -> Self {
        WorkerBuilder(self.0.host_program(program))
    }

    /// See [`crate::WorkerBuilder::python_path`].
    pub fn python_path(self, dir: impl AsRef<Path>) -> Self {
        WorkerBuilder(self.0.python_path(dir))
    }

    /// See [`crate::WorkerBuilder::launcher`].
    pub fn launcher(self, launcher: impl Into<crate::Launcher>) -> Self {
        WorkerBuilder(self.0.launcher(launcher))
    }

    /// See [`crate::WorkerBuilder::heartbeat`].
    pub fn heartbeat(self, interval: Option<Duration>) -> Self {
        WorkerBuilder(self.0.heartbeat(interval))
    }

    /// See [`crate::WorkerBuilder::start_host_ahead`]: the host starts on
    /// malt's background runtime, which [`spawn`](Self::spawn) uses too.
    pub fn start_host_ahead(&self) {
        let _in = runtime().enter();
        self.0.start_host_ahead();
    }

    /// Starts the worker and waits until it is ready.
    pub fn spawn(self) -> Result<Worker> {
        block_on(self.0.spawn()).map(|inner| Worker { inner })
    }
}

/// A worker driven without async (see [`crate::Worker`]).
#[derive(Debug)]
pub struct Worker {
    inner: crate::Worker,
}

/// A request already sent; [`fetch`](CallHandle::fetch) waits for its value.
#[derive(Debug)]
#[must_use = "the request runs anyway; fetch the handle to get its result"]
pub struct CallHandle<R>(crate::CallHandle<R>);

impl<R: DeserializeOwned> CallHandle<R> {
    /// Waits for the value.
    pub fn fetch(self) -> Result<R> {
        block_on(self.0)
    }
}

/// A worker channel driven without async (see [`crate::WorkerChannel`]).
#[derive(Debug, Clone)]
pub struct WorkerChannel<T>(crate::WorkerChannel<T>);

impl<T: Serialize + DeserializeOwned> WorkerChannel<T> {
    /// Appends a value; waits while the channel is full.
    pub fn put(&self, value: T) -> Result<()> {
        block_on(self.0.put(value))
    }

    /// Removes and returns the oldest value; waits while it is empty.
    pub fn take(&self) -> Result<T> {
        block_on(self.0.take())
    }

    /// Whether a take would return at once.
    pub fn is_ready(&self) -> Result<bool> {
        block_on(self.0.is_ready())
    }
}

impl Worker {
    /// See [`crate::Worker::script`].
    pub fn script() -> WorkerBuilder {
        WorkerBuilder(crate::Worker::script())
    }

    /// See [`crate::Worker::wasm`].
    pub fn wasm(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder(crate::Worker::wasm(path))
    }

    /// See [`crate::Worker::native`].
    pub fn native() -> WorkerBuilder {
        WorkerBuilder(crate::Worker::native())
    }

    /// See [`crate::Worker::native_program`].
    pub fn native_program(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder(crate::Worker::native_program(path))
    }

    /// The async worker underneath.
    pub fn as_async(&self) -> &crate::Worker {
        &self.inner
    }

    /// See [`crate::Worker::name`].
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// See [`crate::Worker::python`].
    pub fn python() -> WorkerBuilder {
        WorkerBuilder(crate::Worker::python())
    }

    /// See [`crate::Worker::python_component`].
    pub fn python_component(path: impl AsRef<Path>) -> WorkerBuilder {
        WorkerBuilder(crate::Worker::python_component(path))
    }

    /// See [`crate::Worker::host_pid`].
    pub fn host_pid(&self) -> u32 {
        self.inner.host_pid()
    }

    /// See [`crate::Worker::pid`].
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// See [`crate::Worker::number`].
    pub fn number(&self) -> u64 {
        self.inner.number()
    }

    /// See [`crate::Worker::kind`].
    pub fn kind(&self) -> crate::WorkerKind {
        self.inner.kind()
    }

    /// Waits until the worker process has exited; see [`crate::Worker::wait`].
    pub fn wait(&self) -> Option<std::process::ExitStatus> {
        block_on(self.inner.wait())
    }

    /// See [`crate::Worker::take_output`]; read it with
    /// [`WorkerOutput::blocking_recv`](crate::WorkerOutput::blocking_recv).
    pub fn take_output(&self) -> Option<crate::WorkerOutput> {
        self.inner.take_output()
    }

    /// See [`crate::Worker::hardening`].
    pub fn hardening(&self) -> Option<crate::Hardening> {
        self.inner.hardening()
    }

    /// See [`crate::Worker::termination_reason`].
    pub fn termination_reason(&self) -> Option<String> {
        self.inner.termination_reason()
    }

    /// See [`crate::Worker::host_stderr`].
    pub fn host_stderr(&self) -> String {
        self.inner.host_stderr()
    }

    /// Sends a call; the handle fetches its value.
    pub fn remote_call<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> CallHandle<R> {
        CallHandle(self.inner.remote_call(name, args))
    }

    /// Calls and waits for the value.
    pub fn remote_call_fetch<R: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> Result<R> {
        block_on(self.inner.remote_call_fetch(name, args))
    }

    /// Calls and waits for the call to finish.
    pub fn remote_call_wait(&self, name: &str, args: impl Serialize) -> Result<()> {
        block_on(self.inner.remote_call_wait(name, args))
    }

    /// Sends a call without waiting for anything.
    pub fn remote_do(&self, name: &str, args: impl Serialize) -> Result<()> {
        self.inner.remote_do(name, args)
    }

    /// Sends code to evaluate; the handle fetches its value.
    pub fn remote_eval<R: DeserializeOwned>(&self, code: &str) -> CallHandle<R> {
        CallHandle(self.inner.remote_eval(code))
    }

    /// Evaluates and waits for the value.
    pub fn remote_eval_fetch<R: DeserializeOwned>(&self, code: &str) -> Result<R> {
        block_on(self.inner.remote_eval_fetch(code))
    }

    /// Evaluates and waits for it to finish.
    pub fn remote_eval_wait(&self, code: &str) -> Result<()> {
        block_on(self.inner.remote_eval_wait(code))
    }

    /// Opens a worker channel.
    pub fn worker_channel<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        capacity: usize,
    ) -> Result<WorkerChannel<T>> {
        block_on(self.inner.worker_channel(name, capacity)).map(WorkerChannel)
    }

    /// Interrupts the running request.
    pub fn interrupt(&self) -> Result<()> {
        self.inner.interrupt()
    }

    /// Whether the worker is running.
    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// Stops the worker; returns whether it was running.
    pub fn stop(&self) -> Result<bool, Error> {
        block_on(self.inner.stop())
    }

    /// Kills the worker at once.
    pub fn kill(&self) {
        self.inner.kill()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The public methods of `impl Worker { … }` blocks in `source`.
    fn worker_methods(source: &str) -> BTreeSet<String> {
        methods(source, "impl Worker {")
    }

    /// The public methods of the `impl` blocks that start with `opening`.
    fn methods(source: &str, opening: &str) -> BTreeSet<String> {
        let mut methods = BTreeSet::new();
        let mut inside = false;
        for line in source.lines() {
            if line.starts_with(opening) {
                inside = true;
            } else if inside && line.starts_with('}') {
                inside = false;
            } else if inside {
                let line = line.trim_start();
                let rest = line
                    .strip_prefix("pub async fn ")
                    .or_else(|| line.strip_prefix("pub fn "));
                if let Some(rest) = rest {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    methods.insert(name);
                }
            }
        }
        methods
    }

    #[test]
    fn the_blocking_worker_has_every_method_of_the_async_one() {
        let async_api = worker_methods(include_str!("../worker/mod.rs"));
        let blocking_api = worker_methods(include_str!("mod.rs"));
        assert!(async_api.len() > 20, "found {async_api:?}");
        let missing: Vec<_> = async_api.difference(&blocking_api).collect();
        assert!(missing.is_empty(), "blocking::Worker lacks {missing:?}");
        // And nothing of its own but the way back to the async worker.
        let extra: Vec<_> = blocking_api.difference(&async_api).collect();
        assert_eq!(extra, ["as_async"]);
    }

    #[test]
    fn the_blocking_builders_have_every_method_of_the_async_ones() {
        for (async_source, blocking_source, opening) in [
            (
                include_str!("../worker/builder.rs"),
                include_str!("mod.rs"),
                "impl WorkerBuilder {",
            ),
            (
                include_str!("../pool/mod.rs"),
                include_str!("pool.rs"),
                "impl PoolBuilder {",
            ),
        ] {
            let async_api = methods(async_source, opening);
            let mut blocking_api = methods(blocking_source, opening);
            // Methods written through the forwarding macro.
            for line in blocking_source.lines() {
                if let Some(rest) = line.trim_start().strip_prefix("fn ") {
                    blocking_api.insert(
                        rest.chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect(),
                    );
                }
            }
            assert!(async_api.len() > 5, "found {async_api:?}");
            let missing: Vec<_> = async_api.difference(&blocking_api).collect();
            assert!(missing.is_empty(), "{opening} (blocking) lacks {missing:?}");
        }
    }

    #[test]
    fn the_blocking_pool_has_every_method_of_the_async_one() {
        let async_api = methods(include_str!("../pool/mod.rs"), "impl Pool {");
        let blocking_api = methods(include_str!("pool.rs"), "impl Pool {");
        assert!(async_api.len() > 10, "found {async_api:?}");
        // A blocking call takes its retries as an argument; there is no
        // blocking form of a request to await, nor of a stream.
        let missing: Vec<_> = async_api
            .difference(&blocking_api)
            .filter(|m| !["eval", "map_stream"].contains(&m.as_str()))
            .collect();
        assert!(missing.is_empty(), "blocking::Pool lacks {missing:?}");
        let extra: Vec<_> = blocking_api.difference(&async_api).collect();
        assert_eq!(extra, ["as_async"]);
    }
}
