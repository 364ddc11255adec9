//! The keeper: the worker's process, which stays behind when the serving
//! host is forked off, adopts the snapshots that take over, and exits as
//! the last serving host did.

use crate::exit;

/// The keeper's pid, in a serving host that [`split_keeper`] made.
static KEEPER: std::sync::OnceLock<libc::pid_t> = std::sync::OnceLock::new();

/// The keeper's pid, if this process is a serving host with rollback.
pub(crate) fn keeper() -> Option<libc::pid_t> {
    KEEPER.get().copied()
}

/// Splits the host process (one thread: locked by seccomp, the engine
/// made, the guest not loaded yet) into the keeper, which never returns
/// from here, and the serving host, which returns with the keeper's pid.
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
pub(crate) fn split_keeper() -> Result<libc::pid_t, String> {
    // SAFETY: getpid and fork in a process with one thread.
    let keeper = unsafe { libc::getpid() };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: prctl, getppid and signal have no memory-safety
        // preconditions.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != keeper {
                libc::_exit(exit::START_FAILED);
            }
            // Snapshots are reaped by the kernel: nobody waits for them.
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        }
        let _ = KEEPER.set(keeper);
        return Ok(keeper);
    }
    keep()
}

/// Makes this process the subreaper of its descendants: a snapshot whose
/// host exits is adopted by the keeper. Before the process is locked
/// (the filter refuses this `prctl`).
pub(crate) fn adopt_orphans() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The keeper: holds none of the worker's descriptors (the stream's end
/// is the serving host's), waits for every host it adopts, and ends as
/// the last one that served did.
fn keep() -> ! {
    // SAFETY: closing descriptors this process owns and will not use.
    unsafe {
        libc::close(0);
        libc::close(1);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
    let mut last: Option<i32> = None;
    let mut killed: Option<i32> = None;
    loop {
        let mut status = 0;
        // SAFETY: waits for any child, status written to a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        let handed = libc::WIFEXITED(status)
            && matches!(libc::WEXITSTATUS(status), exit::HANDED_OVER | exit::DROPPED);
        if handed {
            continue;
        }
        // A snapshot dies of SIGKILL with the host that took it; the
        // host's own status says more.
        if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
            killed = Some(status);
        } else {
            last = Some(status);
        }
    }
    match last.or(killed) {
        Some(status) if libc::WIFSIGNALED(status) => {
            let signal = libc::WTERMSIG(status);
            // SAFETY: the default action of the signal the host died of,
            // raised on this process.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
                libc::raise(signal);
            }
            unsafe { libc::_exit(128 + signal) }
        }
        Some(status) => unsafe { libc::_exit(libc::WEXITSTATUS(status)) },
        None => unsafe { libc::_exit(exit::OK) },
    }
}
