//! Pools: many tiny calls over N workers, next to Python's
//! `multiprocessing.Pool.map` measured in the same run.

use std::process::Command;
use std::time::Instant;

use malt::{Error, Pool, PoolBuilder, Worker};

use crate::guests;
use crate::report::Table;

/// Python's `Pool(workers).map` of `x + 1` over `n` inputs: calls per
/// second with one input per task (`chunksize=1`) and with its default
/// chunking. `None` without python3.
fn python_pool(workers: usize, n: usize) -> Option<(f64, f64)> {
    let script = format!(
        r#"
import multiprocessing as mp, time
def f(x):
    return x + 1
if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Pool({workers}) as p:
        p.map(f, range(1000), chunksize=1)
        t = time.perf_counter(); p.map(f, range({n}), chunksize=1); one = time.perf_counter() - t
        t = time.perf_counter(); p.map(f, range({n})); chunked = time.perf_counter() - t
    print({n} / one, {n} / chunked)
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut rates = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some((rates.next()??, rates.next()??))
}

/// Starts the pool, maps `add(i, 1)` over `n` inputs (after a warm-up),
/// stops it: calls per second.
async fn malt_rate(pool: PoolBuilder, n: usize) -> Result<f64, Error> {
    let pool = pool.spawn().await?;
    let _ = pool
        .map::<_, i64>("add", (0..1000i64).map(|i| (i, 1)))
        .await;
    let start = Instant::now();
    let results = pool
        .map::<_, i64>("add", (0..n as i64).map(|i| (i, 1)))
        .await;
    let elapsed = start.elapsed();
    pool.stop().await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r?, i as i64 + 1);
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

pub(crate) async fn measure(table: &mut Table, quick: bool) -> Result<(), Error> {
    let n = if quick { 20_000 } else { 100_000 };
    let workers = 2;
    let python = python_pool(workers, n);
    let (py_one, py_chunked) = match python {
        Some((one, chunked)) => (
            format!("{one:.0} calls/s (Python `Pool({workers}).map`, chunksize=1)"),
            format!("{chunked:.0} calls/s (default chunks)"),
        ),
        None => ("python3 not found: skipped".into(), String::new()),
    };
    let rust = || Pool::builder(Worker::wasm(guests::test_guest()).monitor_output(false));
    let one_goal = "≥ 5× Python chunksize=1";
    let chunk_goal = "≥ Python default chunks";
    // (what, pool, which Python figure it is compared with)
    let mut rows = vec![
        (
            format!("pool of 1 (Rust guest): {n} tiny calls, one per request"),
            rust().size(1).chunk_size(1),
            None,
        ),
        (
            format!("pool of {workers} (Rust guest): {n} tiny calls, one per request"),
            rust().size(workers).chunk_size(1),
            Some(false),
        ),
        (
            format!(
                "pool of {workers} (Rust guest), 8 requests per worker: {n} tiny calls, one per request"
            ),
            rust().size(workers).chunk_size(1).requests_per_worker(8),
            Some(false),
        ),
    ];
    // Scaling, with the default (automatic) chunks.
    for size in [1, 2, 4] {
        rows.push((
            format!("pool of {size} (Rust guest): {n} tiny calls, automatic chunks"),
            rust().size(size),
            (size == workers).then_some(true),
        ));
    }
    for (what, pool, compared) in rows {
        let rate = malt_rate(pool, n).await?;
        let (peer, ratio, goal) = match (compared, python) {
            (Some(false), Some((one, _))) => (
                py_one.clone(),
                format!("{:.1}× Python", rate / one),
                one_goal,
            ),
            (Some(true), Some((_, chunked))) => (
                py_chunked.clone(),
                format!("{:.2}× Python", rate / chunked),
                chunk_goal,
            ),
            _ => ("—".into(), "—".into(), ""),
        };
        table.figure(
            &what,
            format!("{rate:.0} calls/s"),
            "—".into(),
            "—".into(),
            goal,
        );
        if peer != "—" {
            table.peer_figure(peer, ratio);
        }
    }
    for (chunk, label) in [(Some(1), "one per request"), (None, "automatic chunks")] {
        let mut script = Pool::builder(Worker::script().monitor_output(false))
            .size(workers)
            .setup("fn add(a, b) { a + b }");
        if let Some(c) = chunk {
            script = script.chunk_size(c);
        }
        let rate = malt_rate(script, n).await?;
        let (peer, ratio) = match (chunk, python) {
            (None, Some((_, chunked))) => {
                (py_chunked.clone(), format!("{:.2}× Python", rate / chunked))
            }
            _ => ("—".into(), "—".into()),
        };
        table.figure(
            &format!("pool of {workers} (script guest): {n} tiny calls, {label}"),
            format!("{rate:.0} calls/s"),
            "—".into(),
            "—".into(),
            "reported",
        );
        if peer != "—" {
            table.peer_figure(peer, ratio);
        }
    }
    Ok(())
}
