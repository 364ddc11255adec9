//! The manager's side of the zygote: one host process of this program,
//! started once, that forks the hosts of later workers (see
//! `malt_host::zygote` for the process itself).
//!
//! A fork of the zygote replaces the exec of a fresh host: no program to
//! map, no dynamic loader, no runtime start, the engine and linker made
//! already. The zygote starts from a program's second process worker
//! (a program that starts one worker never pays for it), lives as long
//! as the program, and is shared by every tokio runtime in it: its
//! children are not this process's, so no runtime's driver reaps them;
//! the zygote reports their exits, read here by a thread of its own.
//!
//! The requests go out in order under one lock and the zygote answers in
//! the same order, so each answer goes to the oldest waiting request. If
//! the zygote is gone, a waiting request fails and the worker starts an
//! exec'd host instead; the next start makes a new zygote.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use malt_host::zygote::{EXITED, FAILED, FORK, FORKED};
use malt_protocol::{GuestSpec, HostConfig};
use tokio::sync::{Notify, oneshot};

use crate::host_child::HostChild;

/// A forked host's pid and pidfd, and where its exit status will come.
type Forked = (libc::pid_t, OwnedFd, oneshot::Receiver<ExitStatus>);

struct Zygote {
    program: PathBuf,
    control: OwnedFd,
    /// Requests sent and not answered yet, oldest first; pushed under the
    /// same lock as the request is sent. `None` once the zygote is gone.
    waiting: Mutex<Option<VecDeque<oneshot::Sender<io::Result<Forked>>>>>,
    /// Never waited for: it lives as long as this process (and is killed
    /// when this process's spawner thread ends with it).
    _process: tokio::process::Child,
}

enum State {
    None,
    /// Told when it is ready (or failed to start).
    Starting(Arc<Notify>),
    Ready(Arc<Zygote>),
    /// It failed to start this many times: no more tries.
    Failed,
}

static ZYGOTE: Mutex<State> = Mutex::new(State::None);
/// Host starts asked of the zygote: the first is exec'd (a program that
/// starts one worker does not pay for a zygote).
static ASKED: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);
/// Starts that may fail before the zygote is given up.
const TRIES: u64 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the zygote of `program` (this program) in the background; the
/// state says when it is ready. Within a tokio runtime.
fn start_locked(state: &mut State, program: &Path) {
    let made = Arc::new(Notify::new());
    *state = State::Starting(made.clone());
    let program = program.to_path_buf();
    tokio::spawn(async move {
        let started = spawn(program).await;
        *lock(&ZYGOTE) = match started {
            Ok(zygote) => State::Ready(zygote),
            Err(e) => {
                tracing::debug!("cannot start a zygote: {e}");
                match FAILURES.fetch_add(1, Ordering::Relaxed) + 1 >= TRIES {
                    true => State::Failed,
                    false => State::None,
                }
            }
        };
        made.notify_waiters();
    });
}

async fn spawn(program: PathBuf) -> io::Result<Arc<Zygote>> {
    let (ours, theirs) = malt_host::zygote::socketpair()?;
    let mut cmd = std::process::Command::new(&program);
    cmd.args([
        malt_host::zygote::ZYGOTE_ARG.to_string(),
        std::process::id().to_string(),
    ])
    .env_clear()
    .stdin(std::process::Stdio::from(theirs))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let process = crate::process::spawn_command(cmd).await?;
    let zygote = Arc::new(Zygote {
        program,
        control: ours,
        waiting: Mutex::new(Some(VecDeque::new())),
        _process: process,
    });
    let reader = zygote.clone();
    std::thread::Builder::new()
        .name("malt-zygote".into())
        .spawn(move || reader.read_answers())?;
    Ok(zygote)
}

/// Whether the zygote runs, or is starting, for hosts of `program`
/// serving `arg`.
pub(crate) fn serves(program: &Path, arg: &str) -> bool {
    arg == malt_host::HOST_ARG
        && match &*lock(&ZYGOTE) {
            State::Ready(z) => z.program == program,
            State::Starting(_) => true,
            State::None | State::Failed => false,
        }
}

/// A host of `program` serving `arg` forked by the zygote, if it runs for
/// them; within a tokio runtime. From the second host asked for on, the
/// zygote is started if it is not, and waited for if it is starting.
pub(crate) async fn fork(program: &Path, arg: &str, config: &HostConfig) -> Option<HostChild> {
    if arg != malt_host::HOST_ARG {
        return None;
    }
    let first = ASKED.fetch_add(1, Ordering::Relaxed) == 0;
    let mut waited = false;
    let zygote = loop {
        let made = {
            let mut state = lock(&ZYGOTE);
            match &*state {
                State::Ready(z) if z.program == program => break z.clone(),
                State::Ready(_) | State::Failed => return None,
                State::None if first || waited => return None,
                State::None => start_locked(&mut state, program),
                State::Starting(_) if waited => return None,
                State::Starting(_) => {}
            }
            let State::Starting(made) = &*state else {
                return None;
            };
            // Made before the lock is released, so that the wake-up
            // cannot be missed.
            made.clone().notified_owned()
        };
        made.await;
        waited = true;
    };
    // The artifact the host will load, for the zygote to load first (and
    // once for all the hosts it forks): verified, and for an engine
    // without fuel, as the zygote's.
    let tail = match &config.guest {
        GuestSpec::Artifact {
            path,
            identity: Some(identity),
        } if config.fuel.is_none() => malt_host::zygote::fork_tail(path, identity),
        _ => Vec::new(),
    };
    match zygote.fork(&tail).await {
        Ok(child) => Some(child),
        Err(e) => {
            tracing::debug!("the zygote did not fork a host: {e}");
            None
        }
    }
}

impl Zygote {
    async fn fork(&self, tail: &[u8]) -> io::Result<HostChild> {
        let (in_r, in_w) = malt_host::pipe()?;
        let (out_r, out_w) = malt_host::pipe()?;
        let (err_r, err_w) = malt_host::pipe()?;
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            let Some(waiting) = waiting.as_mut() else {
                return Err(io::Error::other("the zygote is gone"));
            };
            // A datagram of 16 bytes: the socket's buffer holds hundreds,
            // and the zygote takes them as fast as it forks.
            malt_host::zygote::send(
                self.control.as_fd(),
                [FORK, 0, 0, 0],
                tail,
                &[in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
            )?;
            waiting.push_back(tx);
        }
        drop((in_r, out_w, err_w));
        let (pid, pidfd, exit) = rx
            .await
            .map_err(|_| io::Error::other("the zygote is gone"))??;
        HostChild::from_zygote(pid, pidfd, exit, in_w, out_r, err_r)
    }

    /// The zygote's answers and exit reports, until it is gone.
    fn read_answers(&self) {
        let mut exits: HashMap<libc::pid_t, oneshot::Sender<ExitStatus>> = HashMap::new();
        loop {
            let message = malt_host::zygote::recv(self.control.as_fd());
            let ([kind, pid, value, _], _, mut fds) = match message {
                Ok(Some(m)) => m,
                _ => break,
            };
            match kind {
                FORKED if fds.len() == 1 => {
                    let (tx, rx) = oneshot::channel();
                    exits.insert(pid, tx);
                    let pidfd = fds.pop().expect("one descriptor");
                    if let Some(asked) = self.next_waiting() {
                        let _ = asked.send(Ok((pid, pidfd, rx)));
                    }
                }
                FAILED => {
                    if let Some(asked) = self.next_waiting() {
                        let _ = asked.send(Err(io::Error::from_raw_os_error(value)));
                    }
                }
                EXITED => {
                    if let Some(tx) = exits.remove(&pid) {
                        let _ = tx.send(ExitStatus::from_raw(value));
                    }
                }
                _ => break,
            }
        }
        // Gone: what waits for an answer fails (and starts an exec'd host),
        // and its children died with it (their exits read as SIGKILL).
        let mut state = lock(&ZYGOTE);
        if matches!(&*state, State::Ready(z) if std::ptr::eq(Arc::as_ptr(z), self)) {
            *state = State::None;
        }
        drop(state);
        *lock(&self.waiting) = None;
    }

    fn next_waiting(&self) -> Option<oneshot::Sender<io::Result<Forked>>> {
        lock(&self.waiting).as_mut()?.pop_front()
    }
}

/// The zygote's process id, if it runs (for tests).
#[doc(hidden)]
pub fn zygote_pid() -> Option<u32> {
    match &*lock(&ZYGOTE) {
        State::Ready(z) => z._process.id(),
        _ => None,
    }
}
