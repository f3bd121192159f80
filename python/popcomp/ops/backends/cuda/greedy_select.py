"""The CUDA kernel of popcomp::greedy_select (the compiled core, on torch's current stream)."""
from __future__ import annotations

from ...._backend import compiled, cuda_capturing, cuda_fallback, cuda_stream_args, cuda_workspace
from ..._library import LIB
from ...checks import check_greedy_select, check_greedy_select_values
from .. import compiled_args
from ..reference.greedy_select import greedy_select_reference


def greedy_select_cuda(cov, k, tau, theta, Z):
    # before any device address reaches the kernel; the values (one transfer to the host)
    # not while a CUDA graph is captured (a transfer cannot be captured, a replay runs on
    # other values anyway)
    check_greedy_select(cov, k, tau, theta, Z)
    if not cuda_capturing(cov):
        check_greedy_select_values(cov, tau, Z)
    if cuda_fallback(cov, "greedy_select"):  # popcomp's CUDA runtime cannot use the device
        return greedy_select_reference(cov, k, tau, theta, Z)
    C = compiled()

    def run(**kwargs):
        nbytes = C.greedy_select_cuda_workspace(dtype=kwargs["dtype"], m=kwargs["m"], k=kwargs["k"])
        ws = cuda_workspace(nbytes, cov.device)
        device, stream = cuda_stream_args(cov)
        C.greedy_select_cuda(**kwargs, workspace=ws.data_ptr(), workspace_bytes=ws.numel(),
                             device=device, stream=stream)

    return compiled_args.greedy_select(cov, k, tau, theta, Z, run)


LIB.impl("greedy_select", greedy_select_cuda, "CUDA")
