//! Worker output: forwarded to the manager's stdout/stderr with a prefix,
//! or handed to the caller.

use std::io::{IsTerminal, Write};

use tokio::sync::mpsc;

pub use crate::protocol::Stream;

/// A chunk of output a worker's guest wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream it was written to.
    pub stream: Stream,
    /// The bytes, as written (not split into lines).
    pub data: Vec<u8>,
}

/// The output of a worker spawned with output monitoring off.
///
/// Read it with [`recv`](WorkerOutput::recv). The queue is bounded: when
/// the caller does not keep up, chunks are dropped and a notice chunk on
/// [`Stream::Stderr`] says how many bytes were lost.
#[derive(Debug)]
pub struct WorkerOutput {
    rx: mpsc::Receiver<OutputChunk>,
}

impl WorkerOutput {
    /// The next chunk; `None` once the worker has exited and all its output
    /// was read.
    pub async fn recv(&mut self) -> Option<OutputChunk> {
        self.rx.recv().await
    }

    /// The next chunk, waiting without an async runtime (for programs on
    /// [`crate::blocking`]); `None` once the worker has exited and all its
    /// output was read. Do not call it from async code.
    pub fn blocking_recv(&mut self) -> Option<OutputChunk> {
        self.rx.blocking_recv()
    }

    /// The next chunk if one is ready.
    pub fn try_recv(&mut self) -> Option<OutputChunk> {
        self.rx.try_recv().ok()
    }

    /// Reads chunks of one stream until the worker exits, as text.
    pub async fn read_to_string(&mut self, stream: Stream) -> String {
        let mut bytes = Vec::new();
        while let Some(chunk) = self.recv().await {
            if chunk.stream == stream {
                bytes.extend_from_slice(&chunk.data);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Chunks kept for a caller that reads output itself.
const CAPTURE_CHUNKS: usize = 4096;

/// Where a worker's output goes.
pub(crate) enum OutputSink {
    /// To the manager's stdout/stderr, each line prefixed with the worker.
    Forward {
        prefix: String,
        partial: [Vec<u8>; 2],
        /// Whether stdout / stderr get colors (decided once).
        color: [bool; 2],
    },
    /// To the caller (`None` once the worker is gone, which ends the
    /// caller's stream).
    Capture {
        tx: Option<mpsc::Sender<OutputChunk>>,
        dropped: usize,
    },
}

fn color_enabled(stream: Stream) -> bool {
    if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return false;
    }
    match stream {
        Stream::Stdout => std::io::stdout().is_terminal(),
        Stream::Stderr => std::io::stderr().is_terminal(),
    }
}

impl OutputSink {
    pub fn forward(prefix: String) -> Self {
        OutputSink::Forward {
            prefix,
            partial: [Vec::new(), Vec::new()],
            color: [color_enabled(Stream::Stdout), color_enabled(Stream::Stderr)],
        }
    }

    pub fn capture() -> (Self, WorkerOutput) {
        let (tx, rx) = mpsc::channel(CAPTURE_CHUNKS);
        (
            OutputSink::Capture {
                tx: Some(tx),
                dropped: 0,
            },
            WorkerOutput { rx },
        )
    }

    pub fn write(&mut self, stream: Stream, data: &[u8]) {
        match self {
            OutputSink::Forward {
                prefix,
                partial,
                color,
            } => {
                let buf = &mut partial[stream as usize];
                buf.extend_from_slice(data);
                if let Some(last_newline) = buf.iter().rposition(|&b| b == b'\n') {
                    let rest = buf.split_off(last_newline + 1);
                    let lines = std::mem::replace(buf, rest);
                    emit(prefix, stream, color[stream as usize], &lines);
                }
            }
            OutputSink::Capture { tx, dropped } => {
                let Some(tx) = tx else { return };
                if *dropped > 0 {
                    let notice = format!("[malt: {dropped} bytes of worker output were dropped]\n");
                    if tx
                        .try_send(OutputChunk {
                            stream: Stream::Stderr,
                            data: notice.into_bytes(),
                        })
                        .is_ok()
                    {
                        *dropped = 0;
                    }
                }
                let chunk = OutputChunk {
                    stream,
                    data: data.to_vec(),
                };
                if let Err(mpsc::error::TrySendError::Full(chunk)) = tx.try_send(chunk) {
                    *dropped += chunk.data.len();
                }
            }
        }
    }

    /// Writes out partial lines (the worker is gone).
    pub fn finish(&mut self) {
        match self {
            OutputSink::Forward {
                prefix,
                partial,
                color,
            } => {
                for (stream, buf) in [Stream::Stdout, Stream::Stderr].into_iter().zip(partial) {
                    if !buf.is_empty() {
                        buf.push(b'\n');
                        emit(prefix, stream, color[stream as usize], buf);
                        buf.clear();
                    }
                }
            }
            OutputSink::Capture { tx, .. } => *tx = None,
        }
    }
}

/// Writes whole lines with the worker prefix (blue for stdout, yellow for
/// stderr on a terminal).
fn emit(prefix: &str, stream: Stream, color: bool, lines: &[u8]) {
    let (start, end) = match (color, stream) {
        (false, _) => ("", ""),
        (true, Stream::Stdout) => ("\x1b[34m", "\x1b[0m"),
        (true, Stream::Stderr) => ("\x1b[33m", "\x1b[0m"),
    };
    let mut text = Vec::with_capacity(lines.len() + 32);
    for line in lines.split_inclusive(|&b| b == b'\n') {
        text.extend_from_slice(start.as_bytes());
        text.extend_from_slice(prefix.as_bytes());
        text.extend_from_slice(end.as_bytes());
        text.extend_from_slice(line);
    }
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(&text),
        Stream::Stderr => std::io::stderr().lock().write_all(&text),
    };
}
