//! The floors: raw pipes between two processes (this binary started again
//! in echo mode), measured the way malt's figures are.

use super::*;

/// Echo mode: read length-prefixed frames on stdin, write them back.
pub(crate) fn echo() -> ! {
    let mut input = std::io::BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    let mut output = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    let mut header = [0u8; 4];
    let mut body = Vec::new();
    while input.read_exact(&mut header).is_ok() {
        let len = u32::from_le_bytes(header) as usize;
        body.resize(len, 0);
        if input.read_exact(&mut body).is_err() {
            break;
        }
        if output
            .write_all(&header)
            .and_then(|_| output.write_all(&body))
            .is_err()
        {
            break;
        }
        // Like malt's writers: flush when no more input is waiting.
        if input.buffer().is_empty() && output.flush().is_err() {
            break;
        }
    }
    std::process::exit(0)
}

pub(crate) struct Echo {
    pub(crate) child: std::process::Child,
    pub(crate) stdin: std::process::ChildStdin,
    pub(crate) stdout: std::process::ChildStdout,
}

impl Echo {
    pub(crate) fn start() -> Echo {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg(ECHO_ARG);
        Echo::start_with(cmd)
    }

    /// The echo behind another command (e.g. `ssh … malt-bench echo`).
    pub(crate) fn start_with(mut cmd: Command) -> Echo {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Echo {
            child,
            stdin,
            stdout,
        }
    }

    pub(crate) fn send(&mut self, body: &[u8]) {
        self.stdin
            .write_all(&(body.len() as u32).to_le_bytes())
            .unwrap();
        self.stdin.write_all(body).unwrap();
        self.stdin.flush().unwrap();
    }

    pub(crate) fn recv(&mut self, buf: &mut Vec<u8>) {
        let mut header = [0u8; 4];
        self.stdout.read_exact(&mut header).unwrap();
        buf.resize(u32::from_le_bytes(header) as usize, 0);
        self.stdout.read_exact(buf).unwrap();
    }

    pub(crate) fn round_trip(&mut self, body: &[u8], buf: &mut Vec<u8>) {
        self.send(body);
        self.recv(buf);
    }

    pub(crate) fn stop(mut self) {
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

pub(crate) fn floor_round_trip(n: usize, size: usize) -> Stats {
    echo_round_trip(Echo::start(), n, size)
}

/// Round trips of `size` bytes through an echo.
pub(crate) fn echo_round_trip(mut echo: Echo, n: usize, size: usize) -> Stats {
    let body = vec![0x5au8; size];
    let mut buf = Vec::new();
    for _ in 0..n / 10 {
        echo.round_trip(&body, &mut buf);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        echo.round_trip(&body, &mut buf);
        samples.push(start.elapsed());
    }
    echo.stop();
    stats(samples)
}

/// Frames per second through the raw pipe, pipelined like the calls.
pub(crate) fn floor_pipelined(calls: usize) -> f64 {
    let Echo {
        mut child,
        stdin,
        mut stdout,
    } = Echo::start();
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut input = std::io::BufReader::new(&mut stdout);
        let mut header = [0u8; 4];
        let mut buf = Vec::new();
        for _ in 0..calls {
            input.read_exact(&mut header).unwrap();
            buf.resize(u32::from_le_bytes(header) as usize, 0);
            input.read_exact(&mut buf).unwrap();
        }
    });
    let mut out = std::io::BufWriter::new(stdin);
    let body = [0x5au8; 32];
    for _ in 0..calls {
        out.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        out.write_all(&body).unwrap();
    }
    out.flush().unwrap();
    reader.join().unwrap();
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    drop(out);
    let _ = child.wait();
    rate
}
