//! Builds the script guest (`guest/script`) for `wasm32-wasip2` and embeds it
//! in the library, so `Worker::script()` needs no file at run time.
//!
//! Set `MALT_SCRIPT_GUEST=path/to/malt_script.wasm` to embed a prebuilt
//! component instead of building one.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const GUEST_TARGET: &str = "wasm32-wasip2";
const GUEST_PROFILE: &str = "guest";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=guest/script/src");
    println!("cargo:rerun-if-changed=guest/script/Cargo.toml");
    println!("cargo:rerun-if-changed=wit");
    println!("cargo:rerun-if-env-changed=MALT_SCRIPT_GUEST");

    let wasm = match env::var_os("MALT_SCRIPT_GUEST") {
        Some(path) => PathBuf::from(path),
        None => build_guest(&manifest_dir, &out_dir, "guest/script", "malt_script"),
    };
    let bytes = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("cannot read the script guest {}: {e}", wasm.display()));
    std::fs::write(out_dir.join("malt_script.wasm"), &bytes).unwrap();
    let mut hex = String::new();
    for b in Sha256::digest(&bytes) {
        write!(hex, "{b:02x}").unwrap();
    }
    std::fs::write(out_dir.join("malt_script.sha256"), hex).unwrap();
}

/// Runs a nested `cargo build` of a guest crate for `wasm32-wasip2`.
///
/// The nested build gets its own target directory: the outer build holds
/// the lock on the main one.
fn build_guest(manifest_dir: &Path, out_dir: &Path, krate: &str, artifact: &str) -> PathBuf {
    check_target_installed();
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out_dir.ancestors().nth(4).unwrap_or(out_dir).join("guest");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest_dir)
        .args(["build", "--manifest-path"])
        .arg(manifest_dir.join(krate).join("Cargo.toml"))
        .args(["--target", GUEST_TARGET, "--profile", GUEST_PROFILE])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host, not for the guest.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_NET_OFFLINE")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {krate}: {e}"));
    if !status.success() {
        panic!("building {krate} for {GUEST_TARGET} failed ({status}); see the output above");
    }
    target_dir
        .join(GUEST_TARGET)
        .join(GUEST_PROFILE)
        .join(format!("{artifact}.wasm"))
}

fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = sysroot
        && !sysroot.join("lib/rustlib").join(GUEST_TARGET).exists()
    {
        panic!(
            "the {GUEST_TARGET} target is not installed; malt embeds a guest built for it.\n\
                 Install it with: rustup target add {GUEST_TARGET}"
        );
    }
}
