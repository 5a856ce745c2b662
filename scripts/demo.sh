#!/usr/bin/env bash
# The README's first command: install what is missing, build, run the demo (the benchmark on a
# small default shape: DMA top-k vs the library's dense path vs an OpenBLAS dense attention).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build >/dev/null
build/tools/dmattn-bench --sgemm "$@"
