//! A host process this manager started: spawned (exec'd), forked from
//! this process before it had a second thread ([`crate::fork_host_ahead`]),
//! or forked by the zygote ([`crate::zygote`]). All are read, written,
//! waited for and killed the same way.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

/// A started host process and its standard streams (each taken once).
pub(crate) struct HostChild {
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    process: Process,
}

enum Process {
    Spawned(Child),
    Forked(Forked),
    Zygote(FromZygote),
}

/// A host the zygote forked: not this process's child, so it is signalled
/// through its pidfd (which names it even after it is reaped) and its exit
/// status comes from the zygote.
struct FromZygote {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

impl FromZygote {
    fn try_wait(&mut self) -> Option<ExitStatus> {
        use tokio::sync::oneshot::error::TryRecvError;
        if self.status.is_none() {
            self.status = match self.exit.try_recv() {
                Ok(status) => Some(status),
                Err(TryRecvError::Empty) => None,
                // The zygote is gone, and its children with it.
                Err(TryRecvError::Closed) => Some(killed()),
            };
        }
        self.status
    }

    fn kill(&self) -> io::Result<()> {
        match signal_pidfd(&self.pidfd, libc::SIGKILL) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            sent => sent,
        }
    }
}

impl Drop for FromZygote {
    fn drop(&mut self) {
        // As a spawned child's `kill_on_drop`; the zygote reaps it.
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

fn killed() -> ExitStatus {
    ExitStatus::from_raw(libc::SIGKILL)
}

/// Sends `signal` to the process `pidfd` names.
fn signal_pidfd(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    match sent {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Sends signals to a host process without borrowing its [`HostChild`]
/// (which a task waits on meanwhile).
pub(crate) enum Signaller {
    /// An unreaped child of this process (or the group it leads).
    Pid(libc::pid_t),
    /// A process named by a pidfd.
    Pidfd(OwnedFd),
    /// Nothing left to signal.
    Gone,
}

impl Signaller {
    /// Sends `signal`, ignoring a process that is gone.
    pub fn send(&self, signal: libc::c_int) {
        match self {
            // SAFETY: kill(2) on our own unreaped child (or its group).
            Signaller::Pid(target) => unsafe {
                libc::kill(*target, signal);
            },
            Signaller::Pidfd(pidfd) => {
                let _ = signal_pidfd(pidfd, signal);
            }
            Signaller::Gone => {}
        }
    }
}

/// A forked child: its exit is seen through a pidfd (tokio reaps only the
/// children it spawned).
struct Forked {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl From<Child> for HostChild {
    fn from(mut child: Child) -> Self {
        HostChild {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            process: Process::Spawned(child),
        }
    }
}

impl HostChild {
    /// A forked child `pid` with its pidfd and the manager's ends of its
    /// stdin, stdout and stderr; within a tokio runtime (which then
    /// watches them).
    pub fn forked(
        pid: libc::pid_t,
        pidfd: OwnedFd,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the pidfd, which stays open and the
        // same for the AsyncFd's whole life.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        let forked = Forked {
            pid,
            pidfd,
            status: None,
        };
        Self::with_pipes(Process::Forked(forked), stdin, stdout, stderr)
    }

    /// A host the zygote forked: `pid`, its pidfd, where its exit status
    /// will come, and the manager's ends of its stdin, stdout and stderr;
    /// within a tokio runtime.
    pub fn from_zygote(
        pid: libc::pid_t,
        pidfd: OwnedFd,
        exit: tokio::sync::oneshot::Receiver<ExitStatus>,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> io::Result<Self> {
        let process = Process::Zygote(FromZygote {
            pid,
            pidfd,
            exit,
            status: None,
        });
        Self::with_pipes(process, stdin, stdout, stderr)
    }

    fn with_pipes(
        process: Process,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> io::Result<Self> {
        Ok(HostChild {
            stdin: Some(ChildStdin::from_std(std::process::ChildStdin::from(stdin))?),
            stdout: Some(ChildStdout::from_std(std::process::ChildStdout::from(
                stdout,
            ))?),
            stderr: Some(ChildStderr::from_std(std::process::ChildStderr::from(
                stderr,
            ))?),
            process,
        })
    }

    /// What sends it (or, with `group`, the process group it leads)
    /// signals while it is not reaped.
    pub fn signaller(&self, group: bool) -> Signaller {
        match &self.process {
            Process::Zygote(z) if !group => match z.pidfd.try_clone() {
                Ok(pidfd) => Signaller::Pidfd(pidfd),
                Err(_) => Signaller::Gone,
            },
            _ => match self.id() {
                Some(pid) if group => Signaller::Pid(-(pid as libc::pid_t)),
                Some(pid) => Signaller::Pid(pid as libc::pid_t),
                None => Signaller::Gone,
            },
        }
    }

    /// Its process id, until it is reaped.
    pub fn id(&self) -> Option<u32> {
        match &self.process {
            Process::Spawned(child) => child.id(),
            Process::Forked(f) => f.status.is_none().then_some(f.pid as u32),
            Process::Zygote(z) => z.status.is_none().then_some(z.pid as u32),
        }
    }

    /// Sends it SIGKILL.
    pub fn start_kill(&mut self) -> io::Result<()> {
        match &mut self.process {
            Process::Spawned(child) => child.start_kill(),
            Process::Forked(f) if f.status.is_none() => {
                // SAFETY: kill(2) on our own child, not reaped yet (so the
                // pid is still its).
                match unsafe { libc::kill(f.pid, libc::SIGKILL) } {
                    0 => Ok(()),
                    _ => Err(io::Error::last_os_error()),
                }
            }
            Process::Forked(_) => Ok(()),
            Process::Zygote(z) => z.kill(),
        }
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.process {
            Process::Spawned(child) => child.try_wait(),
            Process::Forked(f) => f.try_reap(),
            Process::Zygote(z) => Ok(z.try_wait()),
        }
    }

    /// Waits until it exits, and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.process {
            Process::Spawned(child) => child.wait().await,
            Process::Forked(f) => loop {
                if let Some(status) = f.try_reap()? {
                    return Ok(status);
                }
                // A pidfd becomes readable when its process exits.
                let mut ready = f.pidfd.readable().await?;
                ready.clear_ready();
            },
            Process::Zygote(z) => {
                if let Some(status) = z.status {
                    return Ok(status);
                }
                let status = (&mut z.exit).await.unwrap_or_else(|_| killed());
                z.status = Some(status);
                Ok(status)
            }
        }
    }
}

impl Forked {
    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        match unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) } {
            0 => Ok(None),
            pid if pid == self.pid => {
                self.status = Some(ExitStatus::from_raw(raw));
                Ok(self.status)
            }
            _ => Err(io::Error::last_os_error()),
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        // As a spawned child's `kill_on_drop`: a host nobody owns goes.
        // What is left to reap is reaped if it is gone already; otherwise
        // it waits as a zombie for this process's exit (a forked host is
        // a program's first worker's, started once).
        if self.status.is_none() {
            // SAFETY: kill(2) and waitpid(2) on our own unreaped child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut raw = 0;
                libc::waitpid(self.pid, &mut raw, libc::WNOHANG);
            }
        }
    }
}
