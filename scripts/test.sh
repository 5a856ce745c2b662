#!/usr/bin/env bash
# The README's second command (and CI's): install what is missing, then build and run every test:
#   1. release build with -Werror, all Check suites (every ISA this CPU runs);
#   2. the README's C example, compiled and run against that build;
#   3. the same suites under AddressSanitizer + UndefinedBehaviorSanitizer;
#   4. an aarch64 cross build whose suites run under qemu (the NEON path).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== release build (-Werror) and tests"
meson setup build-test --buildtype=release -Dwerror=true --wipe >/dev/null 2>&1 ||
  meson setup build-test --buildtype=release -Dwerror=true >/dev/null
ninja -C build-test
meson test -C build-test --print-errorlogs

echo "== README example"
scripts/readme-example.sh build-test

echo "== ASan + UBSan build and tests"
meson setup build-asan --buildtype=debugoptimized -Db_sanitize=address,undefined \
  -Db_lundef=false -Dwerror=true --wipe >/dev/null 2>&1 ||
  meson setup build-asan --buildtype=debugoptimized -Db_sanitize=address,undefined \
    -Db_lundef=false -Dwerror=true >/dev/null
ninja -C build-asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  meson test -C build-asan --print-errorlogs --timeout-multiplier 3

echo "== aarch64 (NEON) under qemu"
scripts/test-aarch64.sh
