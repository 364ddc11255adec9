//! Crash detection, kill, limits that reset a guest, and no orphans.

use std::time::{Duration, Instant};

use malt::{Error, Limit, Worker};

use crate::common::{Kind, finishes, test_guest_worker};
use crate::{conformance, conformance_python, conformance_ssh, conformance_wasm};

conformance!(
    sigkill_mid_call_fails_pending_calls,
    kill_fails_pending_calls,
    a_guest_that_ignores_the_interrupt_is_reset,
    a_trap_resets_the_guest,
    large_values_round_trip,
    dropping_the_handle_kills_the_worker,
);

conformance_ssh!(
    sigkill_mid_call_fails_pending_calls,
    kill_fails_pending_calls,
    a_guest_that_ignores_the_interrupt_is_reset,
    a_trap_resets_the_guest,
    large_values_round_trip,
    dropping_the_handle_kills_the_worker,
);

// The rest is the test guest's (Rust) behavior; tests/python has the
// Python guest's traps, limits and kills.
conformance_python!(
    sigkill_mid_call_fails_pending_calls,
    kill_fails_pending_calls,
    dropping_the_handle_kills_the_worker,
);

// The wasm sandbox's limits (a native worker has only the process wall).
conformance_wasm!(memory_limit_is_enforced, fuel_limits_a_request);

pub(crate) use crate::procs::alive as process_alive;

pub(crate) async fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn sigkill_mid_call_fails_pending_calls(kind: Kind) {
    let w = kind.spawn().await;
    let calls: Vec<_> = (0..10)
        .map(|_| w.remote_eval::<()>("sleep(1000)"))
        .collect();
    let queued = w.remote_eval::<()>("0");
    tokio::time::sleep(Duration::from_millis(20)).await;
    if kind.has_process() {
        // SAFETY: kill(2) on the worker's own pid.
        unsafe { libc::kill(w.pid() as i32, libc::SIGKILL) };
    } else {
        // An in-process worker has no process to crash: kill it.
        w.kill();
    }
    let started = Instant::now();
    for call in calls {
        let err = finishes("a pending call", call).await.unwrap_err();
        assert!(err.is_terminated(), "{err:?}");
    }
    assert!(
        finishes("the queued call", queued)
            .await
            .unwrap_err()
            .is_terminated()
    );
    eprintln!("pending calls failed {:?} after SIGKILL", started.elapsed());
    assert!(!w.is_running());
    assert!(
        !w.stop().await.unwrap(),
        "stop on a dead worker returns false"
    );
    assert!(
        w.remote_eval_fetch::<i64>("1")
            .await
            .unwrap_err()
            .is_terminated()
    );
}

async fn kill_fails_pending_calls(kind: Kind) {
    let w = kind.spawn().await;
    let (pid, host) = (w.pid(), w.host_pid());
    let call = w.remote_eval::<()>(kind.code("loop {}", "while True: pass"));
    w.kill();
    assert!(!w.is_running(), "is_running is false right after kill");
    assert!(finishes("call", call).await.unwrap_err().is_terminated());
    if kind.has_process() {
        assert!(wait_gone(pid).await, "the host process is gone");
        // Over SSH, `pid` is the local ssh; the host is on the far side.
        assert!(wait_gone(host).await, "the host process is gone");
    }
}

async fn a_guest_that_ignores_the_interrupt_is_reset(kind: Kind) {
    // The raw guest spins without ever polling for an interrupt: only the
    // hard tier (a kill after the grace period) can stop it.
    let w = test_guest_worker(kind)
        .interrupt_grace(Duration::from_millis(50))
        .spawn()
        .await
        .unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let spinning = w.remote_call::<()>("spin", ());
    let queued = w.remote_call::<i64>("add", (2, 3));
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let err = finishes("the killed request", spinning).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(finishes("queued", queued).await.unwrap(), 5);
    assert!(w.is_running());
    // And again: the fresh instance can be killed too.
    let spinning = w.remote_call::<()>("spin", ());
    finishes("the spin to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let err = finishes("the killed request", spinning).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 1)).await.unwrap(), 2);
    w.stop().await.unwrap();
}

async fn a_trap_resets_the_guest(kind: Kind) {
    let w = test_guest_worker(kind)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let err = w
        .remote_call_fetch::<()>("panic", ("guest bug",))
        .await
        .unwrap_err();
    let Error::Trap { message, .. } = &err else {
        panic!("expected a trap, got {err:?}")
    };
    // A wasm panic aborts (a trap); a native one is caught.
    let expected = match kind {
        Kind::Native | Kind::NativeProgram => "guest bug",
        Kind::Wasm | Kind::InProcess | Kind::Ssh | Kind::Python => "unreachable",
    };
    assert!(message.contains(expected), "{message}");
    assert_eq!(
        w.remote_call_fetch::<i64>("add", (20, 22)).await.unwrap(),
        42
    );
    w.stop().await.unwrap();
}

async fn memory_limit_is_enforced(kind: Kind) {
    let w = test_guest_worker(kind)
        .memory_limit(64 << 20)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let err = w
        .remote_call_fetch::<usize>("alloc", (200,))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: Limit::Memory,
                ..
            }
        ),
        "{err:?}"
    );
    // Fresh state, responsive, and a small allocation still works.
    assert_eq!(
        w.remote_call_fetch::<usize>("alloc", (8,)).await.unwrap(),
        8
    );
    w.stop().await.unwrap();
}

async fn large_values_round_trip(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    let n = 20 << 20;
    let big: serde_bytes::ByteBuf = w.remote_call_fetch("bytes", (n,)).await.unwrap();
    assert_eq!(big.len(), n);
    assert!(big.iter().all(|&b| b == 7));
    let sent = serde_bytes::ByteBuf::from(vec![9u8; n]);
    let back: serde_bytes::ByteBuf = w.remote_call_fetch("echo", (sent.clone(),)).await.unwrap();
    assert_eq!(back, sent);
    w.stop().await.unwrap();
}

async fn dropping_the_handle_kills_the_worker(kind: Kind) {
    let w = kind.spawn().await;
    let (pid, host) = (w.pid(), w.host_pid());
    let ch = w.worker_channel::<i64>("c", 1).await.unwrap();
    drop(w);
    let err = finishes("take", ch.take()).await.unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
    if kind.has_process() {
        assert!(wait_gone(pid).await, "the host process outlived its handle");
        assert!(
            wait_gone(host).await,
            "the host process outlived its handle"
        );
    }
}

async fn fuel_limits_a_request(kind: Kind) {
    let w = test_guest_worker(kind)
        .fuel(5_000_000)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let err = w.remote_call_fetch::<()>("spin", ()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: Limit::Fuel,
                ..
            }
        ),
        "{err:?}"
    );
    // Each request gets the full budget again.
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
    w.stop().await.unwrap();
}

/// A wasm worker's host process is locked down before guest code runs
/// (SECURITY.md): no new privileges, a seccomp filter, no core dumps, few
/// open files. Read from /proc, as an outside observer would.
#[tokio::test]
async fn wasm_hosts_are_hardened() {
    let w = Kind::Wasm.spawn().await;
    assert_hardened(&w).await;
    w.stop().await.unwrap();
}

/// Locked down as a wasm host must be, and working.
async fn assert_hardened(w: &Worker) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid())).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    assert_eq!(limit("Max core file size"), "0");
    assert_eq!(limit("Max open files"), "256");
    // The memory limit is backed by the kernel's: twice the guest's limit
    // (memory and channels), four frames in flight, 256 MiB for the host.
    let data = 2 * malt::DEFAULT_MEMORY_LIMIT + 4 * (256u64 << 20) + (256 << 20);
    assert_eq!(limit("Max data size"), data.to_string());
    // The host reports what it locked down.
    let hardening = w.hardening().expect("a wasm host reports its hardening");
    assert!(hardening.seccomp);
    if hardening.landlock_abi >= 6 {
        assert!(hardening.landlock_full, "{hardening:?}");
    }
    // And it still works, threads and all.
    assert_eq!(
        w.remote_eval_fetch::<i64>("sleep(0.01); 6 * 7")
            .await
            .unwrap(),
        42
    );
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, then the parent.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The zygote, once a program's second worker has started it (liveness
/// wait).
pub(crate) fn wait_for_zygote() -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = malt::__testing::zygote_pid() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no zygote was started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_workers_are_forked_by_the_zygote_locked_down_like_any() {
    // From the second start on, the zygote forks the hosts.
    for _ in 0..2 {
        Kind::Wasm.spawn().await.stop().await.unwrap();
    }
    let zygote = wait_for_zygote();
    let w = Kind::Wasm.spawn().await;
    assert_eq!(parent_of(w.pid()), Some(zygote), "forked by the zygote");
    // The zygote is one thread (a fork copies only the forking one) and
    // has nothing of the manager's: no environment, no descriptor but its
    // control socket and /dev/null.
    let status = std::fs::read_to_string(format!("/proc/{zygote}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Threads:\t1"), "{status}");
    let environ = std::fs::read(format!("/proc/{zygote}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    let links = |pid: u32| -> Vec<(u32, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let fd = e.file_name().to_str()?.parse().ok()?;
                Some((fd, std::fs::read_link(e.path()).ok()?.display().to_string()))
            })
            .collect()
    };
    for (fd, target) in links(zygote) {
        // Its control socket, /dev/null, and the artifact it loaded for
        // its children.
        let expected = match fd {
            0 => target.starts_with("socket:"),
            1 | 2 => target == "/dev/null",
            _ => target.ends_with(".cwasm"),
        };
        assert!(expected, "zygote fd {fd}: {target}");
    }
    // Its child keeps none of the zygote's sockets.
    for (fd, target) in links(w.pid()) {
        assert!(!target.starts_with("socket:"), "host fd {fd}: {target}");
    }
    assert_hardened(&w).await;
    // Its exit status comes from the zygote: a kill is reported as one.
    let pid = w.pid();
    w.kill();
    let status = w.wait().await.expect("an exit status");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(matches!(
        w.remote_eval_fetch::<i64>("1").await,
        Err(malt::Error::TerminatedWorker)
    ));
    assert!(!w.is_running());
    assert!(wait_gone(pid).await);
    // The zygote is still there for the next worker.
    let next = Kind::Wasm.spawn().await;
    assert_eq!(parent_of(next.pid()), Some(zygote));
    assert_eq!(next.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
    next.stop().await.unwrap();
}

/// A host started ahead of its worker (`start_host_ahead`, what the CLI
/// does before it parses its arguments) is the one the next worker of the
/// runtime gets, and it works like any; a builder without a host process
/// of its own starts none.
#[tokio::test]
async fn a_host_started_ahead_serves_the_next_worker() {
    Kind::InProcess.script().start_host_ahead();
    Kind::Native.script().start_host_ahead();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(malt::__testing::spare_host_pid(), None);
    // Other tests here may take this runtime's slot meanwhile (four
    // runtimes keep one each): try until one of ours is served.
    for attempt in 0.. {
        assert!(attempt < 50, "no worker started on the host started ahead");
        // Named: the zygote forks the hosts of this program unnamed.
        let builder = Kind::Wasm
            .script()
            .host_program(std::env::current_exe().unwrap());
        builder.start_host_ahead();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ahead = loop {
            match malt::__testing::spare_host_pid() {
                Some(pid) => break Some(pid),
                None if Instant::now() > deadline => break None,
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let w = builder.spawn().await.unwrap();
        if ahead != Some(w.pid()) {
            w.stop().await.unwrap();
            continue;
        }
        assert_eq!(w.remote_eval_fetch::<i64>("40 + 2").await.unwrap(), 42);
        assert_hardened(&w).await;
        w.stop().await.unwrap();
        break;
    }
}

/// A native host that must restart (hard interrupt) but cannot (its
/// program is gone): the worker terminates cleanly, and waiting for it
/// ends. (Regression: the manager polled the host's exit twice and its
/// reader task panicked, so `wait` never returned.)
#[tokio::test]
async fn a_native_host_that_cannot_restart_terminates_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("vanishing-guest");
    std::fs::copy(crate::guests::test_guest_native(), &program).unwrap();
    let w = malt::Worker::native_program(&program)
        .interrupt_grace(Duration::from_millis(50))
        .spawn()
        .await
        .unwrap();
    std::fs::remove_file(&program).unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let spinning = w.remote_call::<()>("spin", ());
    assert_eq!(
        finishes("the spin to start", started.take()).await.unwrap(),
        1
    );
    w.interrupt().unwrap();
    let err = finishes("the killed spin", spinning).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: true,
                ..
            }
        ),
        "{err:?}"
    );
    finishes("the worker's end", w.wait()).await;
    assert!(!w.is_running());
    let err = finishes("a call", w.remote_call_fetch::<i64>("add", (1, 2)))
        .await
        .unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
}

/// A host keeps nothing of its manager's but the standard streams: a
/// descriptor the manager left without close-on-exec is closed in every
/// host process, and each host leads its own process group, without a
/// controlling terminal.
#[tokio::test]
async fn hosts_inherit_no_descriptor_and_lead_their_own_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manager-secret");
    std::fs::write(&path, "secret").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // Inheritable, as a careless manager might leave it.
    // SAFETY: fcntl on a descriptor this test owns.
    unsafe {
        use std::os::fd::AsRawFd;
        assert_eq!(libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0), 0);
    }
    for kind in [Kind::Wasm, Kind::Native] {
        let w = kind.spawn().await;
        let pid = w.pid();
        let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        assert!(
            !fds.iter().any(|target| target == &path),
            "{kind:?}: the host holds the manager's file: {fds:?}"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name: state, ppid, pgrp, session, tty.
        let fields: Vec<i64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(1)
            .take(4)
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(
            fields[1], pid as i64,
            "{kind:?}: the host leads its own process group"
        );
        assert_eq!(
            fields[3], 0,
            "{kind:?}: the host has no controlling terminal"
        );
        assert_eq!(w.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
        w.stop().await.unwrap();
    }
    drop(file);
}

/// `require_hardening` refuses a worker that cannot lock itself down
/// (in-process, native), and starts a wasm worker only where every layer
/// is in force.
#[tokio::test]
async fn require_hardening_refuses_what_is_not_locked_down() {
    for builder in [Worker::script().in_process(), Worker::native()] {
        let err = builder.require_hardening(true).spawn().await.unwrap_err();
        let Error::Spawn { message, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(message.contains("hardening is required"), "{message}");
    }
    let plain = Worker::script().spawn().await.unwrap();
    let complete = plain.hardening().is_some_and(|h| h.is_complete());
    plain.stop().await.unwrap();
    assert!(
        Worker::native()
            .spawn()
            .await
            .unwrap()
            .hardening()
            .is_none()
    );
    match Worker::script().require_hardening(true).spawn().await {
        Ok(w) => {
            assert!(complete, "started although not fully locked down");
            assert_eq!(w.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
            w.stop().await.unwrap();
        }
        Err(e) => assert!(!complete, "refused although fully locked down: {e}"),
    }
}
