//! Workers on other machines: hosts started through a launcher (OpenSSH
//! to a private sshd on 127.0.0.1). The conformance suite's core runs over
//! SSH too (`tests/conformance`, `over_ssh`); this binary covers what only
//! a link has: the component sent by content, version refusal, and no
//! remote host left when the link dies.

#[path = "../support/guests.rs"]
mod guests;
#[path = "../support/procs.rs"]
mod procs;
#[path = "../support/sshd.rs"]
mod sshd;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use malt::{Error, Worker};
use procs::alive;

fn this_program() -> PathBuf {
    std::env::current_exe().unwrap()
}

/// Writes an executable shell script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Waits (at most `limit`, a liveness bound) for a process to be gone;
/// returns how long it took.
async fn gone_within(pid: u32, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !alive(pid) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_component_crosses_the_link_once_and_is_compiled_remotely() {
    let dir = tempfile::tempdir().unwrap();
    let remote_cache = dir.path().join("remote-cache");
    let log = dir.path().join("stdin.log");
    // The "remote" side: its own cache, and a copy of every byte the
    // manager sends it.
    let wrapper = script(
        dir.path(),
        "remote-malt",
        &format!(
            "tee -a '{}' | MALT_CACHE_DIR='{}' exec '{}' \"$@\"",
            log.display(),
            remote_cache.display(),
            this_program().display()
        ),
    );
    let component = guests::test_guest();
    let size = file_len(&component);
    let launcher = sshd::sshd().launcher(&wrapper);

    let w = Worker::wasm(&component)
        .launcher(launcher.clone())
        .spawn()
        .await
        .unwrap();
    assert_eq!(
        w.remote_call_fetch::<i64>("add", (40, 2)).await.unwrap(),
        42
    );
    assert_ne!(
        w.pid(),
        w.host_pid(),
        "pid is the local ssh, host_pid the host"
    );
    w.stop().await.unwrap();
    let first = file_len(&log);
    assert!(
        first > size,
        "the first start sends the component ({size} bytes); the link carried {first}"
    );
    let artifacts: Vec<_> = std::fs::read_dir(&remote_cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "compiled into the remote cache");

    let w = Worker::wasm(&component)
        .launcher(launcher)
        .spawn()
        .await
        .unwrap();
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
    w.stop().await.unwrap();
    let second = file_len(&log) - first;
    assert!(
        second < size / 10,
        "a cached component is named by hash only; the second start sent {second} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_host_of_another_version_is_refused() {
    use malt::protocol::{self, FromHost, GuestKind};
    let dir = tempfile::tempdir().unwrap();
    let hello = dir.path().join("hello.bin");
    std::fs::write(
        &hello,
        protocol::encode(&FromHost::Hello {
            version: protocol::PROTOCOL_VERSION,
            malt_version: "0.0.1-elsewhere".into(),
            kind: GuestKind::Wasm,
            pid: 1,
            hardening: None,
        }),
    )
    .unwrap();
    // A host that answers any manager with its own (other) version.
    let other = script(
        dir.path(),
        "old-malt",
        &format!("cat '{}'\nexec cat >/dev/null", hello.display()),
    );
    let err = Worker::script()
        .launcher(sshd::sshd().launcher(&other))
        .spawn()
        .await
        .unwrap_err();
    let Error::Spawn { message, .. } = &err else {
        panic!("expected a spawn error, got {err:?}")
    };
    assert!(
        message.contains("version mismatch")
            && message.contains("0.0.1-elsewhere")
            && message.contains(malt::VERSION),
        "{message}"
    );

    // And the real host refuses a manager of another version: the
    // manager's Init says which.
    let init_other = script(
        dir.path(),
        "speak-old",
        &format!(
            "exec '{}' __malt-host < '{}'",
            this_program().display(),
            write_old_init(dir.path()).display()
        ),
    );
    let out = std::process::Command::new(&init_other).output().unwrap();
    let body = protocol::read_frame(&mut &out.stdout[..], 1 << 20).unwrap();
    match protocol::decode::<FromHost>(&body).unwrap() {
        FromHost::Fatal { kind, message } => {
            assert_eq!(kind, protocol::FatalKind::Handshake);
            assert!(message.contains("0.0.1-elsewhere"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// An Init frame from a manager of another version.
fn write_old_init(dir: &Path) -> PathBuf {
    use malt::protocol::{self, GuestSpec, HostConfig, ToHost};
    let config = HostConfig {
        version: protocol::PROTOCOL_VERSION,
        malt_version: "0.0.1-elsewhere".into(),
        name: "old".into(),
        guest: GuestSpec::NativeScript,
        memory_limit: 1 << 26,
        interrupt_grace: Duration::from_millis(100),
        call_timeout: None,
        start_timeout: Duration::from_secs(5),
        max_frame: 1 << 20,
        fuel: None,
        output_limit: 1 << 20,
        env: Vec::new(),
        dirs: Vec::new(),
        heartbeat: None,
        warm_up: None,
        rollback: false,
    };
    let path = dir.join("init.bin");
    std::fs::write(&path, protocol::encode(&ToHost::Init(Box::new(config)))).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_local_ssh_leaves_no_remote_host() {
    let w = Worker::script()
        .launcher(sshd::sshd().launcher(&this_program()))
        .spawn()
        .await
        .unwrap();
    let (ssh, host) = (w.pid(), w.host_pid());
    assert!(alive(host));
    let busy = w.remote_eval::<()>("loop {}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // SAFETY: kill(2) on the worker's own launcher process.
    unsafe { libc::kill(ssh as i32, libc::SIGKILL) };
    let err = tokio::time::timeout(Duration::from_secs(30), busy)
        .await
        .expect("the call ends with its link")
        .unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
    let took = gone_within(host, Duration::from_secs(10))
        .await
        .expect("the remote host exits when its link dies");
    eprintln!("remote host gone {took:?} after ssh was killed");
    assert!(!w.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_ends_the_worker_and_the_remote_host() {
    let w = Worker::script()
        .launcher(sshd::sshd().launcher(&this_program()))
        .heartbeat(Some(Duration::from_millis(200)))
        .spawn()
        .await
        .unwrap();
    let (ssh, host) = (w.pid(), w.host_pid());
    assert_eq!(w.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
    let pending = w.remote_eval::<i64>("sleep(0.5); 7");
    // A frozen link: ssh stops moving bytes, but nothing closes.
    // SAFETY: kill(2) on the worker's own launcher process.
    unsafe { libc::kill(ssh as i32, libc::SIGSTOP) };
    let err = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("a silent link is noticed")
        .unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
    let reason = w.termination_reason().unwrap_or_default();
    assert!(reason.contains("silent"), "{reason}");
    // The host hears no pings either, and exits by itself.
    gone_within(host, Duration::from_secs(10))
        .await
        .expect("the remote host exits when its manager falls silent");
    assert!(
        gone_within(ssh, Duration::from_secs(10)).await.is_some(),
        "the stopped ssh was killed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_command_comes_from_the_environment_when_not_set() {
    // As GIT_SSH_COMMAND: a launcher without its own ssh command uses
    // $MALT_SSH_COMMAND. Checked in a child process (the environment is
    // the process's).
    if std::env::var_os("MALT_TEST_SSH_ENV_CHILD").is_some() {
        let w = Worker::script()
            .launcher(
                malt::Launcher::ssh("127.0.0.1")
                    .remote_program(this_program().display().to_string()),
            )
            .spawn()
            .await
            .unwrap();
        assert_eq!(w.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
        w.stop().await.unwrap();
        return;
    }
    let status = std::process::Command::new(this_program())
        .args([
            "--exact",
            "the_ssh_command_comes_from_the_environment_when_not_set",
            "--nocapture",
        ])
        .env("MALT_TEST_SSH_ENV_CHILD", "1")
        .env(malt::launcher::SSH_COMMAND_ENV, sshd::sshd().ssh_command())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_remote_workers_maps_in_order_and_replaces_the_dead() {
    let pool =
        malt::Pool::builder(Worker::script().launcher(sshd::sshd().launcher(&this_program())))
            .size(3)
            .setup("fn sq(x) { x * x }")
            .spawn()
            .await
            .unwrap();
    let inputs: Vec<(i64,)> = (0..200).map(|i| (i,)).collect();
    let out: Vec<i64> = pool
        .map("sq", inputs.clone())
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(out, (0..200).map(|i| i * i).collect::<Vec<_>>());
    // A link dies (its ssh is killed): the pool starts a replacement over
    // SSH, with the setup code, and goes on.
    let victim = pool.worker_pids()[0];
    // SAFETY: kill(2) on one of the pool's ssh processes.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let nine: i64 = pool.call("sq", (9,)).retry(3).await.unwrap();
    assert_eq!(nine, 81);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.stats().restarts == 0 {
        assert!(
            Instant::now() < deadline,
            "the dead link's worker was replaced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again: Vec<i64> = pool
        .map("sq", inputs)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(again[199], 199 * 199);
    pool.stop().await;
}
