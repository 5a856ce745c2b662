#!/usr/bin/env python3
"""The NIAH programs on a tiny configuration (seconds): examples/niah/niah trains, saves its
checkpoint and writes the whole grid (CSV, JSON, one cells line per cell); run again it
evaluates nothing; with cells missing from its cells file it evaluates exactly those, to the
same results; a checkpoint of another run and bad flags are refused with a message; --init-from
starts a run from another's weights and refuses another model; niah-cost writes one row per
length. Usage: check_niah.py NIAH NIAH_COST. Exit 1 on any failure."""
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile

# In a cross build meson runs the test through this script, not through its exe wrapper (qemu).
wrapper = shlex.split(os.environ.get("MESON_EXE_WRAPPER", ""))
niah, niah_cost = sys.argv[1], sys.argv[2]


def run(argv, want_rc=0):
    p = subprocess.run(wrapper + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != want_rc:
        sys.exit(f"check_niah: {' '.join(argv)} exited {p.returncode}, expected {want_rc}\n"
                 f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def expect(cond, what):
    if not cond:
        sys.exit(f"check_niah: {what}")


def scores(path):
    """(length, depth) -> (retrieved, token_accuracy) of a grid JSON."""
    with open(path) as f:
        g = json.load(f)
    return g, {(c["length"], c["depth"]): (c["retrieved"], c["token_accuracy"]) for c in g["cells"]}


with tempfile.TemporaryDirectory() as t:
    out, ckpt = os.path.join(t, "m"), os.path.join(t, "m.ckpt")
    base = [niah, "--attn", "dma", "--window", "16", "--train-len", "64", "--vocab", "64",
            "--d-model", "16", "--steps", "6", "--batch", "2", "--save-every", "3",
            "--lengths", "64,96", "--depths", "3", "--samples", "3", "--threads", "1",
            "--checkpoint", ckpt, "--out", out]
    p = run(base)
    expect(os.path.exists(ckpt), "no checkpoint written")
    g, first = scores(out + ".json")
    expect(g["lengths"] == [64, 96] and g["depths"] == [0, 0.5, 1] and g["steps"] == 6,
           f"grid header {g}")
    expect(len(first) == 6, f"{len(first)} cells in the JSON, want 6")
    for (n, d), (ret, acc) in first.items():
        expect(0 <= ret <= 3 and 0 <= acc <= 1, f"cell {n} {d}: retrieved {ret}, accuracy {acc}")
    with open(out + ".csv") as f:
        rows = list(csv.DictReader(f))
    expect(len(rows) == 6 and all(r["attn"] == "dma" and r["window"] == "16" for r in rows),
           f"CSV rows {rows}")
    with open(out + ".cells.jsonl") as f:
        cells = f.read().splitlines()
    expect(len(cells) == 6, f"{len(cells)} lines in the cells file, want 6")
    expect("retrieved" in p.stdout and "depth" in p.stdout, "no grid printed")

    # Run again: trained, every cell already there, nothing evaluated.
    p = run(base)
    expect("is trained" in p.stdout and "6 of 6 cells already" in p.stdout,
           f"the second run did not skip its work:\n{p.stdout}")
    with open(out + ".cells.jsonl") as f:
        expect(len(f.read().splitlines()) == 6, "the second run appended cells")

    # Two cells lost: exactly those are evaluated again, to the same scores.
    with open(out + ".cells.jsonl", "w") as f:
        f.write("\n".join(cells[:4]) + "\n")
    p = run(base)
    expect("4 of 6 cells already" in p.stdout and "cell 2/2" in p.stdout,
           f"the third run did not evaluate exactly the missing cells:\n{p.stdout}")
    _, again = scores(out + ".json")
    expect(again == first, f"re-evaluated cells differ: {again} vs {first}")

    # Another run's checkpoint, and bad flags.
    p = run([a if a != "64" else "80" for a in base[:8]] + base[8:], want_rc=1)
    expect("belongs to another run" in p.stderr, f"a foreign checkpoint: {p.stderr}")
    p = run(base[:-4] + ["--checkpoint", ckpt, "--out", out, "--lengths", "64,x"], want_rc=2)
    expect("--lengths" in p.stderr, f"bad --lengths: {p.stderr}")
    p = run([niah, "--attn", "dma"], want_rc=2)
    expect("--checkpoint is required" in p.stderr, f"no checkpoint: {p.stderr}")

    # --init-from: a new run at another length starts from the first run's weights; a model
    # of another shape is refused.
    def second(name, d_model):
        o = os.path.join(t, name)
        return [niah, "--attn", "dma", "--window", "32", "--train-len", "96", "--vocab", "64",
                "--d-model", d_model, "--steps", "2", "--batch", "2", "--lengths", "96",
                "--depths", "2", "--samples", "1", "--threads", "1", "--checkpoint",
                o + ".ckpt", "--out", o, "--init-from", ckpt]
    p = run(second("m2", "16"))
    expect("starting from the weights" in p.stdout, f"--init-from:\n{p.stdout}")
    p = run(second("m3", "8"), want_rc=1)
    expect("is not this run's" in p.stderr, f"--init-from another model: {p.stderr}")

    # niah-cost: one row per length, positive times.
    cost = os.path.join(t, "cost")
    run([niah_cost, "--lengths", "64,128", "--window", "16", "--head-dim", "8", "--repeats", "1",
         "--out", cost])
    with open(cost + ".json") as f:
        c = json.load(f)
    expect([r["length"] for r in c["rows"]] == [64, 128] and
           all(r["dense_seconds"] > 0 and r["dma_seconds"] > 0 for r in c["rows"]),
           f"niah-cost rows {c}")
    run([niah_cost, "--lengths", ""], want_rc=2)
print("check_niah: ok")
