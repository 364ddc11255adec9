//! Rolling a guest back to its state before a request that had to be
//! killed (`HostConfig::rollback`), in a host process.
//!
//! A killed request leaves the guest's memory wherever it was: without
//! rollback the host replaces the guest with a fresh one. With it, three
//! kinds of process take part:
//!
//! - the **keeper** is the host process the manager started, so the
//!   worker's process (what the manager signals and waits for) never
//!   changes. Once the guest is prepared it forks the serving host, then
//!   only waits: it is the subreaper of the hosts that follow, and exits
//!   with the status of the last one that served.
//! - the **serving host** serves the protocol as any host does. Between
//!   requests, when the guest has changed since its last snapshot, its
//!   guest thread forks a new **snapshot**: a copy-on-write copy of the
//!   host with the guest as it is now and that one thread, blocked on a
//!   socket. A newer snapshot replaces it (the old one sees its socket
//!   close and exits).
//! - when a request is killed, the serving host takes the stream from its
//!   reader thread between two frames with nothing buffered, sends its
//!   snapshot the requests it had read but not run and the worker's
//!   channels (they are the manager's, not the guest's: they keep what
//!   they hold now), answers the request `Interrupted { rolled_back }` and
//!   exits. The snapshot starts a reader and a timer thread and serves on
//!   from where the manager's stream is.
//!
//! The snapshot's fork happens under the locks the host's other threads
//! take (the writer's, the timer's, the channels'), so none is held in the
//! copy, and with no reply held back (the copy would send it again).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender};

use serde_bytes::ByteBuf;

mod keeper;
#[cfg(feature = "wasm")]
pub(crate) use keeper::split_keeper;
pub(crate) use keeper::{adopt_orphans, keeper};

use super::*;
use crate::requests::Job;
use crate::serve::{Idle, Request, Stream};

/// The serving host's side of rollback, owned by its guest thread.
pub(crate) struct Rollback {
    shared: Arc<Shared>,
    /// The worker's process, which adopts the snapshot that takes over.
    keeper: libc::pid_t,
    /// The stream, as the reader thread and the idle guest thread share it.
    input: Arc<crate::handoff::SharedInput<Stream>>,
    heartbeat: Option<std::time::Duration>,
    /// Our end of the snapshot's socket (the snapshot exits when it closes).
    snapshot: Option<File>,
    /// The guest may have changed since the snapshot was taken.
    stale: bool,
    /// Requests a failed hand-over took from the queue: they run before
    /// the queue's.
    given_back: VecDeque<Request>,
}

/// What a snapshot that took over serves with: its queue of requests and
/// how its idle guest thread reads.
pub(crate) struct Resumed {
    pub work: Receiver<Request>,
    pub idle: Option<Idle>,
}

/// What the serving host sends the snapshot that takes over: the requests
/// it had read and not run (as frames, in order) and the channels.
type Takeover = (Vec<ByteBuf>, Vec<crate::channels::ChannelState>);

impl Rollback {
    pub fn new(
        shared: Arc<Shared>,
        keeper: libc::pid_t,
        input: Arc<crate::handoff::SharedInput<Stream>>,
        heartbeat: Option<std::time::Duration>,
    ) -> Self {
        Rollback {
            shared,
            keeper,
            input,
            heartbeat,
            snapshot: None,
            stale: true,
            given_back: VecDeque::new(),
        }
    }

    /// The next request a failed hand-over gave back, if any.
    pub fn given_back(&mut self) -> Option<Request> {
        self.given_back.pop_front()
    }

    /// The guest ran a request: the snapshot no longer matches it.
    pub fn guest_changed(&mut self) {
        self.stale = true;
    }

    /// Whether a killed request can be rolled back.
    pub fn ready(&self) -> bool {
        self.snapshot.is_some() && !self.stale
    }

    /// Takes a snapshot if the guest changed since the last one. Returns
    /// in this process with `None`; in the snapshot, only if it takes
    /// over, with what it serves with.
    pub fn snapshot_if_stale(&mut self) -> Option<Resumed> {
        if !self.stale {
            return None;
        }
        // A reply held back would be sent again by the copy.
        self.shared.flush_held();
        let (ours, theirs) = match socket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("malt host: rollback: no snapshot (socketpair: {e})");
                return None;
            }
        };
        let locks = hold_locks(&self.shared);
        // SAFETY: the other threads of this process hold none of the
        // locks the copy uses (held above; glibc's malloc handles its
        // own); the child only runs this thread's code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            drop(locks);
            drop(ours);
            // The previous snapshot's socket is the serving host's alone.
            drop(self.snapshot.take());
            return Some(self.wait_to_take_over(theirs));
        }
        drop(locks);
        if pid < 0 {
            eprintln!(
                "malt host: rollback: no snapshot (fork: {})",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // The old snapshot sees its socket close and exits.
        self.snapshot = Some(ours);
        self.stale = false;
        None
    }

    /// In a snapshot: waits until the serving host hands over (then
    /// serves) or drops this snapshot (then exits).
    fn wait_to_take_over(&mut self, mut socket: File) -> Resumed {
        let serving = unsafe { libc::getppid() };
        // SAFETY: prctl and getppid have no memory-safety preconditions.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        let takeover = protocol::read_frame(&mut socket, usize::MAX)
            .and_then(|body| protocol::decode::<Takeover>(&body));
        let Ok(takeover) = takeover else {
            // SAFETY: ends this copy without running the serving host's
            // exit handlers or flushing its buffers.
            unsafe { libc::_exit(exit::DROPPED) };
        };
        // The serving host exits next: this process must outlive it, then
        // die with the keeper that adopts it.
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
        if socket.write_all(&[1]).is_err() {
            unsafe { libc::_exit(exit::DROPPED) };
        }
        // The serving host's end closes when it exits; nothing is written
        // on the stream by two processes at once.
        let mut rest = [0u8; 1];
        let _ = socket.read(&mut rest);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while unsafe { libc::getppid() } == serving && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        // SAFETY: as above.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != self.keeper {
                libc::_exit(exit::DROPPED);
            }
        }
        self.serve_again(takeover)
    }

    /// In a snapshot that took over: the threads the serving host had
    /// besides its guest thread, on the stream where the manager's next
    /// frame begins, after the requests the serving host had not run.
    fn serve_again(&mut self, (frames, channels): Takeover) -> Resumed {
        let shared = &self.shared;
        shared.channels.import(channels);
        shared.queued.store(0, std::sync::atomic::Ordering::Release);
        let turn = crate::handoff::Turn::new().expect("an eventfd for the stream's turn");
        let unread: Vec<u8> = frames.into_iter().flat_map(ByteBuf::into_vec).collect();
        let stdin = std::io::Cursor::new(unread).chain(crate::handoff::Stdin::new(turn.clone()));
        let (stdin, heard) = crate::remote::Heard::new(Box::new(stdin) as Box<dyn Read + Send>);
        let input = Arc::new(crate::handoff::SharedInput::new(
            std::io::BufReader::with_capacity(64 << 10, stdin),
            turn,
        ));
        if let Some(interval) = self.heartbeat {
            heard.spawn(interval);
        }
        let (work_tx, work_rx): (Sender<Request>, _) = std::sync::mpsc::channel();
        let _timer = crate::serve::spawn_timer(shared, Place::Process);
        let (reader_input, s) = (input.clone(), shared.clone());
        std::thread::Builder::new()
            .name("malt-reader".into())
            .spawn(move || {
                let code = crate::serve::read_loop_sharing(&reader_input, &s, &work_tx);
                std::process::exit(code);
            })
            .expect("spawn the reader thread");
        self.input = input.clone();
        self.stale = true;
        // What a failed hand-over gave back when this copy was taken has
        // run since.
        self.given_back.clear();
        let s = shared.clone();
        Resumed {
            work: work_rx,
            idle: Some(Box::new(move |work: &Receiver<Request>| {
                crate::serve::read_while_idle(&input, &s, work)
            })),
        }
    }

    /// After a killed request: hands the stream over to the snapshot,
    /// with the requests not run yet (those given back, then the
    /// queue's). On success the caller answers the request as rolled back
    /// and calls [`HandedOver::exit`]; on failure (the snapshot is gone)
    /// it resets the guest as without rollback, and the requests taken
    /// are given back.
    pub fn hand_over(&mut self, work: &Receiver<Request>) -> Result<HandedOver, String> {
        let mut socket = self.snapshot.take().ok_or("no snapshot")?;
        // From here on the reader thread reads nothing: the stream stays
        // between two frames, nothing of the next one read.
        let stream = self.input.guest_takes();
        let before = self.given_back.len();
        self.given_back.extend(work.try_iter());
        // Taken from the queue: no longer waiting there.
        let taken = self.given_back.len() - before;
        self.shared
            .queued
            .fetch_sub(taken, std::sync::atomic::Ordering::AcqRel);
        let frames = self.given_back.iter().map(encode_request).collect();
        let takeover: Takeover = (frames, self.shared.channels.export());
        let mut ack = [0u8; 1];
        let handed = protocol::encode_capped(&takeover, usize::MAX)
            .map_err(|e| e.to_string())
            .and_then(|frame| {
                socket
                    .write_all(&frame)
                    .and_then(|()| socket.read_exact(&mut ack))
                    .map_err(|e| e.to_string())
            });
        match handed {
            Ok(()) => {
                // Held, never given back: this process reads no more.
                std::mem::forget(stream);
                Ok(HandedOver {
                    shared: self.shared.clone(),
                    _socket: socket,
                })
            }
            Err(e) => {
                // The snapshot sees its socket close (if it is alive) and
                // exits.
                drop(socket);
                self.input.guest_gives_back(stream);
                Err(format!("the snapshot did not take over: {e}"))
            }
        }
    }
}

/// A host whose snapshot has taken over: it writes its last reply, then
/// exits.
pub(crate) struct HandedOver {
    shared: Arc<Shared>,
    /// Closed when this process exits: the snapshot waits for that.
    _socket: File,
}

impl HandedOver {
    pub fn exit(self) -> ! {
        self.shared.flush_held();
        // No frame from this process after this one.
        let out = self.shared.out.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::forget(out);
        // SAFETY: ends the process at once; its other threads wait on the
        // locks held above.
        unsafe { libc::_exit(exit::HANDED_OVER) }
    }
}

/// The locks the host's other threads take, held by this thread (tried
/// in turn, all released and tried again if one is taken: no order to
/// keep with the other threads).
fn hold_locks(shared: &Shared) -> impl Sized + '_ {
    loop {
        if let Ok(out) = shared.out.try_lock()
            && let Some(timer) = shared.control.try_hold()
            && let Some(channels) = shared.channels.try_hold()
        {
            return (out, timer, channels);
        }
        std::thread::yield_now();
    }
}

/// A request read and not run, as the frame it came in.
fn encode_request((id, job, reply): &Request) -> ByteBuf {
    let (id, reply) = (*id, *reply);
    ByteBuf::from(protocol::encode(&match job {
        Job::One(Work::Call { name, args }) => ToHost::Call {
            id,
            name: name.clone(),
            args: args.to_vec(),
            reply,
        },
        Job::One(Work::Eval { code }) => ToHost::Eval {
            id,
            code: code.clone(),
            reply,
        },
        Job::Batch { name, args } => ToHost::CallBatch {
            id,
            name: name.clone(),
            args: args.iter().cloned().map(ByteBuf::from).collect(),
        },
    }))
}

/// A connected pair of stream sockets, as files: the filter allows
/// `read` and `write` on them (std's socket calls, `send` and `recv`, it
/// refuses).
fn socket_pair() -> std::io::Result<(File, File)> {
    let (ours, theirs) = UnixStream::pair()?;
    let file = |s: UnixStream| File::from(std::os::fd::OwnedFd::from(s));
    Ok((file(ours), file(theirs)))
}
