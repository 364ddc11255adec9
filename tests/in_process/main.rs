//! An in-process worker leaves nothing behind in its manager: after
//! `kill`, `stop` or drop, none of its threads (host reader, guest, timer,
//! the guest's WASI pool) outlives it, even when its guest was blocked in
//! a host call or spinning without polling for interrupts.
//!
//! A test binary of its own, with one test: it counts the threads of the
//! process, so no other test may start or end any meanwhile.

#[path = "../support/guests.rs"]
mod guests;

use std::time::{Duration, Instant};

use malt::Worker;

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = malt::Result<()>> + Send>>;

/// Threads of this process that malt started: its own are all named
/// `malt-…` (the test's tokio runtime has its own threads, which come and
/// go with its blocking pool).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("malt-"))
        .count()
}

/// Waits (liveness, not speed) until at most `limit` threads are left.
async fn settle_to(limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = threads();
        if now <= limit || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_thread_outlives_an_in_process_worker() {
    let guest = guests::test_guest();
    // The first worker compiles the guest (wasmtime's compile pool stays):
    // start and stop one before counting.
    let w = Worker::wasm(&guest).in_process().spawn().await.unwrap();
    w.stop().await.unwrap();
    let before = settle_to(0).await;
    assert_eq!(before, 0, "a stopped in-process worker leaves no thread");

    let mut workers = Vec::new();
    for i in 0..20 {
        let w = Worker::wasm(&guest)
            .in_process()
            .interrupt_grace(Duration::from_millis(50))
            .spawn()
            .await
            .unwrap();
        let started = w.worker_channel::<i64>("started", 1).await.unwrap();
        // Blocked in WASI, or spinning in wasm code: both must be killed.
        let call: Call = if i % 2 == 0 {
            let sleeping = w.remote_call::<bool>("wasi_sleep", (600_000u64, false));
            Box::pin(async move { sleeping.await.map(|_| ()) })
        } else {
            Box::pin(w.remote_call::<()>("spin", ()))
        };
        assert_eq!(started.take().await.unwrap(), 1);
        workers.push((w, call));
    }
    assert!(
        threads() > before,
        "the workers run threads of this process"
    );
    for (i, (w, call)) in workers.into_iter().enumerate() {
        match i % 3 {
            0 => w.kill(),
            1 => {
                w.stop().await.unwrap();
            }
            _ => drop(w),
        }
        let err = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("the call ends with its worker")
            .unwrap_err();
        assert!(err.is_terminated(), "{err:?}");
    }
    let after = settle_to(before).await;
    assert!(
        after <= before,
        "{after} threads after 20 in-process workers ended, {before} before"
    );
}
