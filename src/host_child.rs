//! A host process this manager started: spawned (exec'd), or forked from
//! this process before it had a second thread ([`crate::fork_host_ahead`]).
//! Both are read, written, waited for and killed the same way.

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
        Ok(HostChild {
            stdin: Some(ChildStdin::from_std(std::process::ChildStdin::from(stdin))?),
            stdout: Some(ChildStdout::from_std(std::process::ChildStdout::from(
                stdout,
            ))?),
            stderr: Some(ChildStderr::from_std(std::process::ChildStderr::from(
                stderr,
            ))?),
            process: Process::Forked(forked),
        })
    }

    /// Its process id, until it is reaped.
    pub fn id(&self) -> Option<u32> {
        match &self.process {
            Process::Spawned(child) => child.id(),
            Process::Forked(f) => f.status.is_none().then_some(f.pid as u32),
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
        }
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.process {
            Process::Spawned(child) => child.try_wait(),
            Process::Forked(f) => f.try_reap(),
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
