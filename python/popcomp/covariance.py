"""Compatibility module: ``popcomp.covariance`` names the covariance accumulation and greedy selection of :mod:`popcomp.spectral`; the code lives in ``spectral/covariance.py`` and ``spectral/greedy.py``."""
from .spectral.covariance import CovarianceAccumulator, all_reduce_covariance, covariance_accumulate  # noqa: F401
from .spectral.greedy import GreedyResult, greedy_select  # noqa: F401

__all__ = ["covariance_accumulate", "CovarianceAccumulator", "all_reduce_covariance", "greedy_select", "GreedyResult"]
