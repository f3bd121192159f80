"""popcomp: fast, generalization-aware compression for PyTorch models.

Quantization with Hessian-weighted and diameter-regularized K-means (Bu et al. 2020),
spectral pruning (Suzuki et al. 2020) and compression-based generalization bounds
(Zhang 2020), on a torch-free C++/CUDA core.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the ops)
from ._backend import backends
from .kmeans import KMeansResult, kmeans1d
from . import hessian
from .quantize import (
    PalettizeConfig, dequantize_, load, quantize_, save, select_beta, size_report,
)
from . import spectral
from .spectral import (
    CovarianceAccumulator, GreedyResult, covariance_accumulate, greedy_select, spectral_prune,
)
from . import prune  # noqa: F401  (compatibility: popcomp.prune names spectral's objects)
from . import data, theory  # noqa: F401  (bounds/diagnostics; bundled digits)

__all__ = [
    "__version__", "backends", "kmeans1d", "KMeansResult",
    "hessian", "PalettizeConfig", "quantize_", "dequantize_", "save", "load", "size_report",
    "select_beta",
    "covariance_accumulate", "CovarianceAccumulator", "greedy_select", "GreedyResult",
    "spectral", "prune", "spectral_prune", "theory", "data",
]
