"""subquad_ds: data structures for subquadratic training of wide networks.

Each structure is importable on its own from its module; the common names
are re-exported here.
"""

from ._openmp_helpers import openmp_enabled
from .halfspace import HalfspaceIndex
from .lowrank import LowRankUpdatedMatrix
from .lstsq import sketched_lstsq
from .mlp import SparseMLP
from .sketch import SRHT, CountSketch, GaussianSketch, TensorSketch
from .sparsify import (
    init_scale,
    resolve_sparsity,
    shifted_relu,
    shifted_relu_topk,
    threshold_for_sparsity,
)

__version__ = "0.1.0"

__all__ = [
    "CountSketch",
    "GaussianSketch",
    "HalfspaceIndex",
    "LowRankUpdatedMatrix",
    "SRHT",
    "SparseMLP",
    "TensorSketch",
    "init_scale",
    "openmp_enabled",
    "resolve_sparsity",
    "shifted_relu",
    "shifted_relu_topk",
    "sketched_lstsq",
    "threshold_for_sparsity",
]
