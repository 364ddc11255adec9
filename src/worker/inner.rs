//! The state of one worker behind its handles: the pending requests, the
//! connection to its host, and the task that reads the host's frames.

use super::*;

/// Reads the host's frames until the worker is gone; restarts a native
/// host that asked for it.
pub(crate) async fn read_frames(
    inner: Arc<Inner>,
    mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut exited: tokio::sync::oneshot::Receiver<std::process::ExitStatus>,
) {
    loop {
        let mut restart = false;
        let broken = loop {
            let body =
                match connection::read_body(&mut *reader, inner.launch.config.max_frame).await {
                    Ok(Some(body)) => body,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                };
            // Replies, the most frequent frame and the one that can be
            // large, are read in place.
            let body = match protocol::decode_reply(body) {
                Ok((id, result)) => {
                    inner.resolve(id, result);
                    continue;
                }
                Err(body) => body,
            };
            match protocol::decode::<FromHost>(&body) {
                Ok(FromHost::Reply { id, result }) => {
                    inner.resolve(id, result.map(|v| v.map(|b| b.into_vec().into())))
                }
                Ok(FromHost::Output { stream, data }) => inner.output().write(stream, &data),
                Ok(FromHost::Restart) if inner.restartable => restart = true,
                Ok(FromHost::Pong) => {}
                Ok(FromHost::Fatal { message, .. }) => break Some(message),
                Ok(other) => break Some(format!("unexpected message {other:?}")),
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(reason) = &broken {
            tracing::warn!(worker = %inner.name, "killing the worker: {reason}");
            *inner
                .ended_because
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
            inner.signal(Signal::Kill);
        }
        // `exited` is awaited at most once: a completed oneshot receiver
        // must not be polled again (it panics).
        let mut status = None;
        if restart && broken.is_none() && inner.running.load(Ordering::Acquire) {
            status = Some((&mut exited).await.ok());
            match connection::connect(&inner.launch).await {
                Ok(conn) => {
                    reader = conn.reader;
                    exited = conn.exited;
                    inner.reconnect(conn.frames, conn.signals, conn.pid, conn.host_pid);
                    continue;
                }
                Err(e) => tracing::warn!(worker = %inner.name, "cannot restart: {}", e.message),
            }
        }
        inner.terminate();
        inner.output().finish();
        let status = match status {
            Some(status) => status,
            None => match tokio::time::timeout(Duration::from_secs(2), &mut exited).await {
                Ok(status) => status.ok(),
                Err(_) => {
                    // The stream closed but the host lingers: make sure.
                    inner.signal(Signal::Kill);
                    tokio::time::timeout(Duration::from_secs(5), exited)
                        .await
                        .ok()
                        .and_then(|s| s.ok())
                }
            },
        };
        inner.exit.send_replace(Some(status));
        return;
    }
}

pub(crate) type Reply = std::result::Result<Option<protocol::FrameBytes>, Error>;

/// A request not answered yet.
pub(crate) struct Waiting {
    /// Where the answer goes (`None` for `remote_do`).
    pub(crate) tx: Option<oneshot::Sender<Reply>>,
    /// The request, kept to send again to a restarted native host.
    pub(crate) resend: Option<connection::Frame>,
}

pub(crate) struct Pending {
    pub(crate) waiting: BTreeMap<u64, Waiting>,
    /// Set once the worker is gone: new requests fail at once.
    pub(crate) closed: bool,
    /// The current connection's outgoing frames and control.
    pub(crate) frames: mpsc::UnboundedSender<connection::Frame>,
    pub(crate) signals: mpsc::UnboundedSender<Signal>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) number: u64,
    pub(crate) kind: WorkerKind,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) pid: AtomicU32,
    pub(crate) host_pid: AtomicU32,
    pub(crate) next_id: AtomicU64,
    pub(crate) running: AtomicBool,
    /// The exit status once the worker is gone for good.
    pub(crate) exit: watch::Sender<Option<Option<std::process::ExitStatus>>>,
    pub(crate) restartable: bool,
    pub(crate) max_pending: usize,
    pub(crate) launch: Launch,
    /// Why the host ended the worker, when it said (a fatal frame), or why
    /// the manager did (a frame it could not read).
    pub(crate) ended_because: Mutex<Option<String>>,
    /// What the host process locked down (a hardened wasm host only).
    pub(crate) hardening: Option<crate::protocol::Hardening>,
}

impl Inner {
    pub(crate) fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn output(&self) -> std::sync::MutexGuard<'_, OutputSink> {
        self.launch.output.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn signal(&self, signal: Signal) {
        let _ = self.lock_pending().signals.send(signal);
    }

    /// Switches to a restarted host and sends it every unanswered request,
    /// in order.
    pub(crate) fn reconnect(
        &self,
        frames: mpsc::UnboundedSender<connection::Frame>,
        signals: mpsc::UnboundedSender<Signal>,
        pid: u32,
        host_pid: u32,
    ) {
        let mut pending = self.lock_pending();
        for waiting in pending.waiting.values() {
            if let Some(frame) = &waiting.resend {
                let _ = frames.send(frame.clone());
            }
        }
        pending.frames = frames;
        pending.signals = signals;
        self.pid.store(pid, Ordering::Release);
        self.host_pid.store(host_pid, Ordering::Release);
        if !self.running.load(Ordering::Acquire) {
            // Killed while restarting.
            let _ = pending.signals.send(Signal::Kill);
        }
    }

    /// Marks the worker gone and fails every pending request.
    pub(crate) fn terminate(&self) {
        self.running.store(false, Ordering::Release);
        let waiting = {
            let mut pending = self.lock_pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiting)
        };
        for (_, waiting) in waiting {
            if let Some(tx) = waiting.tx {
                let _ = tx.send(Err(Error::TerminatedWorker));
            }
        }
    }

    pub(crate) fn resolve(
        &self,
        id: u64,
        result: std::result::Result<Option<protocol::FrameBytes>, Failure>,
    ) {
        let Some(Waiting { tx: Some(tx), .. }) = self.lock_pending().waiting.remove(&id) else {
            return;
        };
        let _ = tx.send(result.map_err(|f| self.failure(f)));
    }

    pub(crate) fn failure(&self, failure: Failure) -> Error {
        match failure {
            Failure::Remote(message) => Error::Remote(RemoteException {
                worker: self.name.clone(),
                message,
            }),
            Failure::Interrupted {
                state_lost,
                rolled_back,
            } => Error::Interrupted {
                state_lost,
                rolled_back,
            },
            Failure::Timeout { .. } => Error::Timeout,
            Failure::Trap(message) => Error::Trap {
                worker: self.name.clone(),
                message,
            },
            Failure::Limit { limit, message } => Error::LimitExceeded {
                worker: self.name.clone(),
                limit,
                message,
            },
            Failure::Invalid(message) => Error::Invalid {
                worker: self.name.clone(),
                message,
            },
        }
    }

    /// Sends a request; the receiver gets its reply.
    pub(crate) fn request(
        &self,
        message: impl FnOnce(u64) -> ToHost,
    ) -> Result<oneshot::Receiver<Reply>> {
        let (tx, rx) = oneshot::channel();
        self.submit(message, Some(tx))?;
        Ok(rx)
    }

    /// Sends a request whose reply is awaited by `tx` (or by nobody).
    pub(crate) fn submit(
        &self,
        message: impl FnOnce(u64) -> ToHost,
        tx: Option<oneshot::Sender<Reply>>,
    ) -> Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.request_frame(message(id))?;
        let mut pending = self.lock_pending();
        if pending.closed {
            return Err(Error::TerminatedWorker);
        }
        if pending.waiting.len() >= self.max_pending {
            return Err(Error::LimitExceeded {
                worker: self.name.clone(),
                limit: protocol::Limit::PendingRequests,
                message: format!(
                    "{} requests are already waiting for a reply",
                    self.max_pending
                ),
            });
        }
        let resend = self.restartable.then(|| frame.clone());
        // Sent under the lock, so a restart sends every request once:
        // either from this queue or from its own list, never both.
        let _ = pending.frames.send(frame);
        pending.waiting.insert(id, Waiting { tx, resend });
        Ok(())
    }

    /// Sends a message that gets no reply.
    pub(crate) fn send(&self, message: &ToHost) -> Result<()> {
        if !self.running.load(Ordering::Acquire) {
            return Err(Error::TerminatedWorker);
        }
        let frame = connection::Frame::Whole(self.frame(message)?);
        self.lock_pending()
            .frames
            .send(frame)
            .map_err(|_| Error::TerminatedWorker)
    }

    pub(crate) fn frame(&self, message: &ToHost) -> Result<Vec<u8>> {
        protocol::encode_capped(message, self.launch.config.max_frame)
            .map_err(|e| self.too_large(e))
    }

    /// A request's frame: a call with large arguments is sent as a head
    /// and the arguments as they are, not copied into one frame.
    fn request_frame(&self, message: ToHost) -> Result<connection::Frame> {
        match message {
            ToHost::Call {
                id,
                name,
                args,
                reply,
            } if args.len() >= protocol::IN_PLACE_BYTES => {
                let max = self.launch.config.max_frame;
                let head = protocol::call_head(id, &name, reply, args.len(), max)
                    .map_err(|e| self.too_large(e))?;
                Ok(connection::Frame::Split(head, Arc::new(args)))
            }
            message => Ok(connection::Frame::Whole(self.frame(&message)?)),
        }
    }

    fn too_large(&self, e: protocol::FrameError) -> Error {
        Error::LimitExceeded {
            worker: self.name.clone(),
            limit: protocol::Limit::FrameSize,
            message: format!("the request is too large: {e}"),
        }
    }

    pub(crate) fn decode<R: DeserializeOwned>(&self, bytes: &[u8]) -> Result<R> {
        decode_value(&self.name, bytes)
    }
}
