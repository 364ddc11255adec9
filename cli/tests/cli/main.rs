//! The `malt` CLI, run as a real binary.

#[path = "../../../tests/support/guests.rs"]
mod guests;
#[path = "../../../tests/support/sshd.rs"]
mod sshd;

mod one_shot;
mod python;
mod remote;
mod repl;
mod run;

use assert_cmd::Command;
use predicates::prelude::*;

use guests::{test_command, test_guest};

fn malt() -> Command {
    let mut cmd = Command::cargo_bin("malt").unwrap();
    cmd.env("NO_COLOR", "1")
        .timeout(std::time::Duration::from_secs(60));
    cmd
}

/// Gives the program `cmd` runs `file` on descriptor 9, without
/// close-on-exec: something it inherits and must not pass on.
fn inherit_on_fd_9(cmd: &mut std::process::Command, file: &std::fs::File) {
    use std::os::unix::process::CommandExt;
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: dup2 is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn help_documents_examples_and_exit_codes() {
    malt()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("EXIT CODES"))
        .stdout(predicate::str::contains("repl"));
    malt()
        .args(["eval", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("EXAMPLES"));
}

#[test]
fn eval_prints_the_value() {
    malt()
        .args(["eval", "let x = 20; x * 2 + 2"])
        .assert()
        .success()
        .stdout("42\n");
    malt()
        .args(["eval", "#{a: [1, 2.5, \"s\", true, ()]}"])
        .assert()
        .success()
        .stdout("{\"a\":[1,2.5,\"s\",true,null]}\n");
}

#[test]
fn eval_reads_stdin_and_files() {
    malt()
        .args(["eval", "-"])
        .write_stdin("[1, 2, 3].len()")
        .assert()
        .success()
        .stdout("3\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.rhai");
    std::fs::write(&file, "fn sq(x) { x * x }\nsq(9)").unwrap();
    malt()
        .args(["eval", "--file"])
        .arg(&file)
        .assert()
        .success()
        .stdout("81\n");
}

#[test]
fn guest_output_is_unprefixed_and_comes_first() {
    malt()
        .args(["eval", r#"print("hello"); 7"#])
        .assert()
        .success()
        .stdout("hello\n7\n");
}

#[test]
fn guest_errors_exit_1() {
    malt()
        .args(["eval", r#"throw "boom""#])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("Remote exception from worker"))
        .stderr(predicate::str::contains("boom"));
}

#[test]
fn json_mode_reports_values_and_errors() {
    malt()
        .args(["--json", "eval", "1 + 1"])
        .assert()
        .success()
        .stdout("{\"value\":2}\n");
    let out = malt()
        .args(["--json", "eval", r#"throw "boom""#])
        .assert()
        .code(1)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["kind"], "remote");
    assert!(v["error"]["message"].as_str().unwrap().contains("boom"));
}

#[test]
fn timeout_exits_4() {
    malt()
        .args(["eval", "--timeout", "200ms", "loop {}"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("timed out"));
}

#[test]
fn fuel_limits_a_call() {
    malt()
        .args(["eval", "--fuel", "2000000", "let x = 0; loop { x += 1 }"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("fuel limit exceeded"));
    malt()
        .args(["eval", "--fuel", "50000000", "40 + 2"])
        .assert()
        .success()
        .stdout("42\n");
}

#[test]
fn usage_errors_exit_2() {
    malt().args(["eval"]).assert().code(2);
    malt().args(["frobnicate"]).assert().code(2);
    malt()
        .args(["eval", "--memory", "lots", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not a size"));
    malt()
        .args(["eval", "--allow-net", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("network access is not supported"));
}

#[test]
fn call_takes_json_arguments() {
    malt()
        .arg("call")
        .arg(test_guest())
        .args(["add", "40", "2"])
        .assert()
        .success()
        .stdout("42\n");
    malt()
        .args(["call", "script", "abs", "--", "-5"])
        .assert()
        .success()
        .stdout("5\n");
}

#[test]
fn call_with_bad_json_exits_2() {
    malt()
        .arg("call")
        .arg(test_guest())
        .args(["add", "1", "{bad"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("not a JSON value"));
}

#[test]
fn call_a_missing_function_is_a_guest_error() {
    malt()
        .arg("call")
        .arg(test_guest())
        .args(["nope"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no function named nope"));
}

#[test]
fn a_bad_module_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    malt()
        .args(["eval", "--guest"])
        .arg(&bad)
        .arg("1")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("not a WebAssembly file"));
    malt()
        .arg("call")
        .arg(dir.path().join("missing.wasm"))
        .arg("f")
        .assert()
        .code(3);
    malt().arg("inspect").arg(&bad).assert().code(3);
    malt().arg("run").arg(&bad).assert().code(3);
}

#[test]
fn inspect_describes_a_component() {
    malt()
        .arg("inspect")
        .arg(test_guest())
        .assert()
        .success()
        .stdout(predicate::str::contains("malt guest:    yes\n"))
        .stdout(predicate::str::contains("call (func)"))
        .stdout(predicate::str::contains("eval (func)"))
        .stdout(predicate::str::contains("wasi:cli/stdout"));
    let out = malt()
        .args(["--json", "inspect"])
        .arg(test_command())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["is_command"], true);
    assert_eq!(v["is_worker"], false);
    assert!(v["was_cached"].as_bool().is_some());
}

#[test]
fn compile_into_the_cache_and_to_a_file() {
    let cache = tempfile::tempdir().unwrap();
    malt()
        .env("MALT_CACHE_DIR", cache.path())
        .arg("compile")
        .arg(test_guest())
        .assert()
        .success()
        .stdout(predicate::str::starts_with("compiled in"));
    malt()
        .env("MALT_CACHE_DIR", cache.path())
        .arg("compile")
        .arg(test_guest())
        .assert()
        .success()
        .stdout(predicate::str::starts_with("already cached"));
    let out = cache.path().join("guest.cwasm");
    malt()
        .arg("compile")
        .arg(test_guest())
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
}

#[test]
fn version_names_malt_and_wasmtime() {
    malt()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "malt {} (wasmtime {})",
            malt::VERSION,
            malt::WASMTIME_VERSION
        )));
}

#[test]
fn dir_grants_and_denies_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("note.txt"), "granted\n").unwrap();
    let grant = format!("{}::/data:ro", dir.path().display());
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--dir", &grant, "--", "cat", "/data/note.txt"])
        .assert()
        .success()
        .stdout("granted\n");
    // Without the grant the same read fails.
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--", "cat", "/data/note.txt"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot read /data/note.txt"));
    // Read-only means no writes.
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--dir", &grant, "--", "write", "/data/new.txt", "x"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot write"));
    assert!(!dir.path().join("new.txt").exists());
    // Read-write allows them.
    let rw = format!("{}::/data", dir.path().display());
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--dir", &rw, "--", "write", "/data/new.txt", "x"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("new.txt")).unwrap(),
        "x"
    );
    // No escape with `..`.
    malt()
        .arg("run")
        .arg(test_command())
        .args(["--dir", &grant, "--", "cat", "/data/../etc/passwd"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("root:").not());
}

#[test]
fn native_workers_from_the_cli() {
    malt()
        .args(["eval", "--native", r#"print("native"); 6 * 7"#])
        .assert()
        .success()
        .stdout("native\n42\n");
    malt()
        .args(["eval", "--native", "--timeout", "200ms", "loop {}"])
        .assert()
        .code(4);
    malt()
        .args(["eval", "--native", "--memory", "64M", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("wasm sandbox limit"));
    malt()
        .args(["call", "--native", "script", "abs", "--", "-3"])
        .assert()
        .success()
        .stdout("3\n");
    malt()
        .args(["call", "--native"])
        .arg(guests::test_guest_native())
        .args(["add", "2", "3"])
        .assert()
        .success()
        .stdout("5\n");
}

/// A guest blocked in a WASI wait (`std::thread::sleep` for a minute) is
/// stopped by `--timeout` like any other: exit code 4, not a dead worker.
#[test]
fn timeout_stops_a_guest_blocked_in_a_wasi_sleep() {
    malt()
        .args(["call", "--timeout", "1s"])
        .arg(test_guest())
        .args(["wasi_sleep", "60000", "false"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("timed out"));
}

/// `--strict` refuses a worker that is not fully locked down: a native
/// one always; a wasm one only on a kernel without all of Landlock.
#[test]
fn strict_refuses_what_is_not_locked_down() {
    malt()
        .args(["eval", "--strict", "--native", "1 + 1"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("hardening is required"));
    let probe = malt::blocking::Worker::script().spawn().unwrap();
    let complete = probe.hardening().is_some_and(|h| h.is_complete());
    probe.stop().unwrap();
    let strict = malt().args(["eval", "--strict", "1 + 1"]).assert();
    if complete {
        strict.success().stdout("2\n");
    } else {
        strict
            .code(3)
            .stderr(predicate::str::contains("locked down only partly"));
    }
}

/// Cranelift runs in a child process with limits: a compile that needs
/// more memory or time than allowed (as a compile bomb would) is a clear
/// error, and the manager (here the CLI) is unharmed: it reports it and
/// exits with the start-failure code.
#[test]
fn the_compiler_runs_under_limits() {
    for (var, value, says) in [
        (
            "MALT_COMPILE_MEMORY",
            "50000000",
            "ran out of its memory limit",
        ),
        ("MALT_COMPILE_TIMEOUT", "0.001", "took longer than"),
    ] {
        let cache = tempfile::tempdir().unwrap();
        malt()
            .env("MALT_CACHE_DIR", cache.path())
            .env(var, value)
            .arg("call")
            .arg(test_guest())
            .args(["add", "1", "2"])
            .assert()
            .code(3)
            .stderr(predicate::str::contains(says).and(predicate::str::contains(var)));
        // Within the default limits the same component compiles and runs.
        malt()
            .env("MALT_CACHE_DIR", cache.path())
            .arg("call")
            .arg(test_guest())
            .args(["add", "1", "2"])
            .assert()
            .success()
            .stdout("3\n");
    }
}

/// `malt map`: one output line per input line, in input order, errors in
/// their place, across several workers.
#[test]
fn map_keeps_input_order_and_reports_each_error_in_place() {
    let inputs: String = (0..300)
        .map(|i| match i {
            100 => "{\"not\": \"an array\"}\n".to_string(),
            200 => "[\"text\", 1]\n".to_string(),
            _ => format!("[{i}, {i}]\n"),
        })
        .collect();
    let out = malt()
        .args(["map"])
        .arg(test_guest())
        .args(["add", "--workers", "3"])
        .write_stdin(inputs)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("2 of 300 inputs failed"))
        .get_output()
        .stdout
        .clone();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 300);
    for (i, line) in lines.iter().enumerate() {
        match i {
            100 | 200 => assert!(line["error"].is_string(), "{i}: {line}"),
            _ => assert_eq!(line, &serde_json::json!(2 * i), "{i}"),
        }
    }
    // The script guest, with the function defined by --setup: all good.
    malt()
        .args([
            "map",
            "script",
            "sq",
            "-j",
            "2",
            "--setup",
            "fn sq(x) { x * x }",
        ])
        .write_stdin("[1]\n\n[2]\n[3]\n")
        .assert()
        .success()
        .stdout("1\n4\n9\n");
}
