"""Command line: ``subquad-ds train`` (the main job) and ``subquad-ds bench``.

``train`` fits the same network with the sparse backend and the dense
reference on the embedded default data set, prints the loss and the
per-iteration time of both, and writes a PNG plot of the loss curves and
iteration times.  ``bench`` sweeps the width m, times training iterations
and prints the fitted exponent of time versus m.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ._validation import check_n_threads, check_random_state

__all__ = ["main"]

PLOT_NAME = "subquad_ds_train.png"
HISTORY_NAME = "subquad_ds_train.json"


class ProgressBar:
    """A dependency-free progress bar on a text stream.

    On a terminal the bar is redrawn in place; elsewhere (CI logs, pipes) one
    line is printed per tenth of the run, so logs stay short.
    """

    def __init__(self, total, label, stream=None, width=30):
        self.total = max(1, int(total))
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._next_line = 0
        self._start = time.perf_counter()

    def __call__(self, iteration, loss):
        done = iteration + 1
        elapsed = time.perf_counter() - self._start
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        text = (f"{self.label:>6} [{bar}] {done}/{self.total} loss {loss:.3e} "
                f"{1e3 * elapsed / done:.1f} ms/it")
        if self.interactive:
            self.stream.write("\r" + text)
            if done >= self.total:
                self.stream.write("\n")
        elif done >= self._next_line or done >= self.total:
            self.stream.write(text + "\n")
            self._next_line = done + max(1, self.total // 10)
        self.stream.flush()
        return False

    def close(self):
        """End an in-place bar that stopped before reaching its total."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def _sparsity(text):
    """Parse --sparsity: 'sqrt-log', a fraction in (0, 1) or an active count."""
    if text == "sqrt-log":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'sqrt-log', a fraction in (0, 1) or an integer count; got {text!r}"
        ) from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(
        f"must be 'sqrt-log', a fraction in (0, 1) or an integer count; got {text!r}"
    )


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers; got {text!r}")
    return values


def _model_kwargs(args):
    return dict(
        width=args.width, depth=args.depth, task=args.task, max_iter=args.iters,
        threshold=args.threshold, sparsity=args.sparsity, optimizer=args.optimizer,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        dtype=np.dtype(args.dtype).type, random_state=args.seed, n_threads=args.threads,
    )


def blas_thread_limit(n_threads):
    """Limit numpy's BLAS to ``n_threads`` so both backends get the same threads.

    Returns ``(context manager, description)``; the limit applies inside the
    ``with`` block only (``threadpool_limits`` itself applies it as soon as it
    is constructed, so it is built on entry).  Without threadpoolctl the
    BLAS keeps its default thread count, and the description says so.
    """
    n = check_n_threads(n_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext(), ("numpy's default BLAS threads (threadpoolctl is not "
                                          "installed: pip install 'subquad_ds[cli]')")

    @contextlib.contextmanager
    def limit():
        with threadpool_limits(limits=n, user_api="blas"):
            yield

    return limit(), f"{n} BLAS thread(s)"


def _bench_kwargs(args, width):
    return dict(
        width=width, depth=args.depth, max_iter=args.iters, sparsity=args.sparsity,
        threshold=args.threshold, dtype=np.dtype(args.dtype).type, random_state=args.seed,
        n_threads=args.threads,
    )


def _check_args(args):
    """Run the library's own validation on every configuration before any work.

    An option combination the model rejects (``--width 1``, ``--threads 0``,
    ``--batch-size`` without sgd, ``--n-samples`` beyond the data set, ...)
    is then a usage error, not a traceback after earlier runs finished.
    """
    from .datasets import load_default_task
    from .mlp import SparseMLP

    check_random_state(args.seed, "--seed")  # fit() checks it only after the first runs
    load_default_task(getattr(args, "task", "regression"), n_samples=args.n_samples)
    if args.func is cmd_train:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out must be a directory; {out} is a file")
        configs = [_model_kwargs(args)]
    else:
        configs = [_bench_kwargs(args, width) for width in args.widths]
    for kwargs in configs:
        SparseMLP(**kwargs)._check_params()


def _fit_one(backend, X, y, args, stream):
    from .mlp import SparseMLP

    bar = ProgressBar(args.iters, backend, stream=stream)
    model = SparseMLP(backend=backend, callback=bar, **_model_kwargs(args))
    limit, _ = blas_thread_limit(args.threads)
    start = time.perf_counter()
    with limit:
        model.fit(X, y)
    wall = time.perf_counter() - start
    bar.close()
    return model, wall


def _summary_rows(results):
    rows = []
    for backend, (model, wall) in results.items():
        times = np.asarray(model.history_["time"])
        rows.append({
            "backend": backend,
            "final_loss": float(model.history_["loss"][-1]),
            "iterations": len(times),
            "median_ms_per_iter": float(1e3 * np.median(times)),
            "fit_seconds": float(wall),
        })
    return rows


def _print_summary(rows, args, out):
    print(f"\nwidth m={args.width}, depth L={args.depth}, n={args.n_samples} samples, "
          f"task={args.task}, threshold={args.threshold}, sparsity={args.sparsity}, "
          f"dtype={args.dtype}", file=out)
    print(f"threads: sparse kernels {check_n_threads(args.threads)}, dense reference "
          f"{blas_thread_limit(args.threads)[1]}", file=out)
    print(f"{'backend':<8} {'final loss':>12} {'iters':>6} {'ms/iter':>10} {'fit s':>8}", file=out)
    for r in rows:
        print(f"{r['backend']:<8} {r['final_loss']:>12.4e} {r['iterations']:>6d} "
              f"{r['median_ms_per_iter']:>10.2f} {r['fit_seconds']:>8.2f}", file=out)
    by_name = {r["backend"]: r for r in rows}
    if "sparse" in by_name and "dense" in by_name:
        ratio = by_name["dense"]["median_ms_per_iter"] / by_name["sparse"]["median_ms_per_iter"]
        print(f"per-iteration speedup of sparse over dense (median): {ratio:.1f}x", file=out)


def _write_plot(results, args, path):
    """Write the loss curves and iteration times; returns False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, (model, _) in results.items():
        loss = np.asarray(model.history_["loss"])
        times = 1e3 * np.asarray(model.history_["time"])
        ax_loss.semilogy(np.arange(1, len(loss) + 1), loss, label=backend)
        ax_time.plot(np.arange(1, len(times) + 1), times,
                     label=f"{backend} (median {np.median(times):.1f} ms)")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss" + (" (MSE)" if args.task == "regression" else " (cross-entropy)"))
    ax_loss.set_title("loss")
    ax_time.set_xlabel("iteration")
    ax_time.set_ylabel("ms per iteration")
    ax_time.set_yscale("log")
    ax_time.set_title("time per iteration")
    for ax in (ax_loss, ax_time):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"subquad_ds: width {args.width}, depth {args.depth}, n={args.n_samples}, "
                 f"{args.threshold} threshold, sparsity {args.sparsity}, {args.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cmd_train(args):
    out, err = sys.stdout, sys.stderr
    from .datasets import load_default_task

    X, y = load_default_task(args.task, n_samples=args.n_samples, dtype=np.dtype(args.dtype).type)
    backends = ["sparse"] if args.sparse_only else ["sparse", "dense"]
    results = {}
    for backend in backends:
        results[backend] = _fit_one(backend, X, y, args, err)
    rows = _summary_rows(results)
    _print_summary(rows, args, out)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = {
        "config": {k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                   for k, v in vars(args).items() if k != "func"},
        "summary": rows,
        "history": {b: {k: [float(v) for v in vals] for k, vals in m.history_.items()}
                    for b, (m, _) in results.items()},
    }
    (out_dir / HISTORY_NAME).write_text(json.dumps(history, indent=1))
    print(f"history written to {out_dir / HISTORY_NAME}", file=out)
    if args.no_plot:
        return 0
    if _write_plot(results, args, out_dir / PLOT_NAME):
        print(f"plot written to {out_dir / PLOT_NAME}", file=out)
    else:
        print("matplotlib is not installed, so no plot was written "
              "(pip install 'subquad_ds[cli]')", file=err)
    return 0


def fit_exponent(widths, seconds):
    """Least-squares slope of log(seconds) against log(width)."""
    slope, _ = np.polyfit(np.log(np.asarray(widths, float)), np.log(np.asarray(seconds, float)), 1)
    return float(slope)


def cmd_bench(args):
    out = sys.stdout
    from .datasets import load_default_task
    from .mlp import SparseMLP

    X, y = load_default_task("regression", n_samples=args.n_samples, dtype=np.dtype(args.dtype).type)
    backends = ["sparse", "dense"] if args.backend == "both" else [args.backend]
    timings = {b: [] for b in backends}
    print(f"{'width':>7} " + " ".join(f"{b + ' ms/iter':>16}" for b in backends), file=out)
    for width in args.widths:
        row = []
        for backend in backends:
            model = SparseMLP(backend=backend, **_bench_kwargs(args, width))
            with blas_thread_limit(args.threads)[0]:
                model.fit(X, y)
            # The first iteration pays one-off page faults and cache warm-up.
            times = np.asarray(model.history_["time"][1:] or model.history_["time"])
            timings[backend].append(float(np.median(times)))
            row.append(f"{1e3 * timings[backend][-1]:>16.2f}")
        print(f"{width:>7d} " + " ".join(row), file=out)
    if len(args.widths) >= 2:
        for backend in backends:
            print(f"fitted exponent of {backend} time vs m over "
                  f"{min(args.widths)}..{max(args.widths)}: "
                  f"{fit_exponent(args.widths, timings[backend]):.2f}", file=out)
    return 0


def _add_model_options(p, *, iters, n_samples):
    p.add_argument("--depth", type=_positive_int, default=3, help="number of hidden layers L (default %(default)s)")
    p.add_argument("--iters", type=_positive_int, default=iters, help="training iterations (default %(default)s)")
    p.add_argument("--n-samples", type=_positive_int, default=n_samples,
                   help="samples of the embedded data set to train on, at most 512 (default %(default)s)")
    p.add_argument("--threshold", choices=["relative", "fixed"], default="relative",
                   help="shifted-ReLU threshold rule (default %(default)s: per-sample norm-relative, stable in depth)")
    p.add_argument("--sparsity", type=_sparsity, default="sqrt-log",
                   help="'sqrt-log' (tau = sqrt(0.4 ln m)), an active fraction, or an active count (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for the compiled kernels; -1 for all cores (default %(default)s)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="subquad-ds",
        description="Sparse training of wide networks in subquadratic time per iteration.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train sparse vs dense on the embedded data set and plot")
    train.add_argument("--width", type=_positive_int, default=4096, help="hidden width m (default %(default)s)")
    _add_model_options(train, iters=200, n_samples=32)
    train.add_argument("--task", choices=["regression", "classification"], default="regression")
    train.add_argument("--optimizer", choices=["gd", "sgd", "gauss-newton"], default="gd")
    train.add_argument("--learning-rate", type=float, default=None,
                       help="step size (default: from the NTK scale at initialisation)")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="mini-batch size for --optimizer sgd (default: full batch)")
    train.add_argument("--sparse-only", action="store_true", help="skip the dense reference run")
    train.add_argument("--out", default=".", help="directory for the PNG plot and JSON history (default: .)")
    train.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    train.set_defaults(func=cmd_train)

    bench = sub.add_parser("bench", help="time iterations over widths and fit the exponent")
    _add_model_options(bench, iters=5, n_samples=32)
    bench.add_argument("--widths", type=_int_list, default=[1024, 2048, 4096, 8192],
                       help="comma-separated widths m (default 1024,2048,4096,8192)")
    bench.add_argument("--backend", choices=["sparse", "dense", "both"], default="both")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    """Entry point of the ``subquad-ds`` console script and ``python -m subquad_ds``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line
    return args.func(args)
