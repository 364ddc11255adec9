//! A host as a process of its own: its arguments, signals, the death
//! signal, the protocol moved off fd 1, and locking the process down.

use super::*;

/// Whether this process was started with `arg` as its first argument.
#[doc(hidden)]
pub fn first_arg_is(arg: &str) -> bool {
    process_args().get(1).is_some_and(|a| a == arg)
}

/// This process's arguments, read from the kernel: before `main` (where
/// malt's start-up hook runs) std's own list may not be set up yet.
#[doc(hidden)]
pub fn process_args() -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::read("/proc/self/cmdline") {
        Ok(bytes) => bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
            .collect(),
        Err(_) => std::env::args_os().collect(),
    }
}

/// Exit codes of a host process.
pub(crate) mod exit {
    pub const OK: i32 = 0;
    pub const START_FAILED: i32 = 2;
    pub const PROTOCOL: i32 = 3;
    pub const UNKILLABLE: i32 = 4;
    pub const RESTART: i32 = 5;
    pub const LINK_LOST: i32 = 6;
    /// A host that handed its stream over to its snapshot (rollback).
    pub const HANDED_OVER: i32 = 7;
    /// A snapshot that was not needed (a newer one replaced it).
    pub const DROPPED: i32 = 8;
}

/// Runs a host process on stdin/stdout and returns its exit code: the
/// entry point behind [`HOST_ARG`] and [`main_if_host_with`].
#[doc(hidden)]
pub fn run_process(native: Option<NativeFactory>) -> i32 {
    start_as_host();
    serve_on_stdio(native)
}

/// What every host process started by exec does first: its signals, its
/// death signal, and detaching from what it inherited.
pub(crate) fn start_as_host() {
    ignore_signals();
    die_with_parent();
    detach();
}

/// Runs a host in a child that the manager forked from itself (its
/// first worker's host, before the manager had a second thread) and whose
/// standard streams it set up, and returns its exit code. As
/// [`run_process`], but the manager is `parent` (the arguments are the
/// manager's own), and the environment the manager started with is wiped
/// from this process's memory: a spawned host gets an empty one.
#[doc(hidden)]
pub fn run_forked_process(parent: libc::pid_t) -> i32 {
    forget_environment();
    ignore_signals();
    serve_forked(parent, false)
}

/// Serves as a host in a child forked by `parent` (the manager, or a
/// zygote), with its standard streams set up: dies with `parent`, keeps
/// nothing else it inherited (a zygote's child has closed what it must
/// not keep: `closed`), and serves as an exec'd host does.
pub(crate) fn serve_forked(parent: libc::pid_t, closed: bool) -> i32 {
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            return exit::START_FAILED;
        }
    }
    if !closed {
        close_inherited_files();
    }
    leave_terminal_and_group();
    serve_on_stdio(None)
}

/// Zeroes the environment strings (where `/proc/<pid>/environ` reads
/// them too) and empties the environment.
fn forget_environment() {
    unsafe extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    // SAFETY: this process has one thread (a child just forked), so
    // nothing reads or changes the environment meanwhile; each entry is a
    // NUL-terminated string of this process, overwritten within its length.
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let s = *entry;
            std::ptr::write_bytes(s, 0, libc::strlen(s));
            entry = entry.add(1);
        }
        libc::clearenv();
    }
}

fn serve_on_stdio(native: Option<NativeFactory>) -> i32 {
    // The protocol gets its own descriptor; fd 1 and 2 become pipes whose
    // contents are forwarded as output frames, so nothing a guest (or a
    // library) prints can corrupt the protocol.
    let protocol_out = match take_stdout() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("malt host: cannot set up the protocol stream: {e}");
            return exit::START_FAILED;
        }
    };
    // An idle guest thread reads the next request itself (no hand-off
    // between threads on a call's way in) when the stream can be shared.
    match crate::handoff::Turn::new() {
        Some(turn) => {
            let input = Box::new(crate::handoff::Stdin::new(turn.clone()));
            crate::serve::serve_stream(input, protocol_out, Place::Process, native, Some(turn))
        }
        None => serve(std::io::stdin(), protocol_out, Place::Process, native),
    }
}

/// Duplicates fd 1 for the protocol and points fd 1 at /dev/null until
/// output forwarding replaces it.
fn take_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: dup/dup2 on descriptors this process owns; the duplicate is
    // owned by the returned File alone.
    unsafe {
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        if libc::dup2(null.as_raw_fd(), 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Locks this process the way a wasm host process locks itself before
/// guest code runs: no_new_privs, rlimits, a seccomp filter (no exec, no
/// new processes, no sockets) and, where the kernel has Landlock, no file
/// but those beneath `dirs`. For a process that does nothing afterwards but
/// run a guest (`malt run`); irreversible. Returns what is in force.
/// The kernel also caps private writable memory by `memory_limit`, as
/// for a host.
#[cfg(feature = "wasm")]
#[doc(hidden)]
pub fn harden_process(
    dirs: &[malt_protocol::DirGrant],
    memory_limit: u64,
) -> Result<malt_protocol::Hardening, String> {
    harden::apply(harden::Policy::Host)?;
    harden::limit_data(memory_limit, 0)?;
    harden::restrict_files(dirs)
}

/// Closes every descriptor above 2: what this process inherited (an
/// open file, a socket, another program's pipe) is not for the guest it
/// is about to run. For a process about to be hardened, before it opens
/// anything of its own.
#[doc(hidden)]
pub fn close_inherited_files() {
    // SAFETY: close_range has no memory-safety preconditions; the caller
    // holds no descriptor above 2 that it means to keep.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
}

/// Forks this process into a host: the child moves `stdio` to its
/// descriptors 0, 1 and 2 (the copies do not close on exec), runs `child`
/// and exits with the code it returns; the parent gets the child's pid
/// and a pidfd for it. Without a pidfd (Linux < 5.3) the child is killed
/// and reaped, and the error returned.
///
/// # Safety
///
/// This process must have one thread: the child gets only the calling
/// one, and a lock another thread held would stay locked in it.
#[doc(hidden)]
pub unsafe fn fork_host(
    stdio: [std::os::fd::BorrowedFd<'_>; 3],
    child: impl FnOnce() -> i32,
) -> std::io::Result<(libc::pid_t, std::os::fd::OwnedFd)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: the caller vouches for one thread, so the child's memory is
    // consistent and no lock in it is held; dup2 on descriptors this
    // process owns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        for (to, fd) in stdio.iter().enumerate() {
            unsafe { libc::dup2(fd.as_raw_fd(), to as i32) };
        }
        std::process::exit(child());
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open on our own child, not reaped yet; the result, if
    // a descriptor, is owned by the OwnedFd alone.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    // SAFETY: as above.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd as i32) }))
}

/// A pipe whose two ends close on exec: (read end, write end).
#[doc(hidden)]
pub fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
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
/// Asks for SIGKILL when the manager dies, then checks that it has not
/// died already (the manager passes its pid as the second argument).
fn die_with_parent() {
    let expected: Option<i32> = process_args().get(2).and_then(|p| p.to_str()?.parse().ok());
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if expected.is_some_and(|pid| libc::getppid() != pid) {
            std::process::exit(exit::START_FAILED);
        }
    }
}

/// Keeps nothing of the manager's but the three standard streams: every
/// other inherited descriptor is closed (a manager's descriptor without
/// close-on-exec must not reach guest code), the controlling terminal is
/// given up (no terminal to inject input into) and the host leads a
/// process group of its own (no signal meant for the manager's group). Not
/// a session of its own: the scheduler would put each host in a group of
/// its own (autogroup), which costs every call a slower switch.
fn detach() {
    // This runs first thing in the host, before anything has opened a
    // descriptor above 2 that it means to keep.
    close_inherited_files();
    leave_terminal_and_group();
}

fn leave_terminal_and_group() {
    // SAFETY: open, ioctl, close and setpgid have no memory-safety
    // preconditions, and the path is a valid C string.
    unsafe {
        let tty = libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if tty >= 0 {
            libc::ioctl(tty, libc::TIOCNOTTY);
            libc::close(tty);
        }
        libc::setpgid(0, 0);
    }
}

fn ignore_signals() {
    // A write to a manager that is gone must fail (and end the host
    // cleanly), not kill it; before `main`, std has not set this up yet.
    // SAFETY: as below.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // The manager decides what an interrupt means. A Ctrl-C in the
    // manager's terminal reaches the whole process group, and must not
    // kill its workers.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}
