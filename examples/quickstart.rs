//! Start a sandboxed script worker, call and evaluate code in it,
//! interrupt a runaway loop, and stop it.
//!
//! Run with `cargo run --example quickstart`.

use std::time::Duration;

use malt::{Error, Worker};

fn main() -> Result<(), Error> {
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(demo())
}

async fn demo() -> Result<(), Error> {
    let me = std::env::current_exe().expect("current exe");

    let w = Worker::script().host_program(&me).spawn().await?;
    println!("started {}", w.name());

    // State persists across evals; functions become callable by name.
    w.remote_eval_wait("let total = 0; fn add(a, b) { total += a + b; a + b }")
        .await?;
    let five: i64 = w.remote_call_fetch("add", (2, 3)).await?;
    let total: i64 = w.remote_eval_fetch("total").await?;
    println!("add(2, 3) = {five}, total = {total}");

    // Remote errors carry the guest's message.
    if let Err(e) = w.remote_eval_fetch::<i64>(r#"throw "no such thing""#).await {
        println!("{e}");
    }

    // A runaway loop is interrupted; the session survives.
    let runaway = w.remote_eval::<()>("loop { total += 1; }");
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.interrupt()?;
    println!("runaway loop: {}", runaway.await.unwrap_err());
    let still_there: bool = w.remote_eval_fetch("total > 5").await?;
    println!("state kept: {still_there}");

    println!("stopped: {}", w.stop().await?);
    Ok(())
}
