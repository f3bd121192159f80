"""Covariance accumulation and greedy unit selection for spectral pruning (Suzuki et al. 2020).

* :func:`covariance_accumulate` streams ``acc += X^T X`` (and the sample count) over batches of
  activations, reading float32/16/bf16 activations in place (no upcast copy).
* :class:`CovarianceAccumulator` wraps it for a whole pass over the data, all-reduces across
  ranks when ``torch.distributed`` is initialized, and returns the non-centered covariance
  ``Sigma = (1/n) sum_i phi(x_i) phi(x_i)^T``.
* :func:`greedy_select` greedily minimizes
  ``L(J) = theta Tr[Sigma_FF - Sigma_FJ (Sigma_JJ + I_tau)^-1 Sigma_JF]
  + (1 - theta) Tr{Z [...] Z^T}`` by residual rank-one updates (eq. 2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch

from . import _validate as V

_ACC_DTYPES = (torch.float32, torch.float64)


def _sample_view(x: torch.Tensor, channel_dim: Optional[int]) -> torch.Tensor:
    """The (N, m) or (B, m, S) view the op reads (a view whenever the layout allows)."""
    if x.dim() == 1:
        raise ValueError(f"x must have a sample dimension, got shape {tuple(x.shape)}")
    if x.dim() == 2:
        if channel_dim not in (None, 1, -1):
            raise ValueError("for 2-D x (N, m) the channel dimension is the last one")
        return x
    cd = 1 if channel_dim is None else channel_dim % x.dim()
    if cd == x.dim() - 1:  # features last: every leading index is a sample
        return x.reshape(-1, x.shape[-1])
    if cd != 1:
        raise ValueError(f"channel_dim must be 1 or the last dimension, got {channel_dim}")
    # (B, C, *spatial): every spatial position is a sample (sizes spelled out: B = 0 is fine)
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def covariance_accumulate(
    x: torch.Tensor,
    acc: Optional[torch.Tensor] = None,
    count: Optional[torch.Tensor] = None,
    *,
    dtype: torch.dtype = torch.float32,
    channel_dim: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``acc += X^T X`` over the samples of ``x`` and ``count += number of samples``.

    Args:
        x: activations. ``(N, m)``: N samples of m units. ``(B, C, H, W)`` (or any
            ``(B, C, *spatial)``): the covariance is over the C channels and every spatial
            position is a sample (the input of a Conv2d). With ``channel_dim=-1`` a
            ``(..., m)`` tensor is read as ``prod(...)`` samples. float32/16, bfloat16 or
            float64; read in place, never upcast as a whole.
        acc: ``(m, m)`` float32 or float64 accumulator, updated in place; None starts one of
            zeros with ``dtype``.
        count: 0-d int64 tensor, updated in place; None starts at 0.
        dtype: accumulator dtype when ``acc`` is None (float32 or float64).
        channel_dim: see ``x``.

    Returns:
        ``(acc, count)``. ``acc / count`` is the non-centered covariance.

    ``x`` is not checked for NaN/Inf (that would cost a second pass over the activations):
    non-finite values propagate into ``acc`` (the rows and columns of their units), and the
    squares of activations beyond ~1.8e19 overflow a float32 ``acc`` to Inf. Check the
    accumulated matrix once at the end, e.g. ``torch.isfinite(acc).all()``, as
    :func:`popcomp.spectral_prune` does for every layer after calibration.
    """
    x = V.as_tensor("x", x)
    V.check_float("x", x)
    xv = _sample_view(x, channel_dim)
    m = xv.shape[1]
    if acc is None:
        if dtype not in _ACC_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        acc = torch.zeros((m, m), dtype=dtype, device=x.device)
    else:
        acc = V.as_tensor("acc", acc)
        if acc.dtype not in _ACC_DTYPES:
            raise TypeError(f"acc must be float32 or float64, got {acc.dtype}")
        if acc.shape != (m, m):
            raise ValueError(f"acc must have shape ({m}, {m}) for x with {m} channels, got {tuple(acc.shape)}")
        V.check_same_device("acc", acc, "x", x)
    if count is None:
        count = torch.zeros((), dtype=torch.int64, device=x.device)
    else:
        count = V.as_tensor("count", count)
        if count.dtype != torch.int64 or count.dim() != 0:
            raise TypeError(f"count must be a 0-d int64 tensor, got {count.dtype} with shape {tuple(count.shape)}")
        V.check_same_device("count", count, "x", x)
    torch.ops.popcomp.covariance_accumulate(xv, acc, count)
    return acc, count


class CovarianceAccumulator:
    """Streams :func:`covariance_accumulate` over batches; ``covariance()`` gives
    ``Sigma = acc / n`` after an all-reduce over ranks (when torch.distributed is initialized).
    Like :func:`covariance_accumulate`, neither checks for NaN/Inf: a non-finite activation
    gives a non-finite ``Sigma``.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, channel_dim: Optional[int] = None):
        if dtype not in _ACC_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.channel_dim = channel_dim
        self.acc: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        self.acc, self.count = covariance_accumulate(
            x.detach(), self.acc, self.count, dtype=self.dtype, channel_dim=self.channel_dim
        )

    def covariance(self, all_reduce: bool = True) -> torch.Tensor:
        if self.acc is None:
            raise ValueError("no data was accumulated")
        acc, count = self.acc, self.count
        if all_reduce:
            acc, count = all_reduce_covariance(acc, count)
        n = int(count)
        if n == 0:
            raise ValueError("no samples were accumulated")
        return acc / n


def all_reduce_covariance(acc: torch.Tensor, count: torch.Tensor):
    """Sums ``acc`` and ``count`` over ranks when torch.distributed is initialized (copies)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        acc = acc.clone()
        count = count.clone()
        dist.all_reduce(acc)
        dist.all_reduce(count)
    return acc, count


@dataclasses.dataclass
class GreedyResult:
    """indices: the chosen units in the order of selection (int64, ``(k,)``).
    objective: ``L_tau^theta`` after each step (float64, ``(k,)``); non-increasing.
    initial_objective: ``L(empty set) = theta Tr Sigma + (1 - theta) Tr[Z Sigma Z^T]``."""

    indices: torch.Tensor
    objective: torch.Tensor
    initial_objective: float


def check_covariance(name: str, cov: torch.Tensor, dtypes=(torch.float32, torch.float64)) -> torch.Tensor:
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


def check_tau(tau, m: int, device) -> torch.Tensor:
    if isinstance(tau, (int, float)) and not isinstance(tau, bool):
        t = V.check_real("tau", tau, lo=None)
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
    theta = V.check_real("theta", theta)
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    return theta


def check_Z(Z, m: int, cov: torch.Tensor) -> Optional[torch.Tensor]:
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
    ``L(J) = Tr[M (Sigma - Sigma_FJ (Sigma_JJ + I_tau)^-1 Sigma_JF)]``,
    ``M = theta I + (1 - theta) Z^T Z``, the most (ties to the lowest index), using residual
    rank-one updates (O(k m^2), no inverse).

    Args:
        cov: ``(m, m)`` symmetric covariance, float32 or float64 (the kernels compute in its
            dtype, with float64 vectors).
        k: number of units to keep, ``1 <= k <= m``.
        tau: the ridge ``tau`` (``(m,)`` or a scalar, >= 0). None: the paper's default
            ``tau = k * lambda * leverage`` with ``lambda = 1e-6 Tr Sigma``
            (:func:`popcomp.prune.default_tau`).
        theta: weight of the input information loss, in [0, 1].
        Z: ``(p, m)`` output matrix of the output information loss; None stands for
            ``Z = I`` (then ``L = Tr`` of the residual for every theta).

    Returns a :class:`GreedyResult`: the ``k`` distinct indices in the order chosen and the
    objective after each step. A unit whose residual variance has fallen to
    ``1e3 * eps(dtype) * Sigma_jj`` or below (already explained by the chosen units) and whose
    ``tau_j`` is that small too (``tau_j = 0`` included) scores 0: its gain would be rounding
    noise over rounding noise. Once every remaining gain is 0 the
    lowest remaining indices follow in order.
    """
    cov = check_covariance("cov", cov)
    m = cov.shape[0]
    k = V.check_int("k", k, lo=1, hi=m)
    theta = check_theta(theta)
    Z = check_Z(Z, m, cov)
    if tau is None:
        from .prune import default_tau

        tau = default_tau(cov, k)
    tau = check_tau(tau, m, cov.device)
    idx, obj = torch.ops.popcomp.greedy_select(cov, k, tau, theta, Z)
    if Z is None:
        L0 = float(cov.diagonal().to(torch.float64).sum())
    else:
        Zd = Z.to(torch.float64)
        L0 = float(theta * cov.diagonal().to(torch.float64).sum()
                   + (1 - theta) * ((Zd @ cov.to(torch.float64)) * Zd).sum())
    return GreedyResult(idx, obj, L0)


__all__ = [
    "covariance_accumulate",
    "CovarianceAccumulator",
    "all_reduce_covariance",
    "greedy_select",
    "GreedyResult",
]
