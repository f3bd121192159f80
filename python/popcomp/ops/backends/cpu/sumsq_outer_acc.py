"""The CPU kernel of popcomp::sumsq_outer_acc (the compiled core; torch's BLAS for T = 1)."""
from __future__ import annotations

import torch

from ...._backend import DTYPE_CODES, compiled, num_threads
from ..._library import LIB
from ...checks import check_sumsq_outer_acc
from .. import compiled_args

# T == 1: floats of squared operands per chunk of samples (16 MiB, whatever B is)
_GEMM_CHUNK_FLOATS = 1 << 22
# T > 1: the compiled kernel does a 64 x 256 x 64 tile update per (sample, column, 64
# positions), whatever out and in are. Where that is more than _PAD_WASTE times the useful
# products (small out and in: first convolutions, in = C_in * k * k = 27, 54) and T is long
# enough to amortize torch's per-call costs, torch's batched GEMM per chunk of samples is
# faster (measured 2-16x at out 8-16, in 27-54, T >= 1024; the kernel stays faster at out 32-64
# or T = 64).
_PAD_WASTE = 16
_BMM_MIN_T = 256


def _sumsq_gemm(acc, g, x):
    """T == 1: acc += (sum_r g^2)^T (x^2), an ordinary GEMM on squared operands, done by
    torch's BLAS (faster on CPU than the tiled kernel) over chunks of samples."""
    B, R, _, out = g.shape
    step = max(1, _GEMM_CHUNK_FLOATS // (R * out + x.shape[2]))
    for b0 in range(0, B, step):  # in acc's dtype (float32, or float64 with float64 operands)
        gs = g[b0 : b0 + step, :, 0].to(acc.dtype).square()
        d = gs[:, 0] if R == 1 else gs.sum(1)
        acc.addmm_(d.t(), x[b0 : b0 + step, 0].to(acc.dtype).square())


def _prefer_bmm(T: int, out: int, n_in: int) -> bool:
    """Whether the batched GEMM beats the tiled kernel (see _PAD_WASTE)."""
    tiles = -(-T // 64) * -(-out // 64) * -(-n_in // 256) * (64 * 64 * 256)
    return T >= _BMM_MIN_T and tiles > _PAD_WASTE * T * out * n_in


def _sumsq_bmm(acc, g, x):
    """Small out x in: the per-sample products M[b, r] = g[b, r]^T x[b] by torch's batched GEMM
    (in acc's dtype) over chunks of samples holding at most _GEMM_CHUNK_FLOATS products, then
    acc += sum_{b, r} M^2."""
    B, R, T, out = g.shape
    n_in = x.shape[2]
    step = max(1, _GEMM_CHUNK_FLOATS // (R * out * n_in + R * T * out + T * n_in))
    for b0 in range(0, B, step):
        gb = g[b0 : b0 + step].to(acc.dtype).transpose(2, 3)  # (b, R, out, T)
        m = torch.matmul(gb, x[b0 : b0 + step].to(acc.dtype).unsqueeze(1))  # (b, R, out, in)
        acc.add_(m.square_().sum((0, 1)))


def sumsq_outer_acc_cpu(acc, g, x):
    check_sumsq_outer_acc(acc, g, x)
    if g.numel() == 0 or x.numel() == 0:
        return None
    if g.shape[2] == 1:
        _sumsq_gemm(acc, g, x)
        return None
    if _prefer_bmm(g.shape[2], g.shape[3], x.shape[2]):
        _sumsq_bmm(acc, g, x)
        return None
    C = compiled()
    code = DTYPE_CODES[acc.dtype]  # float32, or float64 (then g and x are float64 too)
    compiled_args.sumsq_outer_acc(
        acc, g, x,
        lambda **kwargs: C.sumsq_outer_cpu(**kwargs, num_threads=num_threads(), acc_dtype=code)
    )
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cpu, "CPU")
