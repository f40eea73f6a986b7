"""Input validation shared by every public class.

Each public entry point validates once, here, and hands the Cython cores
C-contiguous arrays of the structure's dtype, so the cores can run with
bounds checks off.  Every message names the argument, states what was
expected and what was received.  Validation never mutates its input and
happens before any state changes, so a rejected call leaves a structure as
it was.

dtype policy (the scikit-learn tree rule): a structure built from a
``np.float32`` ndarray works in float32, anything else (float64, integers,
bools, lists) in float64.  Later inputs are cast to the structure's dtype.
Complex, object, string and datetime inputs are rejected with TypeError.
Non-contiguous and read-only inputs are accepted: they are copied to a
contiguous array when needed and never written to.
"""

import math
import numbers
import operator

import numpy as np

from ._finite import all_finite_contiguous
from ._openmp_helpers import max_threads, openmp_enabled

__all__ = [
    "all_finite",
    "as_float_array",
    "as_index_array",
    "check_bool",
    "check_int",
    "check_n_threads",
    "check_random_state",
    "check_scalar_or_vector",
    "reject_bools",
    "resolve_float_dtype",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INTP_MIN, _INTP_MAX = int(np.iinfo(np.intp).min), int(np.iinfo(np.intp).max)
_CINT_MAX = int(np.iinfo(np.intc).max)


def resolve_float_dtype(X, dtype=None):
    """Pick the working float dtype for a new structure.

    ``dtype`` wins when given (it must be float32 or float64); otherwise
    float32 if ``X`` is already a float32 ndarray, else float64.
    """
    if dtype is not None:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64; got {dtype!r}") from None
        if dt not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64; got {dt}")
        return dt
    if isinstance(X, np.ndarray) and X.dtype == np.float32:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def all_finite(arr):
    """True iff the float array ``arr`` holds no NaN or infinity.

    Contiguous float32/float64 arrays take one pass without a temporary
    (``np.isfinite(arr).all()`` costs about 1.4 us of overhead even for one
    row); anything else falls back to numpy.
    """
    if (type(arr) is np.ndarray and arr.dtype in _FLOAT_DTYPES
            and (arr.flags.c_contiguous or arr.flags.f_contiguous)):
        return all_finite_contiguous(arr)
    return bool(np.isfinite(arr).all())


def _check_numeric_kind(arr, name):
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float); got dtype {arr.dtype}"
        )


def as_float_array(X, name, *, dtype, ndim=None, shape=None, allow_empty=True,
                   finite=True, order="C"):
    """Validate ``X`` and return it as a contiguous array of ``dtype``.

    Parameters
    ----------
    X : array-like
        The input.
    name : str
        The argument's name, used in messages.
    dtype : numpy dtype
        float32 or float64; the result has this dtype.
    ndim : int or tuple of int, optional
        Accepted numbers of dimensions.
    shape : tuple, optional
        Expected shape; ``None`` entries are free.
    allow_empty : bool, default=True
        Whether a zero-size array is accepted.
    finite : bool, default=True
        Reject NaN and infinity.
    order : {"C", "F", "A"}, default="C"
        Memory layout of the result: C-contiguous, Fortran-contiguous, or
        ``"A"``: either, keeping ``X``'s layout when it is already
        contiguous (a copy, when needed, is C-contiguous).

    Returns
    -------
    out : ndarray
        ``X`` itself when it already fits (no copy), otherwise a contiguous
        copy of ``dtype``.  The result may be read-only: callers must not
        write to it.

    Raises
    ------
    TypeError
        Non-numeric dtype (complex, object, string, ...).
    ValueError
        Wrong number of dimensions or shape, empty input when not allowed,
        NaN or infinity when ``finite``.
    """
    if isinstance(X, np.ndarray):
        arr = X
    elif is_sparse(X):
        # np.asarray would wrap it in a 0-d object array ("dtype object").
        raise TypeError(
            f"{name} must be a dense array; got a scipy.sparse {type(X).__name__} "
            "(convert it with .toarray())"
        )
    else:
        try:
            arr = np.asarray(X)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be an array of real numbers; {exc}") from None
    _check_numeric_kind(arr, name)
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in ndims:
            expected = " or ".join(f"{d}-D" for d in ndims)
            raise ValueError(f"{name} must be {expected}; got shape {arr.shape}")
    if shape is not None:
        if arr.ndim != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, arr.shape)
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}; got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} is empty; got shape {arr.shape}")
    if order == "A":
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    if type(arr) is np.ndarray and arr.dtype == dtype and (
            arr.flags.f_contiguous if order == "F" else arr.flags.c_contiguous):
        out = arr            # nothing to cast (np.errstate alone costs ~1 us)
    else:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            # np.asarray with an order, not np.ascontiguousarray: that one
            # turns a 0-d input into shape (1,).
            out = np.asarray(arr, dtype=dtype, order="F" if order == "F" else "C")
    if finite and out.size and not all_finite(out):
        # Check after the cast: a float64 value beyond float32 range becomes inf.
        raise ValueError(f"{name} must be finite; found NaN or inf")
    return out


def as_index_array(ids, name, *, ndim=1):
    """Validate integer ids and return a C-contiguous ``np.intp`` array.

    Scalars are promoted to 1-D.  Floats, even integral ones, are rejected
    with TypeError, like numpy fancy indexing.
    """
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"{name} must be integers; got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.intp).max:
        raise ValueError(f"{name} has values beyond the np.intp range")
    return np.ascontiguousarray(arr, dtype=np.intp)


def check_bool(value, name):
    """Return ``value`` as a Python bool; anything but a bool is a TypeError.

    Truthiness is not enough: ``return_scores="no"`` must not mean True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return bool(value)


def check_int(value, name, *, minimum=None, maximum=None, allow_none=False):
    """Return ``value`` as a Python int after checking type and range."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    value = operator.index(value)
    # Every int here reaches C as an np.intp (Py_ssize_t): beyond it is
    # an OverflowError deep inside, so the intp range bounds every check.
    minimum = _INTP_MIN if minimum is None else max(minimum, _INTP_MIN)
    maximum = _INTP_MAX if maximum is None else min(maximum, _INTP_MAX)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")
    return value


def check_scalar_or_vector(b, name, *, length, dtype):
    """Broadcast a scalar or a vector to shape ``(length,)`` of ``dtype``.

    Used for per-query thresholds: ``b`` must broadcast to ``(length,)``.
    """
    arr = as_float_array(b, name, dtype=dtype, ndim=(0, 1))
    if arr.ndim == 1 and arr.shape[0] not in (1, length):
        raise ValueError(
            f"{name} must broadcast to ({length},); got shape {arr.shape}"
        )
    return np.ascontiguousarray(np.broadcast_to(arr, (length,)), dtype=dtype)


def reject_bools(value, name):
    """TypeError if ``value`` is a bool, or an array, list or tuple of bools.

    For arguments where a bool is never meant as a number (thresholds),
    although the dtype policy casts bool arrays of data to float.
    """
    seen = value
    if isinstance(value, (list, tuple)):
        try:
            seen = np.asarray(value)
        except ValueError:          # ragged: the array check that follows names it
            return
    if isinstance(seen, (bool, np.bool_)) or getattr(seen, "dtype", None) == np.bool_:
        raise TypeError(f"{name} must hold real numbers, not bools; got {value!r}")


def check_n_threads(n_threads):
    """Resolve ``n_threads`` to a positive thread count.

    ``None`` and ``-1`` mean every usable core; ``-k`` means
    ``n_cpus + 1 - k`` (at least 1); 0 is invalid.  Without OpenMP the
    answer is always 1.
    """
    if n_threads is None:
        n_threads = -1
    # OpenMP's num_threads is a C int.
    n_threads = check_int(n_threads, "n_threads", minimum=-_CINT_MAX, maximum=_CINT_MAX)
    if n_threads == 0:
        raise ValueError("n_threads = 0 is invalid")
    if not openmp_enabled():
        return 1
    n_cpus = max_threads()
    if n_threads < 0:
        return max(1, n_cpus + 1 + n_threads)
    return n_threads


def check_random_state(seed, name="random_state"):
    """Turn ``seed`` into a ``np.random.Generator``.

    None gives fresh OS entropy, an int or a ``SeedSequence`` seeds a new
    PCG64 generator, and a Generator is returned unchanged (shared state).
    """
    if seed is None or isinstance(seed, (numbers.Integral, np.random.SeedSequence)):
        if isinstance(seed, (bool, np.bool_)):
            raise TypeError(f"{name} must be None, an int, a SeedSequence or a Generator; got {seed!r}")
        if isinstance(seed, numbers.Integral) and seed < 0:
            raise ValueError(f"{name} must be a non-negative int; got {seed!r}")
        return np.random.default_rng(seed)
    if isinstance(seed, np.random.Generator):
        return seed
    raise TypeError(
        f"{name} must be None, an int, a SeedSequence or a Generator; got {seed!r}"
    )


def is_sparse(X):
    """True for any scipy.sparse array or matrix (without importing scipy eagerly)."""
    return hasattr(X, "tocsr") and hasattr(X, "nnz") and hasattr(X, "format")


def as_float_csr(X, name, *, dtype, shape=None, finite=True):
    """Validate a scipy.sparse input and return it as CSR of ``dtype``.

    Any scipy.sparse format is accepted and converted.  The result shares
    no writable state with ``X`` that the caller could mutate by accident:
    when ``X`` already is a CSR of the right dtype it is returned as is and
    must be treated as read-only.  Index arrays keep their int32/int64 dtype
    (made a common one when they differ).

    Raises
    ------
    TypeError
        ``X`` is not scipy.sparse, or holds non-real numbers.
    ValueError
        Not 2-D, wrong shape, NaN or infinity when ``finite``.
    """
    import scipy.sparse as sp

    if not is_sparse(X):
        raise TypeError(f"{name} must be a scipy.sparse matrix; got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float); got dtype {X.dtype}"
        )
    if shape is not None and any(
        s is not None and s != a for s, a in zip(shape, X.shape)
    ):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}; got shape {X.shape}")
    X = sp.csr_array(X) if X.format != "csr" else X
    if X.dtype != dtype:
        X = X.astype(dtype)
    if X.indices.dtype != X.indptr.dtype:
        idx = np.promote_types(X.indices.dtype, X.indptr.dtype)
        X = sp.csr_array(
            (X.data, X.indices.astype(idx), X.indptr.astype(idx)), shape=X.shape
        )
    if finite and X.nnz and not all_finite(X.data):
        raise ValueError(f"{name} must be finite; found NaN or inf")
    return X


def to_float(value):
    """``float(value)``, but an int beyond the float range is +-inf, not OverflowError.

    Callers then report it with their usual "must be finite" message.
    """
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_float(value, name, *, minimum=None, below=None):
    """Return ``value`` as a finite Python float in [minimum, below)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = to_float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}; got {value}")
    return value
