//! `malt run`: WASI commands, as components and as preview 1 modules.

use predicates::prelude::*;

use super::malt;
use crate::guests::{test_command, test_guest};

#[test]
fn run_a_command_component() {
    malt()
        .arg("run")
        .arg(test_command())
        .assert()
        .success()
        .stdout("hello from a malt command\n");
    // WASI 0.2 commands report only success or failure: any nonzero
    // exit is 1.
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--", "exit", "7"])
        .assert()
        .code(1);
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--", "exit", "0"])
        .assert()
        .success();
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--env", "WHO=me", "--", "env", "WHO"])
        .assert()
        .success()
        .stdout("me\n");
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--timeout", "200ms", "--", "spin"])
        .assert()
        .code(4);
    // A worker guest is not a command.
    malt()
        .arg("run")
        .arg(test_guest())
        .assert()
        .code(3)
        .stderr(predicate::str::contains("not a WASI command"));
}

/// A WASI preview 1 command (a core module, like Rust's wasm32-wasip1
/// output): prints, then exits with the errno of `fd_prestat_get(3)`: 0
/// when a directory is granted, 8 (EBADF) when none is.
const P1_COMMAND: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasip1\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 18))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (call $prestat (i32.const 3) (i32.const 64)))))"#;

#[test]
fn run_a_wasi_preview1_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("hello-p1.wasm");
    std::fs::write(&module, wat::parse_str(P1_COMMAND).unwrap()).unwrap();
    // Default deny: no directory, so fd 3 is not a preopen.
    malt()
        .arg("run")
        .arg(&module)
        .assert()
        .code(8)
        .stdout("hello from wasip1\n");
    // The same flags as for components.
    malt()
        .arg("run")
        .arg(&module)
        .arg("--dir")
        .arg(format!("{}::/data:ro", dir.path().display()))
        .assert()
        .success()
        .stdout("hello from wasip1\n");
    let spin = dir.path().join("spin-p1.wasm");
    std::fs::write(
        &spin,
        wat::parse_str(r#"(module (func (export "_start") (loop (br 0))))"#).unwrap(),
    )
    .unwrap();
    malt()
        .arg("run")
        .arg(&spin)
        .args(["--timeout", "200ms"])
        .assert()
        .code(4);
    malt()
        .arg("run")
        .arg(&spin)
        .args(["--fuel", "100000"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("fuel"));
    // inspect describes it.
    malt()
        .arg("inspect")
        .arg(&module)
        .assert()
        .success()
        .stdout(predicate::str::contains("core module (WASI preview 1)"))
        .stdout(predicate::str::contains("WASI command:  yes"))
        .stdout(predicate::str::contains("wasi_snapshot_preview1"));
    // A worker guest must still be a component, and says so.
    malt()
        .args(["eval", "--guest"])
        .arg(&module)
        .arg("1")
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "core WebAssembly module, not a component",
        ));
}

/// `malt run` locks its own process as a host does before the program's
/// first instruction: seccomp and no_new_privs in force, and nothing it
/// inherited (here a file on descriptor 9) left open for the program.
#[test]
fn run_locks_its_process_and_keeps_nothing_it_inherited() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    let secret_path = secret.path().to_path_buf();
    let file = std::fs::File::open(&secret_path).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_malt"));
    cmd.arg("run")
        .arg(test_command())
        .args(["--timeout", "20s", "--", "spin"])
        .stdout(std::process::Stdio::null());
    super::inherit_on_fd_9(&mut cmd, &file);
    let mut child = cmd.spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut status = String::new();
    while std::time::Instant::now() < deadline {
        status = std::fs::read_to_string(&status_path).unwrap_or_default();
        if status
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let open: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "a seccomp filter is in force:\n{status}"
    );
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    assert!(!open.is_empty(), "the program was running");
    assert!(
        !open.contains(&secret_path),
        "the inherited file is closed: {open:?}"
    );
}
