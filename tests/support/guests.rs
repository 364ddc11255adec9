//! The test guests of `guest/testing` (and `examples/native_guest`), built
//! on first use: a build that is up to date is quick, and CI's first test
//! run builds them once.

use std::path::PathBuf;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `cargo build --quiet ARGS` in the workspace, or fails the test.
fn cargo_build(args: &[&str], what: &str) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(root())
        .args(["build", "--quiet"])
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run cargo to build {what}: {e}"));
    assert!(status.success(), "building {what} failed");
}

/// The directory holding the test guests built for wasm32-wasip2.
fn guest_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = target_dir().join("guest");
        let target_arg = target.to_string_lossy().into_owned();
        cargo_build(
            &[
                "--manifest-path",
                "guest/testing/Cargo.toml",
                "--target",
                "wasm32-wasip2",
                "--profile",
                "guest",
                "--target-dir",
                &target_arg,
            ],
            "the wasm test guests",
        );
        target.join("wasm32-wasip2/guest")
    })
}

/// The test worker guest as a wasm component (see guest/testing).
#[allow(dead_code)]
pub fn test_guest() -> PathBuf {
    guest_dir().join("malt_test_guest.wasm")
}

/// A WASI command component (see guest/testing/src/bin).
#[allow(dead_code)]
pub fn test_command() -> PathBuf {
    guest_dir().join("malt-test-command.wasm")
}

/// The same test guest built as a native worker program.
#[allow(dead_code)]
pub fn test_guest_native() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        cargo_build(
            &["-p", "malt-test-guest", "--bin", "malt-test-guest"],
            "the native test guest",
        );
        target_dir().join("debug/malt-test-guest")
    })
    .clone()
}

/// `examples/native_guest`: a program serving the script guest natively,
/// as a user's own native worker would.
#[allow(dead_code)]
pub fn native_guest_example() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        cargo_build(&["--example", "native_guest"], "examples/native_guest");
        target_dir().join("debug/examples/native_guest")
    })
    .clone()
}
