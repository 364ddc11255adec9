//! Compiling untrusted wasm in a child process, with limits.
//!
//! Cranelift's time and memory grow with what it is given: a component
//! built to make it slow or hungry (a compile bomb) must not stall or
//! exhaust the manager. So the manager never compiles in its own process:
//! it starts its own executable again with [`COMPILE_ARG`] (served by the
//! start-up hook, like a worker host), which locks itself down (seccomp,
//! Landlock with no file at all, no core dumps), caps its address space
//! and CPU time, reads the wasm on stdin and writes the artifact on
//! stdout. The manager kills it at the wall-clock limit.
//!
//! Limits: `$MALT_COMPILE_MEMORY` (bytes of address space, default 4 GiB)
//! and `$MALT_COMPILE_TIMEOUT` (seconds, fractions allowed; default 600:
//! an unoptimized debug build of malt compiles the script guest in ~40 s;
//! the CPU time of all its threads is capped at the same number of
//! seconds, rounded up).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cache::WasmKind;
use crate::error::{Error, Result};

/// First argument that makes a program linking malt a compiler process.
pub(crate) const COMPILE_ARG: &str = "__malt-compile";

/// Environment variable: the compiler's address-space limit, in bytes.
pub const COMPILE_MEMORY_ENV: &str = "MALT_COMPILE_MEMORY";
/// Environment variable: the compiler's wall-clock limit, in seconds.
pub const COMPILE_TIMEOUT_ENV: &str = "MALT_COMPILE_TIMEOUT";

const DEFAULT_MEMORY: u64 = 4 << 30;
const DEFAULT_TIMEOUT: u64 = 600;

fn limit(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// The wall-clock limit: whole or fractional seconds.
fn timeout() -> Duration {
    std::env::var(COMPILE_TIMEOUT_ENV)
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v.trim().parse().ok()?).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT))
}

/// Compiles `bytes` in a child process; the artifact's bytes.
pub(crate) fn compile(bytes: &[u8], kind: WasmKind, fuel: bool, what: &str) -> Result<Vec<u8>> {
    let memory = limit(COMPILE_MEMORY_ENV, DEFAULT_MEMORY);
    let timeout = timeout();
    let failed = |why: String| Error::Component(format!("cannot compile {what}: {why}"));
    let mut child = Command::new("/proc/self/exe")
        .arg(COMPILE_ARG)
        .arg(if fuel { "fuel" } else { "no-fuel" })
        .arg(match kind {
            WasmKind::Component => "component",
            WasmKind::CoreModule => "module",
        })
        .arg(memory.to_string())
        // CPU time: the wall-clock limit, rounded up, for every thread.
        .arg(timeout.as_secs_f64().ceil().max(1.0).to_string())
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start the compiler process: {e}")))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = bytes.to_vec();
    // Written from a thread: the child may fill its stdout meanwhile.
    let writer = std::thread::spawn(move || {
        // A compiler that died (or was killed) must be an error here, not
        // a SIGPIPE for a manager that restored its default disposition.
        // SAFETY: sigemptyset/sigaddset on a local set, then
        // pthread_sigmask on this thread alone.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let _ = stdin.write_all(&input);
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let (output, timed_out) = match done_rx.recv_timeout(timeout) {
        Ok(output) => (output, false),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not reaped yet (the waiting
            // thread reaps it only once it has exited).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let output = done_rx
                .recv()
                .map_err(|_| failed("the compiler process was lost".into()))?;
            (output, true)
        }
    };
    let _ = writer.join();
    let output = output.map_err(|e| failed(format!("the compiler process failed: {e}")))?;
    if output.status.success() && !timed_out {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    use std::os::unix::process::ExitStatusExt;
    Err(failed(if timed_out {
        format!(
            "the compiler took longer than {timeout:?} and was stopped (a compile bomb?); \
             ${COMPILE_TIMEOUT_ENV} raises the limit"
        )
    } else if output.status.signal() == Some(libc::SIGXCPU) {
        format!(
            "the compiler used more than its CPU time ({timeout:?}) and was stopped (a \
             compile bomb?); ${COMPILE_TIMEOUT_ENV} raises the limit"
        )
    } else if stderr.contains("memory allocation") || stderr.contains("out of memory") {
        format!(
            "the compiler ran out of its memory limit ({memory} bytes; a compile bomb?); \
             ${COMPILE_MEMORY_ENV} raises the limit"
        )
    } else if stderr.is_empty() {
        format!("the compiler process ended with {}", output.status)
    } else {
        stderr.to_string()
    }))
}

/// The child side: `ARGS = [fuel|no-fuel, component|module, memory, secs]`.
/// Never returns.
pub(crate) fn serve(args: &[String]) -> ! {
    std::process::exit(match compile_here(args) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("{message}");
            2
        }
    })
}

fn compile_here(args: &[String]) -> std::result::Result<(), String> {
    let [fuel, kind, memory, secs] = args else {
        return Err(format!("{COMPILE_ARG}: expected 4 arguments, got {args:?}"));
    };
    let number = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("{COMPILE_ARG}: {s}: {e}"))
    };
    let (memory, secs) = (number(memory)?, number(secs)?);
    // Cranelift compiles on rayon's global pool: start its threads (and
    // map their stacks) before the address space is capped, so that the
    // cap fails an allocation (a clear out-of-memory) rather than the
    // creation of a thread.
    rayon_core::ThreadPoolBuilder::new()
        .build_global()
        .map_err(|e| format!("cannot start the compiler's threads: {e}"))?;
    // SAFETY: prctl and setrlimit with valid arguments; nothing else runs
    // yet in this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        for (resource, value) in [
            (libc::RLIMIT_AS, memory),
            (libc::RLIMIT_CPU, secs),
            (libc::RLIMIT_CORE, 0),
        ] {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
            }
        }
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the wasm: {e}"))?;
    let engine = wasmtime::Engine::new(&malt_host::wasm::engine_config(fuel == "fuel"))
        .map_err(|e| format!("cannot create the compiler: {e:#}"))?;
    // The wasm is untrusted: no file, no process, no network from here on.
    // Its memory is capped already (the address space, by the manager).
    malt_host::harden_process(&[], u64::MAX)
        .map_err(|e| format!("cannot lock the compiler: {e}"))?;
    let compiled = match kind.as_str() {
        "component" => engine.precompile_component(&bytes),
        _ => engine.precompile_module(&bytes),
    }
    .map_err(|e| format!("{e:#}"))?;
    std::io::stdout()
        .lock()
        .write_all(&compiled)
        .map_err(|e| format!("writing the artifact: {e}"))
}
