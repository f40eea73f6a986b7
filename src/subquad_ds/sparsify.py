"""Shifted-ReLU sparsifier and the sparsity schedules of the network.

The shifted ReLU ``sigma_t(z) = max(z - t, 0)`` keeps only the neurons whose
pre-activation exceeds a threshold ``t``; with Gaussian weights a neuron
fires with probability ``p = Phibar(tau)`` when ``t = tau * s * ||h||`` (``s``
the weight scale, ``h`` the layer input).  Three rules pick ``t`` per sample:

* ``"relative"`` (default of :class:`~subquad_ds.SparseMLP`):
  ``t_i = tau * s * ||h_i||``.  The threshold follows each sample's input
  norm, so the active fraction stays ``p`` at every depth.
* ``"fixed"`` (the paper's): ``t = tau * s``, the same for every sample.  It
  assumes ``||h_i|| = 1`` at every layer; at practical widths the per-sample
  norm noise is amplified layer by layer (a gain of 2.5-4.7 per layer
  measured for p = 0.1-0.01), many samples end with no active neuron, and
  gradient descent stalls.
* top-k (an integer sparsity ``k``): ``t_i`` is the (k+1)-th largest entry of
  ``z_i``, so exactly the ``k`` largest pre-activations are active (fewer
  only when values tie at ``t_i``).

Schedules map a width ``m`` and a ``sparsity`` specification to ``tau``:
``"sqrt-log"`` (the paper's) uses ``tau = sqrt(0.4 ln m)``, so the active
count ``k = m Phibar(tau)`` grows like ``m^0.8 / sqrt(ln m)``; a float
``p`` fixes the active fraction (``tau = Phi^-1(1 - p)``); an int ``k``
fixes the active count (top-k rule, with ``tau = Phi^-1(1 - k/m)`` for the
initial scale).

Activations of a batch are returned in CSR layout, as
``scipy.sparse.csr_array`` (int32 column indices sorted within each row,
only strictly positive values stored).
"""

import math
import numbers

import numpy as np
from scipy import sparse, special

from . import _sparse_mlp
from ._validation import (
    as_float_array,
    check_float,
    check_int,
    check_n_threads,
    check_scalar_or_vector,
    resolve_float_dtype,
    to_float,
)

__all__ = [
    "init_scale",
    "resolve_sparsity",
    "shifted_relu",
    "shifted_relu_topk",
    "threshold_for_sparsity",
]

RULE_FIXED, RULE_RELATIVE, RULE_TOPK = 0, 1, 2


def threshold_for_sparsity(p):
    """Return ``tau = Phi^-1(1 - p)``: a standard normal exceeds it with probability ``p``.

    Parameters
    ----------
    p : float
        Active fraction, ``0 < p < 1``.

    Returns
    -------
    tau : float
    """
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a float in (0, 1); got {p!r}")
    p = to_float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    return float(-special.ndtri(p))


def _second_moment(tau):
    """``c(tau) = E[max(g - tau, 0)^2]`` for ``g ~ N(0, 1)``."""
    phi = math.exp(-0.5 * tau * tau) / math.sqrt(2.0 * math.pi)
    return (1.0 + tau * tau) * float(special.ndtr(-tau)) - tau * phi


def init_scale(width, tau):
    """Standard deviation ``s = 1 / sqrt(width * c(tau))`` of the initial weights.

    ``c(tau) = (1 + tau^2) Phibar(tau) - tau phi(tau)`` is the second moment
    of a shifted ReLU of a standard normal, so with ``W`` entries
    ``N(0, s^2)`` and threshold ``tau * s * ||h||`` the next layer keeps
    ``E ||h_l||^2 = ||h_{l-1}||^2``.

    Parameters
    ----------
    width : int
        Number of neurons of the layer.
    tau : float
        Threshold in units of the pre-activation standard deviation.

    Returns
    -------
    s : float
    """
    width = check_int(width, "width", minimum=1)
    tau = check_float(tau, "tau")
    c = _second_moment(tau) if abs(tau) < 1e150 else math.nan  # tau**2 overflows
    s = 1.0 / math.sqrt(width * c) if c > 0 else math.nan  # c underflows to 0 near tau = 38
    if not (math.isfinite(s) and s > 0):
        raise ValueError(
            f"tau = {tau} is out of range: the second moment c(tau) = {c:.3g} "
            f"gives no positive finite scale"
        )
    return s


def resolve_sparsity(width, sparsity="sqrt-log"):
    """Turn a sparsity specification into ``(tau, p, k)``.

    Parameters
    ----------
    width : int
        Layer width ``m``.
    sparsity : "sqrt-log", float or int, default="sqrt-log"
        ``"sqrt-log"``: ``tau = sqrt(0.4 ln m)`` (the paper's schedule);
        a float ``p`` in (0, 1): fixed active fraction; an int ``k`` in
        [1, m): fixed active count (top-k rule).

    Returns
    -------
    tau : float
        Threshold in units of the pre-activation standard deviation.
    p : float
        Expected active fraction.
    k : int or None
        Active count for the top-k rule, None otherwise.
    """
    width = check_int(width, "width", minimum=2)
    if isinstance(sparsity, str):
        if sparsity != "sqrt-log":
            raise ValueError(
                f"sparsity must be 'sqrt-log', a float in (0, 1) or an int count; got {sparsity!r}"
            )
        tau = math.sqrt(0.4 * math.log(width))
        return tau, float(special.ndtr(-tau)), None
    if isinstance(sparsity, (bool, np.bool_)):
        raise TypeError(f"sparsity must be 'sqrt-log', a float or an int; got {sparsity!r}")
    if isinstance(sparsity, numbers.Integral):
        k = check_int(sparsity, "sparsity", minimum=1, maximum=width - 1)
        p = k / width
        return threshold_for_sparsity(p), p, k
    if isinstance(sparsity, numbers.Real):
        p = float(sparsity)
        if not 0.0 < p < 1.0:
            raise ValueError(f"sparsity as a fraction must be in (0, 1); got {p}")
        return threshold_for_sparsity(p), p, None
    raise TypeError(f"sparsity must be 'sqrt-log', a float or an int; got {sparsity!r}")


def _csr(indptr, indices, data, shape):
    return sparse.csr_array((data, indices, indptr), shape=shape, copy=False)


def shifted_relu(Z, b, *, relative=None, n_threads=None):
    """Shifted ReLU ``max(Z - t, 0)`` of a batch, returned as CSR.

    Parameters
    ----------
    Z : array-like of shape (n_samples, m)
        Pre-activations.
    b : float or array-like of shape (n_samples,)
        Threshold (one per sample, or shared).
    relative : None or array-like of shape (n_samples,), default=None
        Per-sample input norms ``||h_i||`` for the norm-relative rule: the
        threshold of row ``i`` becomes ``b_i * relative[i]``.  None is the
        fixed rule, ``t_i = b_i``.
    n_threads : int, optional
        OpenMP threads (None: all cores).

    Returns
    -------
    H : scipy.sparse.csr_array of shape (n_samples, m)
        Only the strictly positive entries ``Z[i, r] - t_i > 0`` are
        stored, with sorted column indices; dtype float32 if ``Z`` is
        float32, float64 otherwise.

    Notes
    -----
    O(n m) time, one pass over ``Z``; the activation pattern is the
    support (``H.indices``), so nothing else is needed by a backward pass.

    Examples
    --------
    >>> import numpy as np
    >>> from subquad_ds import shifted_relu
    >>> H = shifted_relu(np.array([[0.5, 2.0, -1.0], [3.0, 0.1, 1.5]]), 1.0)
    >>> H.toarray()
    array([[0. , 1. , 0. ],
           [2. , 0. , 0.5]])
    """
    dtype = resolve_float_dtype(Z)
    Z = as_float_array(Z, "Z", dtype=dtype, ndim=2)
    n, m = Z.shape
    t = check_scalar_or_vector(b, "b", length=n, dtype=dtype)
    if relative is not None:
        norms = as_float_array(relative, "relative", dtype=dtype, shape=(n,))
        if (norms < 0).any():
            raise ValueError("relative must hold non-negative norms")
        with np.errstate(over="ignore"):  # reported just below
            t = t * norms
        if not np.isfinite(t).all():
            raise ValueError(f"b * relative must be finite; it overflows {dtype.name}")
    nt = check_n_threads(n_threads)
    # The kernel's relative rule with unit b gives a per-sample threshold.
    indptr, indices, data, _ = _sparse_mlp.extract_active(
        Z, RULE_RELATIVE, dtype.type(1), np.ascontiguousarray(t, dtype=dtype), 0, nt
    )
    return _csr(indptr, indices, data, (n, m))


def shifted_relu_topk(Z, k, *, n_threads=None):
    """Top-k shifted ReLU: ``max(Z[i] - t_i, 0)`` with ``t_i`` the (k+1)-th largest of ``Z[i]``.

    Parameters
    ----------
    Z : array-like of shape (n_samples, m)
        Pre-activations.
    k : int
        Active count per sample, ``1 <= k < m``.
    n_threads : int, optional
        OpenMP threads (None: all cores).

    Returns
    -------
    H : scipy.sparse.csr_array of shape (n_samples, m)
        The ``k`` largest entries of each row minus ``t_i`` (fewer when
        entries tie at ``t_i``: equal values are all kept or all dropped).
    thresholds : ndarray of shape (n_samples,)
        ``t_i``.

    Notes
    -----
    O(n m) expected time (``std::nth_element``).  In training the threshold
    is treated as a constant in the backward pass (straight-through of the
    selection): the gradient flows only through the selected entries.
    """
    dtype = resolve_float_dtype(Z)
    Z = as_float_array(Z, "Z", dtype=dtype, ndim=2)
    n, m = Z.shape
    k = check_int(k, "k", minimum=1, maximum=max(m - 1, 1))
    if k >= m:
        raise ValueError(f"k must be < m = {m}; got {k}")
    nt = check_n_threads(n_threads)
    indptr, indices, data, thr = _sparse_mlp.extract_active(
        Z, RULE_TOPK, dtype.type(0), np.ones(n, dtype), k, nt
    )
    return _csr(indptr, indices, data, (n, m)), thr
