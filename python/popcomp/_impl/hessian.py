"""CPU and CUDA kernels of popcomp::sumsq_outer_acc, and the registration of its reference."""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, compiled, cuda_stream_args, num_threads
from .._ops import LIB
from .._reference.hessian import check_sumsq_args, sumsq_outer_acc_reference


def _args(acc, g, x):
    B, R, T, out = g.shape
    return (
        g.data_ptr(), x.data_ptr(), acc.data_ptr(), B, R, T, out, x.shape[2],
        tuple(g.stride()), tuple(x.stride()), DTYPE_CODES[g.dtype], DTYPE_CODES[x.dtype],
    )


def sumsq_outer_acc_cpu(acc, g, x):
    C = compiled()
    if C is None:
        return sumsq_outer_acc_reference(acc, g, x)
    check_sumsq_args(acc, g, x)
    if g.numel() == 0 or x.numel() == 0:
        return None
    C.sumsq_outer_cpu(*_args(acc, g, x), num_threads())
    return None


def sumsq_outer_acc_cuda(acc, g, x):
    C = compiled()
    if C is None or not C.has_cuda:
        return sumsq_outer_acc_reference(acc, g, x)
    check_sumsq_args(acc, g, x)
    if g.numel() == 0 or x.numel() == 0:
        return None
    dev, stream = cuda_stream_args(acc)
    C.sumsq_outer_cuda(*_args(acc, g, x), dev, stream)
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_reference, "CompositeExplicitAutograd")
LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cpu, "CPU")
LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cuda, "CUDA")
