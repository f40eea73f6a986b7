"""SparseMLP(optimizer="gauss-newton"): the step against a dense numpy oracle, convergence, API."""

import numpy as np
import pytest
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

from subquad_ds import SparseMLP
from subquad_ds._gn_optimizer import GaussNewtonState
from subquad_ds.datasets import load_default_task

from _oracles import gauss_newton_step_dense, mlp_jacobian_fd, mlp_outputs, topk_selection

RULES = [("relative", 0.2), ("fixed", 0.2), ("relative", 6)]
RULE_IDS = ["relative", "fixed", "topk"]


@pytest.fixture(scope="module")
def task32():
    return load_default_task(n_samples=32)


def _gn(X, y, **kw):
    params = dict(width=256, depth=3, optimizer="gauss-newton", max_iter=6, dtype=np.float64,
                  random_state=0, n_threads=1)
    params.update(kw)
    return SparseMLP(**params).fit(X, y)


def _mse(model, X, y):
    return float(np.mean((model.predict(X) - y) ** 2))


# -- the step against a dense Jacobian -----------------------------------------

def _small_model(backend, threshold, sparsity, X, y):
    """A fitted-then-reinitialised small network (so every attribute exists)."""
    model = _gn(X, y, width=24, max_iter=1, backend=backend, threshold=threshold,
                sparsity=sparsity)
    model._init_params(X.shape[1], 1, np.random.default_rng(7))
    model._build_net()
    model.history_ = {"damping": []}
    return model


def _oracle_kw(model, X):
    rule = "topk" if model.active_count_ is not None else model.threshold
    frozen = topk_selection(model.coefs_, X, model.active_count_) if rule == "topk" else None
    return dict(rule=rule, b=model.tau_ * model.scale_, frozen=frozen)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("threshold, sparsity", RULES, ids=RULE_IDS)
def test_jacobian_factors_match_finite_differences(backend, threshold, sparsity):
    X, y = load_default_task(n_samples=6)
    model = _small_model(backend, threshold, sparsity, X, y)
    kw = _oracle_kw(model, X)
    J = mlp_jacobian_fd(model.coefs_, model.head_, X, **kw)
    state = GaussNewtonState(model, X, y, damping=1e-6, solver="exact", rng=0)
    factors, _ = state.factors(model._net.forward(X))
    blocks = []
    for D, H in factors:
        D = D.toarray()
        H = H.toarray() if hasattr(H, "toarray") else np.asarray(H)
        # coefs_[l][c, r] = W_l[r, c]: d f_i / d coefs_[l][c, r] = H[i, c] D[i, r].
        blocks.append((H[:, :, None] * D[:, None, :]).reshape(len(X), -1))
    J_factors = np.hstack(blocks)
    assert np.count_nonzero(J) > 0
    np.testing.assert_allclose(J_factors, J, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("threshold, sparsity", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("solver", ["exact", "sketched", "jacobi"])
def test_step_equals_the_dense_damped_step(backend, threshold, sparsity, solver):
    """dW = -J^T (J J^T + lambda I)^{-1} r, with J from finite differences."""
    X, y = load_default_task(n_samples=6)
    model = _small_model(backend, threshold, sparsity, X, y)
    kw = _oracle_kw(model, X)
    J = mlp_jacobian_fd(model.coefs_, model.head_, X, **kw)
    r = mlp_outputs(model.coefs_, model.head_, X, **kw) - y
    mu = 1e-3
    lam = mu * np.mean(np.einsum("ij,ij->i", J, J))
    expected = gauss_newton_step_dense(J, r, lam)
    before = np.concatenate([W.ravel() for W in model.coefs_])
    state = GaussNewtonState(model, X, y, damping=mu, solver=solver, rng=0)
    loss = state.step()
    assert loss == pytest.approx(0.5 * np.mean(r * r), rel=1e-12)
    assert model.history_["damping"] == [mu], "the first trial is accepted"
    step = np.concatenate([W.ravel() for W in model.coefs_]) - before
    np.testing.assert_allclose(step, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_undamped_step_solves_the_linearised_problem(backend):
    """With a tiny damping, J dW = -r (the linearised residual vanishes)."""
    X, y = load_default_task(n_samples=6)
    model = _small_model(backend, "relative", 0.2, X, y)
    kw = _oracle_kw(model, X)
    J = mlp_jacobian_fd(model.coefs_, model.head_, X, **kw)
    r = mlp_outputs(model.coefs_, model.head_, X, **kw) - y
    before = np.concatenate([W.ravel() for W in model.coefs_])
    GaussNewtonState(model, X, y, damping=1e-12, solver="exact", rng=0).step()
    step = np.concatenate([W.ravel() for W in model.coefs_]) - before
    assert np.linalg.norm(J @ step + r) <= 1e-6 * np.linalg.norm(r)
    # The minimum-norm solution: the step lies in the row space of J.
    coef, *_ = np.linalg.lstsq(J.T, step, rcond=None)
    np.testing.assert_allclose(J.T @ coef, step, rtol=1e-7, atol=1e-8 * np.abs(step).max())


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), width=st.integers(8, 20),
       depth=st.integers(1, 3), threshold=st.sampled_from(["relative", "fixed"]),
       backend=st.sampled_from(["sparse", "dense"]), mu=st.floats(1e-6, 1.0))
def test_step_matches_the_oracle_on_random_networks(seed, n, width, depth, threshold, backend,
                                                     mu):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    y = rng.standard_normal(n)
    model = SparseMLP(width=width, depth=depth, optimizer="gauss-newton", max_iter=1,
                      threshold=threshold, sparsity=0.3, backend=backend, dtype=np.float64,
                      random_state=seed, n_threads=1)
    try:
        model.fit(X, y)
    except ValueError as exc:
        # A fixed threshold can leave every sample without an active neuron;
        # fit refuses that network, and it has no step to compare.
        if "the Jacobian is zero" not in str(exc):
            raise
        reject()
    model._init_params(5, 1, np.random.default_rng(seed))
    model._build_net()
    model.history_ = {"damping": []}
    kw = _oracle_kw(model, X)
    J = mlp_jacobian_fd(model.coefs_, model.head_, X, **kw)
    diag = np.einsum("ij,ij->i", J, J)
    assume(diag.max() > 1e-6)  # at least one sample with an active path
    r = mlp_outputs(model.coefs_, model.head_, X, **kw) - y
    expected = gauss_newton_step_dense(J, r, mu * diag.mean())
    shapes = [W.shape for W in model.coefs_]
    trial = np.split(np.concatenate([W.ravel() for W in model.coefs_]) + expected,
                     np.cumsum([np.prod(s) for s in shapes])[:-1])
    new_r = mlp_outputs([t.reshape(s) for t, s in zip(trial, shapes)], model.head_, X,
                        **kw) - y
    gain = r @ r - (mu * diag.mean()) ** 2 * np.sum(
        np.linalg.solve(J @ J.T + mu * diag.mean() * np.eye(n), r) ** 2)
    assume(new_r @ new_r < r @ r and gain > 1e-20)  # a first trial the optimiser accepts
    before = np.concatenate([W.ravel() for W in model.coefs_])
    GaussNewtonState(model, X, y, damping=mu, solver="exact", rng=0).step()
    assert model.history_["damping"] == [pytest.approx(mu, rel=1e-12)]
    step = np.concatenate([W.ravel() for W in model.coefs_]) - before
    np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-8 * np.abs(expected).max())


# -- convergence -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reaches_1e_10_within_10_iterations(task32, dtype):
    """Done criterion: MSE <= 1e-10 on the default task in at most 10 iterations."""
    X, y = task32
    model = SparseMLP(width=2048, optimizer="gauss-newton", max_iter=10, dtype=dtype,
                      random_state=0).fit(X, y)
    assert _mse(model, X, y) <= 1e-10
    mse = 2 * np.array(model.history_["loss"])
    assert mse[0] > 0.5 and np.min(mse) <= 1e-10
    assert model.n_iter_ == 10
    assert model.coefs_[1].dtype == dtype


@pytest.mark.parametrize("solver", ["exact", "sketched", "jacobi"])
def test_every_solver_converges(task32, solver):
    X, y = task32
    model = _gn(X, y, width=512, max_iter=9, gn_solver=solver)
    assert _mse(model, X, y) <= 1e-10


@pytest.mark.parametrize("threshold, sparsity", RULES, ids=RULE_IDS)
def test_sparse_and_dense_backends_agree(task32, threshold, sparsity):
    X, y = task32
    runs = {b: _gn(X, y, backend=b, threshold=threshold, sparsity=sparsity, max_iter=4)
            for b in ("sparse", "dense")}
    ls, ld = (np.array(runs[b].history_["loss"]) for b in ("sparse", "dense"))
    np.testing.assert_allclose(ls, ld, rtol=1e-8)
    np.testing.assert_allclose(runs["sparse"].history_["damping"],
                               runs["dense"].history_["damping"], rtol=1e-8)
    for Ws, Wd in zip(runs["sparse"].coefs_, runs["dense"].coefs_):
        np.testing.assert_allclose(Ws, Wd, rtol=1e-8, atol=1e-11)
    assert ls[-1] < 0.5 * ls[0]


def test_history_has_one_entry_per_iteration_and_never_increases(task32):
    X, y = task32
    model = _gn(X, y, max_iter=12)
    h = model.history_
    assert set(h) == {"loss", "time", "active_fraction", "damping"}
    assert all(len(v) == 12 for v in h.values()) and model.n_iter_ == 12
    assert all(t > 0 for t in h["time"])
    assert all(0 < a < 0.5 for a in h["active_fraction"])
    assert all(d >= 1e-6 for d in h["damping"])
    # Rejected steps are undone, accepted ones decrease the loss.
    assert np.all(np.diff(h["loss"]) <= 0)
    assert h["loss"][-1] <= 1e-20


def test_fixed_threshold_fits_every_sample_that_has_an_active_path(task32):
    """The fixed rule leaves some samples with no active neuron: GN fits all the others."""
    X, y = task32
    model = _gn(X, y, width=1024, threshold="fixed", sparsity="sqrt-log", max_iter=8)
    r = model.predict(X) - y
    factors = GaussNewtonState(model, X, y, damping=1e-6, solver="exact", rng=0).factors(
        model._net.forward(X))[0]
    # diag(J J^T)_i = sum_l ||D_l[i]||^2 ||H_{l-1}[i]||^2 = 0: a sample f does not depend on.
    diag = sum(np.asarray(D.multiply(D).sum(axis=1)).ravel()
               * np.asarray((H.multiply(H) if hasattr(H, "multiply") else H * H).sum(axis=1)).ravel()
               for D, H in factors)
    live = diag > 0
    assert 0 < np.count_nonzero(~live) < len(X)
    assert np.max(np.abs(r[live])) <= 1e-8
    # The dead samples' outputs are constant (zero): nothing can fit them.
    np.testing.assert_array_equal(model.predict(X)[~live], 0.0)


def test_damping_slows_the_steps_down(task32):
    X, y = task32
    fast = _gn(X, y, max_iter=5).history_["loss"]
    slow = _gn(X, y, max_iter=5, damping=1.0).history_["loss"]
    assert slow[-1] > 10 * fast[-1]
    assert slow[-1] < slow[0]


def test_levenberg_marquardt_recovers_from_bad_steps():
    """A narrow network where full Gauss-Newton steps overshoot: damping rises, the loss falls."""
    X, y = load_default_task(n_samples=32)
    model = _gn(X, y, width=64, sparsity=0.05, max_iter=10)
    h = model.history_
    assert max(h["damping"]) > 1e3 * 1e-6
    assert np.all(np.diff(h["loss"]) <= 0) and h["loss"][-1] < 0.1 * h["loss"][0]


def test_reproducible_and_thread_independent(task32):
    X, y = task32
    kw = dict(width=512, dtype=np.float32)
    a = _gn(X, y, n_threads=1, **kw)
    b = _gn(X, y, n_threads=2, **kw)
    assert a.history_["loss"] == b.history_["loss"]
    c = _gn(X, y, n_threads=1, **kw, gn_solver="sketched")
    d = _gn(X, y, n_threads=1, **kw, gn_solver="sketched")
    assert c.history_["loss"] == d.history_["loss"]


# -- estimator API ----------------------------------------------------------------

def test_params_save_and_load(task32, tmp_path):
    X, y = task32
    model = _gn(X, y, max_iter=3, damping=1e-4, gn_solver="jacobi")
    params = model.get_params()
    assert params["damping"] == 1e-4 and params["gn_solver"] == "jacobi"
    assert model.learning_rate_ == 1.0
    loaded = SparseMLP.load(model.save(tmp_path / "gn"))
    assert loaded.get_params()["gn_solver"] == "jacobi" and loaded.damping == 1e-4
    assert loaded.history_ == model.history_
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    # Ignored by the first-order optimizers, as documented.
    SparseMLP(width=32, max_iter=1, damping=-1, gn_solver="nope").fit(X, y)


def test_callback_stops_early_and_inputs_are_not_modified(task32):
    X, y = task32
    Xf = np.asfortranarray(X)
    Xf.flags.writeable = False
    yr = y.copy()
    yr.flags.writeable = False
    seen = []
    model = _gn(Xf, yr, callback=lambda it, loss: seen.append(loss) or it == 2)
    assert model.n_iter_ == 3 and seen == model.history_["loss"]
    assert len(model.history_["damping"]) == 3
    np.testing.assert_array_equal(Xf, X)
    ref = _gn(X, y, max_iter=3)
    assert ref.history_["loss"] == model.history_["loss"]


@pytest.mark.parametrize("kw, exc, match", [
    (dict(task="classification"), ValueError, "supports task='regression' only"),
    (dict(learning_rate=0.1), ValueError, "learning_rate is not used by optimizer='gauss-newton'"),
    (dict(batch_size=8), ValueError, "leave it None for 'gauss-newton'"),
    (dict(damping=0.0), ValueError, "damping must be a positive finite float"),
    (dict(damping=float("nan")), ValueError, "damping must be a positive finite float"),
    (dict(damping=-1e-3), ValueError, "damping must be a positive finite float"),
    (dict(damping="1e-6"), TypeError, "damping must be a positive float"),
    (dict(damping=True), TypeError, "damping must be a positive float"),
    (dict(gn_solver="cholesky"), ValueError, "gn_solver must be one of"),
])
def test_bad_parameters(task32, kw, exc, match):
    X, y = task32
    if kw.get("task") == "classification":
        X, y = load_default_task("classification", n_samples=32)
    model = SparseMLP(width=32, optimizer="gauss-newton", **kw)
    with pytest.raises(exc, match=match):
        model.fit(X, y)
    assert not hasattr(model, "coefs_"), "a rejected fit leaves the model unfitted"


def test_zero_jacobian_is_reported(task32):
    X, y = task32
    # A fixed threshold far out in the tail: no neuron fires on any sample.
    with pytest.raises(ValueError, match="the Jacobian is zero"):
        _gn(X, y, width=64, threshold="fixed", sparsity=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_damping_on_a_singular_system_never_corrupts_the_weights(task32, dtype):
    """Dead samples make J J^T singular; with damping 1e-300 the first solves blow up."""
    X, y = task32
    model = _gn(X, y, width=1024, threshold="fixed", sparsity="sqrt-log", damping=1e-300,
                max_iter=5, dtype=dtype)
    assert all(np.isfinite(W).all() for W in model.coefs_)
    loss = np.array(model.history_["loss"])
    assert np.all(np.diff(loss) <= 0) and loss[-1] < 0.2 * loss[0]
    assert max(model.history_["damping"]) > 1e-300
