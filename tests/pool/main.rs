//! Pools: routing, ordering, back-pressure, supervision, and the
//! blocking facade, on real workers.

#[path = "../support/guests.rs"]
mod guests;

use std::time::{Duration, Instant};

use malt::{Error, Pool, RestartPolicy, Worker};

/// Waits (liveness, not speed) until `done` holds, or fails after 20 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sigkill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

#[tokio::test]
async fn an_ordered_map_of_ten_thousand_inputs_over_eight_workers() {
    let pool = Pool::builder(Worker::script())
        .size(8)
        .setup("fn inc(x) { x + 1 }")
        .spawn()
        .await
        .unwrap();
    let results: Vec<i64> = pool
        .map("inc", 0..10_000i64)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(results, (1..=10_000).collect::<Vec<i64>>());
    let stats = pool.stats();
    assert_eq!((stats.size, stats.alive, stats.done), (8, 8, 10_000));
    assert_eq!(stats.failed, 0);
    assert!(stats.p50.is_some() && stats.p50 <= stats.p99, "{stats:?}");
    pool.stop().await;
}

/// Several requests per worker: the next is already there when one ends;
/// the order of results and the bound on busy workers hold.
#[tokio::test]
async fn pipelined_workers_keep_the_order() {
    let pool = Pool::builder(Worker::wasm(guests::test_guest()))
        .size(2)
        .requests_per_worker(8)
        .spawn()
        .await
        .unwrap();
    let sums: Vec<i64> = pool
        .map("add", (0..5_000i64).map(|i| (i, 1)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sums, (1..=5_000).collect::<Vec<i64>>());
    let stats = pool.stats();
    assert_eq!(
        (stats.done, stats.busy, stats.alive),
        (5_000, 0, 2),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_streaming_map_keeps_input_order() {
    use futures_util::StreamExt;
    let pool = Pool::builder(Worker::wasm(guests::test_guest()))
        .size(3)
        .spawn()
        .await
        .unwrap();
    let inputs = futures_util::stream::iter((0..500i64).map(|i| (i, i)));
    let out: Vec<malt::Result<i64>> = pool.map_stream("add", inputs).collect().await;
    let out: Vec<i64> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(out, (0..500).map(|i| 2 * i).collect::<Vec<i64>>());
}

#[tokio::test]
async fn errors_stay_with_their_input() {
    let pool = Pool::builder(Worker::script())
        .size(2)
        .setup(r#"fn check(x) { if x % 3 == 0 { throw "bad " + x } x }"#)
        .spawn()
        .await
        .unwrap();
    let results: Vec<malt::Result<i64>> = pool.map("check", 1..=9i64).await;
    for (i, r) in (1..=9i64).zip(results) {
        match r {
            Ok(v) => assert_eq!(v, i),
            Err(Error::Remote(e)) => {
                assert_eq!(i % 3, 0);
                assert!(e.message.contains(&format!("bad {i}")), "{}", e.message);
            }
            Err(e) => panic!("{i}: {e}"),
        }
    }
}

/// With one worker and room for two waiting requests, never more than two
/// wait in the pool's queue: the other callers wait for room.
#[tokio::test]
async fn a_bounded_queue_pushes_back() {
    let pool = std::sync::Arc::new(
        Pool::builder(Worker::script())
            .size(1)
            .max_queued(2)
            .setup("fn nap() { sleep(0.05); 1 }")
            .spawn()
            .await
            .unwrap(),
    );
    let mut calls = Vec::new();
    for _ in 0..10 {
        let pool = pool.clone();
        calls.push(tokio::spawn(async move {
            pool.remote_call_fetch::<i64>("nap", ()).await
        }));
    }
    let mut peak = 0;
    until("every call is done", || {
        let s = pool.stats();
        peak = peak.max(s.queued);
        assert!(s.queued <= 2, "{s:?}");
        assert!(s.busy <= 1, "{s:?}");
        calls.iter().all(|c| c.is_finished())
    })
    .await;
    assert_eq!(peak, 2, "the queue filled up to its bound");
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 1);
    }
}

#[tokio::test]
async fn a_dead_worker_is_replaced_and_set_up_again() {
    let pool = Pool::builder(Worker::script())
        .size(2)
        .setup("fn answer() { 42 }")
        .spawn()
        .await
        .unwrap();
    pool.broadcast_eval("fn twice(x) { 2 * x }").await.unwrap();
    let victim = pool.worker_pids()[0];
    sigkill(victim);
    until("the worker is replaced", || {
        let s = pool.stats();
        s.restarts == 1 && s.alive == 2 && !pool.worker_pids().contains(&victim)
    })
    .await;
    // Every worker, the new one too, has the setup and the broadcast.
    for _ in 0..20 {
        let (a, t) = tokio::join!(
            pool.remote_call_fetch::<i64>("answer", ()),
            pool.remote_call_fetch::<i64>("twice", (21,))
        );
        assert_eq!((a.unwrap(), t.unwrap()), (42, 42));
    }
}

#[tokio::test]
async fn a_reset_guest_runs_the_setup_again() {
    let pool = Pool::builder(Worker::wasm(guests::test_guest()))
        .size(1)
        .spawn()
        .await
        .unwrap();
    // No setup: the worker is handed out again at once.
    assert_eq!(
        pool.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(),
        3
    );
    let trap = pool.remote_call_fetch::<()>("panic", ("boom",)).await;
    assert!(matches!(trap, Err(Error::Trap { .. })), "{trap:?}");
    assert_eq!(
        pool.remote_call_fetch::<i64>("add", (2, 2)).await.unwrap(),
        4
    );

    // Out of fuel: the guest's state is reset, and the setup runs again
    // before the worker's next request.
    let script = Pool::builder(Worker::script().fuel(50_000_000))
        .size(1)
        .setup("fn answer() { 42 }")
        .spawn()
        .await
        .unwrap();
    let spin = script.remote_eval_fetch::<i64>("loop { }").await;
    assert!(
        matches!(
            spin,
            Err(Error::LimitExceeded {
                limit: malt::Limit::Fuel,
                ..
            })
        ),
        "{spin:?}"
    );
    assert_eq!(
        script.remote_call_fetch::<i64>("answer", ()).await.unwrap(),
        42
    );
    assert_eq!(script.stats().resets, 1);
}

/// A map sends its inputs in chunks, run back to back in the worker. An
/// input that runs out of fuel (its guest is reset) ends its chunk; the
/// rest of the chunk runs after the setup code ran again; every input
/// keeps its own result, in order, chunked or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_stop_at_a_reset_and_go_on_after_the_setup() {
    let f = "fn f(x) { if x % 50 == 7 { loop { } } x * 2 }";
    let inputs: Vec<i64> = (0..400).collect();
    let check = |results: Vec<malt::Result<i64>>| {
        assert_eq!(results.len(), 400);
        for (x, result) in results.into_iter().enumerate() {
            match x % 50 {
                7 => assert!(
                    matches!(
                        result,
                        Err(Error::LimitExceeded {
                            limit: malt::Limit::Fuel,
                            ..
                        })
                    ),
                    "{x}: {result:?}"
                ),
                _ => assert_eq!(result.unwrap(), 2 * x as i64, "{x}"),
            }
        }
    };
    for chunk in [None, Some(1), Some(64)] {
        let mut builder = Pool::builder(Worker::script().fuel(20_000_000))
            .size(2)
            .setup(f);
        if let Some(n) = chunk {
            builder = builder.chunk_size(n);
        }
        let pool = builder.spawn().await.unwrap();
        check(pool.map("f", inputs.iter().map(|&x| (x,))).await);
        let stats = pool.stats();
        assert_eq!((stats.done, stats.failed), (392, 8), "{chunk:?}: {stats:?}");
        assert_eq!(
            stats.resets, 8,
            "{chunk:?}: the setup ran again after each reset"
        );
        // The stream form chunks what is ready.
        use futures_util::StreamExt;
        let streamed: Vec<malt::Result<i64>> = pool
            .map_stream(
                "f",
                futures_util::stream::iter(inputs.clone().into_iter().map(|x| (x,))),
            )
            .collect()
            .await;
        check(streamed);
        pool.stop().await;
    }
}

/// 20 SIGKILLs at random workers while 2 000 calls run, as the kernel's
/// OOM killer would do (CPython's Pool hangs then): every plain call is
/// its value or `TerminatedWorker`, every idempotent one its value, and
/// the map returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_during_a_map_never_hang_it() {
    let pool = std::sync::Arc::new(
        Pool::builder(Worker::script())
            .size(4)
            .setup("fn work(x) { let s = 0; for i in 0..2000 { s += i } x }")
            .restart_policy(
                RestartPolicy::new(100, Duration::from_secs(60))
                    .backoff(Duration::from_millis(1), Duration::from_millis(20)),
            )
            .spawn()
            .await
            .unwrap(),
    );
    let killer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut kills = 0;
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            while kills < 20 {
                tokio::time::sleep(Duration::from_millis(15)).await;
                let pids = pool.worker_pids();
                if pids.is_empty() {
                    continue;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                sigkill(pids[(seed % pids.len() as u64) as usize]);
                kills += 1;
            }
        })
    };
    let plain = pool.map::<_, i64>("work", 0..1000i64);
    let idempotent = async {
        let mut out = Vec::new();
        for chunk in (0..1000i64).collect::<Vec<_>>().chunks(50) {
            let calls = chunk
                .iter()
                .map(|&i| pool.call::<i64>("work", (i,)).retry(50).into_future());
            out.extend(futures_util::future::join_all(calls).await);
        }
        out
    };
    use std::future::IntoFuture;
    let (plain, idempotent) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(plain, idempotent)
    })
    .await
    .expect("the map returns");
    killer.await.unwrap();
    let mut terminated = 0;
    for (i, r) in plain.into_iter().enumerate() {
        match r {
            Ok(v) => assert_eq!(v, i as i64),
            Err(Error::TerminatedWorker) => terminated += 1,
            Err(e) => panic!("{i}: {e}"),
        }
    }
    for (i, r) in idempotent.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i64, "idempotent call {i}");
    }
    let stats = pool.stats();
    assert!(stats.restarts >= 1, "{stats:?}");
    eprintln!("{terminated} plain calls met a dead worker; {stats:?}");
}

/// A worker that cannot be replaced (its component is gone) is given up
/// after the policy's restarts: calls then fail with `PoolExhausted`,
/// nothing hangs, and the restarts stay bounded.
#[tokio::test]
async fn a_crash_loop_is_bounded_and_fails_calls() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("guest.wasm");
    std::fs::copy(guests::test_guest(), &copy).unwrap();
    let pool = Pool::builder(Worker::wasm(&copy))
        .size(2)
        .restart_policy(
            RestartPolicy::new(3, Duration::from_secs(60))
                .backoff(Duration::from_millis(1), Duration::from_millis(5)),
        )
        .spawn()
        .await
        .unwrap();
    std::fs::remove_file(&copy).unwrap();
    for pid in pool.worker_pids() {
        sigkill(pid);
    }
    until("both deaths are seen", || pool.stats().alive == 0).await;
    let call = tokio::time::timeout(
        Duration::from_secs(60),
        pool.remote_call_fetch::<i64>("add", (1, 2)),
    )
    .await
    .expect("a call on a pool with no worker left does not hang");
    assert!(matches!(call, Err(Error::PoolExhausted(_))), "{call:?}");
    let stats = pool.stats();
    assert_eq!((stats.alive, stats.restarts), (0, 6), "{stats:?}");
}

#[tokio::test]
async fn interrupt_all_stops_every_running_request() {
    let pool = Pool::builder(Worker::script())
        .size(2)
        .setup("fn spin() { loop { } }")
        .spawn()
        .await
        .unwrap();
    let a = pool.remote_call_fetch::<i64>("spin", ());
    let b = pool.remote_call_fetch::<i64>("spin", ());
    let interrupter = async {
        until("both workers are busy", || pool.stats().busy == 2).await;
        pool.interrupt_all();
    };
    let (a, b, ()) = tokio::join!(a, b, interrupter);
    assert!(matches!(a, Err(Error::Interrupted { .. })), "{a:?}");
    assert!(matches!(b, Err(Error::Interrupted { .. })), "{b:?}");
    assert_eq!(pool.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
}

#[tokio::test]
async fn stop_fails_what_waits_and_what_comes_after() {
    let pool = std::sync::Arc::new(
        Pool::builder(Worker::script())
            .size(1)
            .setup("fn nap() { sleep(0.2); 1 }")
            .spawn()
            .await
            .unwrap(),
    );
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.remote_call_fetch::<i64>("nap", ()).await })
        })
        .collect();
    until("calls are queued", || pool.stats().queued >= 1).await;
    pool.stop().await;
    for call in waiting {
        let r = call.await.unwrap();
        assert!(matches!(r, Ok(1) | Err(Error::TerminatedWorker)), "{r:?}");
    }
    assert!(matches!(
        pool.remote_call_fetch::<i64>("nap", ()).await,
        Err(Error::TerminatedWorker)
    ));
    assert!(pool.worker_pids().is_empty());
}

#[tokio::test]
async fn every_kind_of_worker_pools() {
    let add = "fn add(a, b) { a + b }";
    for (builder, setup) in [
        (Worker::script().in_process(), Some(add)),
        (Worker::native(), Some(add)),
        (Worker::wasm(guests::test_guest()), None),
    ] {
        let mut pool = Pool::builder(builder).size(2);
        if let Some(code) = setup {
            pool = pool.setup(code);
        }
        let pool = pool.spawn().await.unwrap();
        let sums: Vec<i64> = pool
            .map("add", (0..50i64).map(|i| (i, 1)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(sums, (1..=50).collect::<Vec<i64>>());
    }
}

#[test]
fn the_blocking_pool() {
    let pool = malt::blocking::Pool::builder(malt::blocking::Worker::script())
        .size(2)
        .setup("fn sq(x) { x * x }")
        .spawn()
        .unwrap();
    let out: Vec<i64> = pool
        .map("sq", 1..=5i64)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(out, vec![1, 4, 9, 16, 25]);
    assert_eq!(pool.call::<i64>("sq", (3,), 1).unwrap(), 9);
    assert_eq!(pool.remote_eval_fetch::<i64>("6 * 7").unwrap(), 42);
    pool.broadcast_eval("fn cube(x) { x * x * x }").unwrap();
    assert_eq!(pool.remote_call_fetch::<i64>("cube", (2,)).unwrap(), 8);
    assert_eq!(pool.stats().alive, 2);
    pool.stop();
}
