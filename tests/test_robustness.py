"""Cross-API robustness: bad input is rejected cleanly, odd-but-valid input is answered right.

Three tables:

- ``BAD_CASES``: (label, call, exception type, regex).  Every public entry
  point is fed wrong shapes, dtypes, NaN/inf, values that overflow float32,
  sparse where dense is expected, bad ids, wrong-type options, keyword
  typos, ``n_threads=0``, bad ``random_state``.  The message must name the
  argument (the regex starts with it).
- ``STATEFUL_CASES``: a rejected call on a structure leaves its full state
  (every observable output) as it was.
- ``ACCEPTED_CASES``: non-contiguous, read-only, list, integer, bool and
  float16 inputs give the answer of the canonical C-contiguous float64 input
  (the oracle), and the input is never written to.
"""

import numpy as np
import pytest
import scipy.sparse as sp

from subquad_ds import (
    SRHT,
    CountSketch,
    GaussianSketch,
    HalfspaceIndex,
    LowRankUpdatedMatrix,
    SparseMLP,
    TensorSketch,
    init_scale,
    resolve_sparsity,
    shifted_relu,
    shifted_relu_topk,
    sketched_lstsq,
    threshold_for_sparsity,
)
from subquad_ds.datasets import load_default_task

RNG = np.random.default_rng(1234)
X20 = RNG.standard_normal((20, 4))
W53 = RNG.standard_normal((5, 3))
Z68 = RNG.standard_normal((6, 8))
A30 = RNG.standard_normal((30, 4))
B30 = RNG.standard_normal(30)
X_TASK, Y_TASK = load_default_task(n_samples=16)


def _index():
    return HalfspaceIndex(X20, leaf_size=4)


def _lowrank():
    return LowRankUpdatedMatrix(W53)


def _mlp(**kw):
    params = dict(width=16, depth=1, max_iter=2, random_state=0)
    params.update(kw)
    return SparseMLP(**params)


_SPARSE = sp.csr_array(np.ones((2, 4)))
_SKETCHES = [
    ("CountSketch", CountSketch),
    ("GaussianSketch", GaussianSketch),
    ("SRHT", SRHT),
]


def _bad_cases():
    cases = [
        # -- shared validators, seen through public entry points ----------
        ("index X sparse", lambda: HalfspaceIndex(sp.csr_array(X20)),
         TypeError, r"X must be a dense array; got a scipy\.sparse"),
        ("index.add X sparse", lambda: _index().add(_SPARSE),
         TypeError, r"X must be a dense array"),
        ("lowrank W0 sparse", lambda: LowRankUpdatedMatrix(sp.csr_array(W53)),
         TypeError, r"W0 must be a dense array"),
        ("lowrank.update U sparse",
         lambda: _lowrank().update(sp.csr_array(np.ones((5, 1))), np.ones((3, 1))),
         TypeError, r"U must be a dense array"),
        ("lowrank.matvec x sparse", lambda: _lowrank().matvec(sp.csr_array(np.ones((3, 1)))),
         TypeError, r"x must be a dense array"),
        ("lowrank.matmat X sparse", lambda: _lowrank().matmat(sp.csr_array(np.ones((3, 2)))),
         TypeError, r"X must be a dense array"),
        ("shifted_relu Z sparse", lambda: shifted_relu(sp.csr_array(Z68), 0.0),
         TypeError, r"Z must be a dense array"),
        ("sketched_lstsq b sparse", lambda: sketched_lstsq(A30, sp.csr_array(B30[:, None])),
         TypeError, r"b must be a dense array"),
        ("SparseMLP.fit X sparse", lambda: _mlp().fit(sp.csr_array(X_TASK), Y_TASK),
         TypeError, r"X must be a dense array"),
        ("SparseMLP dtype 'foo'", lambda: _mlp(dtype="foo").fit(X_TASK, Y_TASK),
         TypeError, r"dtype must be float32 or float64; got 'foo'"),
        ("SparseMLP random_state=-3", lambda: _mlp(random_state=-3).fit(X_TASK, Y_TASK),
         ValueError, r"random_state must be a non-negative int"),
        ("sketched_lstsq random_state=-1", lambda: sketched_lstsq(A30, B30, random_state=-1),
         ValueError, r"random_state must be a non-negative int"),
        ("TensorSketch random_state=-1", lambda: TensorSketch((2, 3), 4, random_state=-1),
         ValueError, r"random_state must be a non-negative int"),
        # -- sparsify ------------------------------------------------------
        ("init_scale tau str", lambda: init_scale(10, "a"), TypeError, r"tau must be a real number"),
        ("init_scale tau None", lambda: init_scale(10, None), TypeError, r"tau must be a real number"),
        ("init_scale tau bool", lambda: init_scale(10, True), TypeError, r"tau must be a real number"),
        ("init_scale tau complex", lambda: init_scale(10, 1j), TypeError, r"tau must be a real number"),
        ("init_scale tau NaN", lambda: init_scale(10, np.nan), ValueError, r"tau must be finite"),
        ("init_scale tau=40 (c underflows)", lambda: init_scale(10, 40.0),
         ValueError, r"tau = 40\.0 is out of range"),
        ("init_scale tau=1e200", lambda: init_scale(10, 1e200), ValueError, r"tau = 1e\+200 is out of range"),
        ("init_scale tau=-1e200", lambda: init_scale(10, -1e200), ValueError, r"tau = -1e\+200 is out of range"),
        ("init_scale width=0", lambda: init_scale(0, 1.0), ValueError, r"width must be >= 1"),
        ("init_scale width float", lambda: init_scale(10.0, 1.0), TypeError, r"width must be an integer"),
        ("threshold_for_sparsity str", lambda: threshold_for_sparsity("0.1"), TypeError, r"p must be a float"),
        ("threshold_for_sparsity NaN", lambda: threshold_for_sparsity(np.nan), ValueError, r"p must be in \(0, 1\)"),
        ("threshold_for_sparsity 1", lambda: threshold_for_sparsity(1.0), ValueError, r"p must be in \(0, 1\)"),
        ("resolve_sparsity width=1", lambda: resolve_sparsity(1), ValueError, r"width must be >= 2"),
        ("resolve_sparsity 'log'", lambda: resolve_sparsity(10, "log"), ValueError, r"sparsity must be 'sqrt-log'"),
        ("resolve_sparsity list", lambda: resolve_sparsity(10, [0.1]), TypeError, r"sparsity must be 'sqrt-log'"),
        ("resolve_sparsity None", lambda: resolve_sparsity(10, None), TypeError, r"sparsity must be 'sqrt-log'"),
        ("resolve_sparsity bool", lambda: resolve_sparsity(10, True), TypeError, r"sparsity must be 'sqrt-log'"),
        ("resolve_sparsity k=0", lambda: resolve_sparsity(10, 0), ValueError, r"sparsity must be >= 1"),
        ("resolve_sparsity k=width", lambda: resolve_sparsity(10, 10), ValueError, r"sparsity must be <= 9"),
        ("resolve_sparsity p=1.0", lambda: resolve_sparsity(10, 1.0), ValueError, r"sparsity as a fraction"),
        ("shifted_relu Z 0-d", lambda: shifted_relu(np.float64(1.0), 0.0), ValueError, r"Z must be 2-D"),
        ("shifted_relu Z complex", lambda: shifted_relu(Z68 + 1j, 0.0), TypeError, r"Z must hold real numbers"),
        ("shifted_relu Z object", lambda: shifted_relu(Z68.astype(object), 0.0), TypeError, r"Z must hold real numbers"),
        ("shifted_relu Z NaN", lambda: shifted_relu(np.full((2, 3), np.nan), 0.0), ValueError, r"Z must be finite"),
        ("shifted_relu b NaN", lambda: shifted_relu(Z68, np.nan), ValueError, r"b must be finite"),
        ("shifted_relu b str", lambda: shifted_relu(Z68, "x"), TypeError, r"b must hold real numbers"),
        ("shifted_relu b wrong length", lambda: shifted_relu(Z68, np.zeros(5)), ValueError, r"b must broadcast to \(6,\)"),
        ("shifted_relu b 2-D", lambda: shifted_relu(Z68, np.zeros((6, 1))), ValueError, r"b must be 0-D or 1-D"),
        ("shifted_relu b beyond float32", lambda: shifted_relu(Z68.astype(np.float32), 1e300),
         ValueError, r"b must be finite"),
        ("shifted_relu relative wrong length", lambda: shifted_relu(Z68, 0.0, relative=np.ones(5)),
         ValueError, r"relative must have shape"),
        ("shifted_relu relative scalar", lambda: shifted_relu(Z68, 0.0, relative=1.0),
         ValueError, r"relative must have shape"),
        ("shifted_relu relative negative", lambda: shifted_relu(Z68, 0.0, relative=-np.ones(6)),
         ValueError, r"relative must hold non-negative"),
        ("shifted_relu relative NaN", lambda: shifted_relu(Z68, 0.0, relative=np.full(6, np.nan)),
         ValueError, r"relative must be finite"),
        ("shifted_relu b * relative beyond float32",
         lambda: shifted_relu(Z68.astype(np.float32), 1e30, relative=np.full(6, 1e30)),
         ValueError, r"b \* relative must be finite; it overflows float32"),
        ("shifted_relu n_threads=0", lambda: shifted_relu(Z68, 0.0, n_threads=0), ValueError, r"n_threads = 0"),
        ("shifted_relu n_threads=2.0", lambda: shifted_relu(Z68, 0.0, n_threads=2.0),
         TypeError, r"n_threads must be an integer"),
        ("shifted_relu keyword typo", lambda: shifted_relu(Z68, 0.0, relativ=None), TypeError, r"relativ"),
        ("shifted_relu_topk k=m", lambda: shifted_relu_topk(Z68, 8), ValueError, r"k must be <= 7"),
        ("shifted_relu_topk m=1", lambda: shifted_relu_topk(np.ones((3, 1)), 1), ValueError, r"k must be < m = 1"),
        ("shifted_relu_topk 0 columns", lambda: shifted_relu_topk(np.ones((3, 0)), 1), ValueError, r"k must be < m = 0"),
        ("shifted_relu_topk k float", lambda: shifted_relu_topk(Z68, 2.0), TypeError, r"k must be an integer"),
        ("shifted_relu_topk k str", lambda: shifted_relu_topk(Z68, "2"), TypeError, r"k must be an integer"),
        ("shifted_relu_topk k bool", lambda: shifted_relu_topk(Z68, True), TypeError, r"k must be an integer"),
        ("shifted_relu_topk Z NaN", lambda: shifted_relu_topk(np.full((2, 3), np.nan), 1), ValueError, r"Z must be finite"),
        ("shifted_relu_topk Z sparse", lambda: shifted_relu_topk(sp.csr_array(Z68), 2),
         TypeError, r"Z must be a dense array"),
        ("shifted_relu_topk n_threads=0", lambda: shifted_relu_topk(Z68, 2, n_threads=0), ValueError, r"n_threads = 0"),
        # -- sketched_lstsq -------------------------------------------------
        ("sketched_lstsq A sparse complex", lambda: sketched_lstsq(sp.csr_array(A30 + 1j), B30),
         TypeError, r"A must hold real numbers"),
        ("sketched_lstsq A sparse NaN", lambda: sketched_lstsq(sp.csr_array(np.full((30, 4), np.nan)), B30),
         ValueError, r"A must be finite"),
        ("sketched_lstsq A sparse 0 columns", lambda: sketched_lstsq(sp.csr_array((5, 0)), np.ones(5)),
         ValueError, r"A must have at least one column"),
        ("sketched_lstsq A dense NaN", lambda: sketched_lstsq(np.full((30, 4), np.nan), B30),
         ValueError, r"A must be finite"),
        ("sketched_lstsq A complex", lambda: sketched_lstsq(A30 + 1j, B30), TypeError, r"A must hold real numbers"),
        ("sketched_lstsq A 0-d", lambda: sketched_lstsq(np.float64(1.0), B30), TypeError, r"A must be an ndarray"),
        ("sketched_lstsq A ragged list", lambda: sketched_lstsq([[1.0, 2.0], [3.0]], [1.0, 2.0]),
         TypeError, r"A must be an array of real numbers"),
        ("sketched_lstsq A underdetermined", lambda: sketched_lstsq(A30.T, B30[:4]),
         ValueError, r"A must have at least as many rows"),
        ("sketched_lstsq b wrong length", lambda: sketched_lstsq(A30, B30[:5]), ValueError, r"b must have shape \(30,\)"),
        ("sketched_lstsq b NaN", lambda: sketched_lstsq(A30, B30 * np.nan), ValueError, r"b must be finite"),
        ("sketched_lstsq b str", lambda: sketched_lstsq(A30, ["a"] * 30), TypeError, r"b must hold real numbers"),
        ("sketched_lstsq sketch_size str", lambda: sketched_lstsq(A30, B30, sketch_size="8"),
         TypeError, r"sketch_size must be an integer"),
        ("sketched_lstsq sketch_size < n", lambda: sketched_lstsq(A30, B30, sketch_size=2),
         ValueError, r"sketch_size must be >= 4"),
        ("sketched_lstsq tol -1", lambda: sketched_lstsq(A30, B30, tol=-1), ValueError, r"tol must be >= 0"),
        ("sketched_lstsq tol NaN", lambda: sketched_lstsq(A30, B30, tol=np.nan), ValueError, r"tol must be finite"),
        ("sketched_lstsq max_iter float", lambda: sketched_lstsq(A30, B30, max_iter=2.0),
         TypeError, r"max_iter must be an integer"),
        ("sketched_lstsq random_state str", lambda: sketched_lstsq(A30, B30, random_state="a"),
         TypeError, r"random_state must be None"),
        ("sketched_lstsq keyword typo", lambda: sketched_lstsq(A30, B30, sketchsize=8), TypeError, r"sketchsize"),
        # -- bool options are bools, not truthy values -----------------------
        ("index.query return_scores='no'", lambda: _index().query(np.ones(4), 0.0, return_scores="no"),
         TypeError, r"return_scores must be a bool; got 'no'"),
        ("index.query return_scores=1", lambda: _index().query(np.ones((2, 4)), 0.0, return_scores=1),
         TypeError, r"return_scores must be a bool; got 1"),
        ("sketched_lstsq return_info='no'", lambda: sketched_lstsq(A30, B30, return_info="no"),
         TypeError, r"return_info must be a bool"),
        ("lowrank copy=1", lambda: LowRankUpdatedMatrix(W53, copy=1), TypeError, r"copy must be a bool; got 1"),
        # -- TensorSketch ---------------------------------------------------
        ("TensorSketch input_dims int", lambda: TensorSketch(5, 4), TypeError, r"input_dims must be a pair"),
        ("TensorSketch input_dims triple", lambda: TensorSketch((2, 3, 4), 4), ValueError, r"input_dims must be a pair"),
        ("TensorSketch input_dims float", lambda: TensorSketch((2.0, 3), 4), TypeError, r"input_dims\[0\] must be an integer"),
        ("TensorSketch n_threads=0", lambda: TensorSketch((2, 3), 4, n_threads=0), ValueError, r"n_threads = 0"),
        ("TensorSketch U wrong width", lambda: TensorSketch((2, 3), 4).transform(np.ones((2, 3)), np.ones((2, 3))),
         ValueError, r"U has 3 features"),
        ("TensorSketch rows differ", lambda: TensorSketch((2, 3), 4).transform(np.ones((2, 2)), np.ones((3, 3))),
         ValueError, r"U and V must have the same number of rows; got 2 and 3"),
        ("TensorSketch 1-D and 2-D", lambda: TensorSketch((2, 3), 4).transform(np.ones(2), np.ones((1, 3))),
         ValueError, r"U and V must both be 1-D or both 2-D; got shapes \(2,\) and \(1, 3\)"),
        ("TensorSketch 2-D sparse and 1-D", lambda: TensorSketch((2, 3), 4).transform(
            sp.csr_array(np.ones((1, 2))), np.ones(3)),
         ValueError, r"got shapes \(1, 2\) and \(3,\)"),
        ("TensorSketch V NaN", lambda: TensorSketch((2, 3), 4).transform(np.ones((2, 2)), np.full((2, 3), np.nan)),
         ValueError, r"V must be finite"),
        # -- ints beyond C's range -------------------------------------------
        ("index.search k=2**63", lambda: _index().search(np.ones(4), 2 ** 63), ValueError, r"k must be <= "),
        ("index leaf_size=2**70", lambda: HalfspaceIndex(X20, leaf_size=2 ** 70), ValueError, r"leaf_size must be <= "),
        ("CountSketch input_dim=2**64", lambda: CountSketch(2 ** 64, 3), ValueError, r"input_dim must be <= "),
        ("shifted_relu n_threads=2**40", lambda: shifted_relu(Z68, 0.0, n_threads=2 ** 40),
         ValueError, r"n_threads must be <= 2147483647"),
        ("index n_threads=-2**40", lambda: HalfspaceIndex(X20, n_threads=-2 ** 40),
         ValueError, r"n_threads must be >= -2147483647"),
        ("index.query n_threads=2**31", lambda: _index().query(np.ones((2, 4)), 0.0, n_threads=2 ** 31),
         ValueError, r"n_threads must be <= 2147483647"),
        ("lowrank max_rank=2**64", lambda: LowRankUpdatedMatrix(W53, max_rank=2 ** 64), ValueError, r"max_rank must be <= 3"),
        # -- LowRankUpdatedMatrix operators ---------------------------------
        ("lowrank @ ragged list", lambda: _lowrank() @ [[1.0, 2.0], [3.0]],
         TypeError, r"operand of @ must be an array of real numbers"),
        ("ragged list @ lowrank", lambda: [[1.0, 2.0], [3.0]] @ _lowrank(),
         TypeError, r"operand of @ must be an array of real numbers"),
        ("lowrank @ str", lambda: _lowrank() @ "abc", TypeError, r"operand of @ must hold real numbers"),
        ("lowrank @ sparse", lambda: _lowrank() @ sp.csr_array(np.ones((3, 2))),
         TypeError, r"operand of @ must be a dense array"),
        ("lowrank @ 0-d", lambda: _lowrank() @ 2.0, ValueError, r"operand of @ must be 1-D or 2-D; got 0-D"),
        ("lowrank @ list wrong length", lambda: _lowrank() @ [1.0, 2.0], ValueError, r"x must have shape \(3,\)"),
        # -- Python ints beyond the float range -------------------------------
        ("index.query b=10**400", lambda: _index().query(np.ones(4), 10 ** 400), ValueError, r"b must be finite"),
        ("index.query b=-10**400", lambda: _index().query(np.ones(4), -(10 ** 400)), ValueError, r"b must be finite"),
        ("threshold_for_sparsity 10**400", lambda: threshold_for_sparsity(10 ** 400), ValueError, r"p must be in \(0, 1\)"),
        ("init_scale tau=10**400", lambda: init_scale(10, 10 ** 400), ValueError, r"tau must be finite"),
        ("sketched_lstsq tol=10**400", lambda: sketched_lstsq(A30, B30, tol=10 ** 400), ValueError, r"tol must be finite"),
        ("SparseMLP learning_rate=10**400", lambda: _mlp(learning_rate=10 ** 400).fit(X_TASK, Y_TASK),
         ValueError, r"learning_rate must be a positive finite float"),
        ("SparseMLP damping=10**400", lambda: _mlp(optimizer="gauss-newton", damping=10 ** 400).fit(X_TASK, Y_TASK),
         ValueError, r"damping must be a positive finite float"),
    ]
    for name, cls in _SKETCHES:
        cases += [
            (f"{name} random_state=-1", lambda cls=cls: cls(8, 4, random_state=-1),
             ValueError, r"random_state must be a non-negative int"),
            (f"{name} random_state='x'", lambda cls=cls: cls(8, 4, random_state="x"),
             TypeError, r"random_state must be None, an int"),
            (f"{name} random_state=1.5", lambda cls=cls: cls(8, 4, random_state=1.5),
             TypeError, r"random_state must be None, an int"),
            (f"{name} random_state=RandomState",
             lambda cls=cls: cls(8, 4, random_state=np.random.RandomState(0)),
             TypeError, r"random_state must be None, an int"),
            (f"{name} n_threads=0", lambda cls=cls: cls(8, 4, n_threads=0),
             ValueError, r"n_threads = 0 is invalid"),
            (f"{name} n_threads='1'", lambda cls=cls: cls(8, 4, n_threads="1"),
             TypeError, r"n_threads must be an integer"),
            (f"{name} input_dim='8'", lambda cls=cls: cls("8", 4),
             TypeError, r"input_dim must be an integer"),
            (f"{name} sketch_size=4.0", lambda cls=cls: cls(8, 4.0),
             TypeError, r"sketch_size must be an integer"),
            (f"{name} input_dim=0", lambda cls=cls: cls(0, 4),
             ValueError, r"input_dim must be >= 1"),
            (f"{name} keyword typo", lambda cls=cls: cls(8, 4, randomstate=0),
             TypeError, r"randomstate"),
            (f"{name}.transform X 0-d",
             lambda cls=cls: cls(8, 4, random_state=0).transform(np.float64(1.0)),
             ValueError, r"X must be 1-D or 2-D"),
            (f"{name}.transform X wrong width",
             lambda cls=cls: cls(8, 4, random_state=0).transform(np.ones((2, 7))),
             ValueError, r"X has 7 features"),
            (f"{name}.transform X NaN",
             lambda cls=cls: cls(8, 4, random_state=0).transform(np.full((2, 8), np.nan)),
             ValueError, r"X must be finite"),
            (f"{name}.transform X complex",
             lambda cls=cls: cls(8, 4, random_state=0).transform(np.ones((2, 8)) + 1j),
             TypeError, r"X must hold real numbers"),
            (f"{name}.transform X sparse complex",
             lambda cls=cls: cls(8, 4, random_state=0).transform(sp.csr_array(np.ones((2, 8)) + 1j)),
             TypeError, r"X must hold real numbers"),
            (f"{name}.transform X sparse NaN",
             lambda cls=cls: cls(8, 4, random_state=0).transform(sp.csr_array(np.full((2, 8), np.nan))),
             ValueError, r"X must be finite"),
            (f"{name}.transform X sparse wrong width",
             lambda cls=cls: cls(8, 4, random_state=0).transform(sp.csr_array(np.ones((2, 7)))),
             ValueError, r"X must have shape \(\*, 8\)"),
        ]
    return cases


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("label, call, exc, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_the_argument(label, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_load_default_task_rejects_non_float_dtype():
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64; got int32"):
        load_default_task(dtype=np.int32)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64; got 'foo'"):
        load_default_task(dtype="foo")
    X, y = load_default_task(n_samples=4, dtype="float32")
    assert X.dtype == y.dtype == np.float32


# -- HalfspaceIndex: membership and state after rejected calls --------------


@pytest.mark.parametrize("key, expected", [
    (3, True), (np.int64(3), True), (np.uint8(3), True), (-1, False), (20, False),
    (2 ** 63, False), (2 ** 70, False), (-(2 ** 70), False), ("3", False), (3.0, False),
    (True, False), (None, False),
])
def test_index_contains_any_key(key, expected):
    assert (key in _index()) is expected


# -- state is unchanged after a rejected call --------------------------------


def _index_state(index):
    ids = index.ids
    w = np.linspace(-1.0, 1.0, index.n_features)
    return {
        "ids": ids, "points": index.get(ids), "next_id": index._core.next_id,
        "len": len(index), "query": np.sort(index.query(w, 0.1)),
        "search": index.search(w, 5),
    }


def _lowrank_state(M):
    x = np.linspace(-1.0, 1.0, M.shape[1])
    return {
        "dense": M.toarray(), "pending_rank": M.pending_rank, "n_flushes": M.n_flushes,
        "matvec": M.matvec(x), "shape": M.shape, "dtype": M.dtype,
    }


def _mlp_state(model):
    state = {k: v for k, v in vars(model).items() if k not in ("_net", "_gn_state", "history_")}
    state["history_"] = {k: list(v) for k, v in model.history_.items()}
    state["coefs_"] = [W.copy() for W in model.coefs_]
    state["predict"] = model.predict(X_TASK)
    return state


def _fitted_mlp():
    return _mlp().fit(X_TASK, Y_TASK)


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    else:
        assert a == b or (a != a and b != b)


def _set_and_fit(**params):
    def call(model):
        model.set_params(**params)
        model.fit(X_TASK, Y_TASK)
    return call


def _set_and_fit_on(X, y, **params):
    def call(model):
        model.set_params(**params)
        model.fit(X, y)
    return call


def _raise_in_callback(iteration, loss):
    raise RuntimeError("stop from the callback")


STATEFUL_CASES = [
    # (label, factory, state, rejected call, exception, regex)
    ("index.add NaN", _index, _index_state, lambda s: s.add(np.full((2, 4), np.nan)), ValueError, "X must be finite"),
    ("index.add beyond float32", lambda: HalfspaceIndex(X20.astype(np.float32)), _index_state,
     lambda s: s.add(np.full((1, 4), 1e300)), ValueError, "X must be finite"),
    ("index.add ids duplicate", _index, _index_state, lambda s: s.add(X20[:2], [50, 50]), ValueError, "ids contains duplicates"),
    ("index.add ids present", _index, _index_state, lambda s: s.add(X20[:2], [50, 3]), ValueError, r"ids\[1\] = 3 is already"),
    ("index.add ids negative", _index, _index_state, lambda s: s.add(X20[:1], [-1]), ValueError, "ids must be non-negative"),
    ("index.add ids wrong length", _index, _index_state, lambda s: s.add(X20[:2], [50]), ValueError, "ids has 1 entries"),
    ("index.add ids float", _index, _index_state, lambda s: s.add(X20[:1], [50.0]), TypeError, "ids must be integers"),
    ("index.add ids bool", _index, _index_state, lambda s: s.add(X20[:1], [True]), TypeError, "ids must be integers"),
    ("index.add ids 2-D", _index, _index_state, lambda s: s.add(X20[:1], [[50]]), ValueError, "ids must be 1-D"),
    ("index.add X 1-D", _index, _index_state, lambda s: s.add(X20[0]), ValueError, "X must be 2-D"),
    ("index.add X wrong width", _index, _index_state, lambda s: s.add(np.ones((1, 3))), ValueError, "X has 3 features"),
    ("index.add ids = intp max", _index, _index_state,
     lambda s: s.add(X20[:1], [np.iinfo(np.intp).max]), ValueError, "ids must be < 9223372036854775807"),
    ("index.add default ids exhausted",
     lambda: (lambda h: (h.add(X20[:1], [np.iinfo(np.intp).max - 1]), h)[1])(_index()), _index_state,
     lambda s: s.add(X20[:1]), ValueError, "no default ids are left after 9223372036854775806"),
    ("index.remove unknown", _index, _index_state, lambda s: s.remove([1, 99]), KeyError, r"ids\[1\] = 99 is not"),
    ("index.remove negative", _index, _index_state, lambda s: s.remove(-1), KeyError, r"ids\[0\] = -1 is not"),
    ("index.remove 2**62", _index, _index_state, lambda s: s.remove(2 ** 62), KeyError, "is not in the index"),
    ("index.remove uint64 max", _index, _index_state, lambda s: s.remove(np.uint64(2 ** 64 - 1)),
     ValueError, "ids has values beyond"),
    ("index.remove duplicate", _index, _index_state, lambda s: s.remove([1, 1]), ValueError, "ids contains duplicates"),
    ("index.remove str", _index, _index_state, lambda s: s.remove("a"), TypeError, "ids must be integers"),
    ("index.remove None", _index, _index_state, lambda s: s.remove(None), TypeError, "ids must be integers"),
    ("index.update NaN", _index, _index_state, lambda s: s.update([1], np.full((1, 4), np.nan)), ValueError, "X must be finite"),
    ("index.update unknown", _index, _index_state, lambda s: s.update([1, 77], X20[:2]), KeyError, r"ids\[1\] = 77"),
    ("index.update wrong length", _index, _index_state, lambda s: s.update([1], X20[:2]), ValueError, "X has 2 rows"),
    ("index.update duplicate", _index, _index_state, lambda s: s.update([1, 1], X20[:2]), ValueError, "ids contains duplicates"),
    ("index.query n_threads=0", _index, _index_state, lambda s: s.query(np.ones((2, 4)), 0.0, n_threads=0),
     ValueError, "n_threads = 0"),
    ("index.query b NaN", _index, _index_state, lambda s: s.query(np.ones(4), np.nan), ValueError, "b must be finite"),
    ("index.query W sparse NaN", _index, _index_state, lambda s: s.query(sp.csr_array(np.full((2, 4), np.nan)), 0.0),
     ValueError, "W.data must be finite"),
    ("index.search k=-1", _index, _index_state, lambda s: s.search(np.ones(4), -1), ValueError, "k must be >= 0"),
    ("lowrank.update NaN", _lowrank, _lowrank_state, lambda s: s.update(np.full(5, np.nan), np.ones(3)),
     ValueError, "U must be finite"),
    ("lowrank.update V NaN after pending", lambda: (lambda M: (M.update(np.ones(5), np.ones(3)), M)[1])(_lowrank()),
     _lowrank_state, lambda s: s.update(np.ones(5), np.full(3, np.inf)), ValueError, "V must be finite"),
    ("lowrank.update ranks differ", _lowrank, _lowrank_state, lambda s: s.update(np.ones((5, 2)), np.ones((3, 1))),
     ValueError, "U and V must have the same number of columns"),
    ("lowrank.update 1-D and 2-D", _lowrank, _lowrank_state, lambda s: s.update(np.ones(5), np.ones((3, 1))),
     ValueError, "U and V must both be 1-D"),
    ("lowrank.update float32 overflow", lambda: LowRankUpdatedMatrix(W53.astype(np.float32)), _lowrank_state,
     lambda s: s.update(np.full(5, 1e300), np.ones(3)), ValueError, "U must be finite"),
    ("lowrank.matvec rows out of range", _lowrank, _lowrank_state, lambda s: s.matvec(np.ones(3), rows=[5]),
     ValueError, r"rows must be in \[0, 5\)"),
    ("SparseMLP.fit verbose='x'", _fitted_mlp, _mlp_state, _set_and_fit(verbose="x"),
     TypeError, "verbose must be an integer"),
    ("SparseMLP.fit verbose=-1", _fitted_mlp, _mlp_state, _set_and_fit(verbose=-1),
     ValueError, "verbose must be >= 0"),
    ("SparseMLP.fit task=array", _fitted_mlp, _mlp_state, _set_and_fit(task=np.array(["a", "b"])),
     ValueError, "task must be one of"),
    ("SparseMLP.fit backend=list", _fitted_mlp, _mlp_state, _set_and_fit(backend=["sparse"]),
     ValueError, "backend must be one of"),
    ("SparseMLP.fit gn_solver=array", _fitted_mlp, _mlp_state,
     _set_and_fit(optimizer="gauss-newton", gn_solver=np.array(["auto", "exact"])),
     ValueError, "gn_solver must be one of"),
    ("SparseMLP.fit random_state='a'", _fitted_mlp, _mlp_state, _set_and_fit(random_state="a"),
     TypeError, "random_state must be None"),
    ("SparseMLP.fit n_threads=0", _fitted_mlp, _mlp_state, _set_and_fit(n_threads=0),
     ValueError, "n_threads = 0"),
    ("SparseMLP.fit dtype=int32", _fitted_mlp, _mlp_state, _set_and_fit(dtype=np.int32),
     TypeError, "dtype must be float32 or float64"),
    ("SparseMLP.fit y beyond float32", _fitted_mlp, _mlp_state, lambda s: s.fit(X_TASK, Y_TASK * 1e300),
     ValueError, "y must be finite"),
    ("SparseMLP.fit y NaN", _fitted_mlp, _mlp_state, lambda s: s.fit(X_TASK, Y_TASK * np.nan),
     ValueError, "y must be finite"),
    ("SparseMLP.fit X wrong rows", _fitted_mlp, _mlp_state, lambda s: s.fit(X_TASK[:3], Y_TASK),
     ValueError, r"y must have shape \(3\)"),
    ("SparseMLP.fit X sparse", _fitted_mlp, _mlp_state, lambda s: s.fit(sp.csr_array(X_TASK), Y_TASK),
     TypeError, "X must be a dense array"),
    # Failures found only once training starts: the fitted model is restored.
    ("SparseMLP.fit zero tangent kernel", _fitted_mlp, _mlp_state,
     lambda s: s.fit(np.zeros((8, 3)), Y_TASK[:8]), ValueError, "cannot derive a learning rate"),
    ("SparseMLP.fit zero Jacobian (Gauss-Newton)", _fitted_mlp, _mlp_state,
     _set_and_fit_on(np.zeros((8, 3)), Y_TASK[:8], optimizer="gauss-newton"), ValueError, "the Jacobian is zero"),
    ("SparseMLP.fit raising callback", _fitted_mlp, _mlp_state,
     _set_and_fit(callback=_raise_in_callback), RuntimeError, "stop from the callback"),
    ("SparseMLP.predict wrong width", _fitted_mlp, _mlp_state, lambda s: s.predict(X_TASK[:, :3]),
     ValueError, "X has 3 features"),
    ("SparseMLP.score y str", _fitted_mlp, _mlp_state, lambda s: s.score(X_TASK, np.array(["a"] * 16)),
     TypeError, "y must hold real numbers"),
    ("SparseMLP.score y NaN", _fitted_mlp, _mlp_state, lambda s: s.score(X_TASK, Y_TASK * np.nan),
     ValueError, "y must be finite"),
]


@pytest.mark.parametrize("label, factory, state, call, exc, match", STATEFUL_CASES,
                         ids=[c[0] for c in STATEFUL_CASES])
def test_rejected_call_leaves_state_unchanged(label, factory, state, call, exc, match):
    obj = factory()
    before = state(obj)
    if isinstance(obj, SparseMLP):
        params = obj.get_params()
    with pytest.raises(exc, match=match):
        call(obj)
    if isinstance(obj, SparseMLP):
        obj.set_params(**params)
    if isinstance(obj, HalfspaceIndex):
        obj._core.check_invariants()
    _assert_same(state(obj), before)


# -- CLI: every option the library rejects is a usage error -------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "--width", "1"], "width must be >= 2; got 1"),
    (["train", "--threads", "0"], "n_threads = 0 is invalid"),
    (["train", "--width", "64", "--sparsity", "100000"], "sparsity must be <= 63"),
    (["train", "--n-samples", "100000"], "n_samples must be <= 512"),
    (["train", "--batch-size", "4"], "batch_size is only used by optimizer='sgd'"),
    (["train", "--learning-rate", "nan"], "learning_rate must be a positive finite float"),
    (["train", "--optimizer", "gauss-newton", "--learning-rate", "0.1"], "learning_rate is not used"),
    (["train", "--task", "classification", "--optimizer", "gauss-newton"], "supports task='regression' only"),
    (["train", "--seed", "-1"], "--seed must be a non-negative int"),
    (["train", "--width", "64", "--sparsity", "64", "--threshold", "fixed"], "sparsity must be <= 63"),
    (["bench", "--widths", "64,1"], "width must be >= 2; got 1"),
    (["bench", "--widths", "64", "--threads", "0"], "n_threads = 0 is invalid"),
])
def test_cli_rejects_bad_options_before_any_work(argv, message, capsys, tmp_path):
    from subquad_ds.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv + ["--iters", "1"] + (["--out", str(tmp_path)] if argv[0] == "train" else []))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""  # nothing ran
    assert list(tmp_path.iterdir()) == []


# -- accepted odd inputs give the oracle's answer and are never written ------

_IRNG = np.random.default_rng(99)
# Small integers: exactly representable in every variant below (int, float16).
XI = _IRNG.integers(-3, 4, size=(12, 4)).astype(np.float64)
WI = _IRNG.integers(-3, 4, size=(5, 3)).astype(np.float64)
ZI = _IRNG.integers(-3, 4, size=(6, 8)).astype(np.float64)
AI = _IRNG.integers(-3, 4, size=(40, 3)).astype(np.float64) + 4 * np.eye(40, 3)
BI = _IRNG.integers(-3, 4, size=40).astype(np.float64)


def _variants(a):
    """(name, array-like) with the same values as ``a`` in odd layouts and dtypes."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],))
    wide[..., ::2] = a
    ro = a.copy()
    ro.flags.writeable = False
    ro_strided = wide.copy()[..., ::2]
    ro_strided.flags.writeable = False
    out = [
        ("strided", wide[..., ::2]),
        ("negative-stride", a[::-1].copy()[::-1]),
        ("read-only", ro),
        ("read-only strided", ro_strided),
        ("list", a.tolist()),
        ("int64", a.astype(np.int64)),
        ("int32", a.astype(np.int32)),
        ("float16", a.astype(np.float16)),
    ]
    if a.ndim == 2:
        out.append(("F-order", np.asfortranarray(a)))
    if a.ndim == 2 and a.shape[0] > 1:
        out.append(("row-strided", np.repeat(a, 2, axis=0)[::2]))
    return out


def _dense(result):
    if sp.issparse(result):
        return result.toarray()
    if isinstance(result, tuple):
        return tuple(_dense(r) for r in result)
    return result


def _index_query(X):
    index = HalfspaceIndex(X, leaf_size=2)
    return np.sort(index.query(np.array([1.0, -1.0, 0.5, 2.0]), 0.5))


def _index_add_update(X):
    index = HalfspaceIndex(XI[:3], leaf_size=2)
    index.add(X, ids=np.arange(10, 22))
    index.update(np.arange(10, 16), X[6:] if isinstance(X, np.ndarray) else np.asarray(X)[6:])
    return index.get(index.ids)


def _index_queries(W):
    index = HalfspaceIndex(XI, leaf_size=2)
    indptr, ids = index.query(W, 0.5)
    sorted_ids = np.concatenate([np.sort(ids[a:b]) for a, b in zip(indptr[:-1], indptr[1:])])
    return indptr, sorted_ids, index.query_count(W, 0.5), index.search(W, 3)


def _lowrank_ops(W0):
    M = LowRankUpdatedMatrix(W0)
    return M.toarray(), M.matvec([1.0, -2.0, 0.5]), M.rmatvec(np.arange(5.0))


def _lowrank_update(U):
    M = LowRankUpdatedMatrix(WI)
    M.update(U, np.ones((3, U.shape[1] if isinstance(U, np.ndarray) else len(U[0]))))
    return M.toarray()


def _lowrank_matmat(X):
    M = LowRankUpdatedMatrix(WI)
    M.update(np.ones(5), np.arange(3.0))
    return M.matmat(X), M @ X


def _mlp_predict(X):
    return _fitted_mlp_i.predict(X)


_fitted_mlp_i = SparseMLP(width=16, depth=1, max_iter=2, random_state=0, dtype=np.float64).fit(
    XI[:, :4], XI[:, 0])


ACCEPTED_CASES = [
    # (label, function of one array, canonical float64 C-contiguous input)
    ("HalfspaceIndex(X).query", _index_query, XI),
    ("HalfspaceIndex.add/update X", _index_add_update, XI),
    ("HalfspaceIndex.query/search W batch", _index_queries, XI[:5]),
    ("HalfspaceIndex.query W single", lambda w: np.sort(HalfspaceIndex(XI).query(w, 0.0)), XI[0]),
    ("LowRankUpdatedMatrix(W0)", _lowrank_ops, WI),
    ("LowRankUpdatedMatrix.update U", _lowrank_update, XI[:5, :2]),
    ("LowRankUpdatedMatrix.matmat X", _lowrank_matmat, ZI[:3, :4]),
    ("LowRankUpdatedMatrix.matvec x", lambda x: LowRankUpdatedMatrix(WI).matvec(x), ZI[0, :3]),
    ("shifted_relu Z", lambda Z: shifted_relu(Z, 0.5), ZI),
    ("shifted_relu b", lambda b: shifted_relu(ZI, b), ZI[:, 0]),
    ("shifted_relu relative", lambda r: shifted_relu(ZI, 0.5, relative=r), np.abs(ZI[:, 1])),
    ("shifted_relu_topk Z", lambda Z: shifted_relu_topk(Z, 3), ZI),
    ("CountSketch.transform", lambda X: CountSketch(8, 4, random_state=0).transform(X), ZI),
    ("GaussianSketch.transform", lambda X: GaussianSketch(8, 4, random_state=0).transform(X), ZI),
    ("SRHT.transform", lambda X: SRHT(8, 4, random_state=0).transform(X), ZI),
    ("TensorSketch.transform U", lambda U: TensorSketch((8, 3), 16, random_state=0).transform(U, ZI[:, :3]), ZI),
    ("sketched_lstsq A", lambda A: sketched_lstsq(A, BI, random_state=0), AI),
    ("sketched_lstsq b", lambda b: sketched_lstsq(AI, b, random_state=0), BI),
    ("SparseMLP.fit X", lambda X: SparseMLP(width=16, depth=1, max_iter=2, random_state=0,
                                            dtype=np.float64).fit(X, XI[:, 0]).predict(XI), XI),
    ("SparseMLP.fit y", lambda y: SparseMLP(width=16, depth=1, max_iter=2, random_state=0,
                                            dtype=np.float64).fit(XI, y).predict(XI), XI[:, 0]),
    ("SparseMLP.predict X", _mlp_predict, XI),
]

_ACCEPTED_PARAMS = [
    pytest.param(func, canonical, name, variant, id=f"{label}-{name}")
    for label, func, canonical in ACCEPTED_CASES
    for name, variant in _variants(canonical)
]


@pytest.mark.parametrize("func, canonical, name, variant", _ACCEPTED_PARAMS)
def test_odd_input_gives_oracle_answer_and_is_not_written(func, canonical, name, variant):
    expected = _dense(func(canonical.copy()))
    before = np.array(variant, copy=True)
    writeable = getattr(variant, "flags", None) and variant.flags.writeable
    got = _dense(func(variant))
    _assert_same(got, expected)
    np.testing.assert_array_equal(np.asarray(variant), before)
    if isinstance(variant, np.ndarray):
        assert variant.flags.writeable == writeable


def _id_variants(ids):
    wide = np.zeros(2 * ids.shape[0], dtype=np.int64)
    wide[::2] = ids
    ro = wide[::2]
    ro.flags.writeable = False
    return [("strided", wide[::2]), ("read-only strided", ro), ("list", ids.tolist()),
            ("int32", ids.astype(np.int32)), ("uint8", ids.astype(np.uint8)),
            ("negative-stride", ids[::-1].copy()[::-1])]


ID_CASES = [
    ("LowRankUpdatedMatrix.matvec rows", lambda r: LowRankUpdatedMatrix(WI).matvec(np.ones(3), rows=r)),
    ("HalfspaceIndex.get", lambda i: HalfspaceIndex(XI).get(i)),
    ("HalfspaceIndex.remove", lambda i: (lambda h: (h.remove(i), h.ids)[1])(HalfspaceIndex(XI))),
    ("HalfspaceIndex.update", lambda i: (lambda h: (h.update(i, XI[:3] + 1), h.get(h.ids))[1])(HalfspaceIndex(XI))),
    ("HalfspaceIndex.add ids", lambda i: (lambda h: (h.add(XI[:3], i), h.get(h.ids))[1])(HalfspaceIndex(XI[:2]))),
]


@pytest.mark.parametrize("func, name, variant", [
    pytest.param(func, name, variant, id=f"{label}-{name}")
    for label, func in ID_CASES for name, variant in _id_variants(np.array([4, 2, 3]))
])
def test_odd_ids_give_oracle_answer_and_are_not_written(func, name, variant):
    expected = _dense(func(np.array([4, 2, 3], dtype=np.intp)))
    before = np.array(variant, copy=True)
    _assert_same(_dense(func(variant)), expected)
    np.testing.assert_array_equal(np.asarray(variant), before)


@pytest.mark.parametrize("scalar", [3, np.int64(3), np.int32(3), np.uint16(3), np.array(3)])
def test_scalar_ids(scalar):
    index = HalfspaceIndex(XI)
    np.testing.assert_array_equal(index.get(scalar), XI[3:4])
    assert index.remove(scalar) == 1 and 3 not in index


def test_index_largest_id_and_default_ids_near_it():
    index = _index()
    top = np.iinfo(np.intp).max - 1
    np.testing.assert_array_equal(index.add(X20[:1], [top - 1]), [top - 1])
    np.testing.assert_array_equal(index.add(X20[1:2]), [top])  # the last default id
    assert index._core.next_id == top + 1 and len(index) == 22
    assert (index.ids >= 0).all() and index.ids.shape == (22,)


@pytest.mark.parametrize("optimizer", ["gd", "sgd", "gauss-newton"])
@pytest.mark.parametrize("n_features", [1, 2])
def test_mlp_with_one_feature_matches_the_dense_backend(optimizer, n_features):
    # One input feature used to fail in the sparse backend with
    # "ndarray is not C-contiguous" (a stride-0 index pattern).
    X = np.ascontiguousarray(X_TASK[:, :n_features])
    kw = dict(width=32, depth=2, max_iter=3, random_state=0, dtype=np.float64, optimizer=optimizer)
    if optimizer == "sgd":
        kw["batch_size"] = 8
    sparse = SparseMLP(backend="sparse", **kw).fit(X, Y_TASK)
    dense = SparseMLP(backend="dense", **kw).fit(X, Y_TASK)
    np.testing.assert_allclose(sparse.predict(X), dense.predict(X), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("content", ["npy", "npz without meta", "text"])
def test_mlp_load_of_a_foreign_file_names_the_path(content, tmp_path):
    path = tmp_path / "model.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones(3))
    elif content == "npz without meta":
        np.savez(path, a=np.ones(3))
    else:
        path.write_text("hello")
    with pytest.raises(ValueError, match=r"model\.npz is not a saved SparseMLP"):
        SparseMLP.load(path)


def test_cli_out_must_be_a_directory(tmp_path, capsys):
    from subquad_ds.cli import main

    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--width", "64", "--iters", "1", "--n-samples", "4", "--out", str(target)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "--out must be a directory" in captured.err and captured.out == ""


@pytest.mark.parametrize("order", ["C", "F", "A"])
@pytest.mark.parametrize("value", [2.0, np.float32(2.0), np.array(2.0), 3])
def test_as_float_array_keeps_0d_scalars_0d(value, order):
    # np.ascontiguousarray returned shape (1,) for a 0-d input.
    from subquad_ds._validation import as_float_array

    out = as_float_array(value, "x", dtype=np.float64, order=order)
    assert out.shape == () and float(out) in (2.0, 3.0)


def _read_only_csr(M, index_dtype):
    M = sp.csr_array(M)
    data, indices, indptr = M.data.copy(), M.indices.astype(index_dtype), M.indptr.astype(index_dtype)
    for a in (data, indices, indptr):
        a.flags.writeable = False
    return sp.csr_array((data, indices, indptr), shape=M.shape)


_D58 = np.where(np.random.default_rng(5).random((5, 8)) < 0.5, ZI[:5], 0.0)
_UNSORTED = sp.csr_array((np.array([1.0, 2.0, 3.0]), np.array([3, 1, 3]), np.array([0, 3])), shape=(1, 8))
_INDEX8 = HalfspaceIndex(np.random.default_rng(6).standard_normal((30, 8)), leaf_size=4)

SPARSE_CASES = [
    ("CountSketch", lambda S: CountSketch(8, 4, random_state=0).transform(S)),
    ("GaussianSketch", lambda S: GaussianSketch(8, 4, random_state=0).transform(S)),
    ("SRHT", lambda S: SRHT(8, 4, random_state=0).transform(S)),
    ("TensorSketch", lambda S: TensorSketch((8, 8), 16, random_state=0).transform(S, S)),
    ("HalfspaceIndex.query", lambda S: _INDEX8.query(S, 0.1)),
    ("HalfspaceIndex.query_count", lambda S: _INDEX8.query_count(S, 0.1)),
    ("HalfspaceIndex.search", lambda S: _INDEX8.search(S, 3)),
]


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("label, func", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_read_only_and_non_canonical_csr_match_dense(label, func, index_dtype):
    def canon(result):
        if isinstance(result, tuple) and len(result) == 2 and label == "HalfspaceIndex.query":
            indptr, ids = result
            return indptr, np.concatenate([np.sort(ids[a:b]) for a, b in zip(indptr[:-1], indptr[1:])])
        return result

    S = _read_only_csr(_D58, index_dtype)
    got = canon(func(S))
    expected = canon(func(_D58))
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    # duplicate and unsorted column indices are summed, as scipy does
    got = canon(func(_UNSORTED))
    expected = canon(func(_UNSORTED.toarray()))
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
