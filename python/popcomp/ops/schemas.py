"""The schema and the fake (meta) kernel of every popcomp op.

Each op ``popcomp::NAME`` is defined here (``LIB.define``) with its ``register_fake`` (shape and
dtype propagation for torch.compile and opcheck), which runs the op's argument checks
(``checks.check_<op>``) like every other kernel of the op. The kernels themselves live in
``backends/{reference,cpu,cuda}/<op>.py``.
"""
from __future__ import annotations

import torch

from ._library import LIB
from .checks import (
    check_covariance_accumulate,
    check_greedy_select,
    check_kmeans1d,
    check_palettized_decode,
    check_palettized_linear,
    check_sumsq_outer_acc,
)

# ---- weighted 1-D K-means (HW / DRHW K-means) ---------------------------------------------
# x: (rows, n) floating; weights: (rows, n) floating or None (all ones); init_centers:
# (rows, k) float64 or None. Returns centers (rows, k) float64 ascending, labels (rows, n)
# int32, cost (rows,) float64 (objective incl. the diameter term), n_iter (rows,) int64.
LIB.define(
    "kmeans1d(Tensor x, Tensor? weights, int k, float beta, str method, str init, "
    "Tensor? init_centers, int max_iter, float tol, int seed, str diameter) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("popcomp::kmeans1d")
def _kmeans1d_fake(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    rows, n = x.shape
    return (
        x.new_empty((rows, k), dtype=torch.float64),
        x.new_empty((rows, n), dtype=torch.int32),
        x.new_empty((rows,), dtype=torch.float64),
        x.new_empty((rows,), dtype=torch.int64),
    )


# ---- fused squared per-sample gradients (Fisher / GGN diagonal) -------------------------
# acc (out, in) float32 contiguous, mutated: acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2
# g: (B, R, T, out), x: (B, T, in), float32/float16/bfloat16, any strides; or acc, g and x all
# float64 (computed in float64: a float64 model's diagonal).
LIB.define("sumsq_outer_acc(Tensor(a!) acc, Tensor g, Tensor x) -> ()")


@torch.library.register_fake("popcomp::sumsq_outer_acc")
def _sumsq_outer_acc_fake(acc, g, x):
    check_sumsq_outer_acc(acc, g, x)
    return None


# ---- spectral pruning: covariance accumulation and greedy selection ------------------------
# covariance_accumulate: x (N, m) or (B, m, S) (channels second, every s a sample; strided
# views are read in place), acc (m, m) float32/float64 += x^T x, count (int64, 0-d) += samples.
LIB.define("covariance_accumulate(Tensor x, Tensor(a!) acc, Tensor(b!) count) -> ()")


@torch.library.register_fake("popcomp::covariance_accumulate")
def _covariance_accumulate_fake(x, acc, count):
    check_covariance_accumulate(x, acc, count)
    return None


# greedy_select: cov (m, m) float32/float64 symmetric, tau (m,) float64 >= 0, theta in [0, 1],
# Z (p, m) or None (Z = I). Returns the k chosen indices in order (int64) and the objective
# L_tau^theta after each step (float64).
LIB.define("greedy_select(Tensor cov, int k, Tensor tau, float theta, Tensor? Z) -> (Tensor, Tensor)")


@torch.library.register_fake("popcomp::greedy_select")
def _greedy_select_fake(cov, k, tau, theta, Z):
    check_greedy_select(cov, k, tau, theta, Z)
    return (
        cov.new_empty((k,), dtype=torch.int64),
        cov.new_empty((k,), dtype=torch.float64),
    )


# ---- palettized (lookup-table) matmul: layout in quantize/packing.py --------------------
# palettized_linear: y = x @ W_hat^T (+ bias), W_hat[r, c] = codebook[g(r, c), idx[r, c]] read
# from packed (out, row_bytes) uint8 layout-v2 indices and codebook (cb_rows, 2**bits) fp16/fp32;
# x (..., in_features) fp32/fp16/bf16, any strides; returns (..., out) in x's dtype.
# palettized_decode: W_hat (rows, in_features) in dtype. group_size 0: per tensor / per channel.
LIB.define(
    "palettized_linear(Tensor x, Tensor packed, Tensor codebook, Tensor? bias, int bits, "
    "int in_features, int group_size) -> Tensor"
)
LIB.define(
    "palettized_decode(Tensor packed, Tensor codebook, int bits, int in_features, "
    "int group_size, ScalarType dtype) -> Tensor"
)


@torch.library.register_fake("popcomp::palettized_linear")
def _palettized_linear_fake(x, packed, codebook, bias, bits, in_features, group_size):
    check_palettized_linear(x, packed, codebook, bias, bits, in_features, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("popcomp::palettized_decode")
def _palettized_decode_fake(packed, codebook, bits, in_features, group_size, dtype):
    check_palettized_decode(packed, codebook, bits, in_features, group_size, dtype)
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)
