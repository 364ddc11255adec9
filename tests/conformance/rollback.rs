//! Rollback (`WorkerBuilder::rollback`): a request that has to be killed
//! leaves the guest as it was before that request, and the worker serves
//! on: queued requests, channels, its process, its end.

use std::time::Duration;

use malt::{Error, Worker};

use crate::common::{finishes, test_guest};
use crate::lifecycle::{process_alive, wait_gone};
use crate::procs::children;

/// A test-guest worker that rolls back, with a short grace period (the
/// spin never polls for an interrupt: only a kill stops it).
fn rolling_back() -> malt::WorkerBuilder {
    Worker::wasm(test_guest())
        .interrupt_grace(Duration::from_millis(50))
        .rollback(true)
}

/// Runs the spin and kills it: the error it ends with.
async fn kill_a_spin(w: &Worker, started: &malt::WorkerChannel<i64>) -> Error {
    let spinning = w.remote_call::<()>("spin", ());
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    finishes("the killed request", spinning).await.unwrap_err()
}

/// Killed and reset, as without rollback.
fn is_reset(err: &Error) -> bool {
    matches!(
        err,
        Error::Interrupted {
            state_lost: true,
            rolled_back: false
        }
    )
}

fn is_rolled_back(err: &Error) -> bool {
    matches!(
        err,
        Error::Interrupted {
            state_lost: false,
            rolled_back: true
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_request_leaves_the_guest_as_it_was_and_the_queue_runs() {
    let w = rolling_back().spawn().await.unwrap();
    let host = w.host_pid();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 1);
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 2);
    // Sent behind the spin: read by the host that gets killed, run by
    // the one that takes over.
    let spinning = w.remote_call::<()>("spin", ());
    let queued_add = w.remote_call::<i64>("add", (2, 3));
    let queued_bump = w.remote_call::<u64>("bump", ());
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let err = finishes("the killed request", spinning).await.unwrap_err();
    assert!(is_rolled_back(&err), "{err:?}");
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert_eq!(finishes("queued", queued_add).await.unwrap(), 5);
    // Without rollback the guest would start over: 1.
    assert_eq!(finishes("queued", queued_bump).await.unwrap(), 3);
    assert!(w.is_running());
    assert_eq!(w.host_pid(), host, "the worker's process stays the same");
    // The host that took over rolls back too.
    let err = kill_a_spin(&w, &started).await;
    assert!(is_rolled_back(&err), "{err:?}");
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 4);
    w.stop().await.unwrap();
    assert!(wait_gone(host).await, "the worker's process ends at stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_rolls_back_too() {
    let w = rolling_back()
        .call_timeout(Duration::from_millis(300))
        .spawn()
        .await
        .unwrap();
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 1);
    let err = finishes("the spin", w.remote_call_fetch::<()>("spin", ()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_keep_what_they_hold_across_a_rollback() {
    let w = rolling_back().spawn().await.unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let inbox = w.worker_channel::<i64>("inbox", 8).await.unwrap();
    finishes("a put", inbox.put(1)).await.unwrap();
    let spinning = w.remote_call::<()>("spin", ());
    finishes("the spin to start", started.take()).await.unwrap();
    // Put while the request that gets killed runs, after the snapshot.
    finishes("a put", inbox.put(2)).await.unwrap();
    // A take that waits in the host when the stream changes hands.
    let outbox = w.worker_channel::<i64>("outbox", 8).await.unwrap();
    let waiting = outbox.take();
    w.interrupt().unwrap();
    let err = finishes("the killed request", spinning).await.unwrap_err();
    assert!(is_rolled_back(&err), "{err:?}");
    assert_eq!(finishes("a take", inbox.take()).await.unwrap(), 1);
    assert_eq!(finishes("a take", inbox.take()).await.unwrap(), 2);
    // The guest relays one value to the waiting take.
    finishes("a put", inbox.put(7)).await.unwrap();
    let relayed = w.remote_call_fetch::<i64>("relay", ("inbox", "outbox"));
    assert_eq!(finishes("the relay", relayed).await.unwrap(), 7);
    assert_eq!(finishes("the waiting take", waiting).await.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_process_outlives_a_worker_that_rolled_back() {
    let w = rolling_back().spawn().await.unwrap();
    let keeper = w.host_pid();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 1)).await.unwrap(), 2);
    let err = kill_a_spin(&w, &started).await;
    assert!(is_rolled_back(&err), "{err:?}");
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
    // The keeper, its serving host, and that host's snapshot.
    let (serving, snapshot) = the_snapshot(keeper, None).await;
    w.kill();
    for pid in [keeper, serving, snapshot] {
        assert!(wait_gone(pid).await, "process {pid} ended with the worker");
    }
    assert!(!process_alive(keeper));
}

/// Waits for the serving host's one snapshot, other than `not` (a
/// snapshot is forked after a reply; the one before it then exits):
/// (serving host, snapshot).
async fn the_snapshot(keeper: u32, not: Option<u32>) -> (u32, u32) {
    finishes("one snapshot", async {
        loop {
            if let [serving] = children(keeper)[..]
                && let [snapshot] = children(serving)[..]
                && Some(snapshot) != not
            {
                return (serving, snapshot);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_snapshot_died_resets_and_loses_no_request() {
    let w = rolling_back().spawn().await.unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let (_, fresh) = the_snapshot(w.host_pid(), None).await;
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 1);
    // The snapshot taken after the bump, not the one of the fresh guest.
    let (_, snapshot) = the_snapshot(w.host_pid(), Some(fresh)).await;
    // SAFETY: a signal to a process of this test's own worker.
    assert_eq!(unsafe { libc::kill(snapshot as i32, libc::SIGKILL) }, 0);
    assert!(wait_gone(snapshot).await);
    let spinning = w.remote_call::<()>("spin", ());
    let queued = w.remote_call::<i64>("add", (2, 3));
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let err = finishes("the killed request", spinning).await.unwrap_err();
    assert!(is_reset(&err), "{err:?}");
    // The request the failed hand-over had taken from the queue runs.
    assert_eq!(finishes("queued", queued).await.unwrap(), 5);
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 1);
    // And the next kill rolls back again.
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 2);
    let err = kill_a_spin(&w, &started).await;
    assert!(is_rolled_back(&err), "{err:?}");
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 3);
}

/// A kill among requests a failed hand-over gave back: the ones after it
/// are handed over too and run once, on the rolled-back guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_given_back_by_a_failed_hand_over_run_once_after_a_rollback() {
    let w = rolling_back().spawn().await.unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let (_, snapshot) = the_snapshot(w.host_pid(), None).await;
    // SAFETY: a signal to a process of this test's own worker.
    assert_eq!(unsafe { libc::kill(snapshot as i32, libc::SIGKILL) }, 0);
    assert!(wait_gone(snapshot).await);
    let first = w.remote_call::<()>("spin", ());
    let second = w.remote_call::<()>("spin", ());
    let bumped = w.remote_call::<u64>("bump", ());
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let err = finishes("the first spin", first).await.unwrap_err();
    assert!(is_reset(&err), "{err:?}");
    // The second spin and the bump were given back; the second runs on a
    // fresh guest, with a snapshot taken before it.
    finishes("the second spin to start", started.take())
        .await
        .unwrap();
    w.interrupt().unwrap();
    let err = finishes("the second spin", second).await.unwrap_err();
    assert!(is_rolled_back(&err), "{err:?}");
    assert_eq!(finishes("the bump", bumped).await.unwrap(), 1);
    assert_eq!(w.remote_call_fetch::<u64>("bump", ()).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_refused_where_the_host_cannot_fork_itself() {
    for builder in [
        Worker::script().in_process().rollback(true),
        Worker::native().rollback(true),
    ] {
        let err = builder.spawn().await.unwrap_err();
        assert!(err.to_string().contains("rollback needs"), "{err}");
    }
}
