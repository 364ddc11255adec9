//! One-shots (`malt eval`, `malt call`): their worker's host is forked
//! from the CLI at its start, and locked down like any host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The child processes of `pid` (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// The host of a one-shot is forked, not exec'd (its command line is the
/// CLI's), and is what a spawned host is: seccomp and no_new_privs in
/// force, nothing the CLI inherited open (a file on descriptor 9), none
/// of the CLI's environment left, not even in its memory; and it dies
/// with the CLI, killed as it is.
#[test]
fn a_one_shots_host_is_forked_and_locked_down_like_any() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    let secret_path: PathBuf = secret.path().to_path_buf();
    let file = std::fs::File::open(&secret_path).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_malt"));
    cmd.args(["eval", "--timeout", "30s", "loop {}"])
        .env("MALT_TEST_SECRET", "hunter2-for-the-test")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    super::inherit_on_fd_9(&mut cmd, &file);
    let mut cli = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let host = loop {
        let locked = children(cli.id())
            .into_iter()
            .find(|&c| status(c).lines().any(|l| l == "Seccomp:\t2"));
        if let Some(host) = locked {
            break host;
        }
        assert!(Instant::now() < deadline, "no locked host under the CLI");
        std::thread::sleep(Duration::from_millis(20));
    };
    let cmdline = std::fs::read(format!("/proc/{host}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{host}/environ")).unwrap_or_default();
    let open: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{host}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let host_status = status(host);
    let _ = cli.kill();
    let _ = cli.wait();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("eval"), "forked: {cmdline}");
    assert!(
        !cmdline.contains("__malt-host"),
        "forked, not spawned: {cmdline}"
    );
    assert!(
        host_status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "{host_status}"
    );
    assert!(!open.is_empty(), "the host was running");
    assert!(
        !open.contains(&secret_path),
        "the inherited file is closed: {open:?}"
    );
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("hunter2"),
        "the environment is wiped: {environ:?}"
    );
    // Gone with the CLI.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{host}/status")).exists()
        && !status(host).contains("State:\tZ")
    {
        assert!(
            Instant::now() < deadline,
            "the host {host} outlived the CLI"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
