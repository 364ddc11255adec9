//! Hostile input and faults: garbage on the protocol stream, a damaged
//! artifact cache, workers killed while calls are in flight.

#[path = "../support/guests.rs"]
#[allow(dead_code)]
mod guests;

mod escape;
mod fuzz_corpus;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use malt::Worker;

/// This test binary: it links malt, so it serves as a worker host when
/// started with the host argument.
fn this_program() -> std::path::PathBuf {
    std::env::current_exe().unwrap()
}

/// Writes `bytes` straight to a host process's stdin and returns how it
/// ended: it must exit (not hang, not crash with a signal).
fn feed_host(bytes: &[u8]) -> (Option<i32>, String) {
    let mut child = Command::new(this_program())
        .arg(malt::host::HOST_ARG)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(bytes);
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        assert!(Instant::now() < deadline, "the host hung on garbage input");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn garbage_frames_never_crash_a_host() {
    // A tiny xorshift generator: reproducible garbage without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 4],                                         // a 4 GiB length
        vec![5, 0, 0, 0, 1, 2],                                // truncated body
        vec![1, 0, 0, 0, 0xc1],                                // reserved MessagePack byte
        malt::protocol::encode(&malt::protocol::ToHost::Stop), // not Init first
    ];
    for _ in 0..30 {
        let len = (next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if next() % 2 == 0 && bytes.len() >= 4 {
            // A plausible length in front of the garbage.
            let body = (bytes.len() - 4) as u32;
            bytes[..4].copy_from_slice(&body.to_le_bytes());
        }
        cases.push(bytes);
    }
    for bytes in cases {
        let (code, stderr) = feed_host(&bytes);
        assert!(code.is_some(), "killed by a signal on {bytes:?}");
        if !bytes.is_empty() {
            assert_ne!(code, Some(0), "garbage accepted: {bytes:?}");
            assert!(
                stderr.contains("malt host:"),
                "no diagnostic for {bytes:?}: {stderr}"
            );
        }
    }
}

/// Env var that turns `damaged_artifact_child` into the child side of
/// `a_damaged_artifact_is_replaced`.
const DAMAGED_CHILD_ENV: &str = "MALT_TEST_DAMAGED_ARTIFACT";

/// The damage is done in a child process with a cache directory of its
/// own: setting the cache directory here would send the other tests of
/// this binary, running at the same time, to the artifact being damaged.
#[test]
fn a_damaged_artifact_is_replaced() {
    let cache = tempfile::tempdir().unwrap();
    run_child_test(
        "damaged_artifact_child",
        (DAMAGED_CHILD_ENV, "1"),
        cache.path(),
    );
}

/// Runs the test `name` of this binary alone in a child process, with
/// `env` set and a cache directory of its own, and fails if it does.
fn run_child_test(name: &str, env: (&str, &str), cache: &std::path::Path) {
    let out = Command::new(this_program())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .env(malt::CACHE_DIR_ENV, cache)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the child {name} ({}={}) failed:\n{stdout}\n{}",
        env.0,
        env.1,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child side: damages its cache's artifact twice; the worker starts
/// each time.
#[test]
fn damaged_artifact_child() {
    if std::env::var_os(DAMAGED_CHILD_ENV).is_none() {
        return;
    }
    let cache = PathBuf::from(std::env::var_os(malt::CACHE_DIR_ENV).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let guest = guests::test_guest();
        let w = Worker::wasm(&guest).spawn().await.unwrap();
        w.stop().await.unwrap();
        let artifact = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .expect("an artifact in the cache");
        let original = std::fs::read(&artifact).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&artifact), 0o600, "artifacts are private files");
        let elsewhere = cache.join("elsewhere");
        // Truncated, overwritten with garbage, made writable by others,
        // replaced by a symlink (to a valid artifact, even): each time the
        // worker still starts, from a freshly compiled, private artifact.
        let damages: [&dyn Fn(); 4] = [
            &|| std::fs::write(&artifact, &original[..original.len() / 3]).unwrap(),
            &|| std::fs::write(&artifact, vec![0x42; 4096]).unwrap(),
            &|| {
                std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o666)).unwrap()
            },
            &|| {
                std::fs::write(&elsewhere, &original).unwrap();
                std::fs::remove_file(&artifact).unwrap();
                std::os::unix::fs::symlink(&elsewhere, &artifact).unwrap();
            },
        ];
        for damage in damages {
            damage();
            let w = Worker::wasm(&guest).spawn().await.unwrap();
            assert_eq!(w.remote_call_fetch::<i64>("add", (2, 2)).await.unwrap(), 4);
            w.stop().await.unwrap();
            let meta = std::fs::symlink_metadata(&artifact).unwrap();
            assert!(meta.file_type().is_file(), "a regular file again");
            assert_eq!(meta.len(), original.len() as u64);
            assert_eq!(mode(&artifact), 0o600);
        }
    });
}

/// Set in the children of `a_substituted_artifact_never_runs`: what the
/// child does (`plant`, then `check`).
const SUBSTITUTE_CHILD_ENV: &str = "MALT_TEST_SUBSTITUTE_ARTIFACT";

/// The code-substitution attack: the valid artifact of another component
/// (the attacker's) copied over the script guest's, private and regular
/// like the original. A later manager (a new process: nothing memoized)
/// checks the bytes against the cache's seal, refuses them, compiles the
/// script guest again and runs it. Before the seal, `40 + 2` ran the
/// attacker's component.
#[test]
fn a_substituted_artifact_never_runs() {
    let cache = tempfile::tempdir().unwrap();
    for stage in ["plant", "check"] {
        run_child_test(
            "substituted_artifact_child",
            (SUBSTITUTE_CHILD_ENV, stage),
            cache.path(),
        );
    }
}

#[test]
fn substituted_artifact_child() {
    let Some(stage) = std::env::var_os(SUBSTITUTE_CHILD_ENV) else {
        return;
    };
    let cache = PathBuf::from(std::env::var_os(malt::CACHE_DIR_ENV).unwrap());
    let artifacts = || -> Vec<PathBuf> {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        if stage == "plant" {
            let w = Worker::wasm(guests::test_guest()).spawn().await.unwrap();
            w.stop().await.unwrap();
            let attacker = artifacts().pop().expect("the test guest's artifact");
            let w = Worker::script().spawn().await.unwrap();
            w.stop().await.unwrap();
            let script = artifacts()
                .into_iter()
                .find(|p| *p != attacker)
                .expect("the script guest's artifact");
            std::fs::copy(&attacker, &script).unwrap();
            return;
        }
        let w = Worker::script().spawn().await.unwrap();
        assert_eq!(w.remote_eval_fetch::<i64>("40 + 2").await.unwrap(), 42);
        w.stop().await.unwrap();
        let mut bytes: Vec<Vec<u8>> = artifacts()
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        bytes.dedup();
        assert_eq!(
            bytes.len(),
            2,
            "the script guest's artifact is its own again"
        );
    });
}

/// 20 workers, 10 000 calls in flight across them, workers SIGKILLed at
/// random: every call resolves to its value or TerminatedWorker; none
/// hangs, none is lost.
#[test]
fn calls_survive_random_kills() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..20 {
            let w = Worker::script()
                .monitor_output(false)
                .spawn()
                .await
                .unwrap();
            w.remote_eval_wait("fn work(n) { let s = 0; for i in 0..3000 { s += i } n }")
                .await
                .unwrap();
            workers.push(w);
        }
        let mut handles = Vec::new();
        for i in 0..10_000i64 {
            let w = &workers[(i % 20) as usize];
            handles.push((i, w.remote_call::<i64>("work", (i,))));
        }
        // Kill 10 of the 20, at pseudo-random moments, while calls run.
        let pids: Vec<u32> = workers.iter().map(|w| w.pid()).collect();
        let killer = tokio::spawn(async move {
            let mut seed = 7u64;
            for pid in pids.iter().step_by(2) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                tokio::time::sleep(Duration::from_micros(seed >> 54)).await;
                // SAFETY: kill(2) on a worker's pid.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        });
        let (mut values, mut terminated) = (0, 0);
        for (i, h) in handles {
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(v)) => {
                    assert_eq!(v, i);
                    values += 1;
                }
                Ok(Err(e)) => {
                    assert!(e.is_terminated(), "call {i}: {e:?}");
                    terminated += 1;
                }
                Err(_) => panic!("call {i} hung"),
            }
        }
        killer.await.unwrap();
        assert_eq!(values + terminated, 10_000);
        assert!(
            values >= 5_000,
            "the 10 surviving workers answered: {values}"
        );
        for (n, w) in workers.iter().enumerate() {
            // Every other worker was killed; the rest still answer.
            if n % 2 == 1 {
                assert_eq!(w.remote_call_fetch::<i64>("work", (1,)).await.unwrap(), 1);
            } else {
                assert!(!w.is_running());
            }
        }
        eprintln!("{values} values, {terminated} TerminatedWorker");
    });
}

#[test]
fn another_protocol_version_is_refused() {
    let mut init = malt::protocol::encode(&malt::protocol::ToHost::Stop);
    // Build a real Init with a version from the future.
    let config = malt::protocol::HostConfig {
        version: malt::protocol::PROTOCOL_VERSION + 1,
        malt_version: "99.0.0".into(),
        name: "future".into(),
        guest: malt::protocol::GuestSpec::NativeScript,
        memory_limit: 1 << 20,
        interrupt_grace: Duration::from_millis(10),
        call_timeout: None,
        start_timeout: Duration::from_secs(5),
        max_frame: 1 << 20,
        fuel: None,
        output_limit: 1 << 20,
        env: vec![],
        dirs: vec![],
        heartbeat: None,
        warm_up: None,
        rollback: false,
    };
    init.clear();
    init.extend(malt::protocol::encode(&malt::protocol::ToHost::Init(
        Box::new(config),
    )));
    let (code, stderr) = feed_host(&init);
    assert_ne!(code, Some(0));
    // The refusal names both sides' versions.
    assert!(stderr.contains("version mismatch"), "{stderr}");
    assert!(stderr.contains("malt 99.0.0"), "{stderr}");
    assert!(
        stderr.contains(&format!("malt {}", malt::VERSION)),
        "{stderr}"
    );
}

#[test]
fn frame_caps_hold_in_both_directions() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let w = Worker::wasm(guests::test_guest())
            .max_frame_size(64 << 10)
            .spawn()
            .await
            .unwrap();
        // Too big to send: refused before it leaves the manager.
        let big = serde_bytes::ByteBuf::from(vec![0u8; 100 << 10]);
        let err = w
            .remote_call_fetch::<serde_bytes::ByteBuf>("echo", (big,))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                malt::Error::LimitExceeded {
                    limit: malt::Limit::FrameSize,
                    ..
                }
            ),
            "{err:?}"
        );
        // Too big to come back: refused by the host, the worker answers on.
        let err = w
            .remote_call_fetch::<serde_bytes::ByteBuf>("bytes", (100 << 10,))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                malt::Error::LimitExceeded {
                    limit: malt::Limit::FrameSize,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
        w.stop().await.unwrap();

        // A guest's channel value too big for a frame: refused to the
        // guest, and the worker answers on.
        let w = Worker::script()
            .max_frame_size(64 << 10)
            .spawn()
            .await
            .unwrap();
        let err = w
            .remote_eval_wait(r#"channel_put("big", blob(100000))"#)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("frame cap"), "{err}");
        w.remote_eval_wait(r#"channel_put("small", blob(100))"#)
            .await
            .unwrap();
        let small = w
            .worker_channel::<serde_bytes::ByteBuf>("small", 1)
            .await
            .unwrap();
        assert_eq!(small.take().await.unwrap().len(), 100);
        w.stop().await.unwrap();
    });
}

#[test]
fn pending_requests_are_capped() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let w = Worker::script().max_pending(3).spawn().await.unwrap();
        let held: Vec<_> = (0..3).map(|_| w.remote_eval::<()>("sleep(0.2)")).collect();
        let err = w.remote_eval_fetch::<i64>("1").await.unwrap_err();
        assert!(
            matches!(
                err,
                malt::Error::LimitExceeded {
                    limit: malt::Limit::PendingRequests,
                    ..
                }
            ),
            "{err:?}"
        );
        for h in held {
            h.await.unwrap();
        }
        // Room again once they are answered.
        assert_eq!(w.remote_eval_fetch::<i64>("1").await.unwrap(), 1);
        w.stop().await.unwrap();
    });
}

#[test]
fn a_guest_trapping_during_stop() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for _ in 0..10 {
            let w = Worker::wasm(guests::test_guest())
                .monitor_output(false)
                .spawn()
                .await
                .unwrap();
            let trapping = w.remote_call::<()>("panic", ("now",));
            let stopped = tokio::time::timeout(Duration::from_secs(30), w.stop()).await;
            assert!(stopped.expect("stop hung").unwrap());
            let err = tokio::time::timeout(Duration::from_secs(30), trapping)
                .await
                .expect("the call hung")
                .unwrap_err();
            // Either the trap was reported before the stop, or the stop
            // came first: both are clean.
            assert!(
                matches!(
                    err,
                    malt::Error::Trap { .. } | malt::Error::TerminatedWorker
                ),
                "{err:?}"
            );
            assert!(!w.is_running());
        }
    });
}
