//! `malt repl` driven through a real pseudo-terminal.

use rexpect::session::spawn_command;

fn repl(args: &[&str]) -> rexpect::session::PtySession {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_malt"));
    cmd.arg("repl")
        .args(args)
        .env("NO_COLOR", "1")
        .env("MALT_CACHE_DIR", cache_dir());
    spawn_command(cmd, Some(60_000)).expect("start malt repl")
}

/// A cache of our own, so the REPL's history file stays out of the way.
fn cache_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("malt-repl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn define_call_interrupt_and_exit() {
    session(&[]);
}

#[test]
fn the_same_with_a_native_worker() {
    session(&["--native"]);
}

fn session(args: &[&str]) {
    let mut p = repl(args);
    p.exp_string("Ctrl-C interrupts").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("fn sq(x) { x * x }").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("let kept = sq(7);").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("kept").unwrap();
    p.exp_string("49").unwrap();
    // Multi-line input.
    p.exp_string("malt> ").unwrap();
    p.send_line("fn cube(x) {").unwrap();
    p.exp_string("....> ").unwrap();
    p.send_line("  x * x * x }").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("cube(3)").unwrap();
    p.exp_string("27").unwrap();
    // A runaway loop, interrupted with Ctrl-C.
    p.exp_string("malt> ").unwrap();
    p.send_line("loop { kept += 0; }").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("interrupted (the session is intact)").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("kept + 1").unwrap();
    p.exp_string("50").unwrap();
    // Errors are shown and the session goes on.
    p.exp_string("malt> ").unwrap();
    p.send_line(r#"throw "oops""#).unwrap();
    p.exp_string("oops").unwrap();
    p.exp_string("malt> ").unwrap();
    // Ctrl-D stops the worker and exits.
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

/// A Python session: blocks go on until an empty line, Ctrl-C interrupts
/// a busy loop and the namespace stays.
#[test]
fn a_python_session() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_malt"));
    cmd.args(["repl", "--python"])
        .env("NO_COLOR", "1")
        .env("MALT_CACHE_DIR", cache_dir())
        .env(malt::python::COMPONENT_ENV, crate::guests::python_guest());
    // The first start in a fresh cache compiles CPython (seconds).
    let mut p = spawn_command(cmd, Some(180_000)).expect("start malt repl --python");
    p.exp_string("malt> ").unwrap();
    p.send_line("def sq(x):").unwrap();
    p.exp_string("....> ").unwrap();
    p.send_line("    return x * x").unwrap();
    p.exp_string("....> ").unwrap();
    p.send_line("").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("kept = sq(7)").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("while True: kept += 0").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("interrupted (the session is intact)").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("kept + 1").unwrap();
    p.exp_string("50").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("1 / 0").unwrap();
    p.exp_string("ZeroDivisionError").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

/// `--rollback`: Ctrl-C on a cell stuck in C (no loop jump to take the
/// interrupt at) kills it after the grace period, and the session is as
/// it was before that input.
#[test]
fn a_python_session_that_rolls_back() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_malt"));
    cmd.args(["repl", "--python", "--rollback"])
        .env("NO_COLOR", "1")
        .env("MALT_CACHE_DIR", cache_dir())
        .env(malt::python::COMPONENT_ENV, crate::guests::python_guest());
    let mut p = spawn_command(cmd, Some(180_000)).expect("start malt repl --python --rollback");
    p.exp_string("malt> ").unwrap();
    p.send_line("kept = 7").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_line("kept = 8; sum(range(10 ** 15))").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("rolled back to before this input").unwrap();
    p.exp_string("malt> ").unwrap();
    // 801 had the cell's assignment stayed.
    p.send_line("kept * 100 + 1").unwrap();
    p.exp_string("701").unwrap();
    p.exp_string("malt> ").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}
