#!/usr/bin/env bash
# Builds the Python guest component with componentize-py (CPython in
# wasm, the modules of this directory, a snapshot of the interpreter after
# guest.py ran): `guest/python/build.sh [OUT]`, default
# target/malt_python.wasm. Beside it, OUT without `.wasm` plus `.stdlib`:
# the rest of the standard library, compiled, which workers mount
# read-only. Needs `pip install componentize-py==0.25.1`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/malt_python.wasm}"
version=0.25.1
if ! command -v componentize-py >/dev/null; then
    echo "componentize-py is missing: pip install componentize-py==$version" >&2
    exit 1
fi
have=$(componentize-py --version | awk '{print $2}')
if [[ "$have" != "$version" ]]; then
    echo "componentize-py $have found, $version needed: pip install componentize-py==$version" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
stdlib="${out%.wasm}.stdlib"
# Build in scratch copies, so that no __pycache__ lands in the tree; the
# guest and the standard library's export side by side.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/guest" "$work/export"
cp "$here"/*.py "$work/guest/"
cp "$here"/*.py "$work/export/"
(cd "$work/guest" && componentize-py -q -d "$root/wit" -w worker componentize -p . guest -o "$work/guest.wasm") &
guest=$!
(cd "$work/export" && componentize-py -q -d "$root/wit" -w worker componentize -p . stdlib_export -o "$work/export.wasm") &
export=$!
wait "$guest"
wait "$export"
rm -rf "$stdlib.tmp.$$"
mv "$work/export/stdlib" "$stdlib.tmp.$$"
rm -rf "$stdlib"
mv "$stdlib.tmp.$$" "$stdlib"
mv "$work/guest.wasm" "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
echo "$out"
