"""Greedy unit selection of spectral pruning (Suzuki et al. 2020, eq. 2): :func:`greedy_select`, its result and the checks of its arguments τ, θ and Z.

:func:`greedy_select` greedily minimizes
``L(J) = θ Tr[Σ_FF − Σ_FJ (Σ_JJ + I_τ)⁻¹ Σ_JF] + (1 − θ) Tr{Z [...] Zᵀ}`` by residual rank-one
updates (the ``popcomp::greedy_select`` op).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .. import _validate as V
from .quantities import check_covariance, default_tau

__all__ = ["GreedyResult", "greedy_select", "check_tau", "check_theta", "check_Z"]


@dataclasses.dataclass
class GreedyResult:
    """indices: the chosen units in the order of selection (int64, ``(k,)``).
    objective: ``L_τ^θ`` after each step (float64, ``(k,)``); non-increasing.
    initial_objective: ``L(∅) = θ Tr Σ + (1 − θ) Tr[Z Σ Zᵀ]``."""

    indices: torch.Tensor
    objective: torch.Tensor
    initial_objective: float


def check_tau(tau, m: int, device) -> torch.Tensor:
    """The ridge τ >= 0, a number or ``(m,)`` (or 0-d) tensor, as a float64 ``(m,)`` tensor on ``device``."""
    if isinstance(tau, (int, float)) and not isinstance(tau, bool):
        t = V.check_real("tau", tau)
        if t < 0:
            raise ValueError(f"tau must be non-negative, got {tau}")
        return torch.full((m,), t, dtype=torch.float64, device=device)
    tau = V.as_tensor("tau", tau)
    V.check_float("tau", tau)
    if tau.dim() == 0:
        tau = tau.expand(m)
    if tau.shape != (m,):
        raise ValueError(f"tau must be a scalar or have shape ({m},), got {tuple(tau.shape)}")
    V.check_finite("tau", tau)
    V.check_nonnegative("tau", tau)
    return tau.to(device=device, dtype=torch.float64)


def check_theta(theta) -> float:
    """θ in [0, 1], as a float."""
    theta = V.check_real("theta", theta)
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    return theta


def check_Z(Z, m: int, cov: torch.Tensor) -> Optional[torch.Tensor]:
    """The output matrix Z ``(p, m)`` (None: Z = I) in ``cov``'s dtype."""
    if Z is None:
        return None
    Z = V.as_tensor("Z", Z)
    V.check_float("Z", Z)
    if Z.dim() != 2 or Z.shape[1] != m:
        raise ValueError(f"Z must have shape (p, {m}) (width = the size of cov), got {tuple(Z.shape)}")
    V.check_same_device("Z", Z, "cov", cov)
    V.check_finite("Z", Z)
    return Z.to(cov.dtype)


def greedy_select(
    cov: torch.Tensor,
    k: int,
    tau: Union[None, float, torch.Tensor] = None,
    theta: float = 1.0,
    Z: Optional[torch.Tensor] = None,
) -> GreedyResult:
    """Greedy spectral-pruning selection of ``k`` of the ``m`` units (Suzuki et al. eq. 2).

    Each step adds the unit that lowers
    ``L(J) = Tr[M (Σ − Σ_FJ (Σ_JJ + I_τ)⁻¹ Σ_JF)]``, ``M = θ I + (1 − θ) ZᵀZ``, the most
    (ties to the lowest index), using residual rank-one updates (O(k m²), no inverse).

    Args:
        cov: ``(m, m)`` symmetric covariance, float32 or float64 (the kernels compute in its
            dtype, with float64 vectors).
        k: number of units to keep, ``1 <= k <= m``.
        tau: the ridge ``τ`` (``(m,)`` or a scalar, >= 0). None: the paper's default
            ``τ = k λ τ̃`` with ``λ = 1e-6 Tr Σ`` (:func:`popcomp.spectral.default_tau`).
        theta: weight of the input information loss, in [0, 1].
        Z: ``(p, m)`` output matrix of the output information loss; None stands for
            ``Z = I`` (then ``L = Tr`` of the residual for every θ).

    Returns a :class:`GreedyResult`: the ``k`` distinct indices in the order chosen and the
    objective after each step. A unit whose residual variance has fallen to
    ``1e3 · eps(dtype) · Σ_jj`` or below (already explained by the chosen units) and whose
    ``τ_j`` is that small too (``τ_j = 0`` included) scores 0: its gain would be rounding
    noise over rounding noise. Once every remaining gain is 0 the lowest remaining indices
    follow in order.
    """
    cov = check_covariance("cov", cov)
    m = cov.shape[0]
    k = V.check_int("k", k, lo=1, hi=m)
    theta = check_theta(theta)
    Z = check_Z(Z, m, cov)
    if tau is None:
        tau = default_tau(cov, k)
    tau = check_tau(tau, m, cov.device)
    idx, obj = torch.ops.popcomp.greedy_select(cov, k, tau, theta, Z)
    L0 = float(cov.diagonal().to(torch.float64).sum())  # Tr Σ
    if Z is not None:
        Zd = Z.to(torch.float64)
        L0 = float(theta * L0 + (1 - theta) * ((Zd @ cov.to(torch.float64)) * Zd).sum())
    return GreedyResult(idx, obj, L0)
