//! What every test needs: worker kinds and small helpers.

use std::future::Future;
use std::time::Duration;

use malt::{Worker, WorkerBuilder};

/// A kind of worker the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The script guest in a wasm worker (its own host process).
    Wasm,
    /// The script guest served natively by a worker process.
    Native,
    /// A user's own native worker program (`examples/native_guest`).
    NativeProgram,
    /// The script guest as wasm on a thread of the test process.
    InProcess,
    /// The script guest in a wasm worker whose host is started over SSH
    /// (a private sshd on 127.0.0.1): the component travels by hash.
    Ssh,
    /// The Python guest in a wasm worker: the same behaviors in Python
    /// (see [`Kind::code`]).
    Python,
}

/// What every Python worker of the suite runs first: malt's functions
/// under the names the script guest gives them.
const PYTHON_PRELUDE: &str = "from malt import *\ndef blob(n, b):\n    return bytes([b]) * n\n";

/// A launcher that runs this test program as the host, over the private
/// sshd.
pub fn ssh_launcher() -> malt::launcher::Ssh {
    let exe = std::env::current_exe().expect("this test program");
    crate::sshd::sshd().launcher(&exe)
}

impl Kind {
    /// A builder for a worker of this kind running the script guest.
    pub fn script(self) -> WorkerBuilder {
        match self {
            Kind::Wasm => Worker::script(),
            Kind::Native => Worker::native(),
            Kind::NativeProgram => Worker::native_program(crate::guests::native_guest_example()),
            Kind::InProcess => Worker::script().in_process(),
            Kind::Ssh => Worker::script().launcher(ssh_launcher()),
            Kind::Python => Worker::python_component(crate::guests::python_guest()),
        }
    }

    /// The snippet for this kind's guest: `rhai` for the script guest,
    /// `python` for the Python guest.
    pub fn code<'a>(self, rhai: &'a str, python: &'a str) -> &'a str {
        match self {
            Kind::Python => python,
            _ => rhai,
        }
    }

    /// Whether the guest runs as wasm (in a sandbox, under wasmtime).
    pub fn is_wasm(self) -> bool {
        matches!(
            self,
            Kind::Wasm | Kind::InProcess | Kind::Ssh | Kind::Python
        )
    }

    /// Whether the worker has a process of its own.
    pub fn has_process(self) -> bool {
        self != Kind::InProcess
    }

    /// A started script worker of this kind (Python: with the prelude).
    pub async fn spawn(self) -> Worker {
        let w = self.script().spawn().await.expect("spawn a worker");
        if self == Kind::Python {
            w.remote_eval_wait(PYTHON_PRELUDE)
                .await
                .expect("the Python prelude");
        }
        w
    }
}

/// Fails the test instead of hanging when a future does not finish:
/// liveness, not speed (the limit is far above any expected time).
pub async fn finishes<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish (hung)"),
    }
}

/// Instantiates `async fn name(kind: Kind)` tests once per worker kind.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@kind wasm Wasm $($name),*);
        $crate::conformance!(@kind native Native $($name),*);
        $crate::conformance!(@kind native_program NativeProgram $($name),*);
        $crate::conformance!(@kind in_process InProcess $($name),*);
    };
    (@kind $module:ident $kind:ident $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Kind::$kind).await
                }
            )*
        }
    };
}

pub use crate::guests::test_guest;

/// A worker of this kind running the raw test guest (for a native
/// worker: the same guest built natively, see guest/testing).
pub fn test_guest_worker(kind: Kind) -> WorkerBuilder {
    match kind {
        Kind::Wasm => Worker::wasm(test_guest()),
        Kind::Native | Kind::NativeProgram => {
            Worker::native_program(crate::guests::test_guest_native())
        }
        Kind::InProcess => Worker::wasm(test_guest()).in_process(),
        Kind::Ssh => Worker::wasm(test_guest()).launcher(ssh_launcher()),
        Kind::Python => panic!("the test guest is a Rust guest, not a Python one"),
    }
}

/// The core of the suite once more, on a worker over SSH: what a link
/// to another machine must not change.
#[macro_export]
macro_rules! conformance_ssh {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@kind over_ssh Ssh $($name),*);
    };
}

/// `conformance!` and `conformance_python!` at once: behaviors written for
/// both guests.
#[macro_export]
macro_rules! conformance_both {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!($($name),*);
        $crate::conformance_python!($($name),*);
    };
}

/// The behaviors written for the Python guest too (each snippet through
/// [`Kind::code`]), on a Python worker.
#[macro_export]
macro_rules! conformance_python {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@kind python Python $($name),*);
    };
}

/// Like `conformance!`, for the kinds with a wasm sandbox only.
#[macro_export]
macro_rules! conformance_wasm {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@kind wasm_only Wasm $($name),*);
        $crate::conformance!(@kind in_process_only InProcess $($name),*);
    };
}
