//! What every test needs: worker kinds and small helpers.

use std::future::Future;
use std::time::Duration;

use malt::{Worker, WorkerBuilder};

/// A kind of worker the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The script guest in a wasm worker (its own host process).
    Wasm,
}

impl Kind {
    /// A builder for a worker of this kind running the script guest.
    pub fn script(self) -> WorkerBuilder {
        match self {
            Kind::Wasm => Worker::script(),
        }
    }

    /// A started script worker of this kind.
    pub async fn spawn(self) -> Worker {
        self.script().spawn().await.expect("spawn a worker")
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
        mod wasm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Kind::Wasm).await
                }
            )*
        }
    };
}

pub use crate::guests::test_guest;

/// A worker of this kind running the raw test guest.
pub fn test_guest_worker(kind: Kind) -> WorkerBuilder {
    match kind {
        Kind::Wasm => Worker::wasm(test_guest()),
    }
}
