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

/// The raw test guest (`guest/testing`) as a wasm component, built on first
/// use (CI builds it before the tests).
pub fn test_guest() -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::sync::OnceLock;
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("guest");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "--manifest-path",
                "guest/testing/Cargo.toml",
            ])
            .args([
                "--target",
                "wasm32-wasip2",
                "--profile",
                "guest",
                "--target-dir",
            ])
            .arg(&target)
            .status()
            .expect("run cargo to build the test guest");
        assert!(status.success(), "building guest/testing failed");
        target.join("wasm32-wasip2/guest/malt_test_guest.wasm")
    })
    .clone()
}

/// A worker of this kind running the raw test guest.
pub fn test_guest_worker(kind: Kind) -> WorkerBuilder {
    match kind {
        Kind::Wasm => Worker::wasm(test_guest()),
    }
}
