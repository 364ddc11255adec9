#!/usr/bin/env bash
# Builds the Python guest component with componentize-py (CPython in
# wasm, the modules of this directory, a snapshot of the interpreter after
# guest.py ran): `guest/python/build.sh [OUT]`, default
# target/malt_python.wasm. Needs `pip install componentize-py==0.25.1`.
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
# Build in a scratch copy, so that no __pycache__ lands in the tree.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here"/*.py "$work"/
(cd "$work" && componentize-py -q -d "$root/wit" -w worker componentize -p . guest -o "$out.tmp.$$")
mv "$out.tmp.$$" "$out"
echo "$out"
