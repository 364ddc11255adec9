//! The state the host's threads share, and how frames go out.

use super::*;

/// State shared by the host's threads.
pub(crate) struct Shared {
    /// The protocol stream out. Whoever has a frame writes it (one
    /// `write` per frame, under the lock, so frames never interleave):
    /// no hop through a writer thread on the way back to the manager.
    /// `None` once closed.
    pub(crate) out: Mutex<Option<Box<dyn Write + Send>>>,
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
            out: Mutex::new(Some(Box::new(Sink(out)))),
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
        let frame = match protocol::encode_capped(message, self.max_frame) {
            Ok(frame) => frame,
            Err(e) => match message {
                FromHost::Reply { id, .. } => protocol::encode(&FromHost::Reply {
                    id: *id,
                    result: Err(Failure::Limit {
                        limit: protocol::Limit::FrameSize,
                        message: format!("the value is too large: {e}"),
                    }),
                }),
                // Output is sent in pieces below the cap; nothing else
                // carries a value.
                _ => return,
            },
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut()
            && w.write_all(&frame).and_then(|()| w.flush()).is_err()
        {
            *out = None;
        }
    }

    /// Exits the host process once every frame written so far is out.
    pub fn exit(&self, code: i32) -> ! {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut() {
            let _ = w.flush();
        }
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
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
