"""One training iteration of the 64 -> m -> m -> m -> 1 network, batch 32, one thread.

Groups ``train-step-m{m}`` put side by side, on the same network and batch:

* ``sparse``  -- SparseMLP(backend="sparse"): compiled shifted-ReLU kernels
  (default "sqrt-log" schedule, norm-relative threshold), ``n_threads=1``;
* ``dense``   -- SparseMLP(backend="dense"): the same maths with numpy BLAS
  (limited to one thread with threadpoolctl);
* ``torch``   -- PyTorch CPU, dense ReLU network, one SGD step
  (``torch.set_num_threads(1)``), skipped when torch is missing.

An iteration is forward, loss, backward and weight update (float32).  The
widths are 2048, 4096, 8192 and 16384; ``SUBQUAD_BENCH_MAX_WIDTH`` caps them
(the dense and PyTorch steps at m=16384 take seconds and ~3-4 GiB each; the
CI smoke run sets it to 4096).  Fit the time-vs-width exponents and draw the
plot with ``python bench/plot_train.py <pytest-benchmark json>``.
"""

import contextlib

import numpy as np
import pytest

from conftest import max_width, require

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # only the dense reference needs it (skipped without it)
    threadpool_limits = None
from subquad_ds import SparseMLP
from subquad_ds.datasets import load_default_task

WIDTHS = [m for m in (2048, 4096, 8192, 16384) if m <= max_width()] or [2048]
BATCH = 32
LR = 1e-3  # small and fixed: the timed steps must not depend on the data


def _one_blas_thread():
    return threadpool_limits(1) if threadpool_limits else contextlib.nullcontext()


def _rounds(m, slow):
    """Rounds per benchmark: the dense steps at large m take seconds each."""
    if not slow:
        return 20
    return {2048: 8, 4096: 5, 8192: 3}.get(m, 2)


@pytest.fixture(scope="module")
def batch():
    X, y = load_default_task(n_samples=BATCH, dtype=np.float32)
    return X, y.astype(np.float32)


def _model(backend, m, X, y):
    # fit() with one step builds the network at its initialisation scale.
    return SparseMLP(width=m, depth=3, backend=backend, max_iter=1, learning_rate=LR,
                     dtype=np.float32, random_state=1234, n_threads=1).fit(X, y)


def _info(benchmark, machine_info, model, impl, m):
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(impl=impl, width=m, batch=BATCH, depth=3, threads=1)
    if model is not None:
        benchmark.extra_info.update(
            expected_active_fraction=model.active_fraction_,
            measured_active_fraction=float(model.history_["active_fraction"][-1]),
        )


@pytest.mark.parametrize("m", WIDTHS)
@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_train_step_subquad(benchmark, machine_info, batch, backend, m):
    X, y = batch
    if backend == "dense":
        require("threadpoolctl")  # numpy's BLAS must be held to one thread
    model = _model(backend, m, X, y)
    benchmark.group = f"train-step-m{m}"
    impl = "subquad_ds sparse" if backend == "sparse" else "numpy dense reference"
    _info(benchmark, machine_info, model, impl, m)
    with _one_blas_thread():
        benchmark.pedantic(model._step, args=(X, y), rounds=_rounds(m, backend == "dense"),
                           iterations=1, warmup_rounds=1 if backend == "sparse" else 0)
    assert np.isfinite(model.history_["loss"][-1])


@pytest.mark.parametrize("m", WIDTHS)
def test_train_step_torch(benchmark, machine_info, batch, m):
    torch = require("torch")
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    X, y = (torch.from_numpy(a) for a in batch)
    net = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], m, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(m, m, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(m, m, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(m, 1, bias=False),
    )
    opt = torch.optim.SGD(net.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = 0.5 * ((net(X)[:, 0] - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    step()  # allocate the gradients outside the timing
    benchmark.group = f"train-step-m{m}"
    _info(benchmark, machine_info, None, "torch dense", m)
    benchmark.extra_info["torch"] = torch.__version__
    with _one_blas_thread():
        benchmark.pedantic(step, rounds=_rounds(m, True), iterations=1, warmup_rounds=0)
