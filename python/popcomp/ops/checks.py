"""The argument checks of the popcomp ops, and the op codes they accept, shared by every kernel.

The public functions (``popcomp.kmeans1d``, ``covariance_accumulate``, ...) check their
arguments, but the ops ``torch.ops.popcomp.*`` can be called directly, and their compiled
kernels receive raw addresses and sizes: a tensor of the wrong shape or dtype, or on another
device, would be read or written out of bounds (or a host address handed to a GPU kernel)
instead of raising. So every kernel of an op -- CPU, CUDA, the pure-torch default, and the fake
(meta) kernel used by torch.compile -- runs the op's ``check_<op>`` here first.

These checks read only metadata (shapes, dtypes, devices), never the data: they cost nothing,
never synchronize a device and behave the same on every device, meta tensors included. Each
error names the argument: TypeError for a wrong type or dtype, ValueError for a wrong shape,
device or value. Checks of the values (NaN/Inf, negative weights, ...) need the data; they are
the ``check_<op>_values`` functions, run by the real kernels only (the CPU K-means kernel checks
x and the weights itself, in the pass that reads them: ``kmeans1d_status_error`` words its
answer).

The op codes (K-means methods, inits, diameters, statuses and their messages, the greedy gain
guard) come from the compiled core (``popcomp._C``, from its C++ enums); the literal tables
passed to ``core_constant`` below serve only a checkout without the compiled core, and
tests/test_op_checks.py keeps them equal to the compiled ones.
"""
from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, core_constant
from .._validate import check_float, check_int, check_real, check_same_device
from ..quantize.packing import row_bytes

# ---- op codes, from the compiled core (csrc/kmeans/kmeans.h, csrc/bindings.cpp) -------------
KMEANS_METHODS = core_constant("kmeans_methods", {"lloyd": 0, "exact": 1})
KMEANS_INITS = core_constant("kmeans_inits", {"kmeans++": 0, "linear": 1, "quantile": 2, "given": 3})
KMEANS_DIAMETERS = core_constant("kmeans_diameters", {"squared": 0, "linear": 1})
KMEANS_STATUS = core_constant(
    "kmeans_status", {"ok": 0, "nonfinite_x": 1, "nonfinite_w": 2, "negative_w": 3, "zero_w": 4}
)
KMEANS_STATUS_MESSAGES = core_constant("kmeans_status_messages", {
    1: "x contains NaN or Inf",
    2: "weights contains NaN or Inf",
    3: "weights must be non-negative (found negative entries)",
    4: "weights are all zero: the objective has no minimizer",
})
# init_centers are checked before any kernel (no kernel reads them for NaN/Inf)
INIT_CENTERS_NONFINITE = "init_centers contains NaN or Inf"

# The greedy gain guard by cov's dtype (1e3 machine epsilons; covariance_math.h, greedy_gain): a
# unit whose residual variance and ridge tau_j are both rel_guard * Sigma_jj or below scores 0.
GREEDY_REL_GUARD = {
    getattr(torch, name): guard
    for name, guard in core_constant(
        "greedy_rel_guard", {"float64": 1e3 * 2.0**-52, "float32": 1e3 * 2.0**-23}
    ).items()
}

ACC_DTYPES = (torch.float32, torch.float64)  # covariance accumulators, greedy_select's cov
# sumsq_outer_acc's g and x with a float32 acc (a float64 acc takes float64 g and x)
SUMSQ_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    check_int("k", k, lo=1)
    check_real("beta", beta, lo=0.0)
    _choice("method", method, KMEANS_METHODS)
    _choice("init", init, KMEANS_INITS)
    _choice("diameter", diameter, KMEANS_DIAMETERS)
    check_int("max_iter", max_iter, lo=0)
    check_real("tol", tol, lo=0.0)
    check_int("seed", seed)
    if init_centers is not None:
        _tensor("init_centers", init_centers)
        check_float("init_centers", init_centers)
        check_same_device("init_centers", init_centers, "x", x)
        if tuple(init_centers.shape) != (x.shape[0], k):
            raise ValueError(f"init_centers must have shape (rows, k) = {(x.shape[0], k)}, "
                             f"got {tuple(init_centers.shape)}")
    elif init == "given":
        raise ValueError("init 'given' needs init_centers (rows, k)")


def kmeans1d_status_error(message: str, row: int, rows: int) -> ValueError:
    """The ValueError of a bad problem: the message, and the row when there are several."""
    return ValueError(message + (f" (row {row})" if rows > 1 else ""))


def check_init_centers_values(init_centers) -> None:
    """init_centers (None or a tensor) finite; one transfer to the host."""
    if init_centers is not None and not bool(torch.isfinite(init_centers).all()):
        raise ValueError(INIT_CENTERS_NONFINITE)


def check_kmeans1d_values(x, weights, init_centers=None) -> None:
    """The checks of the CPU kernel, with torch ops, for the kernels that do not run it (CUDA,
    the reference): per problem (row) the first of NaN/Inf in init_centers (which no kernel
    checks), NaN/Inf in x, NaN/Inf in weights, a negative weight, all weights zero; raises the
    CPU kernel's ValueError for the first bad row. One transfer to the host."""
    S, M = KMEANS_STATUS, KMEANS_STATUS_MESSAGES
    checks = [] if init_centers is None else [
        (INIT_CENTERS_NONFINITE, ~torch.isfinite(init_centers).all(dim=1))]
    checks += [(M[S["nonfinite_x"]], ~torch.isfinite(x).all(dim=1))]
    if weights is not None:
        checks += [(M[S["nonfinite_w"]], ~torch.isfinite(weights).all(dim=1)),
                   (M[S["negative_w"]], (weights < 0).any(dim=1)),
                   (M[S["zero_w"]], ~(weights > 0).any(dim=1))]
    first = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)  # 1 + index in checks
    for i in reversed(range(len(checks))):  # the first failing check of a row wins
        first = torch.where(checks[i][1], i + 1, first)
    first = first.cpu()
    bad = torch.nonzero(first)
    if bad.numel():
        row = int(bad[0, 0])
        raise kmeans1d_status_error(checks[int(first[row]) - 1][0], row, x.shape[0])


# ---- popcomp::sumsq_outer_acc -------------------------------------------------------------
def check_sumsq_outer_acc(acc, g, x) -> None:
    """acc (out, in) float32 contiguous with g (B, R, T, out), x (B, T, in) float32/16,
    bfloat16; or acc, g and x all float64; on acc's device."""
    _tensor("acc", acc)
    _tensor("g", g)
    _tensor("x", x)
    if acc.dtype not in (torch.float32, torch.float64) or acc.dim() != 2 or not acc.is_contiguous():
        raise ValueError(
            f"acc must be a contiguous 2-D float32 tensor (or float64, with float64 g and x), "
            f"got {acc.dtype} {tuple(acc.shape)}"
        )
    if g.dim() != 4:
        raise ValueError(f"g must be 4-D (B, R, T, out), got shape {tuple(g.shape)}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, T, in), got shape {tuple(x.shape)}")
    for name, t in (("g", g), ("x", x)):
        if acc.dtype == torch.float64:
            if t.dtype != torch.float64:
                raise TypeError(f"{name} must be float64 with a float64 acc, got {t.dtype}")
        elif t.dtype not in SUMSQ_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 with a float32 acc "
                            f"(float64 with a float64 acc), got {t.dtype}")
        check_same_device(name, t, "acc", acc)
    B, R, T, out = g.shape
    if x.shape[0] != B or x.shape[1] != T:
        raise ValueError(f"g (B, R, T, out) = {tuple(g.shape)} and x (B, T, in) = "
                         f"{tuple(x.shape)} disagree on B or T")
    if acc.shape != (out, x.shape[2]):
        raise ValueError(
            f"acc must have shape (out, in) = {(out, x.shape[2])}, got {tuple(acc.shape)}"
        )


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
    check_int("k", k, lo=0, hi=m)
    _tensor("tau", tau)
    check_float("tau", tau)
    check_same_device("tau", tau, "cov", cov)
    if tuple(tau.shape) != (m,):
        raise ValueError(f"tau must have shape (m,) = ({m},), got {tuple(tau.shape)}")
    check_real("theta", theta, lo=0.0, hi=1.0)
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


# ---- popcomp::palettized_linear / popcomp::palettized_decode (layout: quantize/packing.py) -
PALETTIZED_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # activations, decoded
PALETTIZED_CB_DTYPES = (torch.float32, torch.float16)  # codebooks


def _check_palettized_ints(bits, in_features, group_size):
    check_int("in_features", in_features, lo=1)
    check_int("group_size", group_size, lo=0)
    return check_int("bits", bits, lo=1, hi=8)


def _check_palettized_weight(packed, codebook, bits, in_features, group_size, ref_name, ref):
    """packed uint8 (rows, row_bytes(in_features, bits)); codebook float16/float32
    (cb_rows, 2**bits) with cb_rows 1 or rows (group_size 0) or rows * ceil(in_features /
    group_size); both on ``ref``'s device (the integers checked by the caller). Returns rows."""
    _tensor("packed", packed)
    _tensor("codebook", codebook)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    nbytes = row_bytes(in_features, bits)
    if packed.dim() != 2 or packed.shape[1] != nbytes:
        raise ValueError(f"packed must have shape (out_features, {nbytes}) for in_features="
                         f"{in_features} at {bits} bits, got {tuple(packed.shape)}")
    if codebook.dtype not in PALETTIZED_CB_DTYPES:
        raise TypeError(f"codebook must be float16 or float32, got {codebook.dtype}")
    rows = packed.shape[0]
    K = 1 << bits
    if group_size > 0:
        G = (in_features + group_size - 1) // group_size
        allowed = f"out_features * ceil(in_features / group_size) = {rows * G}"
        ok = codebook.dim() == 2 and codebook.shape[0] == rows * G
    else:
        allowed = f"1 (per tensor) or out_features = {rows} (per channel)"
        ok = codebook.dim() == 2 and (codebook.shape[0] == 1 or codebook.shape[0] == rows)
    if not ok:
        raise ValueError(f"codebook must be 2-D with {allowed} rows, got shape "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[1] != K:
        raise ValueError(f"codebook must have 2**bits = {K} columns (pad a codebook of fewer "
                         f"centers with copies of its last one), got {codebook.shape[1]}")
    if ref is not None:
        check_same_device("packed", packed, ref_name, ref)
    check_same_device("codebook", codebook, "packed", packed)
    return rows


def check_palettized_linear(x, packed, codebook, bias, bits, in_features, group_size) -> None:
    """x (..., in_features) float32/float16/bfloat16; packed, codebook as
    ``_check_palettized_weight``, on x's device; bias None or (out_features,) of x's dtype or
    float32 on x's device."""
    bits = _check_palettized_ints(bits, in_features, group_size)
    _tensor("x", x)
    if x.dtype not in PALETTIZED_X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features) = (..., {in_features}), got "
                         f"{tuple(x.shape)}")
    rows = _check_palettized_weight(packed, codebook, bits, in_features, group_size, "x", x)
    if bias is not None:
        _tensor("bias", bias)
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"bias must have x's dtype ({x.dtype}) or float32, got {bias.dtype}")
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape (out_features,) = ({rows},), got "
                             f"{tuple(bias.shape)}")
        check_same_device("bias", bias, "x", x)


def check_palettized_decode(packed, codebook, bits, in_features, group_size, dtype) -> None:
    """packed, codebook as ``_check_palettized_weight``; dtype float32/float16/bfloat16."""
    if dtype not in PALETTIZED_X_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    bits = _check_palettized_ints(bits, in_features, group_size)
    _check_palettized_weight(packed, codebook, bits, in_features, group_size, None, None)


__all__ = [
    "FLOAT_DTYPES", "ACC_DTYPES", "SUMSQ_DTYPES",
    "KMEANS_METHODS", "KMEANS_INITS", "KMEANS_DIAMETERS", "KMEANS_STATUS",
    "KMEANS_STATUS_MESSAGES", "INIT_CENTERS_NONFINITE", "GREEDY_REL_GUARD",
    "check_kmeans1d", "check_kmeans1d_values", "check_init_centers_values",
    "kmeans1d_status_error", "check_sumsq_outer_acc", "check_covariance_accumulate",
    "check_greedy_select", "check_greedy_select_values",
    "PALETTIZED_X_DTYPES", "PALETTIZED_CB_DTYPES", "check_palettized_linear",
    "check_palettized_decode",
]
