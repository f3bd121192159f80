"""The keyword arguments of the compiled core's entry points, built from checked tensors.

The CPU and the CUDA kernel of an op pass the same raw addresses, sizes and codes to the
compiled core (``popcomp._C``) and differ only in what they add (threads, or the device,
stream and workspace). Each function here prepares an op's inputs and outputs, calls
``run(**kwargs)`` -- the device kernel's call of its entry point -- while the tensors behind the
addresses are alive, and returns the outputs. Callers have run the op's checks first.
"""
from __future__ import annotations

import torch

from ..._backend import DTYPE_CODES
from ..checks import GREEDY_REL_GUARD, KMEANS_DIAMETERS, KMEANS_INITS, KMEANS_METHODS

_U64 = (1 << 64) - 1


def _ptr(t) -> int:
    """The address of a tensor, 0 (a null address) for None."""
    return t.data_ptr() if t is not None else 0


# ---- popcomp::kmeans1d -------------------------------------------------------------------
def kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter,
             run):
    """(centers, labels, cost, n_iter) of kmeans1d_{cpu,cuda}; run is not called for n = 0."""
    rows, n = x.shape
    x = x.contiguous()
    w = weights.contiguous() if weights is not None else None
    ic = init_centers.to(torch.float64).contiguous() if init_centers is not None else None
    centers, labels, cost, n_iter = outs = (
        torch.empty((rows, k), dtype=torch.float64, device=x.device),
        torch.empty((rows, n), dtype=torch.int32, device=x.device),
        torch.empty((rows,), dtype=torch.float64, device=x.device),
        torch.empty((rows,), dtype=torch.int64, device=x.device),
    )
    if x.numel() == 0:
        return outs
    run(
        x=x.data_ptr(), w=_ptr(w), x_dtype=DTYPE_CODES[x.dtype],
        w_dtype=DTYPE_CODES[(w if w is not None else x).dtype], rows=rows, n=n, k=k,
        beta=float(beta), method=KMEANS_METHODS[method], init=KMEANS_INITS[init],
        diameter=KMEANS_DIAMETERS[diameter], max_iter=int(max_iter), tol=float(tol),
        seed=int(seed) & _U64, init_centers=_ptr(ic), centers=centers.data_ptr(),
        labels=labels.data_ptr(), cost=cost.data_ptr(), n_iter=n_iter.data_ptr(),
    )
    return outs


# ---- popcomp::sumsq_outer_acc -------------------------------------------------------------
def sumsq_outer_acc(acc, g, x, run) -> None:
    """acc += the squared outer products of g and x, read through their strides; run is not
    called when there is nothing to add."""
    if g.numel() == 0 or x.numel() == 0:
        return None
    B, R, T, out = g.shape
    run(
        g=g.data_ptr(), x=x.data_ptr(), acc=acc.data_ptr(), B=B, R=R, T=T, out_features=out,
        in_features=x.shape[2], g_strides=tuple(g.stride()), x_strides=tuple(x.stride()),
        g_dtype=DTYPE_CODES[g.dtype], x_dtype=DTYPE_CODES[x.dtype],
    )
    return None


# ---- popcomp::covariance_accumulate -------------------------------------------------------
def covariance_accumulate(x, acc, count, run) -> None:
    """acc += x^T x over the samples of the (N, m) or (B, m, S) view x, read in place through
    its strides (in elements); count += their number. run is not called for no samples."""
    if x.dim() == 2:  # (N, m): one batch of N samples
        B, S, m, sB, sS, sm = 1, x.shape[0], x.shape[1], 0, x.stride(0), x.stride(1)
    else:  # (B, m, S): B batches of S samples, channels second
        B, m, S = x.shape
        sB, sm, sS = x.stride()
    if B * S > 0 and m > 0:
        target = acc if acc.is_contiguous() else acc.contiguous()
        run(
            x=x.data_ptr(), x_dtype=DTYPE_CODES[x.dtype], B=B, S=S, m=m, stride_b=sB,
            stride_s=sS, stride_m=sm, acc=target.data_ptr(), acc_dtype=DTYPE_CODES[target.dtype],
        )
        if target is not acc:
            acc.copy_(target)
    count.add_(B * S)


# ---- popcomp::greedy_select ---------------------------------------------------------------
def greedy_inputs(cov, tau, theta, Z):
    """(cov contiguous, M or None, tau float64, n0 float64 (m,), L0 float64 (1,)): the
    precomputed inputs of the greedy kernels, one torch matmul each (one-time O(p m^2)
    products, left to BLAS / cuBLAS): M = theta I + (1 - theta) Z^T Z, the starting numerators
    n0_j = Sigma[:,j]^T M Sigma[:,j] and L0 = Tr[M Sigma]."""
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


def greedy_select(cov, k, tau, theta, Z, run):
    """(indices, objective) of greedy_select_{cpu,cuda}; run is not called for k = 0."""
    idx = torch.empty((k,), dtype=torch.int64, device=cov.device)
    obj = torch.empty((k,), dtype=torch.float64, device=cov.device)
    if k == 0:
        return idx, obj
    cov, M, tau, n0, L0 = greedy_inputs(cov, tau, theta, Z)
    run(
        cov=cov.data_ptr(), M=_ptr(M), dtype=DTYPE_CODES[cov.dtype], m=cov.shape[0], k=k,
        tau=tau.data_ptr(), n0=n0.data_ptr(), L0=L0.data_ptr(),
        rel_guard=GREEDY_REL_GUARD[cov.dtype], idx=idx.data_ptr(), obj=obj.data_ptr(),
    )
    return idx, obj
