//! Python guests: start-up, a call's round trip, memory, and the speed of
//! Python code, next to native CPython (`python3`) in the same run.

use super::*;

/// The real `python3` executable (not a version manager's shim, whose
/// own start-up would count).
fn python3() -> Option<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string()).filter(|p| !p.is_empty())
}

/// Seconds `python3` takes for `code` (median of `runs`), or None.
fn native_python(code: &str, runs: usize) -> Option<Duration> {
    let python = python3()?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let status = Command::new(&python).args(["-c", code]).status().ok()?;
        if !status.success() {
            return None;
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    Some(samples[samples.len() / 2])
}

/// The loop's time in native CPython, measured by itself (no start-up).
fn native_loop() -> Option<f64> {
    let code = format!(
        "import time\nt = time.perf_counter()\nexec({LOOP:?}, {{}})\nprint(time.perf_counter() - t)"
    );
    let out = Command::new(python3()?).args(["-c", &code]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// pyeryx's figures, measured by `eryx_peer.py` with the first Python
/// (3.12 or later) that has it (`$MALT_BENCH_ERYX_PYTHON` names one):
/// first session in a process, a later session, a small exec, the same
/// loop. None when it is not installed.
fn eryx_peer() -> Option<[f64; 4]> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/malt_bench/eryx_peer.py"
    );
    let mut pythons: Vec<String> = std::env::var("MALT_BENCH_ERYX_PYTHON")
        .into_iter()
        .collect();
    pythons.extend(["python3.14", "python3.13", "python3.12", "python3"].map(String::from));
    pythons.iter().find_map(|python| {
        let out = Command::new(python).arg(script).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let values: Vec<f64> = text
            .split_whitespace()
            .filter_map(|kv| kv.split_once('=')?.1.trim_end_matches("us").parse().ok())
            .collect();
        <[f64; 4]>::try_from(values).ok()
    })
}

const LOOP: &str = "total = 0\nfor i in range(3_000_000):\n    total += i\n";

pub(crate) async fn measure(table: &mut Table, quick: bool) -> Result<(), Error> {
    if Command::new("componentize-py")
        .arg("--version")
        .output()
        .is_err()
    {
        table.figure(
            "Python guest",
            "componentize-py not installed: skipped".into(),
            "—".into(),
            "—".into(),
            "",
        );
        return Ok(());
    }
    let component = guests::python_guest();
    let python = || host(Worker::python_component(&component));
    let floor = native_python("pass", 11);
    let floor_text = floor.map_or("python3 not found".into(), |f| {
        format!("{} (`python3 -c pass`)", fmt(f))
    });

    // The first worker in a fresh cache compiles CPython into an artifact.
    let cache = std::env::temp_dir().join(format!("malt-bench-python-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    // SAFETY: single-threaded runtime, no other thread reads the variable.
    unsafe { std::env::set_var(malt::CACHE_DIR_ENV, &cache) };
    let start = Instant::now();
    let w = python().spawn().await?;
    let _: i64 = w.remote_eval_fetch("1+1").await?;
    let first = start.elapsed();
    w.stop().await?;
    unsafe { std::env::remove_var(malt::CACHE_DIR_ENV) };
    let _ = std::fs::remove_dir_all(&cache);
    table.figure(
        "Python: first-ever worker (compiles CPython; cold cache) to `1+1`",
        fmt(first),
        floor_text.clone(),
        "—".into(),
        "reported",
    );
    // Warm the real cache.
    python().spawn().await?.stop().await?;

    let runs = if quick { 5 } else { 15 };
    // An in-process worker starts from a spare made in the background
    // (at idle priority) after the last start: a program that starts one
    // now and then finds it ready; back to back, the spares fall behind.
    for (label, in_process, gap, goal) in [
        ("process-isolated worker", false, Duration::ZERO, "≤ 15 ms"),
        (
            "in-process worker, started 20 ms apart",
            true,
            Duration::from_millis(20),
            "≤ 3 ms",
        ),
        (
            "in-process worker, back to back",
            true,
            Duration::ZERO,
            "reported",
        ),
    ] {
        let mut samples = Vec::new();
        for _ in 0..runs {
            tokio::time::sleep(gap).await;
            let start = Instant::now();
            let builder = if in_process {
                python().in_process()
            } else {
                python()
            };
            let w = builder.spawn().await?;
            let _: i64 = w.remote_eval_fetch("1+1").await?;
            samples.push(start.elapsed());
            w.stop().await?;
        }
        let s = stats(samples);
        table.figure(
            &format!("Python: {label}, spawn to first `1+1` (warm cache)"),
            format!("{} (p99 {})", fmt(s.median), fmt(s.p99)),
            floor_text.clone(),
            floor.map_or("—".into(), |f| {
                format!("{:.1}×", s.median.as_secs_f64() / f.as_secs_f64())
            }),
            goal,
        );
    }

    let w = python().spawn().await?;
    let n = if quick { 500 } else { 3_000 };
    let s = time_calls(&w, n, async |w| {
        let _: i64 = w.remote_eval_fetch("1+1").await.unwrap();
    })
    .await;
    table.timing("Python: `remote_eval_fetch(\"1+1\")`", s, None, "≤ 150 µs");

    // A tight loop in the worker: as a request runs it (interrupts raised
    // in CPython's memory, armed), with the polling fallback (a
    // sys.monitoring callback every loop jump), with neither (disarmed),
    // and natively.
    w.remote_eval_wait(&format!(
        "import sys, time\nfrom wit_world.imports import host\ndef timed(mode):\n    if mode != 'memory':\n        host.arm_memory_interrupt(False)\n    if mode == 'polling':\n        sys.monitoring.set_events(4, sys.monitoring.events.JUMP)\n    t = time.perf_counter()\n    exec({LOOP:?}, {{}})\n    took = time.perf_counter() - t\n    sys.monitoring.set_events(4, 0)\n    return took\n"
    ))
    .await?;
    let mode: String = w
        .remote_eval_fetch("import sys; sys.modules['guest'].interrupts")
        .await?;
    // The first run of the loop is slower than the rest (the heap grows):
    // one is run and dropped, and the order rotates.
    w.remote_call_fetch::<f64>("timed", ("none",)).await?;
    let modes = ["memory", "polling", "none"];
    let mut runs: [Vec<f64>; 3] = Default::default();
    for round in 0..if quick { 3 } else { 7 } {
        for i in 0..3 {
            let at = (round + i) % 3;
            let took = w.remote_call_fetch::<f64>("timed", (modes[at],)).await?;
            runs[at].push(took);
        }
    }
    w.stop().await?;
    let [armed, polling, bare] = runs.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    let native = native_loop();
    let native_text = native.map_or("python3 not found".into(), |s| {
        format!("{:.1} ms (native `python3`)", s * 1e3)
    });
    for (what, secs) in [
        (format!("as a request runs it (interrupts: {mode})"), armed),
        (
            "with the polling fallback (monitoring)".to_string(),
            polling,
        ),
        ("with no interrupt mechanism".to_string(), bare),
    ] {
        table.figure(
            &format!("Python: a loop of 3 M additions in the worker, {what}"),
            format!("{:.1} ms", secs * 1e3),
            native_text.clone(),
            native.map_or("—".into(), |n| format!("{:.1}× native", secs / n)),
            "",
        );
    }
    table.figure(
        "Python: cost of interrupts on that loop (as run ÷ none)",
        format!("{:+.0} %", (armed / bare - 1.0) * 100.0),
        "—".into(),
        "—".into(),
        "≤ 10 %",
    );

    match eryx_peer() {
        Some([first, session, exec_us, loop_s]) => {
            for (what, value) in [
                (
                    "pyeryx (peer): first session in a process",
                    fmt(Duration::from_secs_f64(first)),
                ),
                (
                    "pyeryx (peer): a later session (in-process)",
                    fmt(Duration::from_secs_f64(session)),
                ),
                (
                    "pyeryx (peer): `execute(\"x = 1+1\")`",
                    format!("{exec_us:.0} µs"),
                ),
                (
                    "pyeryx (peer): the same loop of 3 M additions",
                    format!("{:.1} ms", loop_s * 1e3),
                ),
            ] {
                table.figure(what, value, "—".into(), "—".into(), "peer");
            }
        }
        None => table.figure(
            "pyeryx (peer)",
            "not installed (pip install pyeryx, Python >= 3.12): skipped".into(),
            "—".into(),
            "—".into(),
            "",
        ),
    }

    // Memory per idle Python worker, 20 alive.
    let mut workers = Vec::new();
    for _ in 0..20 {
        let w = python().spawn().await?;
        let _: i64 = w.remote_eval_fetch("1+1").await?;
        workers.push(w);
    }
    let (rss, pss): (Vec<u64>, Vec<u64>) = workers.iter().map(|w| pss_rss_kib(w.pid())).unzip();
    let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0;
    table.figure(
        "Python: memory per idle worker, 20 alive",
        format!("PSS {:.1} MB, RSS {:.1} MB", avg(&pss), avg(&rss)),
        "—".into(),
        "—".into(),
        "≤ 15 MB PSS",
    );
    for w in &workers {
        w.stop().await?;
    }
    super::rollback::measure(table, quick).await
}
