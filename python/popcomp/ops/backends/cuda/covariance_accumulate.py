"""The CUDA kernel of popcomp::covariance_accumulate (the compiled core, on torch's current
stream)."""
from __future__ import annotations

from ...._backend import compiled, cuda_fallback, cuda_stream_args, cuda_workspace
from ..._library import LIB
from ...checks import check_covariance_accumulate
from .. import compiled_args
from ..reference.covariance_accumulate import covariance_accumulate_reference


def covariance_accumulate_cuda(x, acc, count):
    check_covariance_accumulate(x, acc, count)  # before any device address reaches the kernel
    if cuda_fallback(x, "covariance_accumulate"):  # popcomp's CUDA runtime cannot use the device
        return covariance_accumulate_reference(x, acc, count)
    C = compiled()

    def run(**kwargs):
        device, stream = cuda_stream_args(x)
        nbytes = C.covariance_accumulate_cuda_workspace(
            x_dtype=kwargs["x_dtype"], B=kwargs["B"], S=kwargs["S"], m=kwargs["m"],
            acc_dtype=kwargs["acc_dtype"], device=device,
        )
        ws = cuda_workspace(nbytes, x.device)
        C.covariance_accumulate_cuda(**kwargs, workspace=ws.data_ptr(),
                                     workspace_bytes=ws.numel(), device=device, stream=stream)

    compiled_args.covariance_accumulate(x, acc, count, run)


LIB.impl("covariance_accumulate", covariance_accumulate_cuda, "CUDA")
