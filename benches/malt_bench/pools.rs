//! Pools: many tiny calls over N workers, next to Python's
//! `multiprocessing.Pool.map` measured in the same run.

use std::process::Command;
use std::time::Instant;

use malt::{Error, Pool, Worker};

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

async fn malt_rate(pool: &Pool, n: usize) -> Result<f64, Error> {
    let _ = pool
        .map::<_, i64>("add", (0..1000i64).map(|i| (i, 1)))
        .await;
    let start = Instant::now();
    let results = pool
        .map::<_, i64>("add", (0..n as i64).map(|i| (i, 1)))
        .await;
    let elapsed = start.elapsed();
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
    for size in [1, workers] {
        let pool = Pool::builder(Worker::wasm(guests::test_guest()).monitor_output(false))
            .size(size)
            .spawn()
            .await?;
        let rate = malt_rate(&pool, n).await?;
        pool.stop().await;
        let (peer, ratio) = match (size == workers, python) {
            (true, Some((one, _))) => (py_one.clone(), format!("{:.1}× Python", rate / one)),
            _ => ("—".into(), "—".into()),
        };
        table.figure(
            &format!("pool of {size} (Rust guest): {n} tiny calls, one per request"),
            format!("{rate:.0} calls/s"),
            peer,
            ratio,
            if size == workers {
                "≥ 5× Python chunksize=1"
            } else {
                ""
            },
        );
    }
    let pool = Pool::builder(Worker::wasm(guests::test_guest()).monitor_output(false))
        .size(workers)
        .requests_per_worker(8)
        .spawn()
        .await?;
    let rate = malt_rate(&pool, n).await?;
    pool.stop().await;
    table.figure(
        &format!("pool of {workers} (Rust guest), 8 requests per worker: {n} tiny calls"),
        format!("{rate:.0} calls/s"),
        py_one.clone(),
        python.map_or("—".into(), |(one, _)| {
            format!("{:.1}× Python", rate / one)
        }),
        "≥ 5× Python chunksize=1",
    );
    let pool = Pool::builder(Worker::script().monitor_output(false))
        .size(workers)
        .setup("fn add(a, b) { a + b }")
        .spawn()
        .await?;
    let rate = malt_rate(&pool, n).await?;
    pool.stop().await;
    table.figure(
        &format!("pool of {workers} (script guest): {n} tiny calls"),
        format!("{rate:.0} calls/s"),
        py_chunked,
        "—".into(),
        "reported",
    );
    Ok(())
}
