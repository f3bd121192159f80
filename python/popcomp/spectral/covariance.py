"""Covariance accumulation for spectral pruning: the public wrappers of the ``popcomp::covariance_accumulate`` op.

* :func:`covariance_accumulate` streams ``acc += XᵀX`` (and the sample count) over batches of
  activations, reading float32/16/bf16 activations in place (no upcast copy).
* :class:`CovarianceAccumulator` wraps it for a whole pass over the data, all-reduces across
  ranks when ``torch.distributed`` is initialized, and returns the non-centered covariance
  ``Σ = (1/n) Σ_i φ(x_i) φ(x_i)ᵀ`` (Suzuki et al. 2020, sec. 2.1).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _validate as V
from .._model import all_reduce_sum

__all__ = ["covariance_accumulate", "CovarianceAccumulator", "all_reduce_covariance"]

_ACC_DTYPES = (torch.float32, torch.float64)


def _sample_view(x: torch.Tensor, channel_dim: Optional[int]) -> torch.Tensor:
    """The (N, m) or (B, m, S) view the op reads (a view whenever the layout allows)."""
    if x.dim() < 2:
        raise ValueError(f"x must have a sample dimension and a channel dimension (N, m) or "
                         f"(B, C, *spatial), got shape {tuple(x.shape)}")
    if channel_dim is not None:
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}")
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(f"channel_dim must be in {-x.dim()}..{x.dim() - 1} for {x.dim()}-D x, "
                             f"got {channel_dim}")
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
    """``acc += XᵀX`` over the samples of ``x`` and ``count += number of samples``.

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
    ``Σ = acc / n`` after an all-reduce over ranks (when torch.distributed is initialized).
    Like :func:`covariance_accumulate`, neither checks for NaN/Inf: a non-finite activation
    gives a non-finite ``Σ``.
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
        """``Σ = acc / n``; with ``all_reduce`` the sums of every rank (the running sums are
        not modified)."""
        if self.acc is None:
            raise ValueError("no data was accumulated")
        acc, count = self.acc, self.count
        if all_reduce:
            acc, count = all_reduce_covariance(acc, count)
        n = int(count)
        if n == 0:
            raise ValueError("no samples were accumulated")
        return acc / n


def all_reduce_covariance(acc: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``acc`` and ``count`` summed over the ranks when torch.distributed is initialized
    (copies; :func:`popcomp._model.all_reduce_sum`)."""
    (acc, count), _ = all_reduce_sum([acc, count])
    return acc, count
