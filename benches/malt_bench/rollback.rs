//! Rollback (`WorkerBuilder::rollback`) on the Python guest: what the
//! snapshot between requests costs a request, what a rolled-back kill
//! costs against a reset, and the memory of the worker's processes; each
//! next to the same worker without rollback, in the same run.

use super::*;
use crate::procs::children;

/// A cell that only a kill stops: it stays inside C (no loop jump where
/// CPython would take the interrupt).
const STUCK_IN_C: &str = "sum(range(10 ** 15))";

/// PSS and private memory (KiB: what would be freed if it ended) of one
/// process.
fn pss_private_kib(pid: u32) -> (u64, u64) {
    let [pss, clean, dirty] = smaps_kib(pid, ["Pss:", "Private_Clean:", "Private_Dirty:"]);
    (pss, clean + dirty)
}

/// PSS (KiB) of `pid` and its descendants.
fn tree_pss_kib(pid: u32) -> u64 {
    pss_private_kib(pid).0 + children(pid).into_iter().map(tree_pss_kib).sum::<u64>()
}

/// Interrupts `STUCK_IN_C` once it runs and times the interrupt to the
/// next `1+1` (the grace period, the kill, and a rollback or a reset).
async fn recovery(w: &Worker) -> Result<Duration, Error> {
    let running = w.remote_eval::<i64>(STUCK_IN_C);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    w.interrupt()?;
    let _ = running.await;
    let _: i64 = w.remote_eval_fetch("1+1").await?;
    Ok(start.elapsed())
}

pub(crate) async fn measure(table: &mut Table, quick: bool) -> Result<(), Error> {
    let component = guests::python_guest();
    let python = |rollback: bool| {
        host(Worker::python_component(&component))
            .interrupt_grace(Duration::from_millis(50))
            .rollback(rollback)
    };
    let plain = python(false).spawn().await?;
    let rolling = python(true).spawn().await?;
    // A session with some state, as a notebook has.
    for w in [&plain, &rolling] {
        w.remote_eval_wait("data = list(range(100_000))\ndef f(x):\n    return x + 1")
            .await?;
    }
    let n = if quick { 200 } else { 1_000 };
    for (gap, what) in [
        (Duration::ZERO, "back to back"),
        (Duration::from_millis(5), "5 ms apart"),
    ] {
        let mut both = Vec::new();
        for w in [&plain, &rolling] {
            let mut samples = Vec::with_capacity(n);
            for i in 0..n + n / 10 {
                // The gap is idle time, not timed.
                tokio::time::sleep(gap).await;
                let start = Instant::now();
                let _: i64 = w.remote_eval_fetch("1+1").await?;
                if i >= n / 10 {
                    samples.push(start.elapsed());
                }
            }
            both.push(stats(samples));
        }
        table.timing(
            &format!("Python with rollback: `remote_eval_fetch(\"1+1\")`, {what} (floor: without)"),
            both[1],
            Some(both[0]),
            "reported",
        );
    }

    let rounds = if quick { 3 } else { 7 };
    let mut reset = Vec::new();
    let mut rolled = Vec::new();
    for _ in 0..rounds {
        reset.push(recovery(&plain).await?);
        rolled.push(recovery(&rolling).await?);
    }
    table.timing(
        "Python: interrupt of a cell stuck in C to the next result, rolled back (floor: reset)",
        stats(rolled),
        Some(stats(reset)),
        "reported",
    );

    let mb = |kib: u64| kib as f64 / 1024.0;
    let (plain_pss, rolling_pss) = (tree_pss_kib(plain.pid()), tree_pss_kib(rolling.pid()));
    // What rollback adds: the pages only the keeper and the snapshot hold
    // (the snapshot's are those the serving host wrote since the fork).
    let keeper = rolling.pid();
    let snapshots = children(keeper).into_iter().flat_map(children);
    let added: u64 = std::iter::once(keeper)
        .chain(snapshots)
        .map(|pid| pss_private_kib(pid).1)
        .sum();
    table.figure(
        "Python with rollback: memory of one worker's processes (keeper, host, snapshot)",
        format!(
            "PSS {:.1} MB; keeper and snapshot alone hold {:.1} MB",
            mb(rolling_pss),
            mb(added)
        ),
        format!("PSS {:.1} MB without rollback", mb(plain_pss)),
        "—".into(),
        "reported",
    );
    plain.stop().await?;
    rolling.stop().await?;
    Ok(())
}
