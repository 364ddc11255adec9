//! Interrupts, timeouts, stop and kill of a guest blocked inside a host
//! call rather than in its own code: a WASI clock wait
//! (`std::thread::sleep`), a poll on a pollable that never fires, and a
//! blocking read of a FIFO.
//!
//! A wasm guest wakes at once on an interrupt (the cooperative tier: a
//! guest that then checks `interrupted()` keeps its state); one that goes
//! on waiting is killed after the grace period wherever it is (the hard
//! tier: its state is reset, the worker lives on). A native guest blocked
//! in the OS can only be restarted: the hard tier, always.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use malt::{Error, Worker, WorkerChannel};
use serde::de::IgnoredAny;

use crate::common::{Kind, finishes, test_guest_worker};
use crate::conformance;
use crate::lifecycle::wait_gone;

conformance!(
    an_interrupt_wakes_a_guest_blocked_in_wasi,
    a_guest_that_goes_on_waiting_is_killed_and_reset,
    call_timeout_stops_a_guest_blocked_in_wasi,
    stop_and_kill_a_guest_blocked_in_wasi,
);

/// Where a guest blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// `std::thread::sleep` for ten minutes.
    Sleep,
    /// `wasi:io/poll.poll` on a pollable that never becomes ready.
    Poll,
    /// A read of a FIFO that nobody writes to (native only: in a wasm
    /// guest such a read does not wait, see below).
    Fifo,
}

impl Block {
    /// The ways a guest of this kind can block.
    fn all(kind: Kind) -> &'static [Block] {
        if kind.is_wasm() {
            &[Block::Sleep, Block::Poll]
        } else {
            // No WASI natively: the sleep and the read are the OS's own.
            &[Block::Sleep, Block::Fifo]
        }
    }
}

/// A test guest worker, with a FIFO granted at `/fifo/f`.
struct Blocked {
    w: Worker,
    started: WorkerChannel<i64>,
    /// Kept open read-write, so the guest's open does not wait for a
    /// writer and its read waits for data that never comes.
    fifo: std::fs::File,
    fifo_path: String,
    _dir: tempfile::TempDir,
}

impl Blocked {
    async fn spawn(
        kind: Kind,
        configure: impl FnOnce(malt::WorkerBuilder) -> malt::WorkerBuilder,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let builder = test_guest_worker(kind).interrupt_grace(Duration::from_millis(100));
        let (builder, fifo_path) = if kind.is_wasm() {
            (builder.dir(dir.path(), "/fifo"), "/fifo/f".to_string())
        } else {
            (builder, path.to_string_lossy().into_owned())
        };
        let w = configure(builder)
            .spawn()
            .await
            .expect("spawn the test guest");
        let started = w.worker_channel::<i64>("started", 1).await.unwrap();
        Blocked {
            w,
            started,
            fifo,
            fifo_path,
            _dir: dir,
        }
    }

    /// Starts a call that blocks, and waits until the guest is in it.
    async fn block(&self, block: Block, obey: bool) -> malt::CallHandle<IgnoredAny> {
        let call = match block {
            Block::Sleep => self.w.remote_call("wasi_sleep", (600_000u64, obey)),
            Block::Poll => self.w.remote_call("wasi_poll", (obey,)),
            Block::Fifo => self.w.remote_call("fifo_read", (&self.fifo_path, obey)),
        };
        let started = finishes("the blocking call to start", self.started.take()).await;
        assert_eq!(started.unwrap(), 1, "{block:?}");
        // The guest announced itself just before it blocks: give it the
        // moment to get there (if not, it wakes to the interrupt anyway).
        tokio::time::sleep(Duration::from_millis(20)).await;
        call
    }

    async fn bump(&self) -> u64 {
        finishes("bump", self.w.remote_call_fetch::<u64>("bump", ()))
            .await
            .expect("the worker answers")
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // Release a read the hard tier abandoned (it sits on a thread of
        // the host's blocking pool until the FIFO has data).
        use std::io::Write;
        let _ = (&self.fifo).write_all(&[0; 256]);
    }
}

async fn an_interrupt_wakes_a_guest_blocked_in_wasi(kind: Kind) {
    let b = Blocked::spawn(kind, |b| b).await;
    let mut count = 0;
    for &block in Block::all(kind) {
        count = b.bump().await;
        let call = b.block(block, true).await;
        b.w.interrupt().unwrap();
        let err = finishes("the interrupted call", call).await.unwrap_err();
        // Natively the OS wait cannot be woken: the worker restarts.
        let state_lost = !kind.is_wasm();
        assert!(
            matches!(err, Error::Interrupted { state_lost: s, .. } if s == state_lost),
            "{block:?}: {err:?}"
        );
        let after = b.bump().await;
        if state_lost {
            assert_eq!(after, 1, "{block:?}: a restarted guest starts over");
        } else {
            assert_eq!(after, count + 1, "{block:?}: the guest keeps its state");
        }
        count = after;
    }
    assert!(count > 0);
    b.w.stop().await.unwrap();
}

async fn a_guest_that_goes_on_waiting_is_killed_and_reset(kind: Kind) {
    let b = Blocked::spawn(kind, |b| b).await;
    for &block in Block::all(kind) {
        assert!(b.bump().await >= 1);
        let call = b.block(block, false).await;
        let queued = b.w.remote_call::<i64>("add", (2, 3));
        b.w.interrupt().unwrap();
        let err = finishes("the killed call", call).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    state_lost: true,
                    ..
                }
            ),
            "{block:?}: {err:?}"
        );
        // The worker lives on: the queued request runs on a fresh guest.
        assert_eq!(finishes("the queued call", queued).await.unwrap(), 5);
        assert_eq!(b.bump().await, 1, "{block:?}: the state was reset");
        assert!(b.w.is_running());
    }
    b.w.stop().await.unwrap();
}

async fn call_timeout_stops_a_guest_blocked_in_wasi(kind: Kind) {
    let b = Blocked::spawn(kind, |b| b.call_timeout(Duration::from_millis(300))).await;
    for &block in Block::all(kind) {
        for obey in [true, false] {
            let call = b.block(block, obey).await;
            let err = finishes("the timed-out call", call).await.unwrap_err();
            assert!(matches!(err, Error::Timeout), "{block:?}, {obey}: {err:?}");
            assert_eq!(
                finishes("the next call", b.w.remote_call_fetch::<i64>("add", (1, 2)))
                    .await
                    .unwrap(),
                3,
                "{block:?}: the worker keeps answering"
            );
        }
    }
    b.w.stop().await.unwrap();
}

async fn stop_and_kill_a_guest_blocked_in_wasi(kind: Kind) {
    for &block in Block::all(kind) {
        for kill in [false, true] {
            let b = Blocked::spawn(kind, |b| b).await;
            let call = b.block(block, false).await;
            let pid = b.w.pid();
            if kill {
                b.w.kill();
            } else {
                finishes("stop", b.w.stop()).await.unwrap();
            }
            let err = finishes("the call on a stopped worker", call)
                .await
                .unwrap_err();
            assert!(err.is_terminated(), "{block:?}, kill {kill}: {err:?}");
            finishes("the worker to end", b.w.wait()).await;
            assert!(!b.w.is_running());
            if kind.has_process() {
                assert!(wait_gone(pid).await, "{block:?}: the host process is gone");
            }
        }
    }
}

crate::conformance_wasm!(
    a_fifo_read_does_not_block_a_wasm_guest,
    a_start_that_never_returns_fails_the_spawn,
    a_restart_that_never_returns_ends_the_worker,
);

/// wasmtime-wasi reads files with `pread`: a granted FIFO nobody writes to
/// reads as its end, at once. So the sandbox has no blocking read to wake
/// (and if a wasmtime upgrade changed that, this test would hang and fail).
async fn a_fifo_read_does_not_block_a_wasm_guest(kind: Kind) {
    let b = Blocked::spawn(kind, |b| b).await;
    let read = b.w.remote_call::<usize>("fifo_read", (&b.fifo_path, false));
    assert_eq!(finishes("the FIFO read", read).await.unwrap(), 0);
    b.w.stop().await.unwrap();
}

async fn a_start_that_never_returns_fails_the_spawn(kind: Kind) {
    for start in ["loop", "sleep"] {
        let spawned = test_guest_worker(kind)
            .env("MALT_TEST_START", start)
            // The host's own start limit is a quarter shorter, so its
            // message wins even on a loaded machine.
            .spawn_timeout(Duration::from_secs(4))
            .spawn();
        let err = finishes("the spawn", spawned).await.unwrap_err();
        let Error::Spawn { message, .. } = &err else {
            panic!("{start}: expected a spawn error, got {err:?}")
        };
        assert!(
            message.contains("did not start within") && message.contains("start function"),
            "{start}: the error says what happened: {message}"
        );
    }
}

async fn a_restart_that_never_returns_ends_the_worker(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let w = test_guest_worker(kind)
        .dir(dir.path(), "/d")
        .env("MALT_TEST_START", "again:/d/started")
        .spawn_timeout(Duration::from_secs(2))
        .monitor_output(false)
        .spawn()
        .await
        .expect("the first start succeeds");
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
    // The trap is answered; the restart that follows spins, is killed by
    // the start timeout, and the worker ends (it has no guest to run).
    let err = w
        .remote_call_fetch::<()>("panic", ("boom",))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Trap { .. }), "{err:?}");
    finishes("the worker to end", w.wait()).await;
    assert!(!w.is_running());
    let reason = w.termination_reason().expect("the host said why it ended");
    assert!(reason.contains("did not restart within"), "{reason}");
    let err = w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
}
