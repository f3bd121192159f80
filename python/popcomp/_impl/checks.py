"""Device-independent argument checks of the popcomp ops, shared by all their kernels.

The public functions (``popcomp.kmeans1d``, ``covariance_accumulate``, ...) check their
arguments, but the ops ``torch.ops.popcomp.*`` can be called directly, and their compiled
kernels receive raw addresses and sizes: a tensor of the wrong shape or dtype, or on another
device, would be read or written out of bounds (or a host address handed to a GPU kernel)
instead of raising. So every kernel of an op -- CPU, CUDA, the pure-torch default, and the fake
(meta) kernel used by torch.compile -- runs the op's ``check_*`` here first.

These checks read only metadata (shapes, dtypes, devices), never the data: they cost nothing,
never synchronize a device and behave the same on every device, meta tensors included. Each
error names the argument: TypeError for a wrong type or dtype, ValueError for a wrong shape,
device or value. Checks of the values (NaN/Inf, negative weights, ...) need the data; they are
the ``check_*_values`` functions, run by the real kernels only.
"""
from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES
from .._reference.hessian import check_sumsq_args
from .._validate import check_float, check_int as _int, check_real as _real, check_same_device

# name -> code of the enums of csrc/kmeans/kmeans.h
KMEANS_METHODS = {"lloyd": 0, "exact": 1}
KMEANS_INITS = {"kmeans++": 0, "linear": 1, "quantile": 2, "given": 3}
KMEANS_DIAMETERS = {"squared": 0, "linear": 1}
ACC_DTYPES = (torch.float32, torch.float64)


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")


# ---- popcomp::kmeans1d -------------------------------------------------------------------
def check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed,
                   diameter) -> None:
    """x (rows, n) floating with n >= 1; weights None or floating, x's shape and device;
    k >= 1; beta, tol finite >= 0; max_iter >= 0; seed an int; method, init, diameter known;
    init_centers (rows, k) floating on x's device, required by init 'given'."""
    _tensor("x", x)
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, n), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError("x must hold at least one value per problem (got n = 0)")
    if weights is not None:
        _tensor("weights", weights)
        check_float("weights", weights)
        check_same_device("weights", weights, "x", x)
        if weights.shape != x.shape:
            raise ValueError(
                f"weights must have the shape of x {tuple(x.shape)}, got {tuple(weights.shape)}"
            )
    _int("k", k, lo=1)
    _real("beta", beta, lo=0.0)
    _choice("method", method, KMEANS_METHODS)
    _choice("init", init, KMEANS_INITS)
    _choice("diameter", diameter, KMEANS_DIAMETERS)
    _int("max_iter", max_iter, lo=0)
    _real("tol", tol, lo=0.0)
    _int("seed", seed)
    if init_centers is not None:
        _tensor("init_centers", init_centers)
        check_float("init_centers", init_centers)
        check_same_device("init_centers", init_centers, "x", x)
        if tuple(init_centers.shape) != (x.shape[0], k):
            raise ValueError(f"init_centers must have shape (rows, k) = {(x.shape[0], k)}, "
                             f"got {tuple(init_centers.shape)}")
    elif init == "given":
        raise ValueError("init 'given' needs init_centers (rows, k)")


# ---- popcomp::sumsq_outer_acc -------------------------------------------------------------
def check_sumsq_outer_acc(acc, g, x) -> None:
    """acc (out, in) float32 contiguous; g (B, R, T, out), x (B, T, in) float32/16, bfloat16,
    on acc's device."""
    _tensor("acc", acc)
    _tensor("g", g)
    _tensor("x", x)
    check_sumsq_args(acc, g, x)


# ---- popcomp::covariance_accumulate -------------------------------------------------------
def check_covariance_accumulate(x, acc, count) -> None:
    """x (N, m) or (B, m, S) floating; acc (m, m) float32/float64 and count 0-d int64, both on
    x's device."""
    _tensor("x", x)
    check_float("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, m) or (B, m, S), got shape {tuple(x.shape)}")
    m = x.shape[1]
    _tensor("acc", acc)
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc must be float32 or float64, got {acc.dtype}")
    check_same_device("acc", acc, "x", x)
    if tuple(acc.shape) != (m, m):
        raise ValueError(f"acc must have shape (m, m) = {(m, m)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(acc.shape)}")
    _tensor("count", count)
    if count.dtype != torch.int64 or count.dim() != 0:
        raise TypeError(f"count must be a 0-d int64 tensor, got {count.dtype} with shape "
                        f"{tuple(count.shape)}")
    check_same_device("count", count, "x", x)


# ---- popcomp::greedy_select ---------------------------------------------------------------
def check_greedy_select(cov, k, tau, theta, Z) -> None:
    """cov (m, m) float32/float64; 0 <= k <= m; tau (m,) floating; theta in [0, 1]; Z None or
    (p, m) floating; all on cov's device."""
    _tensor("cov", cov)
    if cov.dtype not in ACC_DTYPES:
        raise TypeError(f"cov must be float32 or float64, got {cov.dtype}")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (m, m) matrix, got shape {tuple(cov.shape)}")
    m = cov.shape[0]
    _int("k", k, lo=0, hi=m)
    _tensor("tau", tau)
    check_float("tau", tau)
    check_same_device("tau", tau, "cov", cov)
    if tuple(tau.shape) != (m,):
        raise ValueError(f"tau must have shape (m,) = ({m},), got {tuple(tau.shape)}")
    _real("theta", theta, lo=0.0, hi=1.0)
    if Z is not None:
        _tensor("Z", Z)
        check_float("Z", Z)
        check_same_device("Z", Z, "cov", cov)
        if Z.dim() != 2 or Z.shape[1] != m:
            raise ValueError(f"Z must have shape (p, m) = (p, {m}), got {tuple(Z.shape)}")


def check_greedy_select_values(cov, tau, Z) -> None:
    """cov, tau and Z finite and tau >= 0 (NaN gains would make the argmax of every step
    meaningless); one transfer to the host."""
    flags = [torch.isfinite(cov).all(), torch.isfinite(tau).all(), (tau >= 0).all()]
    if Z is not None:
        flags.append(torch.isfinite(Z).all())
    ok = torch.stack(flags).cpu().tolist()
    for good, msg in zip(ok, ("cov contains NaN or Inf", "tau contains NaN or Inf",
                              "tau must be non-negative (found negative entries)",
                              "Z contains NaN or Inf")):
        if not good:
            raise ValueError(msg)


__all__ = [
    "FLOAT_DTYPES",
    "check_kmeans1d",
    "check_sumsq_outer_acc",
    "check_covariance_accumulate",
    "check_greedy_select",
    "check_greedy_select_values",
]
