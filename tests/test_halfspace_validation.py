"""HalfspaceIndex: bad input raises a clear error and changes nothing."""

import numpy as np
import pytest
import scipy.sparse as sp

from subquad_ds import HalfspaceIndex


@pytest.fixture
def index(rng):
    return HalfspaceIndex(rng.normal(size=(50, 4)), leaf_size=4)


def snapshot(index):
    ids = index.ids
    return ids, index.get(ids), index._core.next_id


def assert_unchanged(index, snap):
    ids, X, next_id = snap
    np.testing.assert_array_equal(index.ids, ids)
    np.testing.assert_array_equal(index.get(ids), X)
    assert index._core.next_id == next_id
    index._core.check_invariants()


@pytest.mark.parametrize("X, exc, match", [
    (np.ones(5), ValueError, r"X must be 2-D; got shape \(5,\)"),
    (np.ones((3, 0)), ValueError, "X must have at least one feature"),
    (np.array([[1.0, np.nan]]), ValueError, "X must be finite"),
    (np.array([[1.0, np.inf]]), ValueError, "X must be finite"),
    (np.array([["a", "b"]]), TypeError, "X must hold real numbers"),
    (np.array([[1 + 1j]]), TypeError, "X must hold real numbers"),
    (np.array([[object()]]), TypeError, "X must hold real numbers"),
])
def test_constructor_rejects(X, exc, match):
    with pytest.raises(exc, match=match):
        HalfspaceIndex(X)


def test_constructor_options():
    with pytest.raises(ValueError, match="leaf_size must be >= 1; got 0"):
        HalfspaceIndex(np.ones((2, 2)), leaf_size=0)
    with pytest.raises(TypeError, match="leaf_size must be an integer"):
        HalfspaceIndex(np.ones((2, 2)), leaf_size=2.5)
    with pytest.raises(ValueError, match="n_threads = 0 is invalid"):
        HalfspaceIndex(np.ones((2, 2)), n_threads=0)
    with pytest.raises(TypeError):
        HalfspaceIndex(np.ones((2, 2)), 10)          # options are keyword-only


def test_dtype_policy():
    assert HalfspaceIndex(np.ones((2, 2), np.float32)).dtype == np.float32
    assert HalfspaceIndex(np.ones((2, 2), np.float64)).dtype == np.float64
    assert HalfspaceIndex(np.ones((2, 2), np.int64)).dtype == np.float64
    assert HalfspaceIndex([[1, 2]]).dtype == np.float64
    # a float64 value beyond float32 range is rejected for a float32 index
    index = HalfspaceIndex(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="X must be finite"):
        index.add(np.array([[1e300, 0.0]]))


@pytest.mark.parametrize("call, exc, match", [
    (lambda ix: ix.add(np.ones((2, 3))), ValueError, "X has 3 features; the index has 4"),
    (lambda ix: ix.add(np.ones(4)), ValueError, "X must be 2-D"),
    (lambda ix: ix.add(np.full((1, 4), np.nan)), ValueError, "X must be finite"),
    (lambda ix: ix.add(np.ones((2, 4)), ids=[1000]), ValueError,
     "ids has 1 entries; X has 2 rows"),
    (lambda ix: ix.add(np.ones((2, 4)), ids=[1000, 1000]), ValueError,
     "ids contains duplicates"),
    (lambda ix: ix.add(np.ones((2, 4)), ids=[1000, 3]), ValueError,
     r"ids\[1\] = 3 is already in the index"),
    (lambda ix: ix.add(np.ones((1, 4)), ids=[-1]), ValueError, "ids must be non-negative"),
    (lambda ix: ix.add(np.ones((1, 4)), ids=[1.0]), TypeError, "ids must be integers"),
    (lambda ix: ix.remove([1, 999]), KeyError, r"ids\[1\] = 999 is not in the index"),
    (lambda ix: ix.remove([1, 1]), ValueError, "ids contains duplicates"),
    (lambda ix: ix.remove([[1]]), ValueError, "ids must be 1-D"),
    (lambda ix: ix.remove(["a"]), TypeError, "ids must be integers"),
    (lambda ix: ix.update([1, 999], np.ones((2, 4))), KeyError, "999 is not in the index"),
    (lambda ix: ix.update([1, 2], np.ones((3, 4))), ValueError, "X has 3 rows; ids has 2"),
    (lambda ix: ix.update([1], np.ones((1, 5))), ValueError, "X has 5 features"),
    (lambda ix: ix.update([1], np.full((1, 4), np.inf)), ValueError, "X must be finite"),
    (lambda ix: ix.update([1, 1], np.ones((2, 4))), ValueError, "ids contains duplicates"),
    (lambda ix: ix.get([999]), KeyError, "999 is not in the index"),
    (lambda ix: ix.query(np.ones(3), 0.0), ValueError, "W has 3 features; the index has 4"),
    (lambda ix: ix.query(np.ones((2, 2, 4)), 0.0), ValueError, "W must be 1-D or 2-D"),
    (lambda ix: ix.query(np.ones(4), [0.0, 1.0]), ValueError, "b must be a scalar for a 1-D w"),
    (lambda ix: ix.query(np.ones((5, 4)), np.zeros(3)), ValueError,
     r"b must broadcast to \(5,\); got shape \(3,\)"),
    (lambda ix: ix.query(np.ones(4), np.nan), ValueError, "b must be finite"),
    (lambda ix: ix.query(np.ones(4), True), TypeError, "b must hold real numbers, not bools"),
    (lambda ix: ix.query_count(np.ones((2, 4)), np.array([True, False])), TypeError,
     "b must hold real numbers, not bools"),
    (lambda ix: ix.query(np.ones((2, 4)), [np.True_, False]), TypeError,
     "b must hold real numbers, not bools"),
    (lambda ix: ix.query(np.full(4, np.nan), 0.0), ValueError, "W must be finite"),
    (lambda ix: ix.query(np.ones(4), 0.0, n_threads=0), ValueError, "n_threads = 0 is invalid"),
    (lambda ix: ix.query_count(np.ones((2, 5)), 0.0), ValueError, "W has 5 features"),
    (lambda ix: ix.query(sp.csr_matrix(np.ones((2, 5))), 0.0), ValueError,
     "W has 5 features"),
    (lambda ix: ix.query(sp.csr_matrix(np.full((1, 4), np.inf)), 0.0), ValueError,
     "W.data must be finite"),
    (lambda ix: ix.search(np.ones(4), -1), ValueError, "k must be >= 0; got -1"),
    (lambda ix: ix.search(np.ones(4), 2.0), TypeError, "k must be an integer"),
    (lambda ix: ix.search(np.ones(3), 2), ValueError, "W has 3 features"),
])
def test_bad_input_leaves_index_unchanged(index, call, exc, match):
    snap = snapshot(index)
    with pytest.raises(exc, match=match):
        call(index)
    assert_unchanged(index, snap)


def test_remove_unknown_removes_nothing(index):
    n = len(index)
    with pytest.raises(KeyError):
        index.remove([0, 1, 2, 12345])
    assert len(index) == n and 0 in index and 1 in index


def test_query_edge_shapes(index):
    indptr, indices = index.query(np.ones((0, 4)), 0.0)
    np.testing.assert_array_equal(indptr, [0])
    assert indices.shape == (0,)
    assert index.query_count(np.ones((0, 4)), 0.0).shape == (0,)
    s, i = index.search(np.ones((3, 4)), 0)
    assert s.shape == (3, 0) and i.shape == (3, 0)
    s, i = index.search(np.ones((2, 4)), 60)          # k > n pads
    assert (i[:, 50:] == -1).all() and np.isneginf(s[:, 50:]).all()
    assert index.add(np.ones((0, 4))).shape == (0,)
    assert index.remove([]) == 0
