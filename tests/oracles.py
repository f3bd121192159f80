"""Independent oracles shared by the test modules (brute force in plain Python floats, or in
exact rational arithmetic)."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction


def kmeans_brute_force_cost(x, w, k: int) -> float:
    """Minimum of sum_i w_i (x_i - c)^2 over all contiguous partitions of the sorted distinct
    values (an optimal 1-D clustering is contiguous). ``x``, ``w``: tensors or sequences.
    Each center is a convex combination of its values, so nothing overflows where the answer
    is representable; clusters of zero total weight cost nothing."""
    xs = x.tolist() if hasattr(x, "tolist") else list(x)
    ws = w.tolist() if hasattr(w, "tolist") else list(w)
    W = {}
    for v, ww in zip(xs, ws):
        W[v] = W.get(v, 0.0) + ww
    vals = sorted(W)
    u = len(vals)
    if k >= u:
        return 0.0
    best = math.inf
    for cuts in itertools.combinations(range(1, u), k - 1):
        b = (0,) + cuts + (u,)
        c = 0.0
        for a, e in zip(b[:-1], b[1:]):
            seg = vals[a:e]
            H = sum(W[v] for v in seg)
            if H > 0:
                m = sum(W[v] / H * v for v in seg)
                c += sum(W[v] * (v - m) * (v - m) for v in seg)
        best = min(best, c)
    return best


def _exact_segment_sums(x, w):
    """Sorted distinct values with their summed weights, as exact rationals (Fraction(float) is
    exact), and the prefix sums of W, W v, W v^2."""
    xs = x.tolist() if hasattr(x, "tolist") else list(x)
    ws = w.tolist() if hasattr(w, "tolist") else list(w)
    W = {}
    for v, ww in zip(xs, ws):
        W[v] = W.get(v, Fraction(0)) + Fraction(ww)
    vals = sorted(W)
    p0, p1, p2 = [Fraction(0)], [Fraction(0)], [Fraction(0)]
    for v in vals:
        fv = Fraction(v)
        p0.append(p0[-1] + W[v])
        p1.append(p1[-1] + W[v] * fv)
        p2.append(p2[-1] + W[v] * fv * fv)
    return vals, p0, p1, p2


def _exact_seg_cost(p0, p1, p2, a, e):
    H = p0[e] - p0[a]
    if H == 0:
        return H
    S = p1[e] - p1[a]
    return (p2[e] - p2[a]) - S * S / H


def kmeans_brute_force_cost_exact(x, w, k: int):
    """kmeans_brute_force_cost in exact rational arithmetic (fractions.Fraction): the minimum
    over all contiguous partitions of the sorted distinct values of the sum of each segment's
    sum_i W_i (v_i - mean)^2, every segment's cost exact (no rounding at all, whatever the
    scales). Returns a Fraction. Keep u small (about 14 values): the enumeration is
    C(u - 1, k - 1) partitions."""
    vals, p0, p1, p2 = _exact_segment_sums(x, w)
    u = len(vals)
    if k >= u:
        return Fraction(0)
    seg = {(a, e): _exact_seg_cost(p0, p1, p2, a, e) for a in range(u) for e in range(a + 1, u + 1)}
    best = None
    for cuts in itertools.combinations(range(1, u), k - 1):
        b = (0,) + cuts + (u,)
        c = sum((seg[a, e] for a, e in zip(b[:-1], b[1:])), Fraction(0))
        if best is None or c < best:
            best = c
    return best


def kmeans_labels_cost_exact(x, w, labels):
    """Exact (Fraction) cost of a labelling with each cluster at its own weighted mean: the
    least cost any centers give those labels."""
    xs = x.tolist() if hasattr(x, "tolist") else list(x)
    ws = w.tolist() if hasattr(w, "tolist") else list(w)
    ls = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    groups = {}
    for v, ww, l in zip(xs, ws, ls):
        g = groups.setdefault(l, [Fraction(0), Fraction(0), Fraction(0)])
        fv, fw = Fraction(v), Fraction(ww)
        g[0] += fw
        g[1] += fw * fv
        g[2] += fw * fv * fv
    return sum((g[2] - g[1] * g[1] / g[0] for g in groups.values() if g[0] != 0), Fraction(0))


def kmeans_dp_stable_labels(x, w, k: int):
    """Labels (0..k-1, of the input values) of an optimal contiguous k-partition found by an
    O(k u^2) DP in float64 whose segment costs are computed stably: every segment accumulated
    from its own first value by weighted Welford updates (all segments starting at or below a
    value updated together), so a cost's rounding is relative to the segment itself; no prefix
    sums, no cancellation against values outside the segment. For u up to a few thousand."""
    import numpy as np

    xs = np.asarray(x, dtype=np.float64).ravel()
    ws = np.asarray(w, dtype=np.float64).ravel()
    v, inv = np.unique(xs, return_inverse=True)
    W = np.bincount(inv, weights=ws)
    u = v.size
    if k >= u:
        return inv.astype(np.int64)
    C = np.full((u, u), np.inf)  # C[j, i]: cost of the values j..i
    H = np.zeros(u)
    M = np.zeros(u)
    M2 = np.zeros(u)
    for i in range(u):
        s = slice(0, i + 1)
        Hn = H[s] + W[i]
        d = v[i] - M[s]
        f = np.divide(W[i], Hn, out=np.zeros(i + 1), where=Hn > 0)
        Mn = M[s] + d * f
        M2[s] += W[i] * d * (v[i] - Mn)
        H[s], M[s] = Hn, Mn
        C[s, i] = np.maximum(M2[s], 0.0)
    D = C[0].copy()
    arg = np.zeros((k, u), dtype=np.int64)
    for m in range(1, k):
        A = D[:-1, None] + C[1:, :]  # row j - 1: the last cluster starts at j
        arg[m] = A.argmin(0) + 1
        D = A.min(0)
        D[:m] = np.inf
    B = [u]
    i = u - 1
    for m in range(k - 1, 0, -1):
        B.append(int(arg[m, i]))
        i = B[-1] - 1
    starts = np.array(B[::-1][:-1], dtype=np.int64)  # first value of clusters 1..k-1
    return np.searchsorted(v[starts], xs, side="right").astype(np.int64)
