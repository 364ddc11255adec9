//! Embeds the script guest (`guest/malt_script.wasm`, a wasm component
//! built from `guest/script` by `guest/build.sh` and checked in), so
//! `Worker::script()` needs no file at run time and building malt needs no
//! wasm toolchain. CI rebuilds the component and checks that it matches.
//!
//! Set `MALT_SCRIPT_GUEST=path/to/component.wasm` to embed another build.

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let bundled = manifest_dir.join("guest/malt_script.wasm");
    println!("cargo::rerun-if-changed={}", bundled.display());
    println!("cargo::rerun-if-env-changed=MALT_SCRIPT_GUEST");

    let wasm = env::var_os("MALT_SCRIPT_GUEST")
        .map(PathBuf::from)
        .unwrap_or(bundled);
    let bytes = match std::fs::read(&wasm) {
        Ok(bytes) => bytes,
        Err(e) => fail(&format!(
            "cannot read the script guest component {}: {e}\n\
             It is part of the malt-rt sources; rebuild it with `guest/build.sh` \
             (needs `rustup target add wasm32-wasip2`), or point MALT_SCRIPT_GUEST at one.",
            wasm.display()
        )),
    };
    // A component starts with the wasm magic and a version with layer 1.
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" || bytes[6..8] != [1, 0] {
        fail(&format!(
            "{} is not a WebAssembly component; rebuild it with `guest/build.sh`",
            wasm.display()
        ));
    }
    let mut hex = String::new();
    for b in Sha256::digest(&bytes) {
        let _ = write!(hex, "{b:02x}");
    }
    let written = std::fs::write(out_dir.join("malt_script.wasm"), &bytes)
        .and_then(|()| std::fs::write(out_dir.join("malt_script.sha256"), hex));
    if let Err(e) = written {
        fail(&format!("cannot write to {}: {e}", out_dir.display()));
    }
}

/// Ends the build with a message and no backtrace.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
