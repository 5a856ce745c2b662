#!/usr/bin/env bash
# The needle-in-a-haystack experiment of the README (examples/niah), two jobs at a time on one
# thread each:
#   1. a length curriculum's first phase: dense and dma models (8 heads) trained at 128 tokens
#      with a 128-key window (full attention at that length), batch 128, until 99% of the
#      answer tokens of 64 test sequences are right (at most 1000 steps);
#   2. each kind trained on at 1024 tokens with its own window of 256 keys (swa starts from the
#      dense model, which has the same parameters), batch 32, lr 1e-3, until 99.5% (at most
#      1200 steps); then its grid of lengths 1K..32K x depths 0..100% (20 sequences a cell) is
#      evaluated from its checkpoint;
#   3. dma (whose target is >= 95% at every depth at 1K) trained on from its phase-2 weights
#      for up to 600 steps at lr 3e-4 (phase 2 left depths 0% and 100% at 90% and 85%), then
#      its grid (out: dma3);
#   4. niah-cost times dense vs dma attention per sequence over the same lengths in one run, and
#      tools/niah-plot draws the heat maps and the cost line.
# Everything resumes: run it again after an interruption and finished work is skipped.
#   bash scripts/niah.sh [OUT_DIR (default runs/niah)] [PLOT_PREFIX (default OUT_DIR/niah)]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/niah}
plots=${2:-$out/niah}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build >/dev/null
mkdir -p "$out"
niah=build/examples/niah/niah
short=(--heads 8 --train-len 128 --window 128 --batch 128 --steps 1000 --eval-every 100
       --stop-at 0.99 --lengths 128 --depths 3 --samples 4 --threads 1)
long=(--heads 8 --train-len 1024 --window 256 --batch 32 --steps 1200 --lr 1e-3 --eval-every 100
      --stop-at 0.995 --samples 20 --threads 1)
job() { # name, then niah's flags; its log in $out/<name>.log
    local name=$1; shift
    "$niah" "$@" --out "$out/$name" > "$out/$name.log" 2>&1 ||
        { echo "niah $name failed: see $out/$name.log" >&2; return 1; }
    echo "niah $name: done"
}
echo "phase 1 (L 128): dense and dma; logs in $out/*-128.log"
job dense-128 --attn dense "${short[@]}" --checkpoint "$out/dense-128.ckpt" & p=$!
job dma-128 --attn dma "${short[@]}" --checkpoint "$out/dma-128.ckpt"
wait "$p"
echo "phase 2 (L 1024) and the grids: dma and dense, then swa; logs in $out/{dma,dense,swa}.log"
job dense --attn dense "${long[@]}" --init-from "$out/dense-128.ckpt" \
    --checkpoint "$out/dense.ckpt" & p=$!
job dma --attn dma "${long[@]}" --init-from "$out/dma-128.ckpt" --checkpoint "$out/dma.ckpt"
job swa --attn swa "${long[@]}" --init-from "$out/dense-128.ckpt" --checkpoint "$out/swa.ckpt"
wait "$p"
echo "phase 3 (dma, lr 3e-4) and its grid; log in $out/dma3.log"
job dma3 --attn dma "${long[@]}" --steps 600 --lr 3e-4 --stop-at 0.999 \
    --init-from "$out/dma.ckpt" --checkpoint "$out/dma3.ckpt"
build/examples/niah/niah-cost --heads 8 --head-dim 16 --window 256 --out "$out/cost"
for k in dense swa dma3; do sed -n '/^$/,$p' "$out/$k.log"; done
python3 tools/niah-plot --grid "$out/dense.json" "$out/swa.json" "$out/dma3.json" \
    --cost "$out/cost.json" --out "$plots"
