//! The pool's insides: which worker is free, who waits, and the
//! supervisors that replace dead workers.
//!
//! Each slot holds at most one worker, tagged with a generation that grows
//! with every replacement. The free list holds `(slot, generation)`
//! tickets; a ticket whose generation is no longer the slot's (its worker
//! died since) is thrown away when drawn, so a dead worker is never handed
//! out twice and a replaced one never appears twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use super::RestartPolicy;
use super::stats::{PoolStats, Recorder};
use crate::error::{Error, Limit, Result};
use crate::protocol::ReplyMode;
use crate::{Worker, WorkerBuilder};

/// What a pool request asks of a worker.
pub(crate) enum Request {
    /// A function call with its encoded arguments.
    Call { name: String, args: Vec<u8> },
    /// Code to evaluate.
    Eval(String),
}

type Ticket = (usize, u64);

struct Slot {
    worker: Mutex<Option<(u64, Arc<Worker>)>>,
}

impl Slot {
    fn current(&self) -> Option<(u64, Arc<Worker>)> {
        self.worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) struct Shared {
    builder: WorkerBuilder,
    slots: Vec<Slot>,
    free: Mutex<VecDeque<Ticket>>,
    /// Woken when a ticket is added or the pool's state changes.
    wake: Notify,
    /// Room for requests running or queued: back-pressure beyond it.
    room: Semaphore,
    /// Setup code, then every broadcast: run in each new worker.
    setup: Mutex<Vec<String>>,
    policy: RestartPolicy,
    closed: AtomicBool,
    /// Slots whose worker the pool gave up.
    given_up: AtomicUsize,
    /// Tickets per worker: requests it may hold at once.
    per_worker: usize,
    queued: AtomicUsize,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
    pub(super) recorder: Recorder,
}

impl Shared {
    pub(crate) async fn start(
        builder: WorkerBuilder,
        size: usize,
        setup: Vec<String>,
        max_queued: usize,
        per_worker: usize,
        policy: RestartPolicy,
    ) -> Result<Arc<Shared>> {
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..size {
            let (builder, setup) = (builder.clone(), setup.clone());
            starting.spawn(async move { (i, start_worker(builder, &setup).await) });
        }
        let mut workers: Vec<Option<Worker>> = (0..size).map(|_| None).collect();
        while let Some(joined) = starting.join_next().await {
            let (i, started) = joined
                .map_err(|e| Error::Component(format!("starting a pool worker panicked: {e}")))?;
            workers[i] = Some(started?);
        }
        let room = size
            .saturating_mul(per_worker)
            .saturating_add(max_queued)
            .min(Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            builder,
            slots: (0..size)
                .map(|_| Slot {
                    worker: Mutex::new(None),
                })
                .collect(),
            free: Mutex::new(VecDeque::with_capacity(size)),
            wake: Notify::new(),
            room: Semaphore::new(room),
            setup: Mutex::new(setup),
            policy,
            closed: AtomicBool::new(false),
            given_up: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            per_worker,
            supervisors: Mutex::new(Vec::with_capacity(size)),
            recorder: Recorder::default(),
        });
        for (i, worker) in workers.into_iter().enumerate() {
            let worker = worker.expect("every slot started");
            *lock(&shared.slots[i].worker) = Some((0, Arc::new(worker)));
        }
        // Seat by seat: the first requests spread over every worker.
        for _ in 0..per_worker {
            for i in 0..size {
                shared.free_ticket((i, 0));
            }
        }
        for i in 0..size {
            let task = tokio::spawn(supervise(shared.clone(), i, 0));
            lock(&shared.supervisors).push(task);
        }
        Ok(shared)
    }

    pub(crate) fn size(&self) -> usize {
        self.slots.len()
    }

    /// Requests the workers may hold at once.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len() * self.per_worker
    }

    fn free_ticket(&self, ticket: Ticket) {
        lock(&self.free).push_back(ticket);
        self.wake.notify_one();
    }

    /// Waits for an idle worker.
    async fn acquire(&self) -> Result<(Ticket, Arc<Worker>)> {
        // Counted as queued while it waits (`stats`).
        self.queued.fetch_add(1, Ordering::Relaxed);
        let acquired = self.acquire_uncounted().await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        acquired
    }

    async fn acquire_uncounted(&self) -> Result<(Ticket, Arc<Worker>)> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::TerminatedWorker);
            }
            while let Some(ticket) = lock(&self.free).pop_front() {
                match self.slots[ticket.0].current() {
                    Some((generation, worker)) if generation == ticket.1 && worker.is_running() => {
                        return Ok((ticket, worker));
                    }
                    // Its worker died since: the ticket is void (its
                    // supervisor hands out the replacement's).
                    _ => continue,
                }
            }
            if self.given_up.load(Ordering::Acquire) == self.slots.len() {
                return Err(Error::PoolExhausted(
                    "every worker died more often than the restart policy allows".into(),
                ));
            }
            notified.await;
        }
    }

    /// Runs a request on idle workers until it has a result (retrying it
    /// on another worker, if allowed, when its worker dies under it).
    pub(crate) async fn run<R: DeserializeOwned>(
        self: &Arc<Self>,
        request: &Request,
        retries: u32,
    ) -> Result<R> {
        let _room = self
            .room
            .acquire()
            .await
            .map_err(|_| Error::TerminatedWorker)?;
        let mut attempt = 0;
        loop {
            let acquired = self.acquire().await;
            let (ticket, worker) = acquired?;
            let started = Instant::now();
            let result: Result<R> = match request {
                Request::Call { name, args } => {
                    worker
                        .call_encoded(name, args.clone(), ReplyMode::Value)
                        .await
                }
                Request::Eval(code) => worker.remote_eval(code).await,
            };
            self.recorder.record(started.elapsed(), result.is_ok());
            self.release(ticket, &worker, result.as_ref().err());
            match result {
                Err(Error::TerminatedWorker)
                    if attempt < retries && !self.closed.load(Ordering::Acquire) =>
                {
                    attempt += 1;
                    self.recorder.retried();
                }
                other => return other,
            }
        }
    }

    /// Runs a batch of calls of `name` (encoded argument arrays) on idle
    /// workers, one request per worker turn, and returns one result per
    /// input, in order. A batch that stopped early (an input trapped, was
    /// interrupted or hit a limit) goes on with the rest on the next idle
    /// worker; a worker that dies under a batch fails what it had not
    /// answered with `TerminatedWorker` (retried first, if allowed).
    pub(crate) async fn run_batch<R: DeserializeOwned>(
        self: &Arc<Self>,
        name: &str,
        args: Vec<Vec<u8>>,
        retries: u32,
    ) -> Vec<Result<R>> {
        let mut out = Vec::with_capacity(args.len());
        let Ok(_room) = self.room.acquire().await else {
            out.extend(args.iter().map(|_| Err(Error::TerminatedWorker)));
            return out;
        };
        let mut rest = args;
        let mut attempt = 0;
        while !rest.is_empty() {
            let acquired = self.acquire().await;
            let (ticket, worker) = match acquired {
                Ok(acquired) => acquired,
                Err(e) => {
                    out.extend(rest.iter().map(|_| Err(e.duplicate())));
                    return out;
                }
            };
            let started = Instant::now();
            let n = rest.len();
            let result = worker.call_batch::<R>(name, rest.clone()).await;
            let took = started.elapsed() / n as u32;
            match result {
                Ok(items) => {
                    let done = items.len();
                    let last = items
                        .last()
                        .and_then(|r| r.as_ref().err())
                        .map(Error::duplicate);
                    for item in &items {
                        self.recorder.record(took, item.is_ok());
                    }
                    self.release(ticket, &worker, last.as_ref());
                    out.extend(items);
                    rest.drain(..done.min(n));
                    if done == 0 {
                        // Nothing ran (the host answered with no result):
                        // never spin on it.
                        out.extend(rest.drain(..).map(|_| {
                            Err(Error::Invalid {
                                worker: worker.name().to_string(),
                                message: "the host answered a batch with no result".into(),
                            })
                        }));
                    }
                }
                Err(e) => {
                    self.release(ticket, &worker, Some(&e));
                    if e.is_terminated()
                        && attempt < retries
                        && !self.closed.load(Ordering::Acquire)
                    {
                        attempt += 1;
                        self.recorder.retried();
                        continue;
                    }
                    for _ in 0..n {
                        self.recorder.record(took, false);
                    }
                    out.extend(rest.drain(..).map(|_| Err(e.duplicate())));
                }
            }
        }
        out
    }

    /// Gives a worker back after a request: at once if its state is
    /// intact, after running the setup code again if its state was reset,
    /// not at all if it died (its supervisor replaces it).
    fn release(self: &Arc<Self>, ticket: Ticket, worker: &Arc<Worker>, error: Option<&Error>) {
        if !worker.is_running() {
            return;
        }
        let state_lost = matches!(
            error,
            Some(
                Error::Trap { .. }
                    | Error::Timeout
                    | Error::Interrupted {
                        state_lost: true,
                        ..
                    }
                    | Error::LimitExceeded {
                        limit: Limit::Memory | Limit::Fuel,
                        ..
                    }
            )
        );
        let setup = match state_lost {
            true => lock(&self.setup).clone(),
            false => Vec::new(),
        };
        if setup.is_empty() {
            self.free_ticket(ticket);
            return;
        }
        self.recorder.reset();
        let (shared, worker) = (self.clone(), worker.clone());
        tokio::spawn(async move {
            match run_setup(&worker, &setup).await {
                Ok(()) => shared.free_ticket(ticket),
                Err(e) => {
                    tracing::warn!("pool: {}: setup failed after a reset: {e}", worker.name());
                    // Its supervisor starts a new one.
                    worker.kill();
                }
            }
        });
    }

    pub(crate) async fn broadcast(&self, code: &str) -> Result<()> {
        lock(&self.setup).push(code.to_string());
        let workers: Vec<Arc<Worker>> = self
            .slots
            .iter()
            .filter_map(|s| s.current().map(|(_, w)| w))
            .collect();
        let mut first_error = None;
        for handle in workers
            .iter()
            .map(|w| w.remote_eval::<serde::de::IgnoredAny>(code))
            .collect::<Vec<_>>()
        {
            if let Err(e) = handle.await
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub(crate) fn interrupt_all(&self) {
        for slot in &self.slots {
            if let Some((_, worker)) = slot.current() {
                let _ = worker.interrupt();
            }
        }
    }

    /// Ends the pool: no more requests, waiters fail, supervisors end.
    /// Returns the workers, for the caller to kill or stop.
    fn shut(&self) -> Vec<Arc<Worker>> {
        self.closed.store(true, Ordering::Release);
        self.room.close();
        self.wake.notify_waiters();
        for task in lock(&self.supervisors).drain(..) {
            task.abort();
        }
        self.slots
            .iter()
            .filter_map(|s| lock(&s.worker).take().map(|(_, w)| w))
            .collect()
    }

    pub(crate) fn close(&self) {
        for worker in self.shut() {
            worker.kill();
        }
    }

    pub(crate) async fn stop(&self) {
        for worker in self.shut() {
            let _ = worker.stop().await;
        }
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|s| s.current())
            .filter(|(_, w)| w.is_running())
            .map(|(_, w)| w.pid())
            .collect()
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let alive = self
            .slots
            .iter()
            .filter(|s| s.current().is_some_and(|(_, w)| w.is_running()))
            .count();
        // A worker is idle when all its tickets are free.
        let mut free_seats = vec![0; self.slots.len()];
        for (i, g) in lock(&self.free).iter() {
            if self.slots[*i].current().is_some_and(|(cur, _)| cur == *g) {
                free_seats[*i] += 1;
            }
        }
        let idle = free_seats.iter().filter(|&&n| n >= self.per_worker).count();
        self.recorder.stats(
            self.slots.len(),
            alive,
            alive.saturating_sub(idle),
            self.queued.load(Ordering::Relaxed),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_setup(worker: &Worker, setup: &[String]) -> Result<()> {
    for code in setup {
        worker.remote_eval_wait(code).await?;
    }
    Ok(())
}

async fn start_worker(builder: WorkerBuilder, setup: &[String]) -> Result<Worker> {
    let worker = builder.spawn().await?;
    if let Err(e) = run_setup(&worker, setup).await {
        worker.kill();
        return Err(e);
    }
    Ok(worker)
}

/// Watches slot `i`: when its worker ends, starts another after a backoff,
/// until the restart policy gives the slot up.
async fn supervise(shared: Arc<Shared>, i: usize, mut generation: u64) {
    let policy = shared.policy.clone();
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        if let Some((_, worker)) = shared.slots[i].current() {
            worker.wait().await;
        }
        // The slot is empty until a replacement is in: tickets of the dead
        // worker match nothing.
        lock(&shared.slots[i].worker).take();
        loop {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            while restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > policy.window)
            {
                restarts.pop_front();
            }
            if restarts.len() >= policy.max_restarts as usize {
                tracing::error!(
                    "pool: worker slot {i} was replaced {} times within {:?}; giving it up",
                    restarts.len(),
                    policy.window
                );
                shared.given_up.fetch_add(1, Ordering::AcqRel);
                shared.wake.notify_waiters();
                return;
            }
            tokio::time::sleep(backoff(&policy, restarts.len())).await;
            restarts.push_back(Instant::now());
            shared.recorder.restarted();
            let setup = lock(&shared.setup).clone();
            match start_worker(shared.builder.clone(), &setup).await {
                Ok(worker) if shared.closed.load(Ordering::Acquire) => {
                    worker.kill();
                    return;
                }
                Ok(worker) => {
                    generation += 1;
                    *lock(&shared.slots[i].worker) = Some((generation, Arc::new(worker)));
                    for _ in 0..shared.per_worker {
                        shared.free_ticket((i, generation));
                    }
                    break;
                }
                Err(e) => tracing::warn!("pool: cannot replace worker slot {i}: {e}"),
            }
        }
    }
}

/// The wait before the `n`th restart within the window: doubling from the
/// initial backoff, capped, with ±50 % jitter so that workers killed
/// together do not all come back in the same instant.
fn backoff(policy: &RestartPolicy, n: usize) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let base = policy
        .initial_backoff
        .saturating_mul(1u32 << n.min(20))
        .min(policy.max_backoff);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(n);
    let jitter = 0.5 + (hasher.finish() % 1000) as f64 / 1000.0;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let policy =
            RestartPolicy::default().backoff(Duration::from_millis(10), Duration::from_millis(100));
        for n in 0..10 {
            let base = Duration::from_millis(10 * (1 << n)).min(Duration::from_millis(100));
            let wait = backoff(&policy, n);
            assert!(wait >= base / 2 && wait <= base * 3 / 2, "{n}: {wait:?}");
        }
    }
}
