"""The spectral quantities of a covariance Σ (Suzuki et al. 2020, sec. 4.1): eigenvalues, degrees of freedom N̂(λ) and N̂′(λ; Z), leverage scores, the width ↔ λ rule of eq. (3) and the paper's default λ and τ.

Each quantity has one implementation here; :mod:`popcomp.spectral.prune` and
:mod:`popcomp.theory.suzuki2020` (whose ``width_for_lambda`` / ``lambda_for_width`` are aliases of
:func:`width_from_lambda` / :func:`lambda_from_width`) call these.

λ ranges over λ ≥ 0, as in the paper's eq. (3), ``λ_ℓ = inf{λ ≥ 0 | m♯ ≥ 5 N̂(λ) log(80 N̂(λ))}``,
whose condition is evaluated down to λ = 0. There ``N̂(0) = lim_{λ→0+} N̂(λ)`` = the number of
positive eigenvalues (the rank of Σ; eigenvalues at the rounding level of a singular Σ count),
and the leverage scores are their λ → 0+ limit too. Negative λ is refused.

The eigenvalue functions take the covariance ``(m, m)`` or, where only the eigenvalues enter
(N̂(λ), eq. 3), its eigenvalues ``(m,)``. Everything is computed in float64 on Σ's device;
eigenvalues below 0 (rounding) are clamped to 0.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import _validate as V

__all__ = [
    "DEFAULT_LAMBDA_REL", "EQ3_C1", "EQ3_C2", "check_covariance", "check_lambda", "eigh",
    "eigenvalues", "shrinkage", "degrees_of_freedom", "output_degrees_of_freedom",
    "leverage_scores", "leverage_from_eigh", "width_from_lambda", "lambda_from_width",
    "default_lambda", "paper_tau", "default_tau", "LEVERAGE_CONSTRAINT", "leverage_constraint",
]

DEFAULT_LAMBDA_REL = 1e-6  # the paper's λ = 1e-6 Tr Σ (sec. 5)
LEVERAGE_CONSTRAINT = 5.0 / 3.0  # Theorem 1: Σ_{j∈J} τ̃_j⁻¹ <= (5/3) m m♯
EQ3_C1 = 5.0  # eq. (3): m♯ >= c1 N(λ) log(c2 N(λ))
EQ3_C2 = 80.0

Lambda = Union[float, torch.Tensor]


# ---- checks ------------------------------------------------------------------------------------


def check_covariance(name: str, cov, dtypes=(torch.float32, torch.float64)) -> torch.Tensor:
    """``cov`` as a finite, symmetric ``(m, m)`` tensor of one of ``dtypes`` (m >= 1)."""
    cov = V.as_tensor(name, cov)
    if cov.dtype not in dtypes:
        raise TypeError(f"{name} must be float32 or float64, got {cov.dtype}")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name} must be a square (m, m) matrix, got shape {tuple(cov.shape)}")
    if cov.shape[0] == 0:
        raise ValueError(f"{name} must have at least one unit (m >= 1)")
    V.check_finite(name, cov)
    scale = float(cov.abs().max())
    asym = float((cov - cov.T).abs().max())
    tol = 1e3 * torch.finfo(cov.dtype).eps * max(scale, torch.finfo(cov.dtype).tiny)
    if asym > tol:
        raise ValueError(f"{name} must be symmetric (max |{name} - {name}^T| = {asym:.3g})")
    return cov


def check_lambda(lam, name: str = "lam") -> Lambda:
    """λ >= 0: a finite number (returned as a float) or a tensor / sequence of them (returned
    as a float64 tensor)."""
    if isinstance(lam, (torch.Tensor, list, tuple)) or getattr(lam, "ndim", 0) > 0:  # numpy arrays
        t = lam.to(torch.float64) if isinstance(lam, torch.Tensor) else torch.as_tensor(lam, dtype=torch.float64)
        V.check_finite(name, t)
        if t.numel() and bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0 (lambda ranges over [0, inf))")
        return t
    lam = V.check_real(name, lam)
    if lam < 0:
        raise ValueError(f"{name} must be >= 0 (lambda ranges over [0, inf)), got {lam}")
    return lam


def _scalar_lambda(lam, what: str) -> float:
    lam = check_lambda(lam)
    if isinstance(lam, torch.Tensor):
        raise TypeError(f"lam must be a number for {what}")
    return lam


# ---- eigenvalues -------------------------------------------------------------------------------


def eigh(cov, name: str = "cov") -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (float64, ascending, clamped at 0) and eigenvectors (columns) of the
    covariance ``cov`` ``(m, m)``."""
    S = check_covariance(name, cov).to(torch.float64)
    mu, U = torch.linalg.eigh(S)
    return mu.clamp(min=0.0), U


def eigenvalues(cov_or_eigs, name: str = "cov") -> torch.Tensor:
    """The eigenvalues μ̂_j of Σ (float64, clamped at 0): of a covariance ``(m, m)`` (ascending),
    or ``(m,)`` eigenvalues given directly (checked finite, kept in their order)."""
    t = cov_or_eigs
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a covariance matrix or its eigenvalues (a tensor), "
                            f"got {type(cov_or_eigs).__name__}") from None
    if t.dim() == 2:
        return torch.linalg.eigvalsh(check_covariance(name, t).to(torch.float64)).clamp(min=0.0)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a covariance (m, m) or its eigenvalues (m,), m >= 1; "
                         f"got shape {tuple(t.shape)}")
    V.check_float(name, t)
    V.check_finite(name, t)
    return t.to(torch.float64).clamp(min=0.0)


def shrinkage(mu: torch.Tensor, lam: Lambda) -> torch.Tensor:
    """``μ_j / (μ_j + λ)``, the eigenvalues of Σ(Σ + λI)⁻¹ (0 where μ_j = 0; at λ = 0 the
    limit λ → 0+: 1 where μ_j > 0). A tensor λ gives one row per λ: shape ``lam.shape + (m,)``."""
    lam = check_lambda(lam)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(mu.device).unsqueeze(-1)
        return torch.where(mu > 0, mu / (mu + lam), torch.zeros_like(mu))
    if lam == 0:
        return (mu > 0).to(mu.dtype)
    return mu / (mu + lam)


# ---- degrees of freedom and leverage -----------------------------------------------------------


def degrees_of_freedom(cov, lam: Lambda) -> Lambda:
    """``N̂(λ) = Tr[Σ(Σ + λI)⁻¹] = Σ_j μ̂_j / (μ̂_j + λ)`` (sec. 4.1), λ >= 0 (N̂(0) = rank Σ).

    ``cov`` is the covariance ``(m, m)`` or its eigenvalues ``(m,)``. A float ``lam`` gives a
    float; a tensor of λ's gives a float64 tensor of their shape (decreasing in λ).
    """
    lam = check_lambda(lam)
    d = shrinkage(eigenvalues(cov), lam)
    return d.sum(-1) if isinstance(lam, torch.Tensor) else float(d.sum())


def output_degrees_of_freedom(cov, lam, Z) -> float:
    """``N̂′(λ; Z) = Tr[Z Σ(Σ + λI)⁻¹ Zᵀ]`` (sec. 4.1) for ``Z`` of shape ``(p, m)``, λ >= 0."""
    mu, U = eigh(cov)
    Z = V.as_tensor("Z", Z)
    if Z.dim() != 2 or Z.shape[1] != mu.numel():
        raise ValueError(f"Z must have shape (p, {mu.numel()}), got {tuple(Z.shape)}")
    d = shrinkage(mu, _scalar_lambda(lam, "output_degrees_of_freedom"))
    ZU = Z.to(torch.float64).to(U.device) @ U
    return float(((ZU**2) * d[None, :]).sum())


def leverage_from_eigh(mu: torch.Tensor, U: torch.Tensor, lam: float) -> torch.Tensor:
    """:func:`leverage_scores` from an eigendecomposition ``(mu, U)`` of Σ (as :func:`eigh`)."""
    d = shrinkage(mu, lam)
    diag = (U**2 * d[None, :]).sum(1)  # [Σ(Σ + λI)⁻¹]_jj
    tot = float(diag.sum())  # = N̂(λ)
    if not tot > 0:
        return torch.full_like(diag, 1.0 / diag.numel())
    return diag / tot


def leverage_scores(cov, lam: float) -> torch.Tensor:
    """``τ̃_j = [Σ(Σ + λI)⁻¹]_jj / N̂(λ)`` (sec. 4.1; sums to 1), float64 ``(m,)``, λ >= 0.
    With ``N̂(λ) = 0`` (Σ = 0) the scores are uniform."""
    return leverage_from_eigh(*eigh(cov), _scalar_lambda(lam, "leverage_scores"))


# ---- eq. (3): width <-> lambda -----------------------------------------------------------------


def _eq3_needed(n: float, c1: float, c2: float) -> float:
    """``c1 N log(c2 N)``, the width eq. (3) asks for (0 where c2 N <= 1: log <= 0)."""
    return c1 * n * math.log(c2 * n) if c2 * n > 1 else 0.0


def width_from_lambda(cov, lam: float, c1: float = EQ3_C1, c2: float = EQ3_C2) -> int:
    """The smallest width ``m♯ >= c1 N̂(λ) log(c2 N̂(λ))`` (eq. 3 read from λ to m♯; the paper's
    c1 = 5, c2 = 80), clipped to ``[1, m]``. ``cov``: the covariance or its eigenvalues."""
    mu = eigenvalues(cov)
    need = _eq3_needed(float(shrinkage(mu, _scalar_lambda(lam, "width_from_lambda")).sum()), c1, c2)
    return int(min(max(1, math.ceil(need - 1e-9)), mu.numel()))


def lambda_from_width(cov, width: int, c1: float = EQ3_C1, c2: float = EQ3_C2,
                      rtol: float = 1e-10, max_iter: int = 400) -> float:
    """eq. (3): ``λ = inf{λ >= 0 : m♯ >= c1 N̂(λ) log(c2 N̂(λ))}`` for the width ``m♯ = width``.

    N̂ decreases in λ, so the infimum is found by bisection (in log λ once the bracket is
    positive) to the relative tolerance ``rtol`` (at most ``max_iter`` steps); the returned λ
    satisfies the condition. Returns 0 when the width satisfies it at λ = 0 already.
    ``cov``: the covariance or its eigenvalues.
    """
    mu = eigenvalues(cov)
    width = V.check_int("width", width, lo=1)
    max_iter = V.check_int("max_iter", max_iter, lo=1)

    def ok(lam: float) -> bool:
        return width >= _eq3_needed(float(shrinkage(mu, lam).sum()), c1, c2)

    if ok(0.0):
        return 0.0
    hi = max(float(mu.max()), 1e-300)
    while not ok(hi):
        hi *= 2.0
    lo = hi * 1e-30
    if ok(lo):
        lo = 0.0
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
        if ok(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= rtol * hi:
            break
    return hi


# ---- the paper's defaults ----------------------------------------------------------------------


def default_lambda(cov, rel: float = DEFAULT_LAMBDA_REL) -> float:
    """The paper's ``λ = rel · Tr Σ`` (sec. 5: rel = 1e-6; Table 1: 1e-3). ``cov``: the
    covariance (its trace) or its eigenvalues (their sum)."""
    rel = V.check_real("rel", rel, lo=0.0)
    if isinstance(cov, torch.Tensor) and cov.dim() == 2:
        return float(rel * check_covariance("cov", cov).to(torch.float64).diagonal().sum())
    return float(rel * eigenvalues(cov).sum())


def paper_tau(width: int, lam: float, leverage: torch.Tensor) -> torch.Tensor:
    """The ridge of Theorem 1, ``τ = m♯ λ τ̃`` (τ̃: the leverage scores at λ)."""
    return width * lam * leverage


def default_tau(cov, width: int, lam: Optional[float] = None,
                lam_rel: float = DEFAULT_LAMBDA_REL) -> torch.Tensor:
    """The paper's ridge ``τ = m♯ λ τ̃(λ)`` (Theorem 1), float64 ``(m,)``; ``λ`` defaults to
    ``lam_rel · Tr Σ``."""
    if lam is None:
        lam = default_lambda(cov, lam_rel)
    return paper_tau(width, lam, leverage_scores(cov, lam))


def leverage_constraint(leverage: torch.Tensor, indices, width: Optional[int] = None) -> Tuple[float, float]:
    """Theorem 1's constraint on the chosen units J: ``(Σ_{j∈J} τ̃_j⁻¹, (5/3) m m♯)``, with m the
    layer's width (``leverage.numel()``) and m♯ = ``width`` (default ``len(indices)``). The
    selection satisfies the theorem's assumption when the first is <= the second. Units with
    τ̃_j = 0 (up to 1e-12 of the largest score: units that never activate on the data) are
    left out of the sum, as the paper says ("we just need to neglect such a node")."""
    lev = leverage.detach().to(torch.float64).flatten()
    idx = torch.as_tensor(indices, dtype=torch.long, device=lev.device).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= lev.numel()):
        raise ValueError(f"indices must lie in 0..{lev.numel() - 1}")
    t = lev[idx]
    t = t[t > 1e-12 * float(lev.max())] if lev.numel() else t
    total = float((1.0 / t).sum())
    m_sharp = int(idx.numel() if width is None else width)
    return total, LEVERAGE_CONSTRAINT * lev.numel() * m_sharp
