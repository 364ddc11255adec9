//! `--ssh`: the CLI's workers on another machine (a private sshd on
//! 127.0.0.1, the remote malt being this same binary).

use super::*;

fn over_ssh(args: &[&str]) -> Command {
    let sshd = sshd::sshd();
    let program = assert_cmd::cargo::cargo_bin("malt");
    let mut cmd = malt();
    // The flags go right after the command: `call` takes whatever
    // follows its function as arguments.
    cmd.env(malt::launcher::SSH_COMMAND_ENV, sshd.ssh_command())
        .arg(args[0])
        .args(["--ssh", "127.0.0.1", "--remote-program"])
        .arg(program)
        .args(&args[1..]);
    cmd
}

#[test]
fn eval_call_and_map_run_over_ssh() {
    over_ssh(&["eval", "let x = 20; x * 2 + 2"])
        .assert()
        .success()
        .stdout("42\n");
    let guest = test_guest();
    over_ssh(&["call", guest.to_str().unwrap(), "add", "40", "2"])
        .assert()
        .success()
        .stdout("42\n");
    over_ssh(&[
        "map",
        "script",
        "sq",
        "-j",
        "2",
        "--setup",
        "fn sq(x) { x * x }",
    ])
    .write_stdin("[1]\n[2]\n[3]\n")
    .assert()
    .success()
    .stdout("1\n4\n9\n");
}

#[test]
fn an_unreachable_remote_is_a_clear_error() {
    // Nothing listens on port 1: ssh fails, and says so.
    malt()
        .env(
            malt::launcher::SSH_COMMAND_ENV,
            "ssh -F /dev/null -p 1 -o BatchMode=yes -o ConnectTimeout=5",
        )
        .args(["eval", "1", "--ssh", "127.0.0.1"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("Connection refused"));
    // --remote-program means nothing without --ssh.
    malt()
        .args(["eval", "1", "--remote-program", "/opt/malt"])
        .assert()
        .code(2);
}
