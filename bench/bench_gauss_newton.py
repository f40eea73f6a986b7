"""Time to loss: Gauss-Newton vs gradient descent (subquad_ds) vs PyTorch SGD and Adam.

Run:    pytest bench/bench_gauss_newton.py --benchmark-only --benchmark-group-by=group
Smoke:  pytest bench/bench_gauss_newton.py --benchmark-disable   (3 iterations per body)
Table:  python bench/bench_gauss_newton.py [--widths 2048 4096] [--budget 30]

Task: ``load_default_task(n_samples=32)`` (64 features, unit-norm rows,
unit-variance target), full batch, depth 3, one thread everywhere
(``n_threads=1``, ``torch.set_num_threads(1)``, threadpoolctl for numpy's
BLAS).  Losses are the training MSE ``mean((f - y)^2)``.

Methods
-------
gn-float32 / gn-float64
    ``SparseMLP(optimizer="gauss-newton")``: default relative shifted-ReLU
    sparsity, exact Gram solver, damping 1e-6, fixed output signs.
gd-float32
    ``SparseMLP(optimizer="gd")``: the same network, the default NTK-based
    learning rate.
torch-sgd / torch-adam
    ``nn.Sequential(Linear(64, m), ReLU, Linear(m, m), ReLU, Linear(m, m),
    ReLU, Linear(m, 1))``: plain ReLU, PyTorch's default init and biases, a
    trainable output layer, float32, full-batch steps on ``MSELoss``.
    Learning rates are the best of a grid for each optimiser (``--sweep``;
    lowest MSE after a fixed number of steps, see bench/RESULTS.md):
    SGD 0.1 from {0.03, 0.1, 0.3, 1} (0.3 oscillates, 1 diverges) at both
    widths; Adam from {3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2}: 1e-3 at
    m = 2048 (fewest steps to every target), 3e-3 at m = 4096.

Timing: the clock starts before the model is built (weight init counts for
everyone; the GD learning-rate estimate too).  The MSE of the weights after
``k`` steps is credited to the moment those weights existed (the end of
step ``k``), the time to a target is the first such moment with MSE <=
target.  Each pytest body is one fixed-iteration run (``rounds=1``): its
time is the whole run, and ``extra_info`` holds the MSE and time traces and
the times to 1e-4, 1e-6 and 1e-10 (None: not reached within the run).

``SUBQUAD_BENCH_MAX_WIDTH`` caps the widths (e.g. 2048 on a slow machine).
"""

import argparse
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from conftest import max_width
from subquad_ds import SparseMLP
from subquad_ds.datasets import load_default_task

N_SAMPLES = 32
DEPTH = 3
TARGETS = (1e-4, 1e-6, 1e-10)
WIDTHS = [m for m in (2048, 4096) if m <= max_width()]
# Iterations of one pytest body (full run): enough for GN and GD to pass
# 1e-10 (GD needs ~190 at m = 2048); PyTorch gets ~10-30 s of steps.
ITERATIONS = {"gn-float32": 10, "gn-float64": 10, "gd-float32": 300,
              "torch-sgd": 100, "torch-adam": 100}
SMOKE_ITERATIONS = 3
TORCH_LR = {"torch-sgd": {2048: 0.1, 4096: 0.1}, "torch-adam": {2048: 1e-3, 4096: 3e-3}}
METHODS = list(ITERATIONS)


class Trace:
    """MSE after k steps and the wall time at which those weights existed."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds, self.mse = [], []

    def add(self, seconds, mse):
        self.seconds.append(float(seconds))
        self.mse.append(float(mse))

    def time_to(self, target):
        for s, v in zip(self.seconds, self.mse):
            if v <= target:
                return s
        return None

    @property
    def steps(self):
        return len(self.mse) - 1


def run_subquad(method, width, n_iter, X, y, *, budget=None, stop_at=None):
    """Train with SparseMLP; stop early after ``budget`` seconds or at MSE <= ``stop_at``."""
    dtype = np.float64 if method.endswith("float64") else np.float32
    optimizer = "gauss-newton" if method.startswith("gn") else "gd"
    trace = Trace()
    ends = []

    def callback(it, loss):
        ends.append(time.perf_counter() - trace.t0)
        return ((budget is not None and ends[-1] > budget)
                or (stop_at is not None and 2 * loss <= stop_at))

    model = SparseMLP(width=width, depth=DEPTH, optimizer=optimizer, max_iter=n_iter,
                      dtype=dtype, random_state=0, n_threads=1, callback=callback)
    model.fit(X, y)
    losses = model.history_["loss"]
    # Loss k (before step k) belongs to the weights that existed at the end of step k-1.
    trace.add(ends[0] - model.history_["time"][0], 2 * losses[0])
    for k in range(1, len(losses)):
        trace.add(ends[k - 1], 2 * losses[k])
    trace.add(ends[-1], np.mean((model.predict(X) - y) ** 2))
    return trace, model


def run_torch(method, width, n_iter, X, y, *, lr=None, budget=None, stop_at=None):
    """Full-batch PyTorch SGD or Adam on the plain-ReLU network (float32)."""
    import torch

    torch.set_num_threads(1)
    lr = TORCH_LR[method][width] if lr is None else lr
    trace = Trace()
    torch.manual_seed(0)
    layers, d_in = [], X.shape[1]
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(d_in, width), torch.nn.ReLU()]
        d_in = width
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    opt = (torch.optim.SGD(net.parameters(), lr=lr) if method == "torch-sgd"
           else torch.optim.Adam(net.parameters(), lr=lr))
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))[:, None]
    end = time.perf_counter() - trace.t0
    for _ in range(n_iter):
        loss = torch.nn.functional.mse_loss(net(Xt), yt)
        trace.add(end, loss.item())
        if not np.isfinite(trace.mse[-1]) or (stop_at is not None and trace.mse[-1] <= stop_at):
            return trace, net
        opt.zero_grad()
        loss.backward()
        opt.step()
        end = time.perf_counter() - trace.t0
        if budget is not None and end > budget:
            break
    with torch.no_grad():
        trace.add(end, torch.nn.functional.mse_loss(net(Xt), yt).item())
    return trace, net


def warm_up(X, y, methods=METHODS):
    """First-call costs (lazy imports, thread pools, allocator) paid before any timing."""
    for method in methods:
        if method.startswith("torch") and not _have_torch():
            continue
        run(method, 64, 2, X, y, **({"lr": 1e-3} if method.startswith("torch") else {}))


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(method, width, n_iter, X, y, **kw):
    with threadpool_limits(1):
        if method.startswith("torch"):
            return run_torch(method, width, n_iter, X, y, **kw)[0]
        return run_subquad(method, width, n_iter, X, y, **kw)[0]


# -- pytest-benchmark ---------------------------------------------------------------

@pytest.fixture(scope="module")
def task():
    X, y = load_default_task(n_samples=N_SAMPLES, dtype=np.float64)
    warm_up(X, y)
    return X, y


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("method", METHODS)
def test_time_to_loss(benchmark, method, width, task, machine_info):
    if method.startswith("torch"):
        pytest.importorskip("torch", reason="torch is not installed (pip install '.[bench]')")
    X, y = task
    benchmark.group = f"time-to-loss-m{width}-n{N_SAMPLES}-L{DEPTH}"
    n_iter = SMOKE_ITERATIONS if benchmark.disabled else ITERATIONS[method]
    trace = benchmark.pedantic(run, args=(method, width, n_iter, X, y), rounds=1, iterations=1)
    assert trace.steps == n_iter and np.isfinite(trace.mse[-1])
    if not benchmark.disabled:  # Adam's first few steps at lr 3e-3 overshoot
        assert trace.mse[-1] < trace.mse[0]
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(
        method=method, width=width, n_samples=N_SAMPLES, depth=DEPTH, iterations=n_iter,
        mse=trace.mse, seconds=trace.seconds, seconds_init=trace.seconds[0],
        **{f"seconds_to_{t:.0e}": trace.time_to(t) for t in TARGETS},
    )
    if not benchmark.disabled and method.startswith("gn"):
        # The goal: MSE <= 1e-10 within 10 Gauss-Newton iterations.
        assert min(trace.mse) <= 1e-10


# -- time-to-loss table ----------------------------------------------------------------

def _fmt(trace, target, budget_note):
    t = trace.time_to(target)
    if t is not None:
        k = next(i for i, v in enumerate(trace.mse) if v <= target)
        return f"{t:.2f} s ({k} it)"
    return f"not in {budget_note}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--budget", type=float, default=30.0,
                    help="wall seconds per run (default 30)")
    ap.add_argument("--max-iter", type=int, default=5000, help="iteration cap per run")
    ap.add_argument("--sweep", nargs="*", type=float, default=None,
                    help="learning rates to try for the torch methods (prints one row each)")
    args = ap.parse_args()
    X, y = load_default_task(n_samples=N_SAMPLES, dtype=np.float64)
    warm_up(X, y, args.methods)
    print(f"n = {N_SAMPLES}, depth = {DEPTH}, 1 thread, budget {args.budget:g} s or "
          f"{args.max_iter} iterations per run (stops at MSE <= {min(TARGETS):g}); times "
          "from model construction; init = time before the first step")
    print("| m | method | " + " | ".join(f"MSE <= {t:.0e}" for t in TARGETS)
          + " | init | steps run | s/step (median) | final MSE |")
    print("|---|---|" + "---|" * (len(TARGETS) + 4))
    for width in args.widths:
        for method in args.methods:
            lrs = [None]
            if method.startswith("torch") and args.sweep:
                lrs = args.sweep
            elif not method.startswith("torch") and args.sweep is not None:
                continue
            for lr in lrs:
                kw = {"budget": args.budget, "stop_at": min(TARGETS)}
                if lr is not None:
                    kw["lr"] = lr
                n_iter = ITERATIONS[method] if method.startswith("gn") else args.max_iter
                trace = run(method, width, n_iter, X, y, **kw)
                note = f"{args.budget:g} s / {trace.steps} it"
                per_step = np.median(np.diff(trace.seconds[:-1])) if trace.steps > 1 else np.nan
                name = method if lr is None else f"{method} lr={lr:g}"
                print(f"| {width} | {name} | "
                      + " | ".join(_fmt(trace, t, note) for t in TARGETS)
                      + f" | {trace.seconds[0]:.2f} s | {trace.steps} | {per_step * 1e3:.1f} ms"
                      f" | {trace.mse[-1]:.2e} |",
                      flush=True)


if __name__ == "__main__":
    main()
