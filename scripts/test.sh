#!/usr/bin/env bash
# The README's second command (and CI's): install what is missing, then build and run every test:
#   1. release build with -Werror, all Check suites (every ISA this CPU runs); with nvcc on
#      PATH it compiles and links the CUDA backend (cuda/), whose GPU cases skip without a GPU;
#   2. the README's C example, compiled and run against that build, then against an installed
#      copy (scripts/consumer-test.sh: pkg-config, shared and static, C and C++);
#   3. the same suites under AddressSanitizer + UndefinedBehaviorSanitizer, built with
#      -Dcuda=disabled (the library without the CUDA backend);
#   4. the threads suite under ThreadSanitizer;
#   5. the fuzz targets (scripts/fuzz.sh, clang + libFuzzer), 45 s each;
#   6. an aarch64 cross build whose suites run under qemu (the NEON path).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

# Configure a build directory from scratch; meson's own report is shown only when it fails.
setup() {
  local dir=$1; shift
  local log; log=$(mktemp)
  if [ -d "$dir" ]; then set -- --wipe "$@"; fi
  if ! meson setup "$dir" "$@" >"$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi
  rm -f "$log"
}

echo "== release build (-Werror) and tests"
setup build-test --buildtype=release -Dwerror=true
ninja -C build-test
meson test -C build-test --print-errorlogs

echo "== README example"
scripts/readme-example.sh build-test

echo "== the installed library: pkg-config consumers in C and C++, shared and static"
scripts/consumer-test.sh

echo "== ASan + UBSan build and tests"
setup build-asan --buildtype=debugoptimized -Db_sanitize=address,undefined -Db_lundef=false \
  -Dwerror=true -Dcuda=disabled
ninja -C build-asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  meson test -C build-asan --print-errorlogs --timeout-multiplier 3

echo "== ThreadSanitizer: application threads sharing a sparsity object (tests/test_threads.c)"
# One OpenMP thread per context: libgomp is not built for TSan, so its own hand-offs between
# the threads of a parallel region would be reported as races in every region.
setup build-tsan --buildtype=debugoptimized -Db_sanitize=thread -Db_lundef=false \
  -Dopenblas=disabled -Dcuda=disabled -Dwerror=true
ninja -C build-tsan tests/test_threads >/dev/null
DMATTN_TEST_OMP_THREADS=1 TSAN_OPTIONS=halt_on_error=1 OMP_WAIT_POLICY=passive CK_FORK=no \
  build-tsan/tests/test_threads

echo "== fuzzing: libFuzzer targets, 45 s each from their seed corpora"
scripts/fuzz.sh 45

echo "== aarch64 (NEON) under qemu"
scripts/test-aarch64.sh
