"""Independent oracles shared by the test modules (brute force in plain Python floats)."""
from __future__ import annotations

import itertools
import math


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
