"""The pure-torch reference of popcomp::sumsq_outer_acc (the test oracle), and its default kernel."""
from __future__ import annotations

import torch

from ..._library import LIB
from ...checks import check_sumsq_outer_acc


def sumsq_outer_acc_reference(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc[o, i] += sum_b sum_r (sum_t g[b, r, t, o] x[b, t, i])^2, one einsum per sample, in
    acc's dtype (float32, or float64 for float64 operands)."""
    for b in range(g.shape[0]):
        m = torch.einsum("rto,ti->roi", g[b].to(acc.dtype), x[b].to(acc.dtype))
        acc.add_(m.square().sum(0))


def sumsq_outer_acc_default(acc, g, x):
    """The default kernel (every device without its own): the checks, then the reference."""
    check_sumsq_outer_acc(acc, g, x)
    sumsq_outer_acc_reference(acc, g, x)


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_default, "CompositeExplicitAutograd")
