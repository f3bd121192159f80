"""CPU and CUDA kernels of popcomp::sumsq_outer_acc, and the registration of its reference."""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, compiled, cuda_stream_args, num_threads
from .._ops import LIB
from .._reference.hessian import sumsq_outer_acc_reference
from .checks import check_sumsq_outer_acc


def _args(acc, g, x):
    B, R, T, out = g.shape
    return (
        g.data_ptr(), x.data_ptr(), acc.data_ptr(), B, R, T, out, x.shape[2],
        tuple(g.stride()), tuple(x.stride()), DTYPE_CODES[g.dtype], DTYPE_CODES[x.dtype],
    )


# T == 1 on CPU: floats of squared operands per chunk of samples (16 MiB, whatever B is)
_GEMM_CHUNK_FLOATS = 1 << 22


def _sumsq_gemm(acc, g, x):
    """T == 1: acc += (sum_r g^2)^T (x^2), an ordinary GEMM on squared operands, done by
    torch's BLAS (faster on CPU than the tiled kernel) over chunks of samples."""
    B, R, _, out = g.shape
    step = max(1, _GEMM_CHUNK_FLOATS // (R * out + x.shape[2]))
    for b0 in range(0, B, step):
        gs = g[b0 : b0 + step, :, 0].float().square()
        d = gs[:, 0] if R == 1 else gs.sum(1)
        acc.addmm_(d.t(), x[b0 : b0 + step, 0].float().square())


def sumsq_outer_acc_cpu(acc, g, x):
    C = compiled()
    if C is None:
        return sumsq_outer_acc_reference(acc, g, x)
    check_sumsq_outer_acc(acc, g, x)
    if g.numel() == 0 or x.numel() == 0:
        return None
    if g.shape[2] == 1:
        _sumsq_gemm(acc, g, x)
    else:
        C.sumsq_outer_cpu(*_args(acc, g, x), num_threads())
    return None


def sumsq_outer_acc_cuda(acc, g, x):
    C = compiled()
    if C is None or not C.has_cuda:
        return sumsq_outer_acc_reference(acc, g, x)
    check_sumsq_outer_acc(acc, g, x)  # before any device address reaches the kernel
    if g.numel() == 0 or x.numel() == 0:
        return None
    dev, stream = cuda_stream_args(acc)
    C.sumsq_outer_cuda(*_args(acc, g, x), dev, stream)
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_reference, "CompositeExplicitAutograd")
LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cpu, "CPU")
LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cuda, "CUDA")
