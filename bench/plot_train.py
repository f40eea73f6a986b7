"""Summarise a ``bench_train.py`` run: medians, ratios, time-vs-width exponents, plot.

Usage::

    pytest bench/bench_train.py --benchmark-only --benchmark-json=train.json
    python bench/plot_train.py train.json [more.json ...] [-o bench/train_scaling.png]

Prints a Markdown table (median seconds per iteration for each width and
implementation, speed-ups of the sparse backend) and the least-squares slope
of log(time) against log(width) for each implementation, then draws the
log-log plot (needs matplotlib).  With several runs (a shared, noisy
machine), each cell is the median over the runs of the per-run medians, and
the per-run exponents are listed too.
"""

import argparse
import json
from collections import defaultdict

import numpy as np

IMPLS = ("subquad_ds sparse", "numpy dense reference", "torch dense")


def load(path):
    with open(path) as fh:
        data = json.load(fh)
    medians = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        medians[info["impl"]][info["width"]] = bench["stats"]["median"]
    return medians, data.get("datetime", "")


def exponent(times):
    """Slope of log(time) vs log(width), and the widths it was fitted on."""
    widths = sorted(times)
    if len(widths) < 2:
        return float("nan"), widths
    slope = np.polyfit(np.log(widths), np.log([times[w] for w in widths]), 1)[0]
    return float(slope), widths


def table(medians):
    widths = sorted({w for times in medians.values() for w in times})
    sparse = medians.get(IMPLS[0], {})
    lines = ["| m | sparse (ms) | dense numpy (ms) | PyTorch (ms) | vs dense | vs PyTorch |",
             "|---:|---:|---:|---:|---:|---:|"]
    for w in widths:
        cells = [medians.get(impl, {}).get(w) for impl in IMPLS]
        ratio = [f"{c / cells[0]:.1f}x" if c and cells[0] else "-" for c in cells[1:]]
        ms = [f"{c * 1e3:.1f}" if c else "-" for c in cells]
        lines.append(f"| {w} | " + " | ".join(ms + ratio) + " |")
    lines.append("")
    for impl in IMPLS:
        if impl in medians:
            slope, ws = exponent(medians[impl])
            lines.append(f"- exponent of time vs m ({impl}, m = {ws[0]}..{ws[-1]}): {slope:.2f}")
    if not sparse:
        lines.append("- (no sparse results)")
    return "\n".join(lines)


def plot(medians, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for impl, marker in zip(IMPLS, "osd"):
        if impl not in medians:
            continue
        ws = sorted(medians[impl])
        slope, _ = exponent(medians[impl])
        ax.loglog(ws, [medians[impl][w] for w in ws], marker=marker,
                  label=f"{impl} (slope {slope:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width m (64 -> m -> m -> m -> 1, batch 32)")
    ax.set_ylabel("seconds per training iteration (1 thread)")
    ax.set_title("SparseMLP: time per iteration vs width")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def combine(runs):
    """Median over runs of each (implementation, width) median."""
    out = defaultdict(dict)
    for impl in {i for run in runs for i in run}:
        for w in {w for run in runs for w in run.get(impl, {})}:
            out[impl][w] = float(np.median([run[impl][w] for run in runs
                                            if w in run.get(impl, {})]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON of bench/bench_train.py")
    parser.add_argument("-o", "--output", default="bench/train_scaling.png")
    args = parser.parse_args(argv)
    runs = []
    for path in args.json:
        medians, when = load(path)
        runs.append(medians)
        slopes = ", ".join(f"{impl}: {exponent(medians[impl])[0]:.2f}"
                           for impl in IMPLS if impl in medians)
        print(f"run {when}: exponents {slopes}")
    medians = combine(runs)
    print(table(medians))
    print(f"plot: {plot(medians, args.output)}")


if __name__ == "__main__":
    main()
