//! The zygote: a host process that forks the hosts of a program's later
//! workers instead of the manager exec'ing each.
//!
//! A host exec'd from scratch spends about 2 ms of CPU before it reads a
//! byte: the kernel maps a 40 MB program, the dynamic loader applies 50 000
//! relocations (each page they touch is copied), the C and Rust runtimes
//! start, and the host makes its wasmtime engine and linker. The zygote
//! pays this once. It is started like any host (empty environment, its
//! death signal tied to the manager, every inherited descriptor closed, a
//! process group of its own), makes the engine and linker on its one
//! thread, and then does nothing but wait on its control socket (its
//! stdin) for a request: three descriptors, the stdin, stdout and stderr
//! of a new host. It forks; the child takes them as its standard streams,
//! ties its death signal to the zygote (which dies with the manager) and
//! serves as a host exactly as an exec'd one does from that point on: it
//! locks itself down after its `Init` with the same code.
//!
//! The zygote has one thread at every fork (it never starts another), so
//! no lock in the child is held by a thread it lacks. It reaps its
//! children and reports each exit status to the manager, which is not
//! their parent. It runs no guest code and takes nothing but descriptors
//! from the manager; what a forked host shares with its siblings is the
//! zygote's address layout (one ASLR draw for all of them).
//!
//! Messages are datagrams on a `SOCK_SEQPACKET` socket, four `i32`s:
//! the manager sends `[FORK, 0, 0, 0]` with three descriptors; the zygote
//! answers `[FORKED, pid, 0, 0]` with the child's pidfd, or
//! `[FAILED, 0, errno, 0]`, in the order of the requests; and sends
//! `[EXITED, pid, wait status, 0]` when a child it forked has exited.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// First argument that makes a program linking `malt-rt` a zygote
/// (served before `main`, like [`crate::HOST_ARG`]); the second is the
/// manager's pid.
pub const ZYGOTE_ARG: &str = "__malt-zygote";

/// Manager to zygote: fork a host on the three descriptors sent along.
pub const FORK: i32 = 1;
/// Zygote to manager: forked `pid`; its pidfd is sent along.
pub const FORKED: i32 = 2;
/// Zygote to manager: the fork failed with the `errno` in the third word.
pub const FAILED: i32 = 3;
/// Zygote to manager: child `pid` exited with the wait status in the third
/// word.
pub const EXITED: i32 = 4;

/// One message: four words, what follows them, and the descriptors sent
/// with it.
pub type Message = ([i32; 4], Vec<u8>, Vec<OwnedFd>);

/// The most a message carries after its words (a path and an identity).
const MAX_TAIL: usize = 8 << 10;

/// What a `FORK` carries after its words: the artifact the host will most
/// likely be asked to load (path and verified identity), which the zygote
/// loads before it forks.
pub fn fork_tail(path: &str, identity: &malt_protocol::ArtifactIdentity) -> Vec<u8> {
    rmp_serde::to_vec(&(path, identity)).unwrap_or_default()
}

/// A connected pair of `SOCK_SEQPACKET` sockets that close on exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `words` and `fds` on a `SOCK_SEQPACKET` socket.
pub fn send(
    socket: BorrowedFd<'_>,
    words: [i32; 4],
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if tail.len() > MAX_TAIL {
        return Err(io::Error::other("a zygote message too long"));
    }
    let mut bytes = Vec::with_capacity(16 + tail.len());
    for word in words {
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    bytes.extend_from_slice(tail);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    loop {
        match rustix::net::sendmsg(
            socket,
            &[io::IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            sent => return sent.map(drop).map_err(io::Error::from),
        }
    }
}

/// Receives one message; `None` at the end of the stream. The descriptors
/// received close on exec.
pub fn recv(socket: BorrowedFd<'_>) -> io::Result<Option<Message>> {
    let mut bytes = vec![0u8; 16 + MAX_TAIL];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            socket,
            &mut [io::IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            got => break got?,
        }
    };
    let fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .collect();
    if got.bytes == 0 {
        return Ok(None);
    }
    if got.bytes < 16 || got.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(io::Error::other(format!(
            "a zygote message of {} bytes",
            got.bytes
        )));
    }
    let mut words = [0; 4];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = i32::from_ne_bytes(chunk.try_into().expect("four bytes"));
    }
    bytes.truncate(got.bytes);
    bytes.drain(..16);
    Ok(Some((words, bytes, fds)))
}

/// Runs a zygote on its control socket (stdin) and returns its exit code
/// when the manager has closed it.
#[doc(hidden)]
pub fn run_zygote() -> i32 {
    crate::process::start_as_host();
    #[cfg(feature = "wasm")]
    crate::wasm::make_ahead_here();
    // SAFETY: fd 0 is the control socket, open for this process's life.
    let control = unsafe { BorrowedFd::borrow_raw(0) };
    // SIGCHLD stays blocked but while waiting in ppoll, so an exit is
    // never missed between reaping and waiting; it needs a handler (an
    // ignored signal would not end the wait).
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: sigset and sigaction calls on local, initialised values.
    let waiting_mask = unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, &mut before);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut());
        libc::sigdelset(&mut before, libc::SIGCHLD);
        before
    };
    // Descriptors above 2 its children keep: those the artifact loaded
    // for them holds (wasmtime maps memory images from it).
    let mut kept: Vec<i32> = Vec::new();
    loop {
        if reap(control).is_err() {
            return crate::exit::LINK_LOST;
        }
        let mut poll = libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd and a valid signal mask.
        let ready = unsafe { libc::ppoll(&mut poll, 1, std::ptr::null(), &waiting_mask) };
        if ready <= 0 {
            continue;
        }
        match recv(control) {
            Ok(Some(([FORK, ..], tail, fds))) if fds.len() == 3 => {
                // The artifact it holds was changed under it: the manager
                // starts an exec'd host, and a new zygote later.
                #[cfg(feature = "wasm")]
                if !crate::wasm::preloaded_intact() {
                    return crate::exit::RESTART;
                }
                #[cfg(feature = "wasm")]
                if let Ok((path, identity)) = rmp_serde::from_slice(&tail)
                    && crate::wasm::preload(path, identity)
                {
                    let received: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    kept = open_descriptors();
                    kept.retain(|fd| *fd > 2 && !received.contains(fd));
                }
                if fork_host(control, &fds, &kept, &waiting_mask).is_err() {
                    return crate::exit::LINK_LOST;
                }
            }
            Ok(Some(_)) => return crate::exit::PROTOCOL,
            Ok(None) | Err(_) => return crate::exit::OK,
        }
    }
}

/// This process's open descriptors, in order.
fn open_descriptors() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // The directory's own descriptor was open while it was read.
    fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    fds.sort_unstable();
    fds
}

/// Reports every child that has exited.
fn reap(control: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return Ok(());
        }
        send(control, [EXITED, pid, status, 0], &[], &[])?;
    }
}

/// Forks a host on `fds` (its stdin, stdout and stderr) and answers the
/// manager.
fn fork_host(
    control: BorrowedFd<'_>,
    fds: &[OwnedFd],
    kept: &[i32],
    unblocked: &libc::sigset_t,
) -> io::Result<()> {
    // SAFETY: getpid has no preconditions; this process has one thread.
    let zygote = unsafe { libc::getpid() };
    let stdio = [fds[0].as_fd(), fds[1].as_fd(), fds[2].as_fd()];
    let child = || {
        // SAFETY: the child restores the signal state a host starts
        // with; the received descriptors (copied to 0, 1 and 2) and
        // every other one above 2 but those `kept` are closed (the
        // control socket was fd 0). Nothing here owns a closed one:
        // the received ones are forgotten.
        unsafe {
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::sigprocmask(libc::SIG_SETMASK, unblocked, std::ptr::null_mut());
            let mut from = 3u32;
            for &keep in kept {
                if keep as u32 > from {
                    libc::syscall(libc::SYS_close_range, from, keep as u32 - 1, 0u32);
                }
                from = keep as u32 + 1;
            }
            libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32);
        }
        crate::process::serve_forked(zygote, true)
    };
    // SAFETY: this process has one thread.
    let forked = unsafe { crate::process::fork_host(stdio, child) };
    let (pid, pidfd) = match forked {
        Ok(forked) => forked,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            return send(control, [FAILED, 0, errno, 0], &[], &[]);
        }
    };
    send(control, [FORKED, pid, 0, 0], &[], &[pidfd.as_fd()])
}
