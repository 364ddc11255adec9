//! The state the host's threads share, and how frames go out.

use super::*;

/// How many bytes of replies the guest thread holds back at most.
const HELD_BYTES: usize = 64 << 10;

/// How long a held reply may wait for the next request to end before the
/// timer thread writes it.
pub(crate) const HELD_FOR: std::time::Duration = std::time::Duration::from_millis(1);

/// The protocol stream out, and the replies held back for it.
#[derive(Default)]
pub(crate) struct Out {
    /// `None` once closed.
    pub(crate) stream: Option<Box<dyn Write + Send>>,
    /// Replies not written yet: while more requests wait in the queue,
    /// the guest thread answers them in one `write` (pipelined calls
    /// cost one syscall per batch, not per call). Written before any
    /// other frame, when the queue runs dry, when full, or by the timer
    /// thread after [`HELD_FOR`].
    held: Vec<u8>,
}

impl Out {
    /// Writes the held replies, then `frame`; a failed write means the
    /// manager is gone: the stream is dropped.
    fn write(&mut self, frame: &[u8]) {
        self.write_parts(frame, &[]);
    }

    /// Writes the held replies and one frame given in two parts (a head,
    /// and a large value written from where it lies).
    fn write_parts(&mut self, head: &[u8], tail: &[u8]) {
        let Out { stream, held } = self;
        if let Some(w) = stream.as_mut() {
            let written = if held.is_empty() {
                w.write_all(head)
            } else {
                held.extend_from_slice(head);
                w.write_all(held)
            };
            if written
                .and_then(|()| w.write_all(tail))
                .and_then(|()| w.flush())
                .is_err()
            {
                *stream = None;
            }
        }
        held.clear();
    }
}

/// The reply a value over the frame cap gets instead.
fn too_large(id: u64, e: &protocol::FrameError) -> Vec<u8> {
    protocol::encode(&FromHost::Reply {
        id,
        result: Err(Failure::Limit {
            limit: protocol::Limit::FrameSize,
            message: format!("the value is too large: {e}"),
        }),
    })
}

/// State shared by the host's threads.
pub(crate) struct Shared {
    /// The protocol stream out. Whoever has a frame writes it (one
    /// `write` per frame or batch, under the lock, so frames never
    /// interleave): no hop through a writer thread on the way back to the
    /// manager.
    pub(crate) out: Mutex<Out>,
    /// Requests read but not yet taken by the guest thread: while there
    /// are some, the guest thread holds its replies back.
    pub(crate) queued: std::sync::atomic::AtomicUsize,
    pub control: Control,
    pub channels: Channels,
    pub max_frame: usize,
    /// Limit of a start or a reset of the guest.
    pub start_timeout: std::time::Duration,
    pub(crate) output_limit: u64,
    /// Output bytes of the running request; past the limit, the rest is
    /// dropped (one notice).
    pub(crate) output_used: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The state of a worker serving `config`, its stream not open yet.
    pub(crate) fn new(config: &HostConfig) -> Arc<Self> {
        Arc::new(Shared {
            out: Mutex::new(Out::default()),
            queued: Default::default(),
            output_limit: config.output_limit,
            output_used: std::sync::atomic::AtomicU64::new(0),
            control: Control::new(config.interrupt_grace, config.call_timeout),
            channels: Channels::new(usize::try_from(config.memory_limit).unwrap_or(usize::MAX)),
            max_frame: config.max_frame,
            start_timeout: config.start_timeout,
        })
    }

    /// Shared state for unit tests, writing its frames to `out`.
    #[cfg(test)]
    pub(crate) fn for_tests(out: Arc<Mutex<Vec<u8>>>) -> Arc<Self> {
        Self::for_tests_holding(out, usize::MAX)
    }

    /// Like [`Shared::for_tests`], with channels holding at most
    /// `channel_bytes`.
    #[cfg(test)]
    pub(crate) fn for_tests_holding(out: Arc<Mutex<Vec<u8>>>, channel_bytes: usize) -> Arc<Self> {
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        Arc::new(Shared {
            out: Mutex::new(Out {
                stream: Some(Box::new(Sink(out))),
                held: Vec::new(),
            }),
            queued: Default::default(),
            control: Control::new(std::time::Duration::from_secs(600), None),
            channels: Channels::new(channel_bytes),
            max_frame: 1 << 20,
            start_timeout: std::time::Duration::from_secs(30),
            output_limit: 1 << 20,
            output_used: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Writes a frame. A failed write means the manager is gone: the
    /// stream is dropped and later frames go nowhere. A reply over the
    /// frame cap goes out as that error instead (the manager would refuse
    /// the frame and end the worker).
    pub fn send(&self, message: &FromHost) {
        let Some(frame) = self.encode(message) else {
            return;
        };
        self.lock_out().write(&frame);
    }

    fn lock_out(&self) -> std::sync::MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the stream out (once the guest has started).
    pub(crate) fn open(&self, stream: Box<dyn Write + Send>) {
        self.lock_out().stream = Some(stream);
    }

    /// The frame of a message; a reply over the frame cap becomes that
    /// error.
    fn encode(&self, message: &FromHost) -> Option<Vec<u8>> {
        Some(match protocol::encode_capped(message, self.max_frame) {
            Ok(frame) => frame,
            Err(e) => match message {
                FromHost::Reply { id, .. } => too_large(*id, &e),
                // Output is sent in pieces below the cap; nothing else
                // carries a value.
                _ => return None,
            },
        })
    }

    /// Answers a request from the guest thread: held back while another
    /// request waits in the queue (see [`Out::held`]).
    pub(crate) fn answer(&self, id: u64, result: Result<Option<Vec<u8>>, Failure>) {
        use std::sync::atomic::Ordering;
        // A large value goes out from where it lies, behind a frame head.
        if let Ok(Some(value)) = &result
            && value.len() >= protocol::IN_PLACE_BYTES
        {
            let empty = FromHost::Reply {
                id,
                result: Ok(Some(serde_bytes::ByteBuf::new())),
            };
            match protocol::frame_head(&empty, value.len(), self.max_frame) {
                Ok(head) => self.lock_out().write_parts(&head, value),
                Err(e) => self.lock_out().write(&too_large(id, &e)),
            }
            return;
        }
        let failed = result.is_err();
        let result = result.map(|v| v.map(serde_bytes::ByteBuf::from));
        let Some(frame) = self.encode(&FromHost::Reply { id, result }) else {
            return;
        };
        let mut out = self.lock_out();
        // A failure is not held: it is rare in a stream of calls, and
        // the caller of an interrupted request waits for it.
        if failed
            || self.queued.load(Ordering::Acquire) == 0
            || out.held.len() + frame.len() > HELD_BYTES
        {
            out.write(&frame);
            return;
        }
        let first = out.held.is_empty();
        out.held.extend_from_slice(&frame);
        drop(out);
        if first {
            self.control.flush_within(HELD_FOR);
        }
    }

    /// Writes the replies held back, if any.
    pub(crate) fn flush_held(&self) {
        let mut out = self.lock_out();
        if !out.held.is_empty() {
            out.write(&[]);
        }
    }

    /// Exits the host process once every frame written so far is out.
    pub fn exit(&self, code: i32) -> ! {
        let mut out = self.lock_out();
        out.write(&[]);
        std::process::exit(code)
    }

    /// Ends the worker with a fatal frame saying why: a host process exits
    /// with `code`; an in-process worker closes its stream (library code
    /// never exits the manager's process).
    pub(crate) fn end_worker(&self, kind: FatalKind, message: String, place: Place, code: i32) {
        eprintln!("malt host: {message}");
        self.send(&FromHost::Fatal { kind, message });
        if place == Place::Process {
            self.exit(code);
        }
        self.close();
    }

    /// Closes the stream (an in-process worker winding down).
    pub(crate) fn close(&self) {
        let mut out = self.lock_out();
        out.write(&[]);
        out.stream = None;
    }

    pub fn reply(&self, id: u64, result: Result<Option<Vec<u8>>, Failure>) {
        let result = result.map(|v| v.map(serde_bytes::ByteBuf::from));
        self.send(&FromHost::Reply { id, result });
    }

    pub fn output(&self, stream: Stream, data: &[u8]) {
        use std::sync::atomic::Ordering;
        let len = data.len() as u64;
        let used = self.output_used.fetch_add(len, Ordering::Relaxed);
        if used + len > self.output_limit {
            if used <= self.output_limit {
                let notice = format!(
                    "\n[malt: output limit of {} bytes reached; the rest of this request's output is dropped]\n",
                    self.output_limit
                );
                self.send(&FromHost::Output {
                    stream: Stream::Stderr,
                    data: notice.into_bytes(),
                });
            }
            return;
        }
        for chunk in data.chunks(self.max_frame.saturating_sub(64).max(1)) {
            self.send(&FromHost::Output {
                stream,
                data: chunk.to_vec(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn written(out: &Mutex<Vec<u8>>) -> usize {
        out.lock().unwrap().len()
    }

    #[test]
    fn replies_wait_while_requests_are_queued_and_go_out_together() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared::for_tests(out.clone());
        // Nothing queued: a reply goes out at once.
        shared.answer(1, Ok(None));
        let one = written(&out);
        assert!(one > 0);
        // A request waits: replies are held, then written together.
        shared.queued.store(1, Ordering::Release);
        shared.answer(2, Ok(None));
        shared.answer(3, Ok(None));
        assert_eq!(written(&out), one);
        shared.flush_held();
        assert_eq!(written(&out), 3 * one);
        // A failure is never held (nor is what was held before it).
        shared.answer(5, Ok(None));
        shared.answer(
            6,
            Err(Failure::Interrupted {
                state_lost: true,
                rolled_back: false,
            }),
        );
        let bytes = out.lock().unwrap().clone();
        let mut input = &bytes[3 * one..];
        let mut late = Vec::new();
        while let Ok(body) = protocol::read_frame(&mut input, 1 << 20) {
            if let FromHost::Reply { id, .. } = protocol::decode::<FromHost>(&body).unwrap() {
                late.push(id);
            }
        }
        assert_eq!(late, [5, 6]);
        out.lock().unwrap().clear();
        // Any other frame takes the held replies with it, in order.
        shared.answer(4, Ok(None));
        shared.send(&FromHost::Pong);
        let bytes = out.lock().unwrap().clone();
        let mut input = &bytes[..];
        let mut ids = Vec::new();
        while let Ok(body) = protocol::read_frame(&mut input, 1 << 20) {
            match protocol::decode::<FromHost>(&body).unwrap() {
                FromHost::Reply { id, .. } => ids.push(id),
                FromHost::Pong => ids.push(0),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ids, [4, 0]);
    }

    #[test]
    fn a_large_value_is_answered_from_where_it_lies() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared::for_tests(out.clone());
        shared.queued.store(1, Ordering::Release);
        shared.answer(1, Ok(None));
        let value: Vec<u8> = (0..protocol::IN_PLACE_BYTES * 3).map(|i| i as u8).collect();
        shared.answer(2, Ok(Some(value.clone())));
        // Over the frame cap (1 MiB here): the error instead.
        shared.answer(3, Ok(Some(vec![0; 2 << 20])));
        let bytes = out.lock().unwrap().clone();
        let mut input = &bytes[..];
        let mut replies = Vec::new();
        while let Ok(body) = protocol::read_frame(&mut input, 1 << 20) {
            match protocol::decode::<FromHost>(&body).unwrap() {
                FromHost::Reply { id, result } => replies.push((id, result)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0], (1, Ok(None)));
        assert_eq!(replies[1], (2, Ok(Some(serde_bytes::ByteBuf::from(value)))));
        assert!(
            matches!(
                &replies[2],
                (
                    3,
                    Err(Failure::Limit {
                        limit: protocol::Limit::FrameSize,
                        ..
                    })
                )
            ),
            "{:?}",
            replies[2]
        );
    }

    #[test]
    fn held_replies_never_grow_past_their_cap() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared::for_tests(out.clone());
        shared.queued.store(1, Ordering::Release);
        let value = vec![7u8; HELD_BYTES / 4];
        for id in 0..8 {
            shared.answer(id, Ok(Some(value.clone())));
        }
        let held = shared.out.lock().unwrap().held.len();
        assert!(held <= HELD_BYTES, "{held} bytes held");
        assert!(written(&out) >= 4 * value.len(), "the first ones went out");
    }

    #[test]
    fn the_timer_writes_held_replies_when_the_guest_thread_does_not() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared::for_tests(out.clone());
        let s = shared.clone();
        let timer =
            std::thread::spawn(move || s.control.timer_loop(&s.channels, &|| s.flush_held()));
        shared.queued.store(1, Ordering::Release);
        shared.answer(1, Ok(None));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while written(&out) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the held reply never went out"
            );
            std::thread::sleep(HELD_FOR);
        }
        shared.control.shut_down(&shared.channels);
        assert!(!timer.join().unwrap());
    }
}
