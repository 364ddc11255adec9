#!/usr/bin/env bash
# Builds the script guest (guest/script) as a wasm component, pre-initializes
# it (guest/preinit) and writes it to guest/malt_script.wasm, the file
# malt-rt embeds. With --check, builds it and fails unless it is byte for
# byte the checked-in file (CI runs this).
#
# The build is reproducible: a pinned toolchain (guest/toolchain), the
# workspace's Cargo.lock, paths remapped so that where the sources live does
# not leak into the component, and a fixed seed for the hash keys that
# rhai's ahash otherwise draws at random at compile time (const-random).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

toolchain="$(cat guest/toolchain)"
target=wasm32-wasip2
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$toolchain" --profile minimal --target "$target"
fi
rustup target add --toolchain "$toolchain" "$target" >/dev/null 2>&1 ||
    rustup target add --toolchain "$toolchain" "$target"

cargo_home="${CARGO_HOME:-$HOME/.cargo}"
target_dir="${CARGO_TARGET_DIR:-$root/target}/script-guest"
# Only this build's settings: none of an outer cargo's.
env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u CARGO_BUILD_RUSTFLAGS \
    RUSTFLAGS="--remap-path-prefix=$root=/malt --remap-path-prefix=$cargo_home=/cargo" \
    CONST_RANDOM_SEED=malt-script-guest \
    cargo "+$toolchain" build --quiet --locked \
    --manifest-path guest/script/Cargo.toml \
    --target "$target" --profile guest --target-dir "$target_dir"
raw="$target_dir/$target/guest/malt_script.wasm"

# Pre-initialized: the component's memory starts where its first eval has
# made its script engine (guest/preinit, Wizer), which every worker would
# otherwise make at its first eval. Deterministic, like the build above.
# Built with the whole workspace's features (what `cargo test --workspace`
# already built), not as a package alone, which would build wasmtime again.
cargo build --quiet --locked --manifest-path "$root/Cargo.toml" --workspace --bins
preinit="${CARGO_TARGET_DIR:-$root/target}/debug/malt-preinit"
built="$target_dir/malt_script.preinit.wasm"
"$preinit" "$raw" "$built"

if [[ "${1:-}" == "--check" ]]; then
    if cmp -s "$built" guest/malt_script.wasm; then
        echo "guest/malt_script.wasm matches its source ($(sha256sum <"$built" | cut -c1-16)…)"
    else
        echo "guest/malt_script.wasm does not match guest/script: run guest/build.sh and commit it" >&2
        exit 1
    fi
else
    cp "$built" guest/malt_script.wasm
    echo "wrote guest/malt_script.wasm ($(stat -c %s guest/malt_script.wasm) bytes)"
fi
