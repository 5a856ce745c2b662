#!/usr/bin/env bash
# The README's first command: install what is missing, build, and run a short MQAR demo:
# multi-query associative recall trained with dense, sliding-window (swa) and dynamic-mask (dma)
# attention on one small configuration where the pairs lie beyond the window, a few minutes on
# two cores, ending with the three test accuracies in a table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build >/dev/null
out=$(mktemp -d)
python3 tools/mqar-grid --preset demo --results "$out/mqar-demo.jsonl" --no-plot "$@"
