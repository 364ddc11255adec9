//! The README's library example, as a user would paste it.

use malt::{Error, Worker};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let w = Worker::script().spawn().await?;

    w.remote_eval_wait("fn add(a, b) { a + b }").await?; // state persists
    let three: i64 = w.remote_call_fetch("add", (1, 2)).await?; // typed via serde
    assert_eq!(three, 3);

    let pending = w.remote_eval::<()>("loop {}"); // already sent
    w.interrupt()?; // the worker survives
    assert!(matches!(pending.await, Err(Error::Interrupted { state_lost: false, .. })));

    let answer: i64 = w.remote_eval_fetch("let x = 20; x * 2 + 2").await?;
    println!("{answer}");
    w.stop().await?;
    Ok(())
}
