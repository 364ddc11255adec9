//! `malt map`: one call per line of JSON input, across a pool of workers,
//! one line of JSON output per input, in input order.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use futures_util::StreamExt;
use malt::{Pool, WorkerBuilder};
use tokio::io::AsyncBufReadExt;

use crate::values;

/// What `malt map` needs besides the worker builder.
pub(crate) struct MapOptions {
    pub function: String,
    pub workers: usize,
    pub setup: Vec<String>,
    pub retries: u32,
}

/// Reads JSON arrays from stdin, one per line (blank lines are skipped),
/// and writes one line per input: the JSON value, or `{"error": …}`.
/// Returns how many inputs failed.
pub(crate) async fn map(builder: WorkerBuilder, options: MapOptions) -> anyhow::Result<u64> {
    let mut pool = Pool::builder(builder).size(options.workers);
    for code in &options.setup {
        pool = pool.setup(code.clone());
    }
    let pool = pool.spawn().await?;
    let progress = progress_bar();
    let lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let inputs = futures_util::stream::unfold(lines, |mut lines| async move {
        match lines.next_line().await {
            Ok(Some(line)) => Some((Ok(line), lines)),
            Ok(None) => None,
            Err(e) => Some((Err(e), lines)),
        }
    })
    .enumerate()
    .filter(|(_, line)| {
        let blank = matches!(line, Ok(l) if l.trim().is_empty());
        std::future::ready(!blank)
    });
    let (pool, function, retries) = (&pool, options.function.as_str(), options.retries);
    let results = inputs
        .map(|(n, line)| async move {
            let line = line.context("reading the inputs")?;
            let args = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(serde_json::Value::Array(args)) => args,
                Ok(other) => {
                    return Ok(Err(format!(
                        "line {}: not a JSON array of arguments: {other}",
                        n + 1
                    )));
                }
                Err(e) => return Ok(Err(format!("line {}: not JSON: {e}", n + 1))),
            };
            let result = pool
                .call::<rmpv::Value>(function, args)
                .retry(retries)
                .await;
            anyhow::Ok(result.map_err(|e| format!("{e:#}")))
        })
        .buffered(2 * options.workers.max(1));
    let mut results = std::pin::pin!(results);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut failed, mut total) = (0u64, 0u64);
    while let Some(result) = results.next().await {
        total += 1;
        let line = match result? {
            Ok(value) => values::to_json(&value),
            Err(message) => {
                failed += 1;
                serde_json::json!({ "error": message })
            }
        };
        writeln!(out, "{line}").context("writing the outputs")?;
        if let Some(bar) = &progress {
            bar.inc(1);
        } else if out.buffer().len() > 64 << 10 {
            out.flush().context("writing the outputs")?;
        }
    }
    out.flush().context("writing the outputs")?;
    drop(out);
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let stats = pool.stats();
    pool.stop().await;
    if failed > 0 {
        eprintln!(
            "malt map: {failed} of {total} inputs failed ({} workers restarted)",
            stats.restarts
        );
    }
    Ok(failed)
}

/// A progress line on stderr when it is a terminal: inputs done and rate.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {human_pos} done, {per_sec} [{elapsed}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(bar)
}
