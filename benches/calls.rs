//! Call round trips per kind of worker, with divan's statistics:
//! `cargo bench --bench calls`. (malt-bench, `--bench malt_bench`, puts
//! these next to their floors.)

use std::sync::OnceLock;

use malt::blocking::Worker;

fn main() {
    divan::main();
}

fn worker(kind: &str) -> &'static Worker {
    static WASM: OnceLock<Worker> = OnceLock::new();
    static NATIVE: OnceLock<Worker> = OnceLock::new();
    static IN_PROCESS: OnceLock<Worker> = OnceLock::new();
    let (cell, builder) = match kind {
        "wasm" => (&WASM, Worker::script()),
        "native" => (&NATIVE, Worker::native()),
        _ => (&IN_PROCESS, Worker::script().in_process()),
    };
    cell.get_or_init(|| {
        let w = builder.spawn().expect("spawn");
        w.remote_eval_wait("fn add(a, b) { a + b }")
            .expect("define add");
        w
    })
}

#[divan::bench(args = ["wasm", "native", "in-process"])]
fn remote_call_fetch_add(kind: &str) -> i64 {
    let w = worker(kind);
    w.remote_call_fetch("add", (1, 2)).unwrap()
}

#[divan::bench(args = ["wasm", "native", "in-process"])]
fn remote_eval_fetch_1_plus_1(kind: &str) -> i64 {
    let w = worker(kind);
    w.remote_eval_fetch("1+1").unwrap()
}
