"""Reconstruction of a layer's input from its kept units (Suzuki et al. 2020, eq. 1, sec. 3.1): the decoder ``Â_J = Σ_FJ (Σ_JJ + I_τ)⁻¹``, its error ``L_τ^θ(J)``, the next layer's weight ``W♯ = W[:, F] Â_J`` and the output matrix Z.
"""
from __future__ import annotations

from typing import Optional

import torch

from .greedy import check_tau, check_theta
from .quantities import check_covariance

__all__ = ["reconstruction", "reconstruction_error", "pruned_next_weight", "output_matrix"]


def _cov64(cov) -> torch.Tensor:
    return check_covariance("cov", cov).to(torch.float64)


def _as_index(J, m: int, device) -> torch.Tensor:
    J = torch.as_tensor(J, dtype=torch.int64, device=device).reshape(-1)
    if J.numel() == 0:
        raise ValueError("J must hold at least one index")
    if bool((J < 0).any()) or bool((J >= m).any()):
        raise ValueError(f"J must hold indices in [0, {m})")
    return J


def _ridge_gram(S: torch.Tensor, J, tau):
    """(J as an index tensor, ``Σ_JJ + I_τ``) for the float64 covariance ``S``."""
    m = S.shape[0]
    J = _as_index(J, m, S.device)
    t = check_tau(tau, m, S.device)[J]
    return J, S[J][:, J] + torch.diag(t)


def reconstruction(cov: torch.Tensor, J, tau=0.0) -> torch.Tensor:
    """``Â_J = Σ_FJ (Σ_JJ + I_τ)⁻¹``: ``(m, |J|)`` float64 decoder of ``φ`` from ``φ_J``
    (eq. 1). ``tau`` is a scalar or the ``(m,)`` vector of all units (indexed by J).
    A singular ``Σ_JJ + I_τ`` uses the pseudo-inverse."""
    S = _cov64(cov)
    J, G = _ridge_gram(S, J, tau)
    B = S[J]  # (|J|, m) = Σ_JF
    try:
        X, info = torch.linalg.solve_ex(G, B)
        if int(info) != 0 or not bool(torch.isfinite(X).all()):
            raise RuntimeError
    except RuntimeError:
        X = torch.linalg.pinv(G, hermitian=True) @ B
    return X.T.contiguous()


def reconstruction_error(cov: torch.Tensor, J, tau=0.0, Z: Optional[torch.Tensor] = None,
                         theta: float = 1.0) -> float:
    """``L_τ^θ(J) = θ Tr R + (1 − θ) Tr[Z R Zᵀ]``, ``R = Σ − Σ_FJ (Σ_JJ + I_τ)⁻¹ Σ_JF``, by the
    closed form (explicit pseudo-inverse; for checks and reports). Without Z: ``Tr R``."""
    S = _cov64(cov)
    J, G = _ridge_gram(S, J, tau)
    R = S - S[:, J] @ torch.linalg.pinv(G, hermitian=True) @ S[J]
    theta = check_theta(theta)
    if Z is None:
        return float(R.diagonal().sum())
    Zd = Z.to(torch.float64).to(S.device)
    return float(theta * R.diagonal().sum() + (1 - theta) * ((Zd @ R) * Zd).sum())


def pruned_next_weight(W_next: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``W♯ = W_next[:, F] Â_J`` for a Linear ``(out, m)``, a Conv ``(out, m, *kernel)`` or a
    Linear after Flatten viewed as ``(out, m, positions)``; returned in ``W_next``'s dtype."""
    if W_next.shape[1] != A.shape[0]:
        raise ValueError(f"W_next has {W_next.shape[1]} input units but A has {A.shape[0]} rows")
    Wd = W_next.to(torch.float64)
    Ad = A.to(torch.float64).to(Wd.device)
    out = torch.einsum("oc...,cj->oj...", Wd, Ad)
    return out.to(W_next.dtype)


def output_matrix(W_next: torch.Tensor, m: int, keep_next: Optional[torch.Tensor] = None,
                  leverage_next: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paper's ``Z`` (sec. 3.1): rows ``√(m q_j) / max_j' ‖W_j',:‖ · W_j,:`` for the
    kept next units ``j`` (``keep_next``; None: all), ``q_j`` proportional to the inverse
    next-layer leverage scores over them (None: uniform). ``W_next`` is ``(out, m)``,
    ``(out, m, *kernel)`` or ``(out, m, positions)``; each output unit contributes one row per
    kernel position / position. Returns float64 ``(rows, m)``."""
    Wd = W_next.to(torch.float64)
    out = Wd.shape[0]
    W3 = Wd.reshape(out, Wd.shape[1], -1)  # (out, m, P)
    norms = W3.reshape(out, -1).norm(dim=1)
    mx = float(norms.max()) if out else 0.0
    if keep_next is None:
        keep_next = torch.arange(out, device=Wd.device)
    keep_next = keep_next.to(Wd.device)
    if leverage_next is None:
        inv = torch.ones(keep_next.numel(), dtype=torch.float64, device=Wd.device)
    else:
        lev = leverage_next.to(torch.float64).to(Wd.device)[keep_next]
        inv = 1.0 / lev.clamp(min=torch.finfo(torch.float64).tiny)
    q = inv / inv.sum()
    scale = torch.sqrt(m * q) / (mx if mx > 0 else 1.0)
    rows = W3[keep_next] * scale[:, None, None]  # (k, m, P)
    return rows.permute(0, 2, 1).reshape(-1, Wd.shape[1]).contiguous()
