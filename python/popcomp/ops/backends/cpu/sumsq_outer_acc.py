"""The CPU kernel of popcomp::sumsq_outer_acc (the compiled core; torch's BLAS for T = 1)."""
from __future__ import annotations

from ...._backend import DTYPE_CODES, compiled, num_threads
from ..._library import LIB
from ...checks import check_sumsq_outer_acc
from .. import compiled_args

# T == 1: floats of squared operands per chunk of samples (16 MiB, whatever B is)
_GEMM_CHUNK_FLOATS = 1 << 22


def _sumsq_gemm(acc, g, x):
    """T == 1: acc += (sum_r g^2)^T (x^2), an ordinary GEMM on squared operands, done by
    torch's BLAS (faster on CPU than the tiled kernel) over chunks of samples."""
    B, R, _, out = g.shape
    step = max(1, _GEMM_CHUNK_FLOATS // (R * out + x.shape[2]))
    for b0 in range(0, B, step):  # in acc's dtype (float32, or float64 with float64 operands)
        gs = g[b0 : b0 + step, :, 0].to(acc.dtype).square()
        d = gs[:, 0] if R == 1 else gs.sum(1)
        acc.addmm_(d.t(), x[b0 : b0 + step, 0].to(acc.dtype).square())


def sumsq_outer_acc_cpu(acc, g, x):
    check_sumsq_outer_acc(acc, g, x)
    if g.numel() == 0 or x.numel() == 0:
        return None
    if g.shape[2] == 1:
        _sumsq_gemm(acc, g, x)
        return None
    C = compiled()
    code = DTYPE_CODES[acc.dtype]  # float32, or float64 (then g and x are float64 too)
    compiled_args.sumsq_outer_acc(
        acc, g, x,
        lambda **kwargs: C.sumsq_outer_cpu(**kwargs, num_threads=num_threads(), acc_dtype=code)
    )
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cpu, "CPU")
