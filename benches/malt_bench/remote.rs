//! Workers on another machine: a call's round trip over SSH to
//! 127.0.0.1, next to ssh's own echo (the same frames through the same
//! ssh) and a local worker, in the same run.

use super::*;

use crate::sshd;

pub(crate) async fn measure(table: &mut Table, quick: bool) -> Result<(), Error> {
    if !sshd::available() {
        table.figure(
            "call RTT over SSH to 127.0.0.1",
            "OpenSSH not installed: skipped".into(),
            "—".into(),
            "—".into(),
            "",
        );
        return Ok(());
    }
    let n = if quick { 1_000 } else { 5_000 };
    let sshd = sshd::sshd();
    let exe = std::env::current_exe().unwrap();

    // The floor: this binary's echo behind the same ssh, same frames.
    let mut ssh = Command::new("ssh");
    ssh.args(sshd.ssh_args())
        .args(["-T", "--", "127.0.0.1"])
        .arg(format!("{} {ECHO_ARG}", exe.display()));
    let floor = echo_round_trip(Echo::start_with(ssh), n, 32);
    table.timing(
        "ssh echo, 32 B over ssh to 127.0.0.1 (the floor)",
        floor,
        None,
        "",
    );

    let add = async |w: &Worker| {
        let _: i64 = w.remote_call_fetch("add", (1, 2)).await.unwrap();
    };
    let local = host(Worker::wasm(guests::test_guest())).spawn().await?;
    let s = time_calls(&local, n, add).await;
    local.stop().await?;
    table.timing(
        "local wasm worker, Rust guest: `add(1, 2)` (for comparison)",
        s,
        Some(floor),
        "",
    );
    let remote = host(Worker::wasm(guests::test_guest()))
        .launcher(sshd.launcher(&exe))
        .spawn()
        .await?;
    let s = time_calls(&remote, n, add).await;
    remote.stop().await?;
    table.timing(
        "wasm worker over ssh to 127.0.0.1, Rust guest: `add(1, 2)`",
        s,
        Some(floor),
        "≤ 1.5× ssh echo",
    );
    Ok(())
}
