//! No orphans: a worker dies with its manager, however the manager ends.
//! Each test runs a manager as a child process (this test binary, with an
//! environment variable that turns one test into the manager).

use std::time::Duration;

use crate::lifecycle::{process_alive, wait_gone};

/// Env var that turns `killed_manager_child` into the child side of
/// `no_worker_survives_its_manager`.
const KILLED_CHILD_ENV: &str = "MALT_TEST_KILLED_MANAGER";

/// No orphans: a manager killed with SIGKILL (no destructor, no exit
/// handler) takes its workers with it, a worker over SSH too (its ssh,
/// and the host on the far side).
#[tokio::test]
async fn no_worker_survives_its_manager() {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().unwrap();
    let mut manager = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "orphans::killed_manager_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILLED_CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(manager.stdout.take().unwrap()).lines();
    let mut pids = Vec::new();
    while pids.len() < 7 {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the child started its workers")
            .unwrap()
            .expect("the child printed seven pids");
        if let Some(pid) = line.split("worker pid ").nth(1) {
            pids.push(pid.trim().parse::<u32>().unwrap());
        }
    }
    for &pid in &pids {
        assert!(process_alive(pid));
    }
    let _ = manager.start_kill();
    let _ = manager.wait().await;
    for pid in pids {
        assert!(wait_gone(pid).await, "worker {pid} survived its manager");
    }
}

/// The child side: starts a wasm and a native worker, then waits to be
/// killed.
#[test]
fn killed_manager_child() {
    if std::env::var_os(KILLED_CHILD_ENV).is_none() {
        return;
    }
    let wasm = malt::blocking::Worker::script().spawn().unwrap();
    let native = malt::blocking::Worker::native().spawn().unwrap();
    let remote = malt::blocking::Worker::script()
        .launcher(crate::common::ssh_launcher())
        .spawn()
        .unwrap();
    println!("worker pid {}", wasm.pid());
    println!("worker pid {}", native.pid());
    // The local ssh, and the host it reaches.
    println!("worker pid {}", remote.pid());
    println!("worker pid {}", remote.host_pid());
    // The zygote, and the hosts it forked.
    let (zygote, forked) = zygote_and_its_worker();
    println!("worker pid {zygote}");
    println!("worker pid {forked}");
    // A host process started ahead and not taken dies too.
    println!("worker pid {}", spare_host());
    std::thread::sleep(Duration::from_secs(60));
    panic!("the parent did not kill this manager");
}

/// Env var that turns `exiting_manager_child` into the child side of
/// `no_worker_survives_its_manager_exiting`.
const EXIT_CHILD_ENV: &str = "MALT_TEST_EXITING_MANAGER";

/// No orphans: a manager that exits without stopping its workers (no
/// destructors run) takes them with it.
#[tokio::test]
async fn no_worker_survives_its_manager_exiting() {
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "orphans::exiting_manager_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EXIT_CHILD_ENV, "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = stdout
        .lines()
        .filter_map(|l| l.split("worker pid ").nth(1))
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 5, "child output:\n{stdout}");
    for pid in pids {
        assert!(wait_gone(pid).await, "worker {pid} survived its manager");
    }
}

/// The child side: starts a wasm and a native worker, then exits at once.
#[test]
fn exiting_manager_child() {
    if std::env::var_os(EXIT_CHILD_ENV).is_none() {
        return;
    }
    for builder in [
        malt::blocking::Worker::script(),
        malt::blocking::Worker::native(),
    ] {
        let w = builder.spawn().unwrap();
        w.remote_eval_wait("1").unwrap();
        println!("worker pid {}", w.pid());
        std::mem::forget(w);
    }
    let (zygote, forked) = zygote_and_its_worker();
    println!("worker pid {zygote}");
    println!("worker pid {forked}");
    println!("worker pid {}", spare_host());
    std::process::exit(0);
}

/// The zygote and a running worker it forked (left running).
fn zygote_and_its_worker() -> (u32, u32) {
    let zygote = crate::lifecycle::wait_for_zygote();
    let w = malt::blocking::Worker::script().spawn().unwrap();
    w.remote_eval_wait("1").unwrap();
    assert_eq!(crate::lifecycle::parent_of(w.pid()), Some(zygote));
    let pid = w.pid();
    std::mem::forget(w);
    (zygote, pid)
}

/// A host started ahead for another host program (this one, named: the
/// zygote serves only the default) and not taken (liveness wait).
fn spare_host() -> u32 {
    let program = std::env::current_exe().unwrap();
    malt::blocking::Worker::script()
        .host_program(program)
        .start_host_ahead();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = malt::__testing::spare_host_pid() {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spare host was started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
