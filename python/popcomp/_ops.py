"""Schemas and fake (meta) implementations of every popcomp op, in one place.

Each op ``popcomp::NAME`` has
  * its schema and ``register_fake`` here (shape/dtype propagation for torch.compile, opcheck);
  * a CPU kernel and a CUDA kernel (``popcomp/_impl/<family>.py``) calling the compiled core;
  * a pure-torch reference (``popcomp/_reference/<family>.py``) registered as the ``default``
    kernel, so every device works, and used as the oracle in the tests.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("popcomp", "DEF")

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
    rows, n = x.shape
    return (
        x.new_empty((rows, k), dtype=torch.float64),
        x.new_empty((rows, n), dtype=torch.int32),
        x.new_empty((rows,), dtype=torch.float64),
        x.new_empty((rows,), dtype=torch.int64),
    )


# ---- fused squared per-sample gradients (Fisher / GGN diagonal) -------------------------
# acc (out, in) float32 contiguous, mutated: acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2
# g: (B, R, T, out), x: (B, T, in), float32/float16/bfloat16, any strides.
LIB.define("sumsq_outer_acc(Tensor(a!) acc, Tensor g, Tensor x) -> ()")


@torch.library.register_fake("popcomp::sumsq_outer_acc")
def _sumsq_outer_acc_fake(acc, g, x):
    return None


# Device kernels and references register themselves on import.
from ._impl import kmeans as _impl_kmeans  # noqa: E402,F401
from ._impl import hessian as _impl_hessian  # noqa: E402,F401
