//! Guest stdout and stderr, forwarded as output frames.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::Shared;
use malt_protocol::Stream;

/// The worker a store's output goes to. A spare store (`spares.rs`) is
/// made before its worker exists, and handed to it later.
pub(super) type OutputTo = Arc<Mutex<Arc<Shared>>>;

/// One of the guest's output streams.
#[derive(Clone)]
pub(super) struct FrameOutput {
    pub to: OutputTo,
    pub stream: Stream,
}

impl FrameOutput {
    fn write(&self, bytes: &[u8]) {
        let to = self.to.lock().unwrap_or_else(|e| e.into_inner());
        to.output(self.stream, bytes);
    }
}

impl IsTerminal for FrameOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for FrameOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for FrameOutput {
    async fn ready(&mut self) {}
}

/// Largest write the guest is offered at once.
const OUTPUT_PERMIT: usize = 64 << 10;

impl OutputStream for FrameOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        FrameOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_PERMIT)
    }
}

impl tokio::io::AsyncWrite for FrameOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        FrameOutput::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
