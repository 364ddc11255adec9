//! Your own native worker: a program that serves a guest of its own (here
//! the script guest plus a Rust function), started by a manager with
//! `Worker::native_program`. This one program is both: run as a worker
//! host it serves the guest; run normally it is the manager.
//!
//! Run with `cargo run --example native_guest`.

use malt::host::{GuestContext, NativeGuest, ScriptGuest};

/// The guest: a Rust function `fib`, and everything of the script guest.
struct Guest {
    script: ScriptGuest,
}

impl NativeGuest for Guest {
    fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String> {
        match name {
            "fib" => {
                let (n,): (u32,) = rmp_serde::from_slice(args).map_err(|e| e.to_string())?;
                let (mut a, mut b) = (0u64, 1u64);
                for _ in 0..n {
                    (a, b) = (b, a.wrapping_add(b));
                }
                rmp_serde::to_vec(&a).map_err(|e| e.to_string())
            }
            _ => self.script.call(name, args),
        }
    }

    fn eval(&mut self, code: &str) -> Result<Vec<u8>, String> {
        self.script.eval(code)
    }
}

fn main() -> Result<(), malt::Error> {
    // One call into the library: when started as a worker host, serve the
    // guest (a fresh one per worker, and after a panic) and never return.
    malt::host::main_if_host_with(|cx: GuestContext| Guest {
        script: ScriptGuest::new(cx),
    });

    // Otherwise, be the manager of a worker running this very program.
    let me = std::env::current_exe().expect("current exe");
    let w = malt::blocking::Worker::native_program(&me).spawn()?;
    let fib: u64 = w.remote_call_fetch("fib", (50,))?;
    let sum: i64 = w.remote_eval_fetch("let s = 0; for i in 1..=10 { s += i } s")?;
    println!(
        "fib(50) = {fib}, 1 + ... + 10 = {sum}, served by pid {}",
        w.pid()
    );
    w.stop()?;
    Ok(())
}
