"""CPU and CUDA kernels of popcomp::kmeans1d, and the registration of its reference."""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, compiled, cuda_stream_args, cuda_workspace, num_threads
from .._ops import LIB
from .._reference.kmeans import kmeans1d_reference
from .checks import KMEANS_DIAMETERS as DIAMETERS
from .checks import KMEANS_INITS as INITS
from .checks import KMEANS_METHODS as METHODS
from .checks import check_kmeans1d
_U64 = (1 << 64) - 1
# csrc/kmeans/kmeans.h, enum Status
_STATUS = {
    1: "x contains NaN or Inf",
    2: "weights contains NaN or Inf",
    3: "weights must be non-negative (found negative entries)",
    4: "weights are all zero: the objective has no minimizer",
    5: "init_centers contains NaN or Inf",  # checked before the kernel, not by it
}


def check_values(x, weights, init_centers=None):
    """The checks of the CPU kernel, with torch ops, for the paths that do not run it (CUDA,
    the reference fallback): per problem (row) the first of NaN/Inf in init_centers (which no
    kernel checks), NaN/Inf in x, NaN/Inf in weights, a negative weight, all weights zero;
    raises ValueError for the first bad row, as the CPU kernel does. One transfer to the host."""
    checks = [] if init_centers is None else [(5, ~torch.isfinite(init_centers).all(dim=1))]
    checks += [(1, ~torch.isfinite(x).all(dim=1))]
    if weights is not None:
        checks += [(2, ~torch.isfinite(weights).all(dim=1)), (3, (weights < 0).any(dim=1)),
                   (4, ~(weights > 0).any(dim=1))]
    status = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for code, bad in reversed(checks):  # the first failing check of a row wins
        status = torch.where(bad, code, status)
    st = status.cpu()
    bad = torch.nonzero(st)
    if bad.numel():
        row = int(bad[0, 0])
        where = f" (row {row})" if x.shape[0] > 1 else ""
        raise ValueError(_STATUS[int(st[row])] + where)


def kmeans1d_default(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed,
                     diameter):
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    check_values(x, weights, init_centers)
    return kmeans1d_reference(
        x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter
    )


def _common(x, weights, k, init_centers):
    rows, n = x.shape
    x = x.contiguous()
    w = weights.contiguous() if weights is not None else None
    ic = init_centers.to(torch.float64).contiguous() if init_centers is not None else None
    outs = (
        torch.empty((rows, k), dtype=torch.float64, device=x.device),
        torch.empty((rows, n), dtype=torch.int32, device=x.device),
        torch.empty((rows,), dtype=torch.float64, device=x.device),
        torch.empty((rows,), dtype=torch.int64, device=x.device),
    )
    args = (
        x.data_ptr(),
        w.data_ptr() if w is not None else 0,
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[w.dtype] if w is not None else DTYPE_CODES[x.dtype],
        rows,
        n,
        k,
    )
    return x, w, ic, outs, args


def kmeans1d_cpu(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    C = compiled()
    if C is None:
        return kmeans1d_default(
            x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter
        )
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    # init_centers here, x and weights in the kernel's pass over them
    if init_centers is not None and not bool(torch.isfinite(init_centers).all()):
        raise ValueError(_STATUS[5])
    x, w, ic, outs, args = _common(x, weights, k, init_centers)
    if x.numel() == 0:
        return outs
    status, row = C.kmeans1d_cpu(
        *args, float(beta), METHODS[method], INITS[init], DIAMETERS[diameter], int(max_iter),
        float(tol), int(seed) & _U64, ic.data_ptr() if ic is not None else 0,
        *(o.data_ptr() for o in outs), num_threads(),
    )
    if status:
        where = f" (row {row})" if x.shape[0] > 1 else ""
        raise ValueError(_STATUS[status] + where)
    return outs


def kmeans1d_cuda(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    C = compiled()
    if C is None or not C.has_cuda:
        return kmeans1d_default(
            x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter
        )
    # before any device address reaches the kernel: shapes, dtypes, devices, then the values
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    check_values(x, weights, init_centers)  # one transfer to the host for all of them
    x, w, ic, outs, args = _common(x, weights, k, init_centers)
    if x.numel() == 0:
        return outs
    rows, n = x.shape
    dev, stream = cuda_stream_args(x)
    nbytes = C.kmeans1d_cuda_workspace(rows, n, k, METHODS[method], DTYPE_CODES[x.dtype], dev)
    ws = cuda_workspace(nbytes, x.device)
    C.kmeans1d_cuda(
        *args, float(beta), METHODS[method], INITS[init], DIAMETERS[diameter], int(max_iter),
        float(tol), int(seed) & _U64, ic.data_ptr() if ic is not None else 0,
        *(o.data_ptr() for o in outs), ws.data_ptr(), ws.numel(), dev, stream,
    )
    return outs


LIB.impl("kmeans1d", kmeans1d_default, "CompositeExplicitAutograd")
LIB.impl("kmeans1d", kmeans1d_cpu, "CPU")
LIB.impl("kmeans1d", kmeans1d_cuda, "CUDA")
