"""subquad_ds: data structures for subquadratic training of wide networks.

Each structure is importable on its own from its module; the common names
are re-exported here.
"""

from ._openmp_helpers import openmp_enabled
from .lowrank import LowRankUpdatedMatrix
from .mlp import SparseMLP
from .sparsify import (
    init_scale,
    resolve_sparsity,
    shifted_relu,
    shifted_relu_topk,
    threshold_for_sparsity,
)
from .lstsq import sketched_lstsq
from .sketch import SRHT, CountSketch, GaussianSketch, TensorSketch

__version__ = "0.1.0"

__all__ = [
    "LowRankUpdatedMatrix",
    "CountSketch",
    "GaussianSketch",
    "SRHT",
    "TensorSketch",
    "sketched_lstsq",
    "openmp_enabled",
    "SparseMLP",
    "init_scale",
    "resolve_sparsity",
    "shifted_relu",
    "shifted_relu_topk",
    "threshold_for_sparsity",
]
