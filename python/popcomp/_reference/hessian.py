"""Pure-torch reference of popcomp::sumsq_outer_acc (the test oracle and the default kernel)."""
from __future__ import annotations

import torch


def check_sumsq_args(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    if acc.dtype != torch.float32 or acc.dim() != 2 or not acc.is_contiguous():
        raise ValueError(f"acc must be a contiguous 2-D float32 tensor, got {acc.dtype} {tuple(acc.shape)}")
    if g.dim() != 4:
        raise ValueError(f"g must be 4-D (B, R, T, out), got shape {tuple(g.shape)}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, T, in), got shape {tuple(x.shape)}")
    for name, t in (("g", g), ("x", x)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != acc.device:
            raise ValueError(f"{name} is on {t.device} but acc is on {acc.device}")
    B, R, T, out = g.shape
    if x.shape[0] != B or x.shape[1] != T:
        raise ValueError(f"g (B, R, T, out) = {tuple(g.shape)} and x (B, T, in) = {tuple(x.shape)} disagree on B or T")
    if acc.shape != (out, x.shape[2]):
        raise ValueError(f"acc must have shape (out, in) = {(out, x.shape[2])}, got {tuple(acc.shape)}")


def sumsq_outer_acc_reference(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    check_sumsq_args(acc, g, x)
    for b in range(g.shape[0]):
        m = torch.einsum("rto,ti->roi", g[b].float(), x[b].float())
        acc.add_(m.square().sum(0))
