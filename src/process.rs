//! Starting host processes: finding the host program, and making sure a
//! worker dies with its manager.
//!
//! Two mechanisms keep workers from outliving the manager: a host exits as
//! soon as its stdin (the protocol stream) reaches end of file, which the
//! kernel causes when the manager dies however it dies; and on Linux the
//! host sets `PR_SET_PDEATHSIG` on itself first thing (and checks that its
//! parent is still the manager, whose pid it gets as an argument). That
//! signal fires when the *thread* that spawned the child exits, so all
//! children are spawned from one dedicated thread that lives as long as
//! the process.
//!
//! The child does this itself rather than in a `pre_exec` hook: a hook
//! forces `fork` (copying the manager's page tables, milliseconds for a
//! big manager) where std otherwise uses `posix_spawn`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::sync::oneshot;

/// Environment variable naming the host program.
pub const HOST_PROGRAM_ENV: &str = "MALT_HOST_PROGRAM";

/// Finds the program that serves as a worker host.
///
/// In order: the builder's choice; `$MALT_HOST_PROGRAM`; this process if
/// it is `malt`; a `malt` beside this executable or one level up (cargo's
/// `target/debug/deps` layout for tests); `malt` on `PATH`.
pub(crate) fn host_program(chosen: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = chosen {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(HOST_PROGRAM_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    if let Some(exe) = &exe {
        if exe.file_stem().is_some_and(|s| s == "malt") {
            return Ok(exe.clone());
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("malt");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("malt");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "cannot find the malt host program: install the `malt` binary, set {HOST_PROGRAM_ENV}, \
         or use WorkerBuilder::host_program (a program that calls malt::host::main_if_host())"
    ))
}

type Job = (
    Command,
    tokio::runtime::Handle,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("malt-spawner".into())
            .spawn(move || {
                while let Ok((cmd, handle, reply)) = rx.recv() {
                    let _guard = handle.enter();
                    let mut cmd = tokio::process::Command::from(cmd);
                    // Dropping the child (e.g. a failed start) kills it.
                    cmd.kill_on_drop(true);
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the malt-spawner thread");
        tx
    })
}

/// Spawns a host process whose stdio are all pipes and whose environment
/// is empty.
pub(crate) async fn spawn_host(
    program: &Path,
    args: &[OsString],
) -> std::io::Result<tokio::process::Child> {
    use std::process::Stdio;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (tx, rx) = oneshot::channel();
    spawner()
        .send((cmd, tokio::runtime::Handle::current(), tx))
        .map_err(|_| std::io::Error::other("the malt-spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the malt-spawner thread is gone"))?
}

/// A pipe whose two ends close on exec: (read end, write end).
pub(crate) fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}
