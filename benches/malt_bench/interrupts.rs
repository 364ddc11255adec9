//! Interrupts: cooperative and hard, of a busy guest and of one blocked
//! in a WASI wait.

use std::time::{Duration, Instant};

use malt::{Error, Worker};

use crate::report::{Stats, Table, stats};
use crate::{guests, host};

/// Interrupts a runaway request `rounds` times: the time to its error, and
/// until a follow-up request (sent after the interrupt) is answered.
async fn interrupts(
    w: &Worker,
    rounds: usize,
    state_lost: bool,
    requests: impl Fn(&Worker) -> (malt::CallHandle<()>, malt::CallHandle<i64>),
) -> Result<(Stats, Stats), Error> {
    interrupts_of(w, rounds, state_lost, state_lost, requests).await
}

/// [`interrupts`], where `announced` says whether the request puts 1 on
/// the channel `started` when it has begun (the test guest's functions
/// do); a script loop is given a moment instead.
async fn interrupts_of(
    w: &Worker,
    rounds: usize,
    state_lost: bool,
    announced: bool,
    requests: impl Fn(&Worker) -> (malt::CallHandle<()>, malt::CallHandle<i64>),
) -> Result<(Stats, Stats), Error> {
    let started = match announced {
        true => Some(w.worker_channel::<i64>("started", 1).await?),
        false => None,
    };
    let (mut to_error, mut to_answer) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (running, follow_up) = requests(w);
        match &started {
            Some(started) => {
                started.take().await?;
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        let start = Instant::now();
        w.interrupt()?;
        let err = running.await.unwrap_err();
        to_error.push(start.elapsed());
        assert!(
            matches!(err, Error::Interrupted { state_lost: s, .. } if s == state_lost),
            "{err:?}"
        );
        follow_up.await?;
        to_answer.push(start.elapsed());
    }
    Ok((stats(to_error), stats(to_answer)))
}

/// Measures every kind of interrupt into `table`.
pub(crate) async fn measure(table: &mut Table, quick: bool) -> Result<(), Error> {
    let rounds = if quick { 10 } else { 50 };
    let w = host(Worker::script()).spawn().await?;
    let (to_error, to_answer) = interrupts(&w, rounds, false, |w| {
        (w.remote_eval::<()>("loop {}"), w.remote_eval::<i64>("1"))
    })
    .await?;
    w.stop().await?;
    table.timing(
        "interrupt, cooperative (`loop {}`): to the error",
        to_error,
        None,
        "≤ 1 ms",
    );
    table.timing(
        "interrupt, cooperative: until the worker answers again",
        to_answer,
        None,
        "",
    );
    let w = host(Worker::wasm(guests::test_guest()))
        .interrupt_grace(Duration::ZERO)
        .spawn()
        .await?;
    let (to_error, to_answer) = interrupts(&w, rounds, true, |w| {
        (
            w.remote_call::<()>("spin", ()),
            w.remote_call::<i64>("add", (1, 1)),
        )
    })
    .await?;
    w.stop().await?;
    table.timing(
        "interrupt, hard (Rust guest spinning; grace 0): to the error",
        to_error,
        None,
        "≤ 2 ms",
    );
    table.timing(
        "interrupt, hard: until the worker answers again (fresh instance)",
        to_answer,
        None,
        "",
    );

    // Guests blocked in a WASI wait (`std::thread::sleep`): woken at once
    // (cooperative), or killed after the grace period wherever they wait.
    let grace = Duration::from_millis(10);
    let w = host(Worker::wasm(guests::test_guest()))
        .interrupt_grace(grace)
        .spawn()
        .await?;
    let (to_error, _) = interrupts_of(&w, rounds, false, true, |w| {
        (
            w.remote_call::<()>("wasi_sleep", (600_000u64, true)),
            w.remote_call::<i64>("add", (1, 1)),
        )
    })
    .await?;
    table.timing(
        "interrupt, cooperative (Rust guest in `std::thread::sleep`): to the error",
        to_error,
        None,
        "≤ 1 ms",
    );
    let (to_error, to_answer) = interrupts(&w, rounds, true, |w| {
        (
            w.remote_call::<()>("wasi_sleep", (600_000u64, false)),
            w.remote_call::<i64>("add", (1, 1)),
        )
    })
    .await?;
    w.stop().await?;
    table.timing(
        "interrupt, hard (Rust guest sleeping again in WASI; grace 10 ms): to the error",
        to_error,
        None,
        "≤ grace + 2 ms",
    );
    table.timing(
        "interrupt, hard, WASI sleep: until the worker answers again",
        to_answer,
        None,
        "",
    );

    Ok(())
}
