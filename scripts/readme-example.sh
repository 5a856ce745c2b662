#!/usr/bin/env bash
# Compile and run the C example of README.md (the first ```c block) against a build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
awk '/^```c$/{on=1; next} /^```$/{if(on){exit}} on' README.md >"$out/example.c"
[ -s "$out/example.c" ] || { echo "README.md has no \`\`\`c block" >&2; exit 1; }
cc -std=c11 -Wall -Wextra -Werror -Iinclude "$out/example.c" -o "$out/example" \
  -L"$build/lib" -ldmattn -Wl,-rpath,"$PWD/$build/lib" -lm
"$out/example"
