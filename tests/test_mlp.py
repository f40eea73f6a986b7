"""SparseMLP: sparse kernels against the dense reference, gradients, convergence, API."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from subquad_ds import SparseMLP
from subquad_ds.datasets import load_default_task

from _oracles import mlp_loss, topk_threshold

RULES = [("relative", "sqrt-log"), ("fixed", "sqrt-log"), ("relative", 12)]
RULE_IDS = ["relative", "fixed", "topk"]


@pytest.fixture(scope="module")
def task32():
    return load_default_task(n_samples=32)


def _fit(X, y, **kw):
    params = dict(width=256, depth=3, max_iter=20, dtype=np.float64, random_state=0, n_threads=1)
    params.update(kw)
    return SparseMLP(**params).fit(X, y)


# -- sparse backend == dense reference ---------------------------------------

@pytest.mark.parametrize("threshold, sparsity", RULES, ids=RULE_IDS)
def test_sparse_and_dense_trajectories_agree(task32, threshold, sparsity):
    X, y = task32
    runs = {b: _fit(X, y, backend=b, threshold=threshold, sparsity=sparsity)
            for b in ("sparse", "dense")}
    ls, ld = (np.array(runs[b].history_["loss"]) for b in ("sparse", "dense"))
    assert len(ls) == 20
    assert ls[-1] < 0.5 * ls[0], "training makes progress"
    np.testing.assert_allclose(ls, ld, rtol=1e-9, atol=0)
    for Ws, Wd in zip(runs["sparse"].coefs_, runs["dense"].coefs_):
        np.testing.assert_allclose(Ws, Wd, rtol=1e-9, atol=1e-12)
    assert runs["sparse"].history_["active_fraction"] == pytest.approx(
        runs["dense"].history_["active_fraction"])


@pytest.mark.parametrize("kw", [
    dict(optimizer="sgd", batch_size=8),
    dict(task="classification"),
    dict(task="classification", optimizer="sgd", batch_size=10, sparsity=0.1),
], ids=["sgd", "classification", "classification-sgd"])
def test_sparse_and_dense_agree_for_sgd_and_classification(kw):
    task = kw.get("task", "regression")
    X, y = load_default_task(task, n_samples=40)
    ls, ld = (np.array(_fit(X, y, backend=b, **kw).history_["loss"]) for b in ("sparse", "dense"))
    np.testing.assert_allclose(ls, ld, rtol=1e-9, atol=0)


def test_backward_with_arbitrary_output_error(task32):
    """The Gauss-Newton hook: a step from any per-sample error is the same in both backends."""
    X, y = task32
    e = np.random.default_rng(3).standard_normal(32)
    coefs = {}
    for b in ("sparse", "dense"):
        model = _fit(X, y, backend=b, max_iter=1)
        model._backward(model._forward(X), e, 1.0)
        coefs[b] = model.coefs_
    again = _fit(X, y, backend="sparse", max_iter=1)
    again._backward(again._forward(X), e[:, None], 1.0)  # (n,) and (n, 1) are the same
    for W, W2 in zip(coefs["sparse"], again.coefs_):
        np.testing.assert_array_equal(W, W2)
    for Ws, Wd in zip(coefs["sparse"], coefs["dense"]):
        np.testing.assert_allclose(Ws, Wd, rtol=1e-9, atol=1e-12)


# -- gradients ------------------------------------------------------------------

def _gradients(model, X, y):
    """dL/dcoefs_ from the model's own backward (the sparse one through a unit step)."""
    net = model._net
    cache = net.forward(X)
    _, E = model._loss_and_error(model._outputs(net.last_hidden(cache)), y)
    deltas = net.deltas(cache, E, model.head_)
    if model.backend == "dense":
        return net.gradients(cache, deltas)
    before = [W.copy() for W in model.coefs_]
    net.update(cache, deltas, 1.0)
    grads = [W0 - W for W0, W in zip(before, model.coefs_)]
    for W, W0 in zip(model.coefs_, before):
        W[...] = W0
    return grads


@pytest.mark.parametrize("threshold, sparsity", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_gradients_match_finite_differences(threshold, sparsity, task, rng):
    X, y = load_default_task(task, n_samples=8)
    kw = dict(width=48, max_iter=1, learning_rate=1e-3, threshold=threshold,
              sparsity=6 if sparsity == 12 else 0.2, task=task)
    models = {b: _fit(X, y, backend=b, **kw) for b in ("sparse", "dense")}
    model = models["dense"]
    rule = "topk" if sparsity == 12 else threshold
    b = model.tau_ * model.scale_
    frozen = None
    if rule == "topk":
        # Straight-through: the selection (threshold and active set) is held
        # constant.  Freezing the set too keeps the (k+1)-th neuron, which
        # sits exactly at the threshold, off its kink.
        H, frozen = X, []
        for W in model.coefs_:
            Z = H @ W
            t = topk_threshold(Z, model.active_count_)
            frozen.append((t, Z - t[:, None] > 0))
            H = np.maximum(Z - t[:, None], 0)

    def loss(coefs):
        if frozen is None:
            return mlp_loss(coefs, model.head_, model.intercept_, X, y, rule=rule, b=b, task=task)
        Hh = X
        for W, (t, mask) in zip(coefs, frozen):
            Hh = (Hh @ W - t[:, None]) * mask
        out = Hh @ model.head_ + model.intercept_
        if task == "regression":
            return 0.5 * np.mean((out[:, 0] - y) ** 2)
        out = out - out.max(axis=1, keepdims=True)
        return -np.mean((out - np.log(np.exp(out).sum(1, keepdims=True)))[np.arange(len(y)), y])

    grads = _gradients(model, X, y)
    sparse_grads = _gradients(models["sparse"], X, y)
    eps = 1e-6
    for layer, (W, G) in enumerate(zip(model.coefs_, grads)):
        np.testing.assert_allclose(sparse_grads[layer], G, rtol=1e-9, atol=1e-13)
        nz = np.argwhere(G != 0)
        assert len(nz) > 0
        picks = nz[rng.choice(len(nz), size=min(15, len(nz)), replace=False)]
        picks = np.vstack([picks, rng.integers(0, W.shape, size=(5, 2))])
        for i, j in picks:
            coefs = [C.copy() for C in model.coefs_]
            coefs[layer][i, j] += eps
            up = loss(coefs)
            coefs[layer][i, j] -= 2 * eps
            down = loss(coefs)
            fd = (up - down) / (2 * eps)
            assert G[i, j] == pytest.approx(fd, rel=1e-5, abs=1e-9), (layer, i, j)


def test_jacobian_factors_reproduce_the_gradient(task32):
    X, y = task32
    for backend in ("sparse", "dense"):
        model = _fit(X, y, backend=backend, max_iter=2)
        factors = model._jacobian_factors(X)
        assert len(factors) == 3
        assert isinstance(factors[0][1], np.ndarray) and factors[0][1].shape == (32, 64)
        r = model.predict(X) - y
        grads = _gradients(model, X, y)
        for (D, H), G in zip(factors, grads):
            assert isinstance(D, sparse.csr_array) and D.shape == (32, 256)
            assert sparse.issparse(H) or H is factors[0][1]
            JtR = H.T @ D.multiply(r[:, None] / 32)
            JtR = JtR.toarray() if sparse.issparse(JtR) else JtR
            np.testing.assert_allclose(JtR, G, rtol=1e-8, atol=1e-12)


# -- convergence ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_converges_on_the_default_task(dtype):
    """Done criterion: MSE <= 1e-6 at m = 2048 on load_default_task(n_samples=32)."""
    X, y = load_default_task(n_samples=32)
    model = SparseMLP(width=2048, max_iter=200, dtype=dtype, random_state=0).fit(X, y)
    assert np.mean((model.predict(X) - y) ** 2) <= 1e-6
    assert model.score(X, y) > 0.999
    assert len(model.history_["loss"]) == len(model.history_["time"]) == 200
    assert model.coefs_[1].dtype == dtype


def test_classification_fits_and_keeps_labels():
    X, y = load_default_task("classification", n_samples=64)
    labels = np.array([-7, 3, 10, 42])[y]
    model = SparseMLP(width=512, task="classification", max_iter=150, random_state=0,
                      dtype=np.float64).fit(X, labels)
    pred = model.predict(X)
    assert set(np.unique(pred)) <= {-7, 3, 10, 42}
    assert model.score(X, labels) >= 0.95
    P = model.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.classes_[P.argmax(axis=1)], pred)
    assert model.history_["loss"][-1] < 0.3 * model.history_["loss"][0]


def test_sgd_reduces_the_loss_and_is_reproducible():
    X, y = load_default_task(n_samples=128)
    kw = dict(width=512, optimizer="sgd", batch_size=16, max_iter=60, random_state=1)
    a = SparseMLP(**kw).fit(X, y)
    b = SparseMLP(**kw).fit(X, y)
    assert a.history_["loss"] == b.history_["loss"]
    assert np.mean(a.history_["loss"][-10:]) < 0.5 * np.mean(a.history_["loss"][:5])


def test_sgd_classification_default_step_fits_the_default_task():
    # The default SGD step for classification is the full-batch one; the
    # regression-style mini-batch reduction left it at ~48-89% accuracy.
    X, labels = load_default_task("classification")
    gd = SparseMLP(width=512, task="classification", max_iter=1, random_state=0).fit(X, labels)
    sgd = SparseMLP(width=512, task="classification", optimizer="sgd", batch_size=32,
                    max_iter=300, random_state=0).fit(X, labels)
    assert sgd.learning_rate_ == gd.learning_rate_
    assert sgd.score(X, labels) >= 0.97


def test_sgd_regression_default_step_is_reduced_for_the_batch_noise():
    X, y = load_default_task(n_samples=256)
    gd = SparseMLP(width=256, max_iter=1, random_state=0).fit(X, y)
    sgd = SparseMLP(width=256, optimizer="sgd", batch_size=16, max_iter=1,
                    random_state=0).fit(X, y)
    np.testing.assert_allclose(sgd.learning_rate_, gd.learning_rate_ * 0.5 * np.sqrt(16 / 256))


def test_float32_matches_float64_at_start(task32):
    X, y = task32
    l32 = _fit(X, y, dtype=np.float32, max_iter=3).history_["loss"]
    l64 = _fit(X, y, dtype=np.float64, max_iter=3).history_["loss"]
    np.testing.assert_allclose(l32, l64, rtol=1e-3)


def test_n_threads_does_not_change_the_result(task32):
    X, y = task32
    l1 = _fit(X, y, n_threads=1, dtype=np.float32).history_["loss"]
    l2 = _fit(X, y, n_threads=2, dtype=np.float32).history_["loss"]
    assert l1 == l2


# -- estimator API ------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, task32):
    X, y = task32
    model = _fit(X, y, max_iter=5)
    path = model.save(tmp_path / "model")
    assert path.endswith(".npz")
    loaded = SparseMLP.load(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.history_ == model.history_
    assert loaded.get_params()["width"] == 256 and loaded.learning_rate_ == model.learning_rate_
    dense = SparseMLP.load(path, backend="dense")
    np.testing.assert_allclose(dense.predict(X), model.predict(X), rtol=1e-10, atol=1e-12)

    Xc, yc = load_default_task("classification", n_samples=32)
    clf = _fit(Xc, yc + 5, task="classification", max_iter=5)
    clf2 = SparseMLP.load(clf.save(tmp_path / "clf.npz"))
    np.testing.assert_array_equal(clf2.predict(Xc), clf.predict(Xc))


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", meta=np.array('{"format": "other"}'))
    with pytest.raises(ValueError, match="not a saved SparseMLP"):
        SparseMLP.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", meta=np.array('{"format": "subquad_ds.SparseMLP", "version": 99}'))
    with pytest.raises(ValueError, match="unsupported SparseMLP file version 99"):
        SparseMLP.load(tmp_path / "y.npz")


def test_callback_and_verbose(task32, capsys):
    X, y = task32
    seen = []
    model = _fit(X, y, max_iter=10, verbose=True,
                 callback=lambda it, loss: seen.append((it, loss)) or it == 3)
    assert [it for it, _ in seen] == [0, 1, 2, 3]
    assert model.n_iter_ == 4 and len(model.history_["loss"]) == 4
    assert [loss for _, loss in seen] == model.history_["loss"]
    assert "loss" in capsys.readouterr().out


def test_params_protocol():
    model = SparseMLP(width=64)
    assert model.get_params()["width"] == 64
    assert model.set_params(depth=2).depth == 2
    with pytest.raises(ValueError, match="invalid parameter 'foo'"):
        model.set_params(foo=1)
    assert "width=64" in repr(model)


def test_inputs_are_not_modified(task32):
    X, y = task32
    Xf = np.asfortranarray(X)
    Xf.flags.writeable = False
    yr = y.copy()
    yr.flags.writeable = False
    model = _fit(Xf, yr, max_iter=2)
    np.testing.assert_array_equal(Xf, X)
    ref = _fit(X, y, max_iter=2)
    assert model.history_["loss"] == ref.history_["loss"]
    np.testing.assert_array_equal(model.predict(X[::-1][::-1]), ref.predict(X))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(width=1), ValueError, "width must be >= 2"),
    (dict(depth=0), ValueError, "depth must be >= 1"),
    (dict(task="ranking"), ValueError, "task must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(optimizer="adam"), ValueError, "optimizer must be one of"),
    (dict(threshold="soft"), ValueError, "threshold must be one of"),
    (dict(sparsity=10, threshold="fixed"), ValueError, "top-k rule"),
    (dict(sparsity=2.0), ValueError, "fraction must be in"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be a positive"),
    (dict(learning_rate="big"), TypeError, "learning_rate must be a positive float"),
    (dict(batch_size=8), ValueError, "batch_size is only used by optimizer='sgd'"),
    (dict(optimizer="sgd", batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(n_threads=0), ValueError, "n_threads = 0 is invalid"),
])
def test_bad_parameters(task32, kw, exc, match):
    X, y = task32
    with pytest.raises(exc, match=match):
        SparseMLP(**{"width": 32, **kw}).fit(X, y)


def test_bad_data(task32):
    X, y = task32
    model = SparseMLP(width=32, max_iter=1)
    with pytest.raises(ValueError, match="not fitted yet"):
        model.predict(X)
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="X must be finite"):
        model.fit(Xn, y)
    with pytest.raises(ValueError, match="X must be 2-D"):
        model.fit(X[0], y)
    with pytest.raises(ValueError, match=r"y must have shape \(32\)"):
        model.fit(X, y[:5])
    with pytest.raises(ValueError, match="X is empty"):
        model.fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="y must be integer labels"):
        SparseMLP(width=32, task="classification").fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SparseMLP(width=32, task="classification").fit(X, np.zeros(32, dtype=int))
    model.fit(X, y)
    before = model.predict(X)
    coefs = [W.copy() for W in model.coefs_]
    with pytest.raises(ValueError, match="X has 3 features; the model was fitted with 64"):
        model.predict(X[:, :3])
    for bad in (dict(X=Xn), dict(y=y[:5])):
        args = {"X": X, "y": y, **bad}
        with pytest.raises(ValueError):
            model.fit(args["X"], args["y"])
    with pytest.raises(ValueError):
        model.set_params(width=1).fit(X, y)
    model.set_params(width=32)
    np.testing.assert_array_equal(model.predict(X), before)  # rejected calls changed nothing
    for W, W0 in zip(model.coefs_, coefs):
        np.testing.assert_array_equal(W, W0)
    with pytest.raises(ValueError, match="only available for task='classification'"):
        model.predict_proba(X)
    with pytest.raises(FloatingPointError, match="diverged"):
        SparseMLP(width=64, learning_rate=1e12, max_iter=50, dtype=np.float64).fit(X, y)


def test_topk_keeps_exactly_k_active_per_sample(task32):
    X, y = task32
    model = _fit(X, y, sparsity=12, max_iter=3)
    net = model._net
    cache = net.forward(X)
    for indptr, _, _ in cache["H"]:
        assert np.all(np.diff(indptr) == 12)
    assert model.history_["active_fraction"] == pytest.approx([12 / 256] * 3)


def test_pickle_round_trip(task32):
    import pickle

    X, y = task32
    model = _fit(X, y, max_iter=3)
    clone = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(clone.predict(X), model.predict(X))
    clone.fit(X, y)  # the copy trains on its own weights
    np.testing.assert_array_equal(model.predict(X), _fit(X, y, max_iter=3).predict(X))


@given(width=st.integers(8, 48), depth=st.integers(1, 3), n=st.integers(1, 9),
       rule=st.sampled_from(["relative", "fixed", "topk"]), seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_sparse_equals_dense_on_random_configurations(width, depth, n, rule, seed):
    """Edge cases (depth 1, one sample, dead samples, tiny widths) keep the backends equal."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    y = rng.standard_normal(n)
    kw = dict(width=width, depth=depth, max_iter=4, learning_rate=0.3, dtype=np.float64,
              random_state=seed, n_threads=1,
              threshold="fixed" if rule == "fixed" else "relative",
              sparsity=max(1, width // 4) if rule == "topk" else 0.2)
    runs = [SparseMLP(backend=b, **kw).fit(X, y) for b in ("sparse", "dense")]
    # The backends sum in different orders: they agree to rounding relative
    # to the problem's scale (the first loss), not to a loss that has itself
    # shrunk to rounding level (seen: 2.6e-14 after 4 steps, 1.9e-9 apart).
    loss0 = runs[1].history_["loss"][0]
    np.testing.assert_allclose(runs[0].history_["loss"], runs[1].history_["loss"],
                               rtol=1e-9, atol=1e-12 * loss0 + 1e-300)
    np.testing.assert_allclose(runs[0].predict(X), runs[1].predict(X), rtol=1e-9, atol=1e-12)
