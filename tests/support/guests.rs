//! The test guests of `guest/testing` (and `examples/native_guest`), built
//! on first use: a build that is up to date is quick, and CI's first test
//! run builds them once.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The workspace root (the tests of `cli/` share these helpers).
fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or(&manifest)
        .to_path_buf()
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

/// Makes sure the wasm32-wasip2 target is installed, adding it with rustup
/// if need be: on a fresh machine, `cargo test --workspace` just works.
fn ensure_wasm_target() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = std::process::Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else { return };
    if sysroot.join("lib/rustlib/wasm32-wasip2").exists() {
        return;
    }
    eprintln!("the test guests are built for wasm32-wasip2: adding that target with rustup");
    let status = std::process::Command::new("rustup")
        .current_dir(root())
        .args(["target", "add", "wasm32-wasip2"])
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "the wasm32-wasip2 target is missing and rustup could not add it: \
         run `rustup target add wasm32-wasip2`"
    );
}

/// The directory holding the test guests built for wasm32-wasip2.
fn guest_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        ensure_wasm_target();
        let target = target_dir().join("guest");
        let target_arg = target.to_string_lossy().into_owned();
        cargo_build(
            &[
                "-p",
                "malt-test-guest",
                "-p",
                "malt-add-guest",
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

/// The smallest guest: `add` only, no host imports (see guest/add).
#[allow(dead_code)]
pub fn add_guest() -> PathBuf {
    guest_dir().join("malt_add_guest.wasm")
}

/// A WASI command component (see guest/testing/src/bin).
#[allow(dead_code)]
pub fn test_command() -> PathBuf {
    guest_dir().join("malt-test-command.wasm")
}

/// Builds the workspace's native programs: the test guest's binaries and
/// the examples. Built together with the tests (`--tests`), so that the
/// features of every dependency are those `cargo test --workspace` already
/// built with, and nothing is compiled twice.
fn native_programs() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo_build(
            &["--workspace", "--bins", "--examples", "--tests"],
            "the native test guest and the examples",
        )
    });
}

/// The same test guest built as a native worker program.
#[allow(dead_code)]
pub fn test_guest_native() -> PathBuf {
    native_programs();
    target_dir().join("debug/malt-test-guest")
}

/// `examples/native_guest`: a program serving the script guest natively,
/// as a user's own native worker would.
#[allow(dead_code)]
pub fn native_guest_example() -> PathBuf {
    native_programs();
    target_dir().join("debug/examples/native_guest")
}

/// The Python guest component (guest/python), built with componentize-py
/// by `guest/python/build.sh` when missing or older than its sources.
#[allow(dead_code)]
pub fn python_guest() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = target_dir().join("malt_python.wasm");
            let sources = root().join("guest/python");
            let newest_source = std::fs::read_dir(&sources)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok()?.modified().ok())
                .chain(std::fs::metadata(root().join("wit/worker.wit")).and_then(|m| m.modified()))
                .max();
            let built = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
            if built.is_none() || built < newest_source {
                let status = std::process::Command::new(sources.join("build.sh"))
                    .arg(&out)
                    .status()
                    .unwrap_or_else(|e| panic!("run guest/python/build.sh: {e}"));
                assert!(
                    status.success(),
                    "building the Python guest failed: it needs `pip install \
                     componentize-py==0.25.1` (CI installs it)"
                );
            }
            out
        })
        .clone()
}
