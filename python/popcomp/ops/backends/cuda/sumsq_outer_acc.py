"""The CUDA kernel of popcomp::sumsq_outer_acc (the compiled core, on torch's current stream):
float32 acc with float32/16-bit operands, or acc, g and x all float64 (a float64 kernel)."""
from __future__ import annotations

from ...._backend import (DTYPE_CODES, compiled, core_constant, cuda_fallback, cuda_stream_args,
                          cuda_workspace)
from ..._library import LIB
from ...checks import check_sumsq_outer_acc
from .. import compiled_args
from ..reference.sumsq_outer_acc import sumsq_outer_acc_reference

# Room for the per-split partial sums when the samples are split to fill the GPU (added into
# acc in a fixed order: repeated runs are bit-identical; half as many slabs fit in float64).
WORKSPACE_BYTES = core_constant("sumsq_outer_cuda_workspace_bytes", 16 << 20)


def sumsq_outer_acc_cuda(acc, g, x):
    check_sumsq_outer_acc(acc, g, x)  # before any device address reaches the kernel
    if cuda_fallback(acc, "sumsq_outer_acc"):  # popcomp's CUDA runtime cannot use the device
        return sumsq_outer_acc_reference(acc, g, x)
    C = compiled()
    code = DTYPE_CODES[acc.dtype]  # float32, or float64 (then g and x are float64 too)

    def run(**kwargs):
        device, stream = cuda_stream_args(acc)
        # room for the per-split partial sums, added in a fixed order (deterministic)
        ws = cuda_workspace(WORKSPACE_BYTES, acc.device)
        C.sumsq_outer_cuda(**kwargs, workspace=ws.data_ptr(), workspace_bytes=ws.numel(),
                           device=device, stream=stream, acc_dtype=code)

    compiled_args.sumsq_outer_acc(acc, g, x, run)
    return None


LIB.impl("sumsq_outer_acc", sumsq_outer_acc_cuda, "CUDA")
