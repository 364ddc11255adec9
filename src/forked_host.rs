//! A program's first worker's host, forked from the program itself at the
//! start of `main` ([`fork_host_ahead`]): it skips the exec of the
//! program, the dynamic loader and the start of its runtime (about 2 ms
//! of a command line one-shot), and is ready by the time the program has
//! parsed its arguments.
//!
//! A fork is only safe while the process has one thread (the child gets
//! only the forking one, and any lock another held stays locked), so this
//! is refused otherwise. The child is then a host like a spawned one: it
//! wipes the environment it inherited (memory included), sets its death
//! signal, closes every descriptor but its three pipes, leaves the
//! terminal and the process group, and locks itself down after its
//! `Init` exactly as a spawned host does (the same code from there on).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use crate::host_child::HostChild;

/// A forked host waiting for its worker.
struct Forked {
    /// The host program it stands for (this program) and its argument.
    program: std::path::PathBuf,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

static FORKED: Mutex<Option<Forked>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Forked>> {
    FORKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forks this process into the host of its next wasm worker that runs
/// in a host process of this program (the default), for a program that
/// starts a worker first thing: call it at the very start of `main`,
/// before anything has started a thread (a tokio runtime included).
/// Returns whether it forked: not if the process already has a second
/// thread, if this program cannot be its own host (`MALT_HOST_PROGRAM`
/// names another, or malt's start-up hook did not run), or if the kernel
/// lacks pidfds (Linux < 5.3).
///
/// The host waits for its worker's configuration; a worker started with
/// [`WorkerBuilder::host_program`](crate::WorkerBuilder::host_program),
/// in-process, native or behind a launcher does not use it. Unused, it
/// dies with the program. The `malt` CLI calls this for its one-shots.
pub fn fork_host_ahead() -> bool {
    // This program is the host of a default worker unless the user chose
    // another (`$MALT_HOST_PROGRAM`) or the start-up hook did not run.
    let Ok(crate::process::HostProgram::ThisProgram(program)) = crate::process::host_program(None)
    else {
        return false;
    };
    if lock().is_some() || !single_threaded() {
        return false;
    }
    let (Ok((in_r, in_w)), Ok((out_r, out_w)), Ok((err_r, err_w))) =
        (malt_host::pipe(), malt_host::pipe(), malt_host::pipe())
    else {
        return false;
    };
    // SAFETY: getpid has no preconditions; this process has one thread
    // (checked above, and only this thread could start another). The
    // child's pipes become its standard streams (the originals are closed
    // with every other inherited descriptor).
    let parent = unsafe { libc::getpid() };
    let forked = unsafe {
        malt_host::fork_host([in_r.as_fd(), out_w.as_fd(), err_w.as_fd()], || {
            malt_host::set_component_store(crate::cache::remote_store);
            malt_host::run_forked_process(parent)
        })
    };
    drop((in_r, out_w, err_w));
    let Ok((pid, pidfd)) = forked else {
        return false;
    };
    *lock() = Some(Forked {
        program,
        pid,
        pidfd,
        stdin: in_w,
        stdout: out_r,
        stderr: err_r,
    });
    true
}

/// Whether a forked host waits for a worker of `program` serving `arg`.
pub(crate) fn waiting(program: &std::path::Path, arg: &str) -> bool {
    lock()
        .as_ref()
        .is_some_and(|f| f.program == program && arg == malt_host::HOST_ARG)
}

/// The forked host for `program` serving `arg`, if one waits and is
/// alive; within a tokio runtime.
pub(crate) fn take(program: &std::path::Path, arg: &str) -> Option<HostChild> {
    if !waiting(program, arg) {
        return None;
    }
    let f = lock().take()?;
    let mut child = HostChild::forked(f.pid, f.pidfd, f.stdin, f.stdout, f.stderr).ok()?;
    match child.try_wait() {
        Ok(None) => Some(child),
        _ => None,
    }
}

fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.strip_prefix("Threads:").is_some_and(|n| n.trim() == "1"))
    })
}

#[cfg(test)]
mod tests {
    /// Forking a process with a second thread is refused: the child could
    /// inherit a lock that thread holds.
    #[test]
    fn a_process_with_another_thread_is_not_forked() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || stopped.recv());
        assert!(!super::single_threaded());
        assert!(!super::fork_host_ahead());
        assert!(super::lock().is_none(), "no forked host waits");
        drop(stop);
        let _ = other.join();
    }
}
