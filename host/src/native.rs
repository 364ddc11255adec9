//! Native guests: Rust code served by the host process itself (the script
//! guest in a native worker, or a program's own guest).
//!
//! A native guest cannot be killed apart from its process, so the hard
//! tier of an interrupt answers the running request, tells the manager
//! the host is restarting, and exits; the manager starts a fresh host and
//! sends it the requests still unanswered.

use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use super::serve::{GuestMaker, Prepared};
use super::{Guest, GuestContext, GuestError, NativeFactory, NativeGuest, Shared, Work, exit};
use malt_protocol::{FromHost, HostConfig, Stream};

struct Native {
    guest: Box<dyn NativeGuest>,
    factory: NativeFactory,
    context: GuestContext,
    stdio: Arc<Stdio>,
}

impl Guest for Native {
    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError> {
        let guest = &mut self.guest;
        let result = catch_unwind(AssertUnwindSafe(|| match work {
            Work::Call { name, args } => guest.call(name, args),
            Work::Eval { code } => guest.eval(code),
        }));
        // What the request printed goes out before its reply.
        self.stdio.barrier();
        match result {
            Ok(result) => result.map_err(GuestError::Error),
            Err(panic) => {
                // A panic may have left the guest half-updated: the host
                // starts over (`reset`).
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string());
                Err(GuestError::Trap {
                    message: format!("the guest panicked: {message}"),
                    memory_limit_hit: false,
                    out_of_fuel: false,
                })
            }
        }
    }

    fn reset(&mut self) -> Result<(), String> {
        self.guest = (self.factory)(self.context.clone());
        Ok(())
    }
}

/// Sets up a native guest: the process environment becomes exactly the
/// granted variables (workers inherit none), and kills become restarts.
pub(super) fn prepare(
    config: &HostConfig,
    shared: &Arc<Shared>,
    factory: NativeFactory,
) -> Result<Prepared, String> {
    let stdio =
        Stdio::start(shared.clone()).map_err(|e| format!("cannot forward stdout/stderr: {e}"))?;
    for (key, _) in std::env::vars_os() {
        // SAFETY: no other thread of this process reads the environment
        // yet: the host's threads start after this.
        unsafe { std::env::remove_var(key) };
    }
    for (key, value) in &config.env {
        // SAFETY: as above.
        unsafe { std::env::set_var(key, value) };
    }
    // Keep the panic message out of the forwarded stderr: it becomes the
    // request's error instead.
    std::panic::set_hook(Box::new(|_| {}));

    let context = GuestContext::new(shared.clone());
    let maker: GuestMaker = Box::new(move || {
        Box::new(Native {
            guest: factory(context.clone()),
            factory,
            context,
            stdio,
        }) as Box<dyn Guest>
    });
    let s = shared.clone();
    shared.control.set_killer(Box::new(move |id, reason| {
        s.reply(id, Err(reason.failure(true)));
        s.send(&FromHost::Restart);
        s.exit(exit::RESTART);
    }));
    Ok((malt_protocol::GuestKind::Native, maker, None))
}

/// Forwards what native code writes to fd 1 and 2 as output frames.
///
/// Both descriptors become pipes read by one thread. At the end of each
/// request the guest thread calls [`Stdio::barrier`]: the thread drains
/// both pipes and acknowledges, so a request's output always precedes its
/// reply.
struct Stdio {
    wake: std::fs::File,
    acks: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Stdio {
    fn start(shared: Arc<Shared>) -> std::io::Result<Arc<Self>> {
        let mut readers = Vec::new();
        for fd in [1, 2] {
            let (read, write) = crate::pipe()?;
            // SAFETY: dup2 onto fd 1/2, which this process owns.
            if unsafe { libc::dup2(write.as_raw_fd(), fd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_nonblocking(&read)?;
            readers.push(read);
        }
        let (wake_read, wake_write) = crate::pipe()?;
        set_nonblocking(&wake_read)?;
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("malt-stdio".into())
            .spawn(move || forward(readers, wake_read, ack_tx, &shared))?;
        Ok(Arc::new(Stdio {
            wake: std::fs::File::from(wake_write),
            acks: Mutex::new(ack_rx),
        }))
    }

    /// Returns once everything written to stdout/stderr so far is sent.
    fn barrier(&self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        if (&self.wake).write_all(&[1]).is_ok() {
            let _ = acks.recv();
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads what is there without blocking; false once the pipe is closed.
fn drain(fd: &OwnedFd, stream: Stream, shared: &Shared, buf: &mut [u8]) -> bool {
    loop {
        // SAFETY: reading into a buffer we own from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return false,
            n if n > 0 => shared.output(stream, &buf[..n as usize]),
            _ => {
                let err = std::io::Error::last_os_error();
                return err.kind() == std::io::ErrorKind::Interrupted
                    || err.kind() == std::io::ErrorKind::WouldBlock;
            }
        }
    }
}

fn forward(
    readers: Vec<OwnedFd>,
    wake: OwnedFd,
    acks: std::sync::mpsc::Sender<()>,
    shared: &Shared,
) {
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let mut fds: Vec<libc::pollfd> = readers
            .iter()
            .chain(std::iter::once(&wake))
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: polling descriptors we own, with a correctly sized array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for (i, fd) in readers.iter().enumerate() {
            if fds[i].revents != 0 {
                drain(fd, streams[i], shared, &mut buf);
            }
        }
        if fds[2].revents != 0 {
            let mut token = [0u8; 64];
            // SAFETY: as above.
            let _ = unsafe { libc::read(wake.as_raw_fd(), token.as_mut_ptr().cast(), token.len()) };
            for (fd, stream) in readers.iter().zip(streams) {
                drain(fd, stream, shared, &mut buf);
            }
            let _ = acks.send(());
        }
    }
}
