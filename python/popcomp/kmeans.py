"""Weighted 1-D K-means: Hessian-weighted (HW) and diameter-regularized (DRHW) K-means.

For values x_i with non-negative weights h_i, k centers c_1 <= ... <= c_k and labels l(i)::

    cost = sum_i h_i (x_i - c_{l(i)})^2 + beta * (max_j c_j - min_j c_j)^2

beta = 0 is HW K-means (Bu et al. 2020, eq. 27); beta > 0 is DRHW K-means (eq. 31).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from . import _validate as V
from ._backend import FLOAT_DTYPES
from .ops.checks import KMEANS_DIAMETERS, KMEANS_INITS, KMEANS_METHODS

_METHODS = tuple(KMEANS_METHODS)
_INITS = tuple(i for i in KMEANS_INITS if i != "given")  # given: a tensor of centers
_DIAMETERS = tuple(KMEANS_DIAMETERS)
INT32_MAX = 2**31 - 1  # k and max_iter are 32-bit in the kernels


@dataclasses.dataclass
class KMeansResult:
    """Result of :func:`kmeans1d`.

    centers: ascending centers, ``(k,)`` for 1-D input, ``(rows, k)`` for 2-D input; float64
        for float64 input, else float32 (16-bit centers would round the optimum away; cast
        with ``.to()`` for a 16-bit codebook).
    labels: int32 center index of every value, shaped like ``x`` (int32 as scikit-learn's
        labels; usable for indexing; ``.long()`` for ``torch.gather``).
    cost: float64 objective (including the diameter term), ``()`` or ``(rows,)``.
    n_iter: int64 Lloyd iterations run, ``()`` or ``(rows,)`` (0 for a pure ``exact`` solve).
    """

    centers: torch.Tensor
    labels: torch.Tensor
    cost: torch.Tensor
    n_iter: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The quantized values ``centers[labels]``, shaped like ``x``."""
        if self.centers.dim() == 1:
            return self.centers[self.labels]
        return torch.gather(self.centers, 1, self.labels.long())


def kmeans1d(
    x: torch.Tensor,
    k: int,
    weights: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.0,
    method: str = "lloyd",
    init: Union[str, torch.Tensor] = "kmeans++",
    max_iter: int = 300,
    tol: float = 0.0,
    seed: Optional[int] = None,
    diameter: str = "squared",
) -> KMeansResult:
    """Weighted 1-D K-means with an optional diameter penalty (HW / DRHW K-means).

    Args:
        x: values, 1-D ``(n,)`` for one problem or 2-D ``(rows, n)`` for ``rows`` independent
            problems (per-channel / per-group codebooks); float64/32/16 or bfloat16, any device.
        k: number of centers (>= 1). With ``k`` >= the number of distinct values every value
            is its own center (cost 0 at ``beta = 0``; surplus centers repeat the largest).
        weights: non-negative weights shaped like ``x`` (e.g. the Hessian diagonal); None means
            all ones. Zero-weight values get labels but do not move centers.
        beta: diameter penalty (>= 0). 0 is HW K-means, > 0 DRHW K-means.
        method: ``"lloyd"`` (Lloyd iterations on sorted values with prefix sums, O(k log n)
            each) or ``"exact"`` (global optimum at ``beta = 0`` by dynamic programming; with
            ``beta > 0`` DRHW iterations start from that optimum).
        init: ``"kmeans++"``, ``"linear"`` (linspace over [min, max], as Deep Compression),
            ``"quantile"`` (weighted quantiles) or a tensor of initial centers ``(k,)`` or
            ``(rows, k)``. Used by ``"lloyd"`` only.
        max_iter: maximum Lloyd iterations (>= 0). Iterations stop earlier when the
            assignment no longer changes.
        tol: also stop when the relative decrease of the objective is <= tol (default 0).
        seed: seed of the k-means++ sampling; None draws one from torch's default generator.
        diameter: ``"squared"`` (beta * diameter^2, eq. 31 as written) or ``"linear"``
            (beta * diameter, the variant of the paper's public code, which moves each
            extreme center inward by beta / (2 H_cluster) per iteration).

    Every center update for fixed assignments is exact (including the coupling of the two
    extreme centers by the penalty), so the objective never increases between iterations.
    Nothing of the inputs is modified.
    """
    x = V.as_tensor("x", x)
    V.check_float("x", x)
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be 1-D (n,) or 2-D (rows, n), got shape {tuple(x.shape)}")
    k = V.check_int("k", k, lo=1, hi=INT32_MAX)
    if x.shape[-1] == 0:
        raise ValueError("x must hold at least one value per problem (got n = 0)")
    beta = V.check_real("beta", beta, lo=0.0)
    max_iter = V.check_int("max_iter", max_iter, lo=0, hi=INT32_MAX)
    tol = V.check_real("tol", tol, lo=0.0)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if diameter not in _DIAMETERS:
        raise ValueError(f"diameter must be one of {_DIAMETERS}, got {diameter!r}")
    # Values and weights (NaN/Inf, negative or all-zero weights) are checked by the op itself:
    # in the pass that reads them on CPU, with torch ops on other devices.
    squeeze = x.dim() == 1
    x2 = x.unsqueeze(0) if squeeze else x
    rows = x2.shape[0]

    w2 = None
    if weights is not None:
        weights = V.as_tensor("weights", weights)
        V.check_float("weights", weights)
        V.check_same_device("weights", weights, "x", x)
        if weights.shape != x.shape:
            raise ValueError(
                f"weights must have the shape of x {tuple(x.shape)}, got {tuple(weights.shape)}"
            )
        w2 = weights.unsqueeze(0) if squeeze else weights

    init_name = init
    init_centers = None
    if isinstance(init, torch.Tensor):
        V.check_float("init", init)
        V.check_same_device("init", init, "x", x)
        V.check_finite("init", init)
        if init.shape == (k,):
            init_centers = init.to(torch.float64).expand(rows, k)
        elif init.shape == (rows, k):
            init_centers = init.to(torch.float64)
        else:
            raise ValueError(
                f"init tensor must have shape ({k},) or ({rows}, {k}), got {tuple(init.shape)}"
            )
        init_name = "given"
    elif init not in _INITS:
        raise ValueError(f"init must be one of {_INITS} or a tensor of centers, got {init!r}")

    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    else:
        seed = V.check_int("seed", seed)
    seed &= (1 << 63) - 1

    centers, labels, cost, n_iter = torch.ops.popcomp.kmeans1d(
        x2, w2, k, beta, method, init_name, init_centers, max_iter, tol, seed, diameter
    )
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    centers = centers.to(out_dtype)
    if squeeze:
        centers, labels, cost, n_iter = centers[0], labels[0], cost[0], n_iter[0]
    return KMeansResult(centers, labels, cost, n_iter)


__all__ = ["kmeans1d", "KMeansResult", "FLOAT_DTYPES"]
