//! [`Pool`] without an async runtime.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{WorkerBuilder, block_on};
use crate::error::Result;
use crate::{PoolStats, RestartPolicy};

/// Configures and starts a [`Pool`] (see [`crate::PoolBuilder`]).
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .spawn()"]
pub struct PoolBuilder(crate::PoolBuilder);

impl PoolBuilder {
    /// How many workers.
    pub fn size(self, workers: usize) -> Self {
        PoolBuilder(self.0.size(workers))
    }

    /// Code every worker evaluates when started or reset.
    pub fn setup(self, code: impl Into<String>) -> Self {
        PoolBuilder(self.0.setup(code))
    }

    /// How many requests may wait for a worker.
    pub fn max_queued(self, requests: usize) -> Self {
        PoolBuilder(self.0.max_queued(requests))
    }

    /// How many requests each worker may hold at once.
    pub fn requests_per_worker(self, requests: usize) -> Self {
        PoolBuilder(self.0.requests_per_worker(requests))
    }

    /// How many inputs of a map go to a worker in one request.
    pub fn chunk_size(self, inputs: usize) -> Self {
        PoolBuilder(self.0.chunk_size(inputs))
    }

    /// How dead workers are replaced.
    pub fn restart_policy(self, policy: RestartPolicy) -> Self {
        PoolBuilder(self.0.restart_policy(policy))
    }

    /// Starts every worker and runs the setup code in each.
    pub fn spawn(self) -> Result<Pool> {
        block_on(self.0.spawn()).map(Pool)
    }
}

/// Many workers behind one handle, blocking (see [`crate::Pool`]).
#[derive(Debug)]
pub struct Pool(crate::Pool);

impl Pool {
    /// A builder for a pool of workers started from `worker`.
    pub fn builder(worker: WorkerBuilder) -> PoolBuilder {
        PoolBuilder(crate::Pool::builder(worker.0))
    }

    /// The async pool behind this one.
    pub fn as_async(&self) -> &crate::Pool {
        &self.0
    }

    /// How many workers the pool keeps.
    pub fn size(&self) -> usize {
        self.0.size()
    }

    /// Calls `name` on an idle worker; if its worker dies under it, runs it
    /// again on another, up to `retries` more times (0: not idempotent).
    pub fn call<R: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        args: impl Serialize,
        retries: u32,
    ) -> Result<R> {
        block_on(self.0.call(name, args).retry(retries).into_future())
    }

    /// Calls `name` on an idle worker and returns its value.
    pub fn remote_call_fetch<R: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> Result<R> {
        self.call(name, args, 0)
    }

    /// Evaluates `code` on an idle worker and returns its value.
    pub fn remote_eval_fetch<R: DeserializeOwned + Send + 'static>(&self, code: &str) -> Result<R> {
        block_on(self.0.remote_eval_fetch(code))
    }

    /// Evaluates `code` on an idle worker.
    pub fn remote_eval_wait(&self, code: &str) -> Result<()> {
        block_on(self.0.remote_eval_wait(code))
    }

    /// Calls `name` once per input; the results in input order.
    pub fn map<A: Serialize, R: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        inputs: impl IntoIterator<Item = A>,
    ) -> Vec<Result<R>> {
        block_on(self.0.map(name, inputs))
    }

    /// Evaluates `code` in every worker, now and in replacements.
    pub fn broadcast_eval(&self, code: &str) -> Result<()> {
        block_on(self.0.broadcast_eval(code))
    }

    /// Interrupts the request every worker is running.
    pub fn interrupt_all(&self) {
        self.0.interrupt_all()
    }

    /// Stops every worker.
    pub fn stop(&self) {
        block_on(self.0.stop())
    }

    /// How the pool is doing.
    pub fn stats(&self) -> PoolStats {
        self.0.stats()
    }

    /// The process ids of the workers alive now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.0.worker_pids()
    }
}
