"""CPU and CUDA kernels of popcomp::covariance_accumulate and popcomp::greedy_select, and the
registration of their references.

The greedy kernels take two precomputed inputs formed here with one torch matmul each (they
are one-time O(p m^2) products, left to BLAS / cuBLAS): the starting numerators
n0_j = Sigma[:,j]^T M Sigma[:,j] and L0 = Tr[M Sigma], and M = theta I + (1 - theta) Z^T Z.
"""
from __future__ import annotations

import torch

from .._backend import DTYPE_CODES, compiled, cuda_stream_args, cuda_workspace, num_threads
from .._ops import LIB
from .._reference.covariance import (
    REL_GUARD,
    covariance_accumulate_reference,
    greedy_select_reference,
)
from .checks import check_covariance_accumulate, check_greedy_select, check_greedy_select_values


def _layout(x):
    """(B, S, m, sB, sS, sm) of the (N, m) or (B, m, S) sample view, strides in elements."""
    if x.dim() == 2:
        return 1, x.shape[0], x.shape[1], 0, x.stride(0), x.stride(1)
    return x.shape[0], x.shape[2], x.shape[1], x.stride(0), x.stride(2), x.stride(1)


def _accumulate(x, acc, count, run):
    B, S, m, sB, sS, sm = _layout(x)
    if B * S > 0 and m > 0:
        target = acc if acc.is_contiguous() else acc.contiguous()
        run(x, B, S, m, sB, sS, sm, target)
        if target is not acc:
            acc.copy_(target)
    count.add_(B * S)


def covariance_accumulate_default(x, acc, count):
    check_covariance_accumulate(x, acc, count)
    return covariance_accumulate_reference(x, acc, count)


def covariance_accumulate_cpu(x, acc, count):
    check_covariance_accumulate(x, acc, count)
    C = compiled()
    if C is None:
        return covariance_accumulate_reference(x, acc, count)

    def run(x, B, S, m, sB, sS, sm, target):
        C.covariance_accumulate_cpu(
            x.data_ptr(), DTYPE_CODES[x.dtype], B, S, m, sB, sS, sm, target.data_ptr(),
            DTYPE_CODES[target.dtype], num_threads(),
        )

    _accumulate(x, acc, count, run)


def covariance_accumulate_cuda(x, acc, count):
    check_covariance_accumulate(x, acc, count)  # before any device address reaches the kernel
    C = compiled()
    if C is None or not C.has_cuda:
        return covariance_accumulate_reference(x, acc, count)

    def run(x, B, S, m, sB, sS, sm, target):
        dev, stream = cuda_stream_args(x)
        nbytes = C.covariance_accumulate_cuda_workspace(
            DTYPE_CODES[x.dtype], B, S, m, DTYPE_CODES[target.dtype], dev
        )
        ws = cuda_workspace(nbytes, x.device)
        C.covariance_accumulate_cuda(
            x.data_ptr(), DTYPE_CODES[x.dtype], B, S, m, sB, sS, sm, target.data_ptr(),
            DTYPE_CODES[target.dtype], ws.data_ptr(), ws.numel(), dev, stream,
        )

    _accumulate(x, acc, count, run)


def greedy_inputs(cov, tau, theta, Z):
    """(cov contiguous, M or None, tau float64, n0 float64 (m,), L0 float64 (1,))."""
    cov = cov.contiguous()
    dt = cov.dtype
    tau = tau.to(device=cov.device, dtype=torch.float64).contiguous()
    col2 = (cov.to(torch.float64) ** 2).sum(0)
    tr = cov.diagonal().to(torch.float64).sum()
    if Z is None:  # Z = I: M = I
        return cov, None, tau, col2.contiguous(), tr.reshape(1).contiguous()
    Zc = Z.to(device=cov.device, dtype=dt)
    ZS = (Zc @ cov).to(torch.float64)
    n0 = theta * col2 + (1.0 - theta) * (ZS**2).sum(0)
    L0 = theta * tr + (1.0 - theta) * (ZS * Zc.to(torch.float64)).sum()
    M = (1.0 - theta) * (Zc.T @ Zc)
    M.diagonal().add_(theta)
    return cov, M.contiguous(), tau, n0.contiguous(), L0.reshape(1).contiguous()


def _greedy_outputs(cov, k):
    return (
        torch.empty((k,), dtype=torch.int64, device=cov.device),
        torch.empty((k,), dtype=torch.float64, device=cov.device),
    )


def _check_greedy(cov, k, tau, theta, Z):
    check_greedy_select(cov, k, tau, theta, Z)
    check_greedy_select_values(cov, tau, Z)


def greedy_select_default(cov, k, tau, theta, Z):
    _check_greedy(cov, k, tau, theta, Z)
    return greedy_select_reference(cov, k, tau, theta, Z)


def greedy_select_cpu(cov, k, tau, theta, Z):
    _check_greedy(cov, k, tau, theta, Z)
    C = compiled()
    if C is None:
        return greedy_select_reference(cov, k, tau, theta, Z)
    cov, M, tau, n0, L0 = greedy_inputs(cov, tau, theta, Z)
    idx, obj = _greedy_outputs(cov, k)
    if k == 0:
        return idx, obj
    C.greedy_select_cpu(
        cov.data_ptr(), M.data_ptr() if M is not None else 0, DTYPE_CODES[cov.dtype],
        cov.shape[0], k, tau.data_ptr(), n0.data_ptr(), L0.data_ptr(), REL_GUARD[cov.dtype],
        idx.data_ptr(), obj.data_ptr(), num_threads(),
    )
    return idx, obj


def greedy_select_cuda(cov, k, tau, theta, Z):
    _check_greedy(cov, k, tau, theta, Z)  # before any device address reaches the kernel
    C = compiled()
    if C is None or not C.has_cuda:
        return greedy_select_reference(cov, k, tau, theta, Z)
    cov, M, tau, n0, L0 = greedy_inputs(cov, tau, theta, Z)
    idx, obj = _greedy_outputs(cov, k)
    if k == 0:
        return idx, obj
    m = cov.shape[0]
    nbytes = C.greedy_select_cuda_workspace(DTYPE_CODES[cov.dtype], m, k)
    ws = cuda_workspace(nbytes, cov.device)
    dev, stream = cuda_stream_args(cov)
    C.greedy_select_cuda(
        cov.data_ptr(), M.data_ptr() if M is not None else 0, DTYPE_CODES[cov.dtype], m, k,
        tau.data_ptr(), n0.data_ptr(), L0.data_ptr(), REL_GUARD[cov.dtype], idx.data_ptr(),
        obj.data_ptr(), ws.data_ptr(), ws.numel(), dev, stream,
    )
    return idx, obj


LIB.impl("covariance_accumulate", covariance_accumulate_default, "CompositeExplicitAutograd")
LIB.impl("covariance_accumulate", covariance_accumulate_cpu, "CPU")
LIB.impl("covariance_accumulate", covariance_accumulate_cuda, "CUDA")
LIB.impl("greedy_select", greedy_select_default, "CompositeExplicitAutograd")
LIB.impl("greedy_select", greedy_select_cpu, "CPU")
LIB.impl("greedy_select", greedy_select_cuda, "CUDA")
