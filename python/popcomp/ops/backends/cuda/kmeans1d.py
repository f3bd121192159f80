"""The CUDA kernel of popcomp::kmeans1d (the compiled core, on torch's current stream)."""
from __future__ import annotations

import torch

from ...._backend import (compiled, cuda_capturing, cuda_dp_budget, cuda_fallback,
                          cuda_stream_args, cuda_workspace)
from ..._library import LIB
from ...checks import check_kmeans1d, check_kmeans1d_values
from .. import compiled_args
from ..reference.kmeans1d import kmeans1d_reference

# The exact DP keeps (k - 1) x 4 bytes per distinct value of each row it solves at once (rows
# are solved in chunks of POPCOMP_CUDA_DP_BUDGET bytes; a row that alone needs more, alone).
_EXACT_HINT = ("; the exact DP of one row needs about (k + 3) x 4 bytes per distinct value: "
               "use method='lloyd', a smaller k, or the CPU for rows this large")


def kmeans1d_cuda(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    # before any device address reaches the kernel: shapes, dtypes, devices, then the values
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    # the values: one transfer to the host for all of them, skipped while a CUDA graph is
    # captured (a transfer cannot be captured, and a replay runs on other values anyway)
    if not cuda_capturing(x):
        check_kmeans1d_values(x, weights, init_centers)
    if cuda_fallback(x, "kmeans1d"):  # popcomp's CUDA runtime cannot use the device
        return kmeans1d_reference(x, weights, k, beta, method, init, init_centers, max_iter, tol,
                                  seed, diameter)
    C = compiled()

    def run(**kwargs):
        device, stream = cuda_stream_args(x)
        budget = cuda_dp_budget(x.device)
        nbytes = C.kmeans1d_cuda_workspace(
            rows=kwargs["rows"], n=kwargs["n"], k=kwargs["k"], method=kwargs["method"],
            x_dtype=kwargs["x_dtype"], device=device, dp_budget=budget,
        )
        try:
            ws = cuda_workspace(nbytes, x.device)
        except torch.cuda.OutOfMemoryError as err:
            raise torch.cuda.OutOfMemoryError(
                f"kmeans1d on CUDA: {nbytes / 2**30:.2f} GiB of workspace for {kwargs['rows']} "
                f"row(s) of {kwargs['n']} values (method {method!r}, k = {k}) do not fit the "
                f"device's free memory{_EXACT_HINT if method == 'exact' else ''}: {err}"
            ) from err
        C.kmeans1d_cuda(**kwargs, workspace=ws.data_ptr(), workspace_bytes=ws.numel(),
                        device=device, stream=stream, dp_budget=budget)

    return compiled_args.kmeans1d(
        x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter, run
    )


LIB.impl("kmeans1d", kmeans1d_cuda, "CUDA")
