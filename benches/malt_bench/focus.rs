//! One figure alone, repeated, for a profiler (`perf record -a -g --
//! target/release/deps/malt_bench-* --throughput`): `--throughput` (calls
//! pipelined on one worker), `--payload` (50 MB to a worker and back) or
//! `--interrupts` (every kind, few rounds), `--cli` (the CLI one-shots
//! against the wasmtime CLI) or `--scale` (1 000 workers started at once,
//! three rounds).

use super::*;

pub(crate) fn wanted() -> bool {
    std::env::args().any(|a| {
        [
            "--throughput",
            "--payload",
            "--interrupts",
            "--cli",
            "--scale",
        ]
        .contains(&a.as_str())
    })
}

pub(crate) async fn measure(table: &mut Table, guest: &std::path::Path) -> Result<(), Error> {
    if std::env::args().any(|a| a == "--interrupts") {
        return interrupts::measure(table, true).await;
    }
    if std::env::args().any(|a| a == "--cli") {
        peers::cli_one_shots(table, false);
        return Ok(());
    }
    if std::env::args().any(|a| a == "--scale") {
        for _ in 0..3 {
            concurrent_starts(table, 1000).await?;
        }
        return Ok(());
    }
    if std::env::args().any(|a| a == "--throughput") {
        let w = host(Worker::wasm(guest)).spawn().await?;
        for round in 0..5 {
            let calls = 200_000;
            let rate = pipelined_rate(&w, calls).await?;
            table.figure(
                &format!("throughput, round {round}: {calls} pipelined calls"),
                format!("{rate:.0} calls/s"),
                "—".into(),
                "—".into(),
                "",
            );
        }
        w.stop().await?;
        return Ok(());
    }
    if std::env::args().any(|a| a == "--payload") {
        let w = host(Worker::wasm(guest)).spawn().await?;
        let sent = ByteBuf::from(vec![9u8; 50 << 20]);
        for round in 0..10 {
            let start = Instant::now();
            let back: ByteBuf = w.remote_call_fetch("echo", (&sent,)).await?;
            assert_eq!(back.len(), sent.len());
            table.figure(
                &format!("payload, round {round}: 50 MB to the worker and back"),
                fmt(start.elapsed()),
                "—".into(),
                "—".into(),
                "",
            );
        }
        w.stop().await?;
        return Ok(());
    }
    Ok(())
}
