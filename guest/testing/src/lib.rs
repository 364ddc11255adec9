//! A guest for malt's tests, written once with `malt-guest` and built both
//! as a wasm component (the library, for wasm32-wasip2) and as a native
//! worker program (`src/main.rs`). It does what a well-behaved guest must
//! not (spin without polling for interrupts, panic, allocate without
//! end), so the tests can check that every kind of worker copes.
//!
//! Functions:
//! - `add(a, b)`: a + b;
//! - `echo(bytes)`: returns its argument;
//! - `bytes(n)`: n bytes of 7;
//! - `spin()`: puts 1 on channel `started`, then loops forever and never
//!   polls for an interrupt;
//! - `nap(ms)`: puts 1 on channel `started`, sleeps (an interrupt cuts it
//!   short) and says whether it slept the whole time;
//! - `panic(message)`: panics;
//! - `alloc(mib)`: allocates and touches `mib` MiB, returns the count;
//! - `print(text)`: prints a line to stdout;
//! - `relay(from, to)`: takes a value from one channel, puts it on another;
//! - `read(path)`, `write(path, text)`, `env_var(name)`, `connect(addr)`,
//!   `spawn(program)`: what an attacker tries; the sandbox must refuse;
//! - `nested(code)` (native only): starts a script worker of its own and
//!   evaluates `code` there;
//! - `bump()`: adds 1 to the guest's counter and returns it (state that an
//!   interrupt must keep and a kill loses);
//! - `wasi_sleep(ms, obey)`: puts 1 on `started`, then sleeps with
//!   `std::thread::sleep` (a WASI clock wait) until `ms` have passed; when
//!   `obey`, returns the error `interrupted` as soon as it wakes to find
//!   an interrupt, otherwise goes back to sleep;
//! - `wasi_poll(obey)` (wasm only): polls a pollable that never becomes
//!   ready, the same way;
//! - `hoard(path, n)`: opens a file `n` times, keeping every handle;
//! - `fifo_read(path, obey)`: reads from a FIFO (a blocking WASI read),
//!   the same way; returns the number of bytes read.
//!
//! Set `MALT_TEST_START=loop` or `sleep` in the guest's environment and
//! its start (`_initialize`, run when the component is instantiated)
//! spins or sleeps forever; `again:PATH` starts once (it creates the file
//! PATH, in a granted directory) and spins on every later start.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use malt_guest::Guest;
use serde_bytes::ByteBuf;

/// State that lives as long as the guest's instance.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Waits with `wait` until `ms` have passed; when `obey`, stops with an
/// error as soon as it wakes to find an interrupt.
fn wait_until(ms: u64, obey: bool, mut wait: impl FnMut(Duration)) -> Result<bool, String> {
    malt_guest::channel_put("started", &1i64)?;
    let end = Instant::now() + Duration::from_millis(ms);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(true);
        }
        wait(left);
        if obey && malt_guest::interrupted() {
            return Err("interrupted".into());
        }
    }
}

fn guest() -> Guest {
    let guest = Guest::new();
    // Natively, a guest can be a manager too: start a worker and use it.
    #[cfg(not(target_arch = "wasm32"))]
    let guest = guest.func("nested", |(code,): (String,)| {
        let w = malt::blocking::Worker::script()
            .spawn()
            .map_err(|e| e.to_string())?;
        let value: i64 = w.remote_eval_fetch(&code).map_err(|e| e.to_string())?;
        w.stop().map_err(|e| e.to_string())?;
        Ok(value)
    });
    guest
        .func("add", |(a, b): (i64, i64)| Ok(a + b))
        .func("echo", |(b,): (ByteBuf,)| Ok(b))
        .func("bytes", |(n,): (usize,)| Ok(ByteBuf::from(vec![7u8; n])))
        .func("spin", |(): ()| -> Result<(), String> {
            // Tell a waiting test that the spin has begun.
            malt_guest::channel_put("started", &1i64)?;
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        })
        .func("nap", |(ms,): (u64,)| {
            malt_guest::channel_put("started", &1i64)?;
            Ok(malt_guest::sleep(Duration::from_millis(ms)))
        })
        .func("bump", |(): ()| {
            Ok(COUNTER.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .func("wasi_sleep", |(ms, obey): (u64, bool)| {
            wait_until(ms, obey, std::thread::sleep)
        })
        .func("wasi_poll", |(obey,): (bool,)| -> Result<(), String> {
            #[cfg(target_arch = "wasm32")]
            {
                let never = wasip2::clocks::monotonic_clock::subscribe_duration(u64::MAX);
                wait_until(u64::MAX / 2, obey, |_| {
                    wasip2::io::poll::poll(&[&never]);
                })?;
                Ok(())
            }
            #[cfg(not(target_arch = "wasm32"))]
            {
                let _ = obey;
                Err("wasi_poll is for wasm guests".into())
            }
        })
        .func("fifo_read", |(path, obey): (String, bool)| {
            let mut fifo = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
            malt_guest::channel_put("started", &1i64)?;
            let mut buf = [0u8; 64];
            loop {
                match fifo.read(&mut buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if obey && malt_guest::interrupted() => {
                        return Err(format!("interrupted ({e})"));
                    }
                    Err(_) => continue,
                }
            }
        })
        .func("hoard", |(path, n): (String, usize)| {
            // Keeps `n` handles of one file open at once.
            let mut files = Vec::new();
            for _ in 0..n {
                files.push(std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?);
            }
            Ok(files.len())
        })
        .func("panic", |(m,): (String,)| -> Result<(), String> {
            panic!("{m}")
        })
        .func("alloc", |(mib,): (usize,)| {
            let mut keep = Vec::new();
            for _ in 0..mib {
                keep.push(vec![1u8; 1 << 20]);
            }
            Ok(keep.len())
        })
        .func("print", |(t,): (String,)| {
            println!("{t}");
            Ok(())
        })
        // What an attacker would try: each returns the error text it got.
        .func("read", |(path,): (String,)| {
            std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))
        })
        .func("write", |(path, text): (String, String)| {
            std::fs::write(&path, text).map_err(|e| format!("write {path}: {e}"))
        })
        .func("env_var", |(name,): (String,)| Ok(std::env::var(name).ok()))
        .func("connect", |(addr,): (String,)| {
            std::net::TcpStream::connect(&addr)
                .map(|_| ())
                .map_err(|e| format!("connect {addr}: {e}"))
        })
        .func("spawn", |(program,): (String,)| {
            std::process::Command::new(&program)
                .status()
                .map(|s| s.code())
                .map_err(|e| format!("spawn {program}: {e}"))
        })
        .func("relay", |(from, to): (String, String)| {
            let v: i64 = malt_guest::channel_take(&from)?;
            malt_guest::channel_put(&to, &v)?;
            Ok(v)
        })
}

malt_guest::guest!(guest);

/// A start that never ends, on request (see the crate docs): the
/// component model runs a module's `_initialize` when it instantiates the
/// component, before any call.
#[cfg(target_arch = "wasm32")]
#[unsafe(export_name = "_initialize")]
extern "C" fn initialize() {
    unsafe extern "C" {
        // Static constructors, which `_initialize` is expected to run.
        fn __wasm_call_ctors();
    }
    // SAFETY: called once, first thing, as wasi-libc's reactor start does.
    unsafe { __wasm_call_ctors() };
    match std::env::var("MALT_TEST_START").as_deref() {
        Ok("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Ok("sleep") => std::thread::sleep(Duration::from_secs(3600)),
        // Starts the first time, spins every time after (a reset).
        Ok(v) if v.starts_with("again:") => {
            let marker = &v["again:".len()..];
            if std::fs::exists(marker).unwrap_or(true) {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            let _ = std::fs::write(marker, b"started");
        }
        _ => {}
    }
}
