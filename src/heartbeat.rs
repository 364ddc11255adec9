//! Heartbeats on a link to a host behind a launcher: the manager sends a
//! ping every interval and watches for bytes from the host (any frame,
//! or part of one, counts); silence for [`HEARTBEAT_MISSES`] intervals
//! means the link or the host is gone, though no end of stream came (a
//! dead network, a frozen `ssh`). The watcher then kills the launcher
//! process, and the reader ends the worker with the reason.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use crate::connection::Signal;
use crate::protocol::{self, HEARTBEAT_MISSES, ToHost};

/// What the watcher and the reader share.
struct Link {
    epoch: Instant,
    /// Milliseconds since `epoch` when bytes last arrived.
    last: AtomicU64,
    /// Why the watcher gave up on the link.
    lost: OnceLock<String>,
}

impl Link {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn silence(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// A reader that notes when bytes arrive, and ends with the watcher's
/// reason (an error) once the watcher gave up on the link.
struct Heard {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    link: Arc<Link>,
}

impl AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.link.last.store(this.link.now(), Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(result) => match this.link.lost.get() {
                Some(why) => Poll::Ready(Err(io::Error::other(why.clone()))),
                None => Poll::Ready(result),
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Starts the heartbeat of one connection; returns its reader, watched.
pub(crate) fn watch(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    interval: Duration,
    frames: mpsc::UnboundedSender<crate::connection::Frame>,
    signals: mpsc::UnboundedSender<Signal>,
) -> Box<dyn AsyncRead + Send + Unpin> {
    let link = Arc::new(Link {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
        lost: OnceLock::new(),
    });
    let limit = interval * HEARTBEAT_MISSES;
    let watched = link.clone();
    tokio::spawn(async move {
        let ping = protocol::encode(&ToHost::Ping);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            // The writer is gone with the connection: so is the need.
            if frames
                .send(crate::connection::Frame::Whole(ping.clone()))
                .is_err()
            {
                return;
            }
            let silence = watched.silence();
            if silence >= limit {
                let _ = watched.lost.set(format!(
                    "the link to the host was silent for {:.1} s (heartbeat every {interval:?})",
                    silence.as_secs_f64()
                ));
                let _ = signals.send(Signal::Kill);
                return;
            }
        }
    });
    Box::new(Heard {
        inner: reader,
        link,
    })
}
