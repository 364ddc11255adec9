//! malt-bench: every figure next to the physical floor it runs on,
//! measured in the same run, printed as a markdown table.
//!
//! Run with `cargo bench --bench malt_bench` (add `-- --quick` for fewer
//! samples). The floors are raw pipes between two processes: this binary
//! started again in echo mode.

#[path = "../../tests/support/guests.rs"]
#[allow(dead_code)]
mod guests;

#[path = "../../tests/support/procs.rs"]
mod procs;
#[path = "../../tests/support/sshd.rs"]
mod sshd;

mod floor;
mod focus;
mod interrupts;
mod peers;
mod pools;
mod python;
mod remote;
mod report;
mod rollback;

use floor::*;
use report::*;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use malt::{Error, Worker, WorkerBuilder};
use serde_bytes::ByteBuf;

pub(crate) const ECHO_ARG: &str = "__malt_bench_echo";

fn host(builder: WorkerBuilder) -> WorkerBuilder {
    builder.monitor_output(false)
}

async fn time_calls(w: &Worker, n: usize, mut call: impl AsyncFnMut(&Worker)) -> Stats {
    for _ in 0..n / 10 {
        call(w).await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        call(w).await;
        samples.push(start.elapsed());
    }
    stats(samples)
}

/// Calls per second of `calls` calls of `add` sent at once to one worker.
pub(crate) async fn pipelined_rate(w: &Worker, calls: usize) -> Result<f64, Error> {
    let start = Instant::now();
    let handles: Vec<_> = (0..calls as i64)
        .map(|i| w.remote_call::<i64>("add", (i, 1)))
        .collect();
    for h in handles {
        h.await?;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

fn pss_rss_kib(pid: u32) -> (u64, u64) {
    let [rss, pss] = smaps_kib(pid, ["Rss:", "Pss:"]);
    (rss, pss)
}

/// Fields (KiB) of `/proc/<pid>/smaps_rollup`, 0 where missing.
pub(crate) fn smaps_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    names.map(|name| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    })
}

async fn run(quick: bool) -> Result<Table, Error> {
    let n = if quick { 2_000 } else { 20_000 };
    let mut table = Table::new();
    // `-- --pools` measures pools alone.
    if std::env::args().any(|a| a == "--pools") {
        pools::measure(&mut table, quick).await?;
        return Ok(table);
    }
    // `-- --python` measures Python guests alone.
    if std::env::args().any(|a| a == "--python") {
        python::measure(&mut table, quick).await?;
        return Ok(table);
    }
    // `-- --rollback` measures rollback alone.
    if std::env::args().any(|a| a == "--rollback") {
        rollback::measure(&mut table, quick).await?;
        return Ok(table);
    }
    // `-- --remote` measures workers over SSH alone.
    if std::env::args().any(|a| a == "--remote") {
        remote::measure(&mut table, quick).await?;
        python::measure(&mut table, quick).await?;
        return Ok(table);
    }
    let guest = guests::test_guest();
    // `-- --throughput` and `-- --payload`: one figure alone, repeated
    // (for a profiler).
    if focus::wanted() {
        focus::measure(&mut table, &guest).await?;
        return Ok(table);
    }

    // 1. Call round trip. The call frame is ~30 bytes.
    let floor = floor_round_trip(n, 32);
    table.timing("raw pipe ping-pong, 32 B (the floor)", floor, None, "");
    for (label, builder) in [
        ("wasm", host(Worker::script())),
        ("native", host(Worker::native())),
        ("in-process", host(Worker::script().in_process())),
    ] {
        let w = builder.spawn().await?;
        w.remote_eval_wait("fn add(a, b) { a + b }").await?;
        let s = time_calls(&w, n, async |w| {
            let _: i64 = w.remote_call_fetch("add", (1, 2)).await.unwrap();
        })
        .await;
        let goal = if label == "wasm" { "≤ 3× floor" } else { "" };
        table.timing(
            &format!("{label}: `remote_call_fetch(\"add\", (1, 2))`"),
            s,
            Some(floor),
            goal,
        );
        let s = time_calls(&w, n, async |w| {
            let _: i64 = w.remote_eval_fetch("1+1").await.unwrap();
        })
        .await;
        table.timing(
            &format!("{label}: `remote_eval_fetch(\"1+1\")`"),
            s,
            Some(floor),
            goal,
        );
        w.stop().await?;
    }
    // The raw test guest (no script engine): the protocol's own cost.
    let w = host(Worker::wasm(&guest)).spawn().await?;
    let s = time_calls(&w, n, async |w| {
        let _: i64 = w.remote_call_fetch("add", (1, 2)).await.unwrap();
    })
    .await;
    table.timing(
        "wasm, Rust guest: `remote_call_fetch(\"add\", (1, 2))`",
        s,
        Some(floor),
        "≤ 3× floor",
    );

    // The same call next to its peers: the add guest (the component the
    // wasmtime peers run too) and Python's multiprocessing round trips.
    let add = guests::add_guest();
    let wa = host(Worker::wasm(&add)).spawn().await?;
    let s = time_calls(&wa, n, async |w| {
        let _: i64 = w.remote_call_fetch("add", (1, 2)).await.unwrap();
    })
    .await;
    wa.stop().await?;
    table.timing(
        "wasm, add guest: `remote_call_fetch(\"add\", (1, 2))`",
        s,
        Some(floor),
        "≤ 3× floor",
    );
    match peers::wasmtime_in_process(&add, n) {
        Ok(p) => table.peer("wasmtime in this process, same component:", p),
        Err(e) => table.peer_figure(format!("wasmtime in-process failed: {e}"), "—".into()),
    }
    match peers::python_round_trips(n) {
        Some((pipe, apply)) => {
            table.peer("Python `Pipe`:", pipe);
            table.peer("Python `Pool(1).apply`:", apply);
        }
        None => table.peer_figure("Python: python3 not found, skipped".into(), "—".into()),
    }

    // 2. Throughput: calls pipelined on one worker.
    let calls = if quick { 20_000 } else { 100_000 };
    let rate = pipelined_rate(&w, calls).await?;
    let floor_rate = floor_pipelined(calls);
    table.figure(
        &format!("throughput, {calls} pipelined calls (wasm, Rust guest)"),
        format!("{:.0} calls/s", rate),
        format!("{:.0} frames/s", floor_rate),
        format!("{:.2}×", floor_rate / rate),
        "≥ 150 000/s",
    );

    // 4. Payload: 50 MB out of and into a worker.
    let size = 50 << 20;
    let samples = if quick { 3 } else { 10 };
    let mut out = Vec::new();
    let mut inn = Vec::new();
    let sent = ByteBuf::from(vec![9u8; size]);
    for _ in 0..samples {
        let start = Instant::now();
        let b: ByteBuf = w.remote_call_fetch("bytes", (size,)).await?;
        out.push(start.elapsed());
        assert_eq!(b.len(), size);
        let start = Instant::now();
        let _: ByteBuf = w.remote_call_fetch("echo", (&sent,)).await?;
        inn.push(start.elapsed());
    }
    let mut echo = Echo::start();
    let body = vec![9u8; size];
    let mut buf = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        echo.round_trip(&body, &mut buf);
        floor.push(start.elapsed());
    }
    echo.stop();
    let floor = stats(floor);
    table.timing(
        "50 MB returned by the worker (`bytes`)",
        stats(out),
        Some(floor),
        "≤ 1.5× floor",
    );
    table.timing(
        "50 MB sent to the worker and back (`echo`)",
        stats(inn),
        Some(floor),
        "≤ 1.5× floor",
    );
    w.stop().await?;

    // 3. Cold start: spawn (warm cache) + first result + stop.
    let n_start = if quick { 20 } else { 100 };
    let mut floor = Vec::new();
    for _ in 0..n_start {
        let start = Instant::now();
        let mut echo = Echo::start();
        echo.round_trip(b"ping", &mut Vec::new());
        echo.stop();
        floor.push(start.elapsed());
    }
    let floor = stats(floor);
    for (label, make) in [
        (
            "wasm (script guest)",
            (|| host(Worker::script())) as fn() -> WorkerBuilder,
        ),
        ("wasm (Rust guest)", || {
            host(Worker::wasm(guests::test_guest()))
        }),
        ("native (script guest)", || host(Worker::native())),
        ("in-process (script guest)", || {
            host(Worker::script().in_process())
        }),
    ] {
        let mut samples = Vec::new();
        for _ in 0..n_start {
            let start = Instant::now();
            let w = make().spawn().await?;
            if label.contains("Rust") {
                let _: i64 = w.remote_call_fetch("add", (1, 2)).await?;
            } else {
                let _: i64 = w.remote_eval_fetch("1+1").await?;
            }
            w.stop().await?;
            samples.push(start.elapsed());
        }
        let goal = if label.starts_with("wasm") {
            "≤ 3 ms"
        } else {
            ""
        };
        table.timing(
            &format!("cold start, {label}: spawn + first result + stop"),
            stats(samples),
            Some(floor),
            goal,
        );
    }
    // Where a wasm cold start goes.
    let (mut spawn, mut first, mut result, mut stop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n_start {
        let t0 = Instant::now();
        let w = host(Worker::script()).spawn().await?;
        let t1 = Instant::now();
        let _: i64 = w.remote_eval_fetch("1+1").await?;
        let t2 = Instant::now();
        w.stop().await?;
        spawn.push(t1 - t0);
        first.push(t2 - t1);
        result.push(t2 - t0);
        stop.push(t2.elapsed());
    }
    table.timing(
        "cold start to the first result, wasm script: spawn + first eval",
        stats(result),
        Some(floor),
        "≤ 2 ms",
    );
    table.timing(
        "cold start breakdown, wasm script: spawn (exec + load + instantiate + hello)",
        stats(spawn),
        Some(floor),
        "",
    );
    table.timing(
        "cold start breakdown: first eval (Rhai engine init)",
        stats(first),
        None,
        "",
    );
    table.timing(
        "cold start breakdown: stop (until the process is reaped)",
        stats(stop),
        None,
        "",
    );
    let cache = std::env::temp_dir().join(format!("malt-bench-cache-{}", std::process::id()));
    // SAFETY: set while no other thread reads the environment.
    unsafe { std::env::set_var(malt::CACHE_DIR_ENV, &cache) };
    let start = Instant::now();
    let w = host(Worker::wasm(guests::test_guest())).spawn().await?;
    let _: i64 = w.remote_call_fetch("add", (1, 2)).await?;
    w.stop().await?;
    let first = start.elapsed();
    unsafe { std::env::remove_var(malt::CACHE_DIR_ENV) };
    let _ = std::fs::remove_dir_all(&cache);
    table.figure(
        "first-ever start, Rust guest (compiles; cold cache)",
        fmt(first),
        "—".into(),
        "—".into(),
        "reported",
    );

    // The CLI, once per command, against the wasmtime CLI.
    peers::cli_one_shots(&mut table, quick);

    // 5. Interrupts.
    interrupts::measure(&mut table, quick).await?;

    // 6. Pools, and workers over SSH.
    pools::measure(&mut table, quick).await?;
    remote::measure(&mut table, quick).await?;

    // 7. Memory per idle wasm worker, and 8. scale.
    for count in [1usize, 10, 100, 200] {
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..count {
            workers.push(host(Worker::script()).spawn().await?);
        }
        let answers: Vec<_> = workers
            .iter()
            .map(|w| w.remote_eval::<i64>("40 + 2"))
            .collect();
        for a in answers {
            assert_eq!(a.await?, 42);
        }
        let elapsed = start.elapsed();
        let (rss, pss): (Vec<u64>, Vec<u64>) = workers.iter().map(|w| pss_rss_kib(w.pid())).unzip();
        let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0;
        if count == 200 {
            table.figure(
                "scale: 200 wasm workers spawned, each answering a call",
                format!(
                    "{} total, {:.2} ms per worker",
                    fmt(elapsed),
                    elapsed.as_secs_f64() * 1e3 / 200.0
                ),
                "—".into(),
                "—".into(),
                "works",
            );
        } else {
            table.figure(
                &format!("memory per idle wasm worker, {count} alive"),
                format!("PSS {:.1} MB, RSS {:.1} MB", avg(&pss), avg(&rss)),
                "—".into(),
                "—".into(),
                if count == 100 { "≤ 10 MB PSS" } else { "" },
            );
        }
        for w in &workers {
            w.stop().await?;
        }
    }
    // 9. Many workers started at once, each answering a call.
    concurrent_starts(&mut table, if quick { 200 } else { 1000 }).await?;
    Ok(table)
}

/// `count` script workers started at once, each answering a call: the
/// time until the last answer, and memory per worker.
async fn concurrent_starts(table: &mut Table, count: usize) -> Result<(), Error> {
    let start = Instant::now();
    let spawned =
        futures_util::future::join_all((0..count).map(|_| host(Worker::script()).spawn())).await;
    let workers = spawned.into_iter().collect::<Result<Vec<_>, _>>()?;
    let answers =
        futures_util::future::join_all(workers.iter().map(|w| w.remote_eval::<i64>("40 + 2")))
            .await;
    let elapsed = start.elapsed();
    for a in answers {
        assert_eq!(a?, 42);
    }
    let pss: u64 = workers.iter().map(|w| pss_rss_kib(w.pid()).1).sum();
    table.figure(
        &format!("scale: {count} wasm workers started concurrently, each answering a call"),
        format!(
            "{} total; PSS {:.1} MB per worker",
            fmt(elapsed),
            pss as f64 / count as f64 / 1024.0
        ),
        "—".into(),
        "—".into(),
        if count == 1000 { "≤ 2 s" } else { "" },
    );
    futures_util::future::join_all(workers.iter().map(|w| w.stop())).await;
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(ECHO_ARG) {
        echo();
    }
    // `cargo bench` passes --bench; `-- --quick` takes fewer samples.
    let quick = std::env::args().any(|a| a == "--quick");
    // A current-thread runtime: the task reading a worker's replies runs on
    // the thread that awaits them (no cross-thread wakeup per call).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    eprintln!("malt-bench ({} mode)", if quick { "quick" } else { "full" });
    match runtime.block_on(run(quick)) {
        Ok(table) => table.print(),
        Err(e) => {
            eprintln!("malt-bench failed: {e}");
            std::process::exit(1);
        }
    }
}
