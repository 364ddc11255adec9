//! Many workers behind one handle: [`Pool`].
//!
//! A pool starts `size` workers from one [`WorkerBuilder`] (any kind:
//! wasm, in-process, native), runs the same setup code in each, and routes
//! every request to an idle worker: one request per worker at a time, the
//! rest waiting in the pool's queue in arrival order. The queue is bounded
//! ([`PoolBuilder::max_queued`]): past it, a caller waits for room
//! (back-pressure) rather than piling up work.
//!
//! # Supervision
//!
//! A worker that dies (it crashed, was killed, its host was OOM-killed) is
//! replaced by a new one that runs the setup code again; one whose guest
//! state was reset (a trap, a memory or fuel limit, a timeout or an
//! interrupt that had to kill) runs the setup code again before its next
//! request. Replacements follow a [`RestartPolicy`]: exponential backoff
//! with jitter, and at most so many restarts in a window, after which the
//! pool gives that worker up, so a poison input cannot crash-loop it. A
//! pool with no worker left fails its requests with
//! [`Error::PoolExhausted`]; nothing waits forever on a dead worker.
//!
//! A request on a worker that dies fails with
//! [`Error::TerminatedWorker`],
//! unless it was marked idempotent with [`PoolCall::retry`]: then it runs
//! again on another worker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), malt::Error> {
//! use malt::{Pool, Worker};
//!
//! let pool = Pool::builder(Worker::script())
//!     .size(4)
//!     .setup("fn square(x) { x * x }")
//!     .spawn()
//!     .await?;
//! let squares: Vec<i64> = pool
//!     .map("square", 1..=10)
//!     .await
//!     .into_iter()
//!     .collect::<Result<_, _>>()?;
//! assert_eq!(squares[9], 100);
//! let one: i64 = pool.call("square", (1,)).retry(2).await?;
//! assert_eq!(one, 1);
//! pool.stop().await;
//! # Ok(()) }
//! ```

mod sched;
mod stats;

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::worker::{WorkerBuilder, encode_args};
use sched::{Request, Shared};
pub use stats::PoolStats;

/// When and how often a pool replaces a worker that died.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// Most replacements of one worker within [`window`](Self::window);
    /// one more and the pool gives that worker up.
    pub max_restarts: u32,
    /// The window over which restarts are counted.
    pub window: Duration,
    /// Wait before the first replacement after a death; doubled for each
    /// further one within the window (with ±50 % jitter).
    pub initial_backoff: Duration,
    /// The longest wait between replacements.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    /// 10 restarts per worker in 60 s, backoff from 10 ms up to 5 s.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 10,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// A policy of at most `max_restarts` replacements per worker in
    /// `window`, with the default backoff.
    pub fn new(max_restarts: u32, window: Duration) -> Self {
        RestartPolicy {
            max_restarts,
            window,
            ..Default::default()
        }
    }

    /// Sets the backoff: `initial` before the first replacement, doubling
    /// up to `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }
}

/// Requests that may wait in a pool's queue, by default.
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

/// Most inputs of a `map` sent to a worker in one request by default.
const MAX_AUTO_CHUNK: usize = 1024;
/// Most inputs of a `map_stream` sent in one request by default (fewer
/// when fewer are ready).
const STREAM_CHUNK: usize = 64;

/// Configures and starts a [`Pool`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .spawn()"]
pub struct PoolBuilder {
    worker: WorkerBuilder,
    size: usize,
    setup: Vec<String>,
    max_queued: usize,
    per_worker: usize,
    restart: RestartPolicy,
    chunk: Option<usize>,
}

impl PoolBuilder {
    /// How many workers (default: the number of CPUs).
    pub fn size(mut self, workers: usize) -> Self {
        self.size = workers.max(1);
        self
    }

    /// Code every worker evaluates once started, and again whenever it is
    /// replaced or its state was reset (e.g. function definitions). May be
    /// given several times: run in order.
    pub fn setup(mut self, code: impl Into<String>) -> Self {
        self.setup.push(code.into());
        self
    }

    /// How many requests may wait for a worker (default
    /// [`DEFAULT_MAX_QUEUED`]); a caller beyond that waits for room.
    pub fn max_queued(mut self, requests: usize) -> Self {
        self.max_queued = requests;
        self
    }

    /// How many requests each worker may hold at once (default 1: a request
    /// goes only to an idle worker). More keeps a worker busy between tiny
    /// requests (the next one is already there when one ends), for more
    /// throughput, at the price of a request waiting behind another on its
    /// worker; and after a reset, a request already sent may run before
    /// the setup code runs again.
    pub fn requests_per_worker(mut self, requests: usize) -> Self {
        self.per_worker = requests.max(1);
        self
    }

    /// How many inputs of a [`map`](Pool::map) or
    /// [`map_stream`](Pool::map_stream) go to a worker in one request, to
    /// be run there back to back. By default, as Python's `Pool.map` does,
    /// `map` splits its inputs into about four chunks per worker (at most
    /// 1024 inputs each), and `map_stream` sends what is ready, up to 64.
    /// `1` sends each input alone.
    ///
    /// Each input is still a call of its own (its own timeout, output
    /// allowance and result). One that traps, is interrupted or hits a
    /// limit ends its chunk there; the rest of the chunk goes on, on the
    /// next idle worker.
    pub fn chunk_size(mut self, inputs: usize) -> Self {
        self.chunk = Some(inputs.max(1));
        self
    }

    /// How dead workers are replaced (default: [`RestartPolicy::default`]).
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Starts every worker and runs the setup code in each. Fails with the
    /// first worker's error if any cannot start or its setup fails.
    pub async fn spawn(self) -> Result<Pool> {
        let shared = Shared::start(
            self.worker,
            self.size,
            self.setup,
            self.max_queued,
            self.per_worker,
            self.restart,
        )
        .await?;
        Ok(Pool {
            shared,
            chunk: self.chunk,
        })
    }
}

/// Many workers behind one handle: requests go to an idle worker, dead
/// workers are replaced. See the [module documentation](self).
///
/// Dropping the pool kills its workers.
pub struct Pool {
    shared: Arc<Shared>,
    chunk: Option<usize>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Pool {
    /// A builder for a pool of workers started from `worker`.
    pub fn builder(worker: WorkerBuilder) -> PoolBuilder {
        PoolBuilder {
            worker,
            size: std::thread::available_parallelism().map_or(1, |n| n.get()),
            setup: Vec::new(),
            max_queued: DEFAULT_MAX_QUEUED,
            per_worker: 1,
            restart: RestartPolicy::default(),
            chunk: None,
        }
    }

    /// How many workers the pool keeps.
    pub fn size(&self) -> usize {
        self.shared.size()
    }

    /// Calls the guest function `name` with `args` on an idle worker; await
    /// the returned [`PoolCall`] for its value (or mark it idempotent
    /// first with [`PoolCall::retry`]).
    pub fn call<R: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> PoolCall<R> {
        PoolCall::new(
            &self.shared,
            encode_args(&args).map(|args| Request::Call {
                name: name.to_string(),
                args,
            }),
        )
    }

    /// Evaluates `code` on an idle worker; await the returned [`PoolCall`].
    /// Each request may run on another worker: state meant for every
    /// worker belongs in [`setup`](PoolBuilder::setup) or
    /// [`broadcast_eval`](Self::broadcast_eval).
    pub fn eval<R: DeserializeOwned + Send + 'static>(&self, code: &str) -> PoolCall<R> {
        PoolCall::new(&self.shared, Ok(Request::Eval(code.to_string())))
    }

    /// Calls the guest function `name` on an idle worker and waits for its
    /// value.
    pub async fn remote_call_fetch<R: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        args: impl Serialize,
    ) -> Result<R> {
        self.call(name, args).await
    }

    /// Evaluates `code` on an idle worker and waits for its value.
    pub async fn remote_eval_fetch<R: DeserializeOwned + Send + 'static>(
        &self,
        code: &str,
    ) -> Result<R> {
        self.eval(code).await
    }

    /// Evaluates `code` on an idle worker and waits for it to finish.
    pub async fn remote_eval_wait(&self, code: &str) -> Result<()> {
        self.eval::<serde::de::IgnoredAny>(code).await.map(|_| ())
    }

    /// Calls `name` once per input (each input is the arguments: a tuple,
    /// or one value) across the workers, and returns the results in input
    /// order, one per input. Inputs go in chunks (see
    /// [`chunk_size`](PoolBuilder::chunk_size)) as workers free up: at most
    /// twice the requests the workers may hold are in flight.
    pub async fn map<A, R>(&self, name: &str, inputs: impl IntoIterator<Item = A>) -> Vec<Result<R>>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        let inputs: Vec<A> = inputs.into_iter().collect();
        let chunk = self.chunk.unwrap_or_else(|| {
            inputs
                .len()
                .div_ceil(4 * self.shared.size())
                .clamp(1, MAX_AUTO_CHUNK)
        });
        calls(
            &self.shared,
            name,
            futures_util::stream::iter(inputs),
            chunk,
        )
        .collect()
        .await
    }

    /// [`map`](Self::map) for inputs that arrive as a stream, and may not
    /// fit in memory: results come out as a stream, in input order, with at
    /// most twice the requests the workers may hold in flight.
    pub fn map_stream<A, R, S>(
        &self,
        name: &str,
        inputs: S,
    ) -> impl Stream<Item = Result<R>> + Send + 'static
    where
        S: Stream<Item = A> + Send + 'static,
        A: Serialize + 'static,
        R: DeserializeOwned + Send + 'static,
    {
        calls(
            &self.shared,
            name,
            inputs,
            self.chunk.unwrap_or(STREAM_CHUNK),
        )
    }

    /// Evaluates `code` in every worker now, and in every worker that
    /// replaces one later (it joins the setup code): e.g. to define a
    /// function everywhere. Fails with the first worker's error.
    pub async fn broadcast_eval(&self, code: &str) -> Result<()> {
        self.shared.broadcast(code).await
    }

    /// Interrupts the request every worker is running (see
    /// [`Worker::interrupt`](crate::Worker::interrupt)).
    pub fn interrupt_all(&self) {
        self.shared.interrupt_all();
    }

    /// Stops every worker; requests still waiting fail with
    /// [`Error::TerminatedWorker`], and so
    /// do later ones.
    pub async fn stop(&self) {
        self.shared.stop().await;
    }

    /// The process ids of the workers alive now (0 for an in-process
    /// worker), e.g. to watch their resource use.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.pids()
    }

    /// How the pool is doing: workers alive and busy, requests queued,
    /// restarts, requests done and failed, latency percentiles.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }
}

/// One call per input, in order, sent in requests of up to `chunk`
/// inputs, twice the pool's capacity in flight.
fn calls<A, R, S>(
    shared: &Arc<Shared>,
    name: &str,
    inputs: S,
    chunk: usize,
) -> impl Stream<Item = Result<R>> + use<A, R, S>
where
    S: Stream<Item = A>,
    A: Serialize,
    R: DeserializeOwned + Send + 'static,
{
    let shared = shared.clone();
    let name = name.to_string();
    let in_flight = 2 * shared.capacity();
    if chunk == 1 {
        let one = inputs
            .map(move |input| {
                PoolCall::<R>::new(
                    &shared,
                    encode_args(&input).map(|args| Request::Call {
                        name: name.clone(),
                        args,
                    }),
                )
                .into_future()
            })
            .buffered(in_flight);
        return futures_util::future::Either::Left(one);
    }
    let chunked = inputs
        .map(|input| encode_args(&input))
        .ready_chunks(chunk)
        .map(move |encoded| run_chunk(shared.clone(), name.clone(), encoded))
        .buffered(in_flight)
        .flat_map(futures_util::stream::iter);
    futures_util::future::Either::Right(chunked)
}

/// Runs one chunk of a map as a batch; an input that could not be encoded
/// keeps its error in its place.
async fn run_chunk<R: DeserializeOwned + Send + 'static>(
    shared: Arc<Shared>,
    name: String,
    encoded: Vec<Result<Vec<u8>>>,
) -> Vec<Result<R>> {
    let mut results: Vec<Option<Result<R>>> = Vec::with_capacity(encoded.len());
    let mut args = Vec::with_capacity(encoded.len());
    let mut positions = Vec::with_capacity(encoded.len());
    for (i, input) in encoded.into_iter().enumerate() {
        match input {
            Ok(bytes) => {
                positions.push(i);
                args.push(bytes);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if !args.is_empty() {
        let ran = shared.run_batch::<R>(&name, args, 0).await;
        for (i, result) in positions.into_iter().zip(ran) {
            results[i] = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(Error::TerminatedWorker)))
        .collect()
}

/// A request to a pool, not yet sent: await it (or call
/// [`retry`](Self::retry) first).
#[must_use = "a pool request does nothing until awaited"]
pub struct PoolCall<R> {
    shared: Arc<Shared>,
    request: Result<Request>,
    retries: u32,
    _result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for PoolCall<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCall")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl<R: DeserializeOwned + Send + 'static> PoolCall<R> {
    fn new(shared: &Arc<Shared>, request: Result<Request>) -> Self {
        PoolCall {
            shared: shared.clone(),
            request,
            retries: 0,
            _result: PhantomData,
        }
    }

    /// Marks the request idempotent: if its worker dies under it, it runs
    /// again on another worker, up to `times` more times.
    pub fn retry(mut self, times: u32) -> Self {
        self.retries = times;
        self
    }
}

impl<R: DeserializeOwned + Send + 'static> IntoFuture for PoolCall<R> {
    type Output = Result<R>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<R>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let request = self.request?;
            self.shared.run(&request, self.retries).await
        })
    }
}
