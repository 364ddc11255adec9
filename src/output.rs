//! Worker output: forwarded to the manager's stdout/stderr with a prefix,
//! or handed to the caller.
//!
//! A guest controls what it prints, so every buffer here is bounded in
//! bytes: a line without end is cut (and forwarded in pieces), a caller
//! that does not read loses chunks (with a notice), and output forwarded
//! to a terminal has its control characters escaped (a guest must not
//! clear the screen, move the cursor or set the title).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
/// Read it with [`recv`](WorkerOutput::recv). The queue is bounded (4096
/// chunks, 64 MiB): when the caller does not keep up, chunks are dropped
/// and a notice chunk on [`Stream::Stderr`] says how many bytes were lost.
#[derive(Debug)]
pub struct WorkerOutput {
    rx: mpsc::Receiver<OutputChunk>,
    /// Bytes queued and not read yet (shared with the sink).
    queued: Arc<AtomicUsize>,
}

impl WorkerOutput {
    fn took(&self, chunk: Option<OutputChunk>) -> Option<OutputChunk> {
        if let Some(c) = &chunk {
            self.queued.fetch_sub(c.data.len(), Ordering::Relaxed);
        }
        chunk
    }

    /// The next chunk; `None` once the worker has exited and all its output
    /// was read.
    pub async fn recv(&mut self) -> Option<OutputChunk> {
        let chunk = self.rx.recv().await;
        self.took(chunk)
    }

    /// The next chunk, waiting without an async runtime (for programs on
    /// [`crate::blocking`]); `None` once the worker has exited and all its
    /// output was read. Do not call it from async code.
    pub fn blocking_recv(&mut self) -> Option<OutputChunk> {
        let chunk = self.rx.blocking_recv();
        self.took(chunk)
    }

    /// The next chunk if one is ready.
    pub fn try_recv(&mut self) -> Option<OutputChunk> {
        let chunk = self.rx.try_recv().ok();
        self.took(chunk)
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

/// Bytes kept for a caller that reads output itself; past this, chunks
/// are dropped until the caller catches up.
pub(crate) const CAPTURE_BYTES: usize = 64 << 20;

/// Longest partial line kept while forwarding; a longer one is forwarded
/// in pieces of this size.
pub(crate) const MAX_PARTIAL_LINE: usize = 64 << 10;

/// One forwarded stream: where it goes and the line it is in.
pub(crate) struct Forwarded {
    out: Box<dyn Write + Send>,
    partial: Vec<u8>,
    /// The color of the prefix, if colored (decided once).
    color: Option<&'static str>,
    /// Control characters escaped (a terminal).
    escape: bool,
}

/// Where a worker's output goes.
pub(crate) enum OutputSink {
    /// To the manager's stdout/stderr, each line prefixed with the worker.
    Forward {
        prefix: String,
        streams: [Forwarded; 2],
    },
    /// To the caller (`None` once the worker is gone, which ends the
    /// caller's stream).
    Capture {
        tx: Option<mpsc::Sender<OutputChunk>>,
        queued: Arc<AtomicUsize>,
        dropped: usize,
    },
}

fn is_terminal(stream: Stream) -> bool {
    match stream {
        Stream::Stdout => std::io::stdout().is_terminal(),
        Stream::Stderr => std::io::stderr().is_terminal(),
    }
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

impl OutputSink {
    pub fn forward(prefix: String) -> Self {
        let stream = |s: Stream| {
            let terminal = is_terminal(s);
            let out: Box<dyn Write + Send> = match s {
                Stream::Stdout => Box::new(std::io::stdout()),
                Stream::Stderr => Box::new(std::io::stderr()),
            };
            let color = match s {
                Stream::Stdout => "\x1b[34m",
                Stream::Stderr => "\x1b[33m",
            };
            Forwarded {
                out,
                partial: Vec::new(),
                color: (terminal && !no_color()).then_some(color),
                escape: terminal,
            }
        };
        OutputSink::Forward {
            prefix,
            streams: [stream(Stream::Stdout), stream(Stream::Stderr)],
        }
    }

    /// Forwarding into the given writers (tests).
    #[cfg(test)]
    fn forward_to(
        prefix: &str,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
        escape: bool,
    ) -> Self {
        let stream = |out| Forwarded {
            out,
            partial: Vec::new(),
            color: None,
            escape,
        };
        OutputSink::Forward {
            prefix: prefix.to_string(),
            streams: [stream(stdout), stream(stderr)],
        }
    }

    pub fn capture() -> (Self, WorkerOutput) {
        let (tx, rx) = mpsc::channel(CAPTURE_CHUNKS);
        let queued = Arc::new(AtomicUsize::new(0));
        (
            OutputSink::Capture {
                tx: Some(tx),
                queued: queued.clone(),
                dropped: 0,
            },
            WorkerOutput { rx, queued },
        )
    }

    pub fn write(&mut self, stream: Stream, data: &[u8]) {
        match self {
            OutputSink::Forward { prefix, streams } => {
                let s = &mut streams[stream as usize];
                // Only the new bytes are searched: a line that never ends
                // costs linear time, not quadratic.
                match data.iter().rposition(|&b| b == b'\n') {
                    Some(last) => {
                        s.partial.extend_from_slice(&data[..=last]);
                        let lines = std::mem::take(&mut s.partial);
                        s.emit(prefix, &lines);
                        s.partial.extend_from_slice(&data[last + 1..]);
                    }
                    None => s.partial.extend_from_slice(data),
                }
                while s.partial.len() > MAX_PARTIAL_LINE {
                    let rest = s.partial.split_off(MAX_PARTIAL_LINE);
                    let mut piece = std::mem::replace(&mut s.partial, rest);
                    piece.push(b'\n');
                    s.emit(prefix, &piece);
                }
            }
            OutputSink::Capture {
                tx,
                queued,
                dropped,
            } => {
                let Some(tx) = tx else { return };
                if *dropped > 0 {
                    let notice = format!("[malt: {dropped} bytes of worker output were dropped]\n");
                    if send(tx, queued, Stream::Stderr, notice.as_bytes()) {
                        *dropped = 0;
                    }
                }
                if !send(tx, queued, stream, data) {
                    *dropped += data.len();
                }
            }
        }
    }

    /// Writes out partial lines (the worker is gone).
    pub fn finish(&mut self) {
        match self {
            OutputSink::Forward { prefix, streams } => {
                for s in streams {
                    if !s.partial.is_empty() {
                        let mut line = std::mem::take(&mut s.partial);
                        line.push(b'\n');
                        s.emit(prefix, &line);
                    }
                }
            }
            OutputSink::Capture { tx, .. } => *tx = None,
        }
    }
}

/// Queues a chunk for the caller unless the chunk or byte budget is spent.
fn send(tx: &mpsc::Sender<OutputChunk>, queued: &AtomicUsize, stream: Stream, data: &[u8]) -> bool {
    if queued.load(Ordering::Relaxed) + data.len() > CAPTURE_BYTES {
        return false;
    }
    let chunk = OutputChunk {
        stream,
        data: data.to_vec(),
    };
    match tx.try_send(chunk) {
        Ok(()) => {
            queued.fetch_add(data.len(), Ordering::Relaxed);
            true
        }
        Err(_) => false,
    }
}

impl Forwarded {
    /// Writes whole lines with the worker prefix (blue for stdout, yellow
    /// for stderr, when colored).
    fn emit(&mut self, prefix: &str, lines: &[u8]) {
        let (start, end) = match self.color {
            None => ("", ""),
            Some(start) => (start, "\x1b[0m"),
        };
        let mut text = Vec::with_capacity(lines.len() + 32);
        for line in lines.split_inclusive(|&b| b == b'\n') {
            text.extend_from_slice(start.as_bytes());
            text.extend_from_slice(prefix.as_bytes());
            text.extend_from_slice(end.as_bytes());
            if self.escape {
                escape_controls(line, &mut text);
            } else {
                text.extend_from_slice(line);
            }
        }
        let _ = self.out.write_all(&text).and_then(|()| self.out.flush());
    }
}

/// Copies a line with its control characters made visible (`^[` for
/// escape, `^M` for a carriage return, `\u{9b}` for a C1 control), all but
/// tab and newline: what a guest prints cannot steer the terminal.
fn escape_controls(line: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        match b {
            b'\n' | b'\t' => out.push(b),
            0..0x20 | 0x7f => out.extend_from_slice(&[b'^', b ^ 0x40]),
            // U+0080..U+009F in UTF-8: C1 controls (CSI among them).
            0xc2 if line.get(i + 1).is_some_and(|c| (0x80..0xa0).contains(c)) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", line[i + 1]).as_bytes());
                i += 1;
            }
            _ => out.push(b),
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer whose bytes a test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sink(escape: bool) -> (OutputSink, Shared) {
        let out = Shared::default();
        let sink =
            OutputSink::forward_to("[w] ", Box::new(out.clone()), Box::new(out.clone()), escape);
        (sink, out)
    }

    fn partial_len(sink: &OutputSink) -> usize {
        match sink {
            OutputSink::Forward { streams, .. } => streams[0].partial.len(),
            OutputSink::Capture { .. } => unreachable!(),
        }
    }

    #[test]
    fn lines_are_prefixed_and_a_partial_line_waits() {
        let (mut sink, out) = sink(false);
        sink.write(Stream::Stdout, b"one\ntw");
        sink.write(Stream::Stdout, b"o\nthr");
        assert_eq!(*out.0.lock().unwrap(), b"[w] one\n[w] two\n");
        sink.finish();
        assert_eq!(*out.0.lock().unwrap(), b"[w] one\n[w] two\n[w] thr\n");
    }

    #[test]
    fn a_line_without_end_is_forwarded_in_bounded_pieces() {
        // A guest printing 16 MB per request without a newline: the
        // manager keeps at most one piece of it.
        let (mut sink, out) = sink(false);
        let chunk = vec![b'x'; 60 << 10];
        let mut sent = 0;
        while sent < 16 << 20 {
            sink.write(Stream::Stdout, &chunk);
            sent += chunk.len();
            assert!(partial_len(&sink) <= MAX_PARTIAL_LINE);
        }
        sink.finish();
        let out = out.0.lock().unwrap();
        let xs = out.iter().filter(|&&b| b == b'x').count();
        assert_eq!(xs, sent, "nothing is lost");
        let lines = out.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(lines, sent.div_ceil(MAX_PARTIAL_LINE));
    }

    #[test]
    fn control_characters_are_escaped_for_a_terminal() {
        let (mut sink, out) = sink(true);
        sink.write(
            Stream::Stderr,
            "clear\x1b[2J\rmalt> \u{9b}31m\tok\n".as_bytes(),
        );
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "[w] clear^[[2J^Mmalt> \\u{9b}31m\tok\n");
        // Not escaped when not a terminal: the bytes stay as written.
        let (mut sink, out) = super::tests::sink(false);
        sink.write(Stream::Stderr, b"a\x1b[2Jb\n");
        assert_eq!(*out.0.lock().unwrap(), b"[w] a\x1b[2Jb\n");
    }

    #[test]
    fn capture_is_bounded_in_bytes_and_says_what_it_dropped() {
        let (mut sink, mut output) = OutputSink::capture();
        let big = vec![1u8; 8 << 20];
        for _ in 0..(CAPTURE_BYTES / big.len() + 3) {
            sink.write(Stream::Stdout, &big);
        }
        let mut kept = 0;
        while let Some(chunk) = output.try_recv() {
            kept += chunk.data.len();
        }
        assert_eq!(kept, CAPTURE_BYTES, "the budget, and nothing more");
        // Once read, room again, and the loss is reported first.
        sink.write(Stream::Stdout, b"after");
        let notice = output.try_recv().unwrap();
        assert_eq!(notice.stream, Stream::Stderr);
        assert!(
            String::from_utf8_lossy(&notice.data).contains(&format!("{} bytes", 3 * big.len())),
            "{notice:?}"
        );
        assert_eq!(output.try_recv().unwrap().data, b"after");
    }
}
