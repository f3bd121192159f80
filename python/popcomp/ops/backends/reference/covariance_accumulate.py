"""The pure-torch reference of popcomp::covariance_accumulate (the test oracle), and its default
kernel: one matmul in the accumulator dtype, written independently of the compiled kernels."""
from __future__ import annotations

import torch

from ..._library import LIB
from ...checks import check_covariance_accumulate


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """(N, m) or (B, m, S) -> (N, m) samples (a copy for the 3-D layout)."""
    if x.dim() == 2:
        return x
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def covariance_accumulate_reference(x, acc, count):
    """acc += x^T x over the samples of x, count += their number."""
    xs = as_samples(x).to(acc.dtype)
    acc.add_(xs.T @ xs)
    count.add_(xs.shape[0])


def covariance_accumulate_default(x, acc, count):
    """The default kernel (every device without its own): the checks, then the reference."""
    check_covariance_accumulate(x, acc, count)
    covariance_accumulate_reference(x, acc, count)


LIB.impl("covariance_accumulate", covariance_accumulate_default, "CompositeExplicitAutograd")
