#!/usr/bin/env python3
"""Plot the JSON lines of dmattn-bench.

Usage:
    dmattn-bench --sweep --json > sweep.jsonl
    python3 tools/plot_bench.py sweep.jsonl [-o OUTDIR] [--prefix NAME]
    dmattn-bench --sweep --sweep-quick --json | python3 tools/plot_bench.py -

Reads JSON lines from the files named (or stdin for '-' or no file); lines that are not JSON
objects (e.g. the table) are skipped. Writes, into OUTDIR (default '.'):

    NAME_time_vs_L.png     forward time (ms) vs L, log-log, one curve per impl (dma: one per
                           mask/window), one panel per (D, Hkv, threads)
    NAME_speedup.png       speed-up of dma over the library's dense path vs window,
                           one curve per L, one panel per (D, Hkv, threads)
    NAME_gflops_vs_L.png   effective GFLOP/s vs L per impl, with the OpenBLAS SGEMM of the
                           same thread count as a dashed line

and, when the input has op "backward" lines (dmattn-bench --backward):

    NAME_backward_time_vs_L.png   backward time (ms) vs L, as NAME_time_vs_L.png
    NAME_backward_speedup.png     speed-up of the dma backward over the dense backward vs
                                  window, as NAME_speedup.png

and, when the input has thread-scaling lines (dmattn-bench --sweep-threads LIST without --sweep;
they carry thread_speedup and are left out of the plots above):

    NAME_thread_scaling.png       per shape: speed-up over the fewest threads vs threads, one
                                  curve per op (mask_build, forward, backward, sgemm), with the
                                  ideal line; beside it the fraction of the SGEMM GFLOP/s at the
                                  same thread count (forward, backward)

and prints the path of each file written. Only float32 lines are plotted: the bf16/f16 lines
of --dtype are skipped. Needs only matplotlib.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

SHAPE_KEYS = ("B", "Lq", "Lk", "Hq", "Hkv", "D", "threads", "isa")
IMPL_STYLE = {"dense": ("tab:blue", "s"), "openblas": ("tab:orange", "^")}
DMA_COLORS = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
              "tab:cyan", "tab:gray"]


def read_records(paths):
    recs = []
    streams = []
    if not paths or paths == ["-"]:
        streams.append(("<stdin>", sys.stdin))
    for p in paths:
        if p != "-":
            streams.append((p, open(p, encoding="utf-8")))
    for name, f in streams:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"plot_bench: {name}:{n}: skipping bad JSON ({e})", file=sys.stderr)
                continue
            # float32 lines only (lines without a dtype are from before --dtype): the plots
            # key on the shape, not the storage type
            if (isinstance(r, dict) and "op" in r and "impl" in r
                    and r.get("dtype", "f32") == "f32"):
                recs.append(r)
        if f is not sys.stdin:
            f.close()
    return recs


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def panel_key(r):
    return (r.get("D"), r.get("Hkv"), r.get("threads"))


def panel_title(k, hq):
    d, hkv, thr = k
    return f"D={d} Hq={hq} Hkv={hkv} threads={thr}"


def curve_label(r):
    if r["impl"] == "dma":
        return f"dma {r.get('mask')} w={r.get('window')}"
    return f"{r['impl']} ({r.get('mask')})"


def grid(n):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def plain_ticks(ax, minor_y=True):
    """Tick labels as plain numbers (1024, 0.5, 30) instead of 2^10 or 3x10^1."""
    f = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(f)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(f)
    ax.yaxis.set_minor_formatter(f if minor_y else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=6)


def op_records(recs, op):
    # last record wins for a repeated (impl, mask, window, shape) measurement
    seen = {}
    for r in recs:
        if r.get("op") != op or num(r.get("ms_median")) is None or r.get("Lq") is None:
            continue
        seen[(r["impl"], r.get("mask"), r.get("window")) + tuple(r.get(k) for k in SHAPE_KEYS)] = r
    return list(seen.values())


def xlen(r):
    return r["Lk"] if r.get("Lq") == r.get("Lk") else r["Lq"]


def plot_metric_vs_L(fwd, sgemm, metric, ylabel, title, path):
    panels = sorted({panel_key(r) for r in fwd}, key=lambda k: tuple(x if x is not None else -1 for x in k))
    if not panels:
        return False
    fig, axes = grid(len(panels))
    hq = sorted({r.get("Hq") for r in fwd}, key=str)
    hq = hq[0] if len(hq) == 1 else "/".join(map(str, hq))
    for ax, k in zip(axes, panels):
        rs = [r for r in fwd if panel_key(r) == k and num(r.get(metric)) is not None]
        curves = {}
        for r in rs:
            curves.setdefault(curve_label(r), []).append(r)
        dma_labels = sorted((lb for lb in curves if lb.startswith("dma")),
                            key=lambda lb: (lb.split(" w=")[0], int(lb.split("w=")[1]) if lb.split("w=")[1].isdigit() else 0))
        other = sorted(lb for lb in curves if not lb.startswith("dma"))
        for i, lb in enumerate(other + dma_labels):
            pts = sorted(curves[lb], key=xlen)
            if lb.startswith("dma"):
                color, marker = DMA_COLORS[dma_labels.index(lb) % len(DMA_COLORS)], "o"
            else:
                color, marker = IMPL_STYLE.get(pts[0]["impl"], ("black", "x"))
            ax.plot([xlen(p) for p in pts], [p[metric] for p in pts], marker=marker, color=color,
                    label=lb, linewidth=1.4, markersize=4)
        if sgemm is not None:
            for s in sgemm:
                if s.get("threads") == k[2] and num(s.get("gflops")):
                    ax.axhline(s["gflops"], color="black", linestyle="--", linewidth=1,
                               label=f"sgemm N={s.get('N')}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_ticks(ax)
        ax.set_xlabel("L (= Lq = Lk)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title(k, hq), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def forward_records(recs):
    return op_records(recs, "forward")


def plot_speedup(fwd, path, what="forward"):
    dense = {}
    for r in fwd:
        if r["impl"] == "dense":
            dense[tuple(r.get(k) for k in SHAPE_KEYS)] = r
    pts = []
    for r in fwd:
        if r["impl"] != "dma" or num(r.get("window")) is None:
            continue
        d = dense.get(tuple(r.get(k) for k in SHAPE_KEYS))
        sp = d["ms_median"] / r["ms_median"] if d and r["ms_median"] > 0 else num(r.get("speedup_vs_dense"))
        if sp is not None:
            pts.append((r, sp))
    if not pts:
        return False
    panels = sorted({panel_key(r) for r, _ in pts}, key=lambda k: tuple(x if x is not None else -1 for x in k))
    fig, axes = grid(len(panels))
    hq = sorted({r.get("Hq") for r, _ in pts}, key=str)
    hq = hq[0] if len(hq) == 1 else "/".join(map(str, hq))
    for ax, k in zip(axes, panels):
        by_curve = {}
        for r, sp in pts:
            if panel_key(r) == k:
                by_curve.setdefault((xlen(r), r.get("mask")), []).append((r["window"], sp))
        for i, ((L, mask), xs) in enumerate(sorted(by_curve.items(), key=lambda kv: (str(kv[0][1]), kv[0][0]))):
            xs.sort()
            ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", markersize=4,
                    color=DMA_COLORS[i % len(DMA_COLORS)], label=f"L={L} ({mask})")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_ticks(ax)
        ax.set_xlabel("window (keys per row)")
        ax.set_ylabel("speed-up of dma over dense (x)")
        ax.set_title(panel_title(k, hq), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if what == "forward":
        fig.suptitle("dma forward speed-up over the library's dense (causal) path")
    else:
        fig.suptitle(f"dma {what} speed-up over the dense (causal) {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SCALING_STYLE = {"mask_build": ("tab:green", "o"), "forward": ("tab:blue", "s"),
                 "backward": ("tab:red", "^"), "sgemm": ("black", "x")}


def plot_thread_scaling(recs, path):
    """Speed-up vs threads per op (with the ideal line), and the fraction of SGEMM."""
    shape_of = lambda r: (r.get("B"), r.get("Lq"), r.get("Lk"), r.get("Hq"), r.get("Hkv"),
                          r.get("D"), r.get("window"), r.get("isa"))
    shapes = sorted({shape_of(r) for r in recs if r.get("op") != "sgemm"},
                    key=lambda k: tuple(str(x) for x in k))
    if not shapes:
        return False
    fig, axes = plt.subplots(len(shapes), 2, figsize=(10, 4 * len(shapes)), squeeze=False)
    for (ax_sp, ax_sg), shape in zip(axes, shapes):
        # sgemm lines have no attention shape: they go with every shape of the same isa
        rs = [r for r in recs if shape_of(r) == shape or
              (r.get("op") == "sgemm" and r.get("isa") == shape[7])]
        threads = sorted({r["threads"] for r in rs if num(r.get("threads"))})
        base = min((r.get("base_threads") for r in rs if num(r.get("base_threads"))), default=1)
        ax_sp.plot(threads, [t / base for t in threads], color="gray", linestyle="--",
                   linewidth=1, label="ideal")
        for op, (color, marker) in SCALING_STYLE.items():
            pts = sorted((r["threads"], r["thread_speedup"], r.get("gflops_vs_sgemm")) for r in rs
                         if r.get("op") == op and num(r.get("thread_speedup")) is not None)
            if not pts:
                continue
            ax_sp.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                       label=op, linewidth=1.4, markersize=5)
            sg = [(t, f) for t, _, f in pts if num(f) is not None]
            if sg:
                ax_sg.plot([p[0] for p in sg], [p[1] for p in sg], marker=marker, color=color,
                           label=op, linewidth=1.4, markersize=5)
        B, Lq, Lk, Hq, Hkv, D, window, isa = shape
        title = f"B={B} Lq={Lq} Lk={Lk} Hq={Hq} Hkv={Hkv} D={D} window={window} {isa}"
        for ax in (ax_sp, ax_sg):
            ax.set_xscale("log", base=2)
            ax.set_xticks(threads)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("threads")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(title, fontsize=9)
        ax_sp.set_yscale("log", base=2)
        ax_sp.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_sp.set_ylabel(f"speed-up over {base} thread{'s' if base != 1 else ''} (x)")
        ax_sp.legend(fontsize=8)
        ax_sg.set_ylabel("GFLOP/s / SGEMM GFLOP/s (same threads)")
        if ax_sg.lines:
            ax_sg.legend(fontsize=8)
    fig.suptitle("dmattn thread scaling (dmattn-bench --sweep-threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plot dmattn-bench JSON lines.")
    ap.add_argument("files", nargs="*", help="JSON-lines files ('-' or none: stdin)")
    ap.add_argument("-o", "--outdir", default=".", help="directory for the PNGs (default .)")
    ap.add_argument("--prefix", default="bench", help="file name prefix (default bench)")
    a = ap.parse_args(argv)

    recs = read_records(a.files)
    if not recs:
        print("plot_bench: no dmattn-bench JSON records in the input", file=sys.stderr)
        return 1
    os.makedirs(a.outdir, exist_ok=True)
    scaling = [r for r in recs if "thread_speedup" in r]
    recs = [r for r in recs if "thread_speedup" not in r]
    fwd = forward_records(recs)
    sgemm = [r for r in recs if r.get("op") == "sgemm"]
    written = []
    p = os.path.join(a.outdir, f"{a.prefix}_time_vs_L.png")
    if plot_metric_vs_L(fwd, None, "ms_median", "forward time (ms, median)",
                        "dmattn forward time vs L (causal)", p):
        written.append(p)
    p = os.path.join(a.outdir, f"{a.prefix}_speedup.png")
    if plot_speedup(fwd, p):
        written.append(p)
    p = os.path.join(a.outdir, f"{a.prefix}_gflops_vs_L.png")
    if plot_metric_vs_L(fwd, sgemm, "gflops", "effective GFLOP/s",
                        "effective GFLOP/s vs L (dashed: OpenBLAS SGEMM, same threads)", p):
        written.append(p)
    bwd = op_records(recs, "backward")
    p = os.path.join(a.outdir, f"{a.prefix}_backward_time_vs_L.png")
    if plot_metric_vs_L(bwd, None, "ms_median", "backward time (ms, median)",
                        "dmattn backward time vs L (causal)", p):
        written.append(p)
    p = os.path.join(a.outdir, f"{a.prefix}_backward_speedup.png")
    if plot_speedup(bwd, p, "backward"):
        written.append(p)
    p = os.path.join(a.outdir, f"{a.prefix}_thread_scaling.png")
    if plot_thread_scaling(scaling, p):
        written.append(p)
    if not written:
        print("plot_bench: nothing to plot (no forward or backward records)", file=sys.stderr)
        return 1
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
