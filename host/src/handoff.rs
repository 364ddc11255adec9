//! Who reads the manager's stream in a host process: the reader thread,
//! or the guest thread while it is idle.
//!
//! A request read by the reader thread and run by the guest thread costs a
//! wake-up between them, which on a busy machine is a good part of a small
//! call's round trip. So an idle guest thread takes the stream and reads
//! the next request itself: a call it reads runs at once. Before it runs
//! one, it hands the stream back, because while the guest runs someone
//! must read interrupts, channel operations and stop. The hand-back wakes
//! the reader thread, but in parallel with the call, not before it.
//!
//! The reader thread gives the stream up only between two frames with
//! nothing of the next one buffered (so no byte is lost or split between
//! readers): it reads stdin through [`Stdin`], which polls an eventfd
//! beside it, and fails a read with `WouldBlock` when the guest thread
//! wants the stream and the reader is at such a point.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What the two threads share about the stream's turn.
pub(crate) struct Turn {
    /// The guest thread wants the stream, or holds it.
    wanted: AtomicBool,
    /// The reader thread holds it between two frames, nothing buffered.
    may_yield: AtomicBool,
    /// The guest thread holds it (its reads need no poll).
    guest_holds: AtomicBool,
    /// The reader thread waits in its poll for bytes.
    reader_waits: AtomicBool,
    /// Written to wake the reader thread out of its poll.
    wake: OwnedFd,
    /// The reader thread waits here for the stream back.
    given_back: Mutex<()>,
    cv: Condvar,
}

impl Turn {
    /// A turn, or `None` if this process cannot make an eventfd.
    pub fn new() -> Option<Arc<Turn>> {
        // SAFETY: eventfd has no memory-safety preconditions; the
        // descriptor, if one, is owned by the OwnedFd alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        Some(Arc::new(Turn {
            wanted: AtomicBool::new(false),
            may_yield: AtomicBool::new(false),
            guest_holds: AtomicBool::new(false),
            reader_waits: AtomicBool::new(false),
            // SAFETY: as above.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            given_back: Mutex::new(()),
            cv: Condvar::new(),
        }))
    }

    /// Whether the reader thread, between frames with nothing buffered
    /// (`idle`), may give the stream up now.
    pub fn at_frame_boundary(&self, idle: bool) {
        self.may_yield.store(idle, Ordering::Release);
    }
}

/// Standard input (or, in tests, another descriptor), read so that the
/// reader thread can be asked for it.
pub(crate) struct Stdin {
    fd: std::os::fd::RawFd,
    turn: Arc<Turn>,
}

impl Stdin {
    pub fn new(turn: Arc<Turn>) -> Self {
        Stdin { fd: 0, turn }
    }
}

impl Read for Stdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let turn = &self.turn;
        loop {
            let guest = turn.guest_holds.load(Ordering::Acquire);
            if !guest {
                if turn.may_yield.load(Ordering::Acquire) && turn.wanted.load(Ordering::Acquire) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let mut fds = [
                    libc::pollfd {
                        fd: self.fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: turn.wake.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                turn.reader_waits.store(true, Ordering::Release);
                // SAFETY: two valid pollfds.
                let polled = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                turn.reader_waits.store(false, Ordering::Release);
                if polled < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if fds[1].revents != 0 {
                    let mut count = 0u64;
                    // SAFETY: reads 8 bytes into a u64 (clears the eventfd).
                    unsafe { libc::read(turn.wake.as_raw_fd(), (&raw mut count).cast(), 8) };
                }
                if fds[0].revents == 0 {
                    continue;
                }
            }
            // SAFETY: reads into `buf`, within its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            turn.may_yield.store(false, Ordering::Release);
            return Ok(n as usize);
        }
    }
}

/// The manager's stream, shared by the reader thread and the idle guest
/// thread.
pub(crate) struct SharedInput<R> {
    stream: Mutex<R>,
    turn: Arc<Turn>,
}

impl<R> SharedInput<R> {
    pub fn new(stream: R, turn: Arc<Turn>) -> Self {
        SharedInput {
            stream: Mutex::new(stream),
            turn,
        }
    }

    pub fn turn(&self) -> &Turn {
        &self.turn
    }

    fn lock(&self) -> MutexGuard<'_, R> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reader thread's hold on the stream.
    pub fn reader_takes(&self) -> MutexGuard<'_, R> {
        self.lock()
    }

    /// The reader thread gives the stream to the guest thread, which
    /// asked, and waits for it back.
    pub fn reader_yields<'a>(&'a self, held: MutexGuard<'a, R>) -> MutexGuard<'a, R> {
        drop(held);
        let mut waiting = self
            .turn
            .given_back
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while self.turn.wanted.load(Ordering::Acquire) {
            waiting = self
                .turn
                .cv
                .wait(waiting)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(waiting);
        self.lock()
    }

    /// Whether the stream is worth taking for the idle guest thread: the
    /// reader thread waits for bytes that have not come. Otherwise (calls
    /// streaming in) it is about to queue the next request, and taking the
    /// stream would only add switches between the threads.
    pub fn worth_taking(&self, fd: std::os::fd::RawFd) -> bool {
        if !self.turn.reader_waits.load(Ordering::Acquire) {
            return false;
        }
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        unsafe { libc::poll(&mut poll, 1, 0) == 0 }
    }

    /// The guest thread asks for the stream and waits until the reader
    /// thread is between frames.
    pub fn guest_takes(&self) -> MutexGuard<'_, R> {
        self.turn.wanted.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 to the eventfd.
        unsafe { libc::write(self.turn.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        let held = self.lock();
        self.turn.guest_holds.store(true, Ordering::Release);
        self.turn.may_yield.store(false, Ordering::Release);
        held
    }

    /// The guest thread gives the stream back to the reader thread.
    pub fn guest_gives_back(&self, held: MutexGuard<'_, R>) {
        self.turn.guest_holds.store(false, Ordering::Release);
        drop(held);
        let waiting = self
            .turn
            .given_back
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.turn.wanted.store(false, Ordering::Release);
        drop(waiting);
        self.turn.cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Write};

    /// Frames written while the stream passes back and forth between a
    /// reader thread and a "guest" thread that takes it now and then are
    /// each read once, in order, whole; the guest thread does read some.
    #[test]
    fn the_stream_changes_hands_only_between_frames() {
        const FRAMES: u32 = 3000;
        let (read_end, write_end) = crate::pipe().unwrap();
        let turn = Turn::new().unwrap();
        let stdin = Stdin {
            fd: read_end.as_raw_fd(),
            turn: turn.clone(),
        };
        // A small buffer: frames often straddle two reads.
        let input = Arc::new(SharedInput::new(BufReader::with_capacity(64, stdin), turn));
        let writer = std::thread::spawn(move || {
            let mut out = std::fs::File::from(write_end);
            for n in 0..FRAMES {
                // Frames of 4 to 100 bytes: the number, then padding.
                let len = 4 + (n % 97) as usize;
                let mut frame = (len as u32).to_le_bytes().to_vec();
                frame.extend_from_slice(&n.to_le_bytes());
                frame.resize(4 + len, 0xAB);
                out.write_all(&frame).unwrap();
                if n % 50 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let frame_number = |body: Vec<u8>| {
            assert!(body[4..].iter().all(|&b| b == 0xAB), "a frame read whole");
            u32::from_le_bytes(body[..4].try_into().unwrap())
        };
        let guest = {
            let (input, seen) = (input.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut read = 0;
                loop {
                    let mut stream = input.guest_takes();
                    let frame = malt_protocol::read_frame(&mut *stream, 1 << 20);
                    let done = match frame {
                        Ok(body) => {
                            let mut seen = seen.lock().unwrap();
                            seen.push(frame_number(body));
                            read += 1;
                            seen.len() == FRAMES as usize
                        }
                        Err(_) => true,
                    };
                    input.guest_gives_back(stream);
                    if done {
                        return read;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
            })
        };
        let mut stream = input.reader_takes();
        loop {
            input.turn().at_frame_boundary(stream.buffer().is_empty());
            match malt_protocol::read_frame(&mut *stream, 1 << 20) {
                Ok(body) => seen.lock().unwrap().push(frame_number(body)),
                Err(malt_protocol::FrameError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    stream = input.reader_yields(stream);
                }
                Err(_) => break,
            }
        }
        drop(stream);
        writer.join().unwrap();
        let by_guest = guest.join().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, (0..FRAMES).collect::<Vec<_>>());
        assert!(by_guest > 0, "the guest thread read some frames");
        assert!(by_guest < FRAMES as usize, "and the reader thread others");
    }
}
