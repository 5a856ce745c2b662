#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build with the CUDA backend, run the GPU-vs-CPU suite
# (tests/test_cuda.c, test_cuda_sparsity.c, test_cuda_grid.c), then the GPU benchmark
# (tools/gpu-bench, which needs PyTorch with CUDA). Arguments go to gpu-bench, e.g.
#   scripts/gpu-test.sh --lens 4096,16384 --windows 256 --json gpu-bench.jsonl
# DMATTN_TEST_VERBOSE=1 makes the suite print how much of each tolerance it used.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d build-gpu ]; then
  meson setup --reconfigure build-gpu --buildtype=release -Dcuda=enabled >/dev/null
else
  meson setup build-gpu --buildtype=release -Dcuda=enabled >/dev/null
fi
ninja -C build-gpu
# as `meson test` runs the suites: one process (CK_FORK=no), passive OpenMP waits
CK_FORK=no OMP_WAIT_POLICY=passive build-gpu/tests/test_cuda
python3 tools/gpu-bench --lib build-gpu/lib/libdmattn.so "$@"
