"""Greedy unit selection of spectral pruning (Suzuki et al. 2020, eq. 2): :func:`greedy_select`, its result and the checks of its arguments τ, θ and Z.

:func:`greedy_select` greedily minimizes
``L(J) = θ Tr[Σ_FF − Σ_FJ (Σ_JJ + I_τ)⁻¹ Σ_JF] + (1 − θ) Tr{Z [...] Zᵀ}`` by residual rank-one
updates (the ``popcomp::greedy_select`` op).
"""
from __future__ import annotations

import dataclasses
import math
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


def _exponent(a: float, span: int) -> int:
    """0 when ``a`` (a largest |entry|) is 0, non-finite or within [2^-span, 2^span], else the
    e with 2^(e-1) <= a < 2^e (the power of two that brings it near 1)."""
    if not (a > 0.0 and math.isfinite(a)):
        return 0
    e = math.frexp(a)[1]
    return e if abs(e) > span else 0


def _scale2(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t * 2^e`` (a new tensor), in steps that stay inside t's dtype's range (exact)."""
    while e:
        step = max(-60, min(60, e))
        t = t * math.ldexp(1.0, step)
        e -= step
    return t


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
    # Badly scaled Σ or Z would over- or underflow inside the kernels (squares of entries):
    # the selection is invariant to a positive scale of Σ with τ scaled alike, and a scale z
    # of Z is a change of θ (M = θ I + (1 − θ) z² Z'ᵀZ' ∝ θ' I + (1 − θ') Z'ᵀZ'); powers of
    # two keep every entry exact. The objective is mapped back.
    span = 20 if cov.dtype == torch.float32 else 100
    es = _exponent(float(cov.abs().max()), span)
    obj_scale = 1.0
    cov_s, tau_s, Z_s, theta_s = cov, tau, Z, theta
    if es:
        cov_s, tau_s = _scale2(cov, -es), _scale2(tau, -es)
        obj_scale = math.ldexp(1.0, es)
    if Z is not None and theta < 1.0:
        ez = _exponent(float(Z.abs().max()), span)
        if ez:
            Z_s = _scale2(Z, -ez)
            # M = θ I + (1 − θ) 2^(2 ez) Z'ᵀZ' = c (θ' I + (1 − θ') Z'ᵀZ'), c = θ + (1 − θ) 2^(2 ez)
            c = theta + (math.ldexp(1.0 - theta, 2 * ez) if 2 * ez < 1000 else math.inf)
            theta_s = theta / c if theta > 0.0 and math.isfinite(c) else 0.0
            obj_scale *= c
    idx, obj = torch.ops.popcomp.greedy_select(cov_s, k, tau_s, theta_s, Z_s)
    if obj_scale != 1.0:
        obj = obj * obj_scale
    L0 = float(cov.diagonal().to(torch.float64).sum())  # Tr Σ
    if Z is not None:
        Zd = Z.to(torch.float64)
        L0 = float(theta * L0 + (1 - theta) * ((Zd @ cov.to(torch.float64)) * Zd).sum())
    return GreedyResult(idx, obj, L0)
