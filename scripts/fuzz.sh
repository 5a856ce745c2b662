#!/usr/bin/env bash
# Build the libFuzzer targets (tests/fuzz: the sparsity builders, the forward/backward argument
# validation, the training checkpoints) with clang, ASan + UBSan and coverage instrumentation of
# the whole library, then run each for SECONDS (default 60) from its seed corpus in
# tests/fuzz/corpus/<target>. New inputs go to a temporary directory, not into the repository.
# A finding (crash, sanitizer report, broken contract, leak, timeout, out-of-memory) stops the
# run, fails the script and leaves the input under build-fuzz/findings/; fix it and add the
# input to the target's corpus as a regression case.
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
log=$(mktemp)
args=(--buildtype=debugoptimized -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled
      -Dc_args="-fsanitize=fuzzer-no-link -Wno-pass-failed")
if [ -d build-fuzz ]; then args+=(--wipe); fi
CC=clang meson setup build-fuzz "${args[@]}" >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"
targets=(sparsity attention)
# the checkpoint target exists when OpenBLAS is found (the training library needs it)
if grep -q "fuzz_checkpoint" build-fuzz/build.ninja; then targets+=(checkpoint); fi
ninja -C build-fuzz "${targets[@]/#/tests/fuzz/fuzz_}" >/dev/null
mkdir -p build-fuzz/findings
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  echo "fuzz_$t: ${secs} s from $(ls tests/fuzz/corpus/$t | wc -l) seeds"
  if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 build-fuzz/tests/fuzz/fuzz_$t \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
      -artifact_prefix="build-fuzz/findings/$t-" "$work" "tests/fuzz/corpus/$t" \
      >"$work.log" 2>&1; then
    tail -60 "$work.log"
    echo "fuzz_$t: a finding; its input is in build-fuzz/findings/" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|cov:.*DONE|DONE" "$work.log" | tail -2 | sed 's/^/  /'
  rm -rf "$work" "$work.log"
done
