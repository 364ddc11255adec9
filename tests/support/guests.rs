//! The test guests of `guest/testing`, built for wasm32-wasip2 on first use
//! (CI builds them before the tests; a build that is up to date is quick).

use std::path::PathBuf;
use std::sync::OnceLock;

/// The directory holding the built test guests.
fn guest_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
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
            .expect("run cargo to build the test guests");
        assert!(status.success(), "building guest/testing failed");
        target.join("wasm32-wasip2/guest")
    })
}

/// The raw worker guest: spins, traps, allocates (see guest/testing).
#[allow(dead_code)]
pub fn test_guest() -> PathBuf {
    guest_dir().join("malt_test_guest.wasm")
}

/// A WASI command component (see guest/testing/src/bin).
#[allow(dead_code)]
pub fn test_command() -> PathBuf {
    guest_dir().join("malt-test-command.wasm")
}

/// The same test guest built as a native worker program (built on first
/// use, in the workspace's own target directory).
#[allow(dead_code)]
pub fn test_guest_native() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "-p",
                "malt-test-guest",
                "--bin",
                "malt-test-guest",
            ])
            .status()
            .expect("run cargo to build the native test guest");
        assert!(status.success(), "building the native test guest failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug/malt-test-guest")
    })
    .clone()
}

/// `examples/native_guest`: a program serving the script guest natively,
/// as a user's own native worker would (built on first use).
#[allow(dead_code)]
pub fn native_guest_example() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--quiet", "--example", "native_guest"])
            .status()
            .expect("run cargo to build examples/native_guest");
        assert!(status.success(), "building examples/native_guest failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug/examples/native_guest")
    })
    .clone()
}
