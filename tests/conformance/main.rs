//! The conformance suite: Malt's own test suite (`test/basic.jl`,
//! `exceptions.jl`, `interrupt.jl`, `stdout.jl`, `starting.jl`) ported to
//! malt, written once and run on every kind of worker.
//!
//! Each behavior is an `async fn(Kind)`; the `conformance!` macro
//! instantiates it as one `#[tokio::test]` per kind. The behaviors of the
//! script guest run on the Python guest too (`conformance_python!`), each
//! snippet in Python beside its Rhai (`Kind::code`).

mod common;
#[path = "../support/guests.rs"]
mod guests;
#[path = "../support/procs.rs"]
mod procs;
#[path = "../support/sshd.rs"]
mod sshd;

mod basic;
mod blocked;
mod channels;
mod exceptions;
mod interrupt;
mod lifecycle;
mod orphans;
mod output;
mod rollback;
mod sdk;
mod starting;
