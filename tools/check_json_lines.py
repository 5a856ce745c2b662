#!/usr/bin/env python3
"""Run a command (argv[1:]) and check that it succeeds and that its stdout is one JSON object
per line, at least one line (the smoke tests of dmattn-bench --json). Exit 1 on any failure."""
import json
import os
import shlex
import subprocess
import sys

# In a cross build meson runs the test through this script, not through its exe wrapper (qemu):
# put the wrapper it exports in front of the program.
wrapper = shlex.split(os.environ.get("MESON_EXE_WRAPPER", ""))
proc = subprocess.run(wrapper + sys.argv[1:], stdout=subprocess.PIPE, text=True)
sys.stdout.write(proc.stdout)
if proc.returncode != 0:
    sys.exit(f"check_json_lines: the command exited with {proc.returncode}")
lines = [l for l in proc.stdout.splitlines()]
if not lines:
    sys.exit("check_json_lines: no output")
for i, line in enumerate(lines, 1):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        sys.exit(f"check_json_lines: line {i} is not JSON ({e}): {line!r}")
    if not isinstance(obj, dict) or "op" not in obj:
        sys.exit(f"check_json_lines: line {i} is not an object with an op: {line!r}")
print(f"check_json_lines: {len(lines)} JSON lines", file=sys.stderr)
