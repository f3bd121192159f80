"""Spectral pruning (Suzuki et al. 2020): the public names of the package.

* :mod:`.quantities` — eigenvalues, degrees of freedom N̂(λ) and N̂′(λ; Z), leverage scores,
  the width ↔ λ rule of eq. (3), the paper's default λ and τ;
* :mod:`.covariance` — :func:`covariance_accumulate`, :class:`CovarianceAccumulator`;
* :mod:`.greedy` — :func:`greedy_select` (eq. 2), :class:`GreedyResult`;
* :mod:`.reconstruct` — ``Â_J = Σ_FJ (Σ_JJ + I_τ)⁻¹``, its error, ``W♯`` and Z;
* :mod:`.sites` — which layers of a model can be pruned, and their rewriting;
* :mod:`.prune` — :func:`spectral_prune`, which composes the above.
"""
from __future__ import annotations

from .covariance import CovarianceAccumulator, all_reduce_covariance, covariance_accumulate
from .greedy import GreedyResult, greedy_select
from .prune import DEFAULT_THETA, LayerReport, PruneReport, spectral_prune
from .quantities import (
    DEFAULT_LAMBDA_REL, EQ3_C1, EQ3_C2, default_lambda, default_tau, degrees_of_freedom, eigenvalues,
    lambda_from_width, leverage_scores, output_degrees_of_freedom, width_from_lambda,
)
from .reconstruct import output_matrix, pruned_next_weight, reconstruction, reconstruction_error
from .sites import find_sites

__all__ = [
    "spectral_prune", "PruneReport", "LayerReport", "find_sites",
    "covariance_accumulate", "CovarianceAccumulator", "all_reduce_covariance",
    "greedy_select", "GreedyResult",
    "reconstruction", "reconstruction_error", "pruned_next_weight", "output_matrix",
    "eigenvalues", "degrees_of_freedom", "output_degrees_of_freedom", "leverage_scores",
    "lambda_from_width", "width_from_lambda", "default_lambda", "default_tau",
    "DEFAULT_LAMBDA_REL", "DEFAULT_THETA", "EQ3_C1", "EQ3_C2",
]
