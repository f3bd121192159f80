"""The CUDA kernel of popcomp::sumsq_outer_acc (the compiled core, on torch's current stream)."""
from __future__ import annotations

from ...._backend import compiled, cuda_fallback, cuda_stream_args
from ..._library import LIB
from ...checks import check_sumsq_outer_acc
from .. import compiled_args
from ..reference.sumsq_outer_acc import sumsq_outer_acc_reference


def sumsq_outer_acc_cuda(acc, g, x):
    check_sumsq_outer_acc(acc, g, x)  # before any device address reaches the kernel
    if cuda_fallback(acc, "sumsq_outer_acc"):  # popcomp's CUDA runtime cannot use the device
        return sumsq_outer_acc_reference(acc, g, x)
    C = compiled()

    def run(**kwargs):
        device, stream = cuda_stream_args(acc)
        C.sumsq_outer_cuda(**kwargs, device=device, stream=stream)

    compiled_args.sumsq_outer_acc(acc, g, x, run)
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cuda, "CUDA")
