"""The pure-torch reference of popcomp::kmeans1d (float64, any device), and its default kernel.

Written independently of the compiled kernels so that it serves as their test oracle:
  * exact: the DP  D_m(i) = min_j D_{m-1}(j-1) + cost(j, i)  solved per layer by the
    monotone-argmin divide and conquer, all midpoints of one recursion level evaluated in a
    single batched torch expression (O(u log u) per layer);
  * DRHW center update: every candidate clamp interval (p lowest, q highest clusters clamped,
    plus full collapse) is evaluated with the true objective and the best is kept.
"""
from __future__ import annotations

import torch

from ..._library import LIB
from ...checks import check_kmeans1d, check_kmeans1d_values


def _prefix(W, v):
    z = W.new_zeros(1)
    return (
        torch.cat([z, torch.cumsum(W, 0)]),
        torch.cat([z, torch.cumsum(W * v, 0)]),
        torch.cat([z, torch.cumsum(W * v * v, 0)]),
    )


def _seg_cost(s0, s1, s2, a, b):
    w = s0[b] - s0[a]
    s = s1[b] - s1[a]
    q = s2[b] - s2[a]
    c = q - torch.where(w > 0, s * s / torch.where(w > 0, w, torch.ones_like(w)), torch.zeros_like(w))
    return torch.clamp(c, min=0.0)


def _penalty(d, beta, diameter):
    return beta * d * d if diameter == "squared" else beta * d


def _exact_partition(v, s0, s1, s2, k):
    """Boundaries (k+1,) of an optimal contiguous k-partition of the u sorted values."""
    u = v.numel()
    dev = v.device
    idx = torch.arange(u, device=dev)
    D = _seg_cost(s0, s1, s2, torch.zeros_like(idx), idx + 1)  # one cluster over [0, i]
    Js = []
    for m in range(1, k):
        Dn = torch.full((u,), float("inf"), dtype=torch.float64, device=dev)
        J = torch.zeros(u, dtype=torch.long, device=dev)
        rlo = torch.tensor([m], device=dev)
        rhi = torch.tensor([u - 1], device=dev)
        clo = torch.tensor([m], device=dev)
        chi = torch.tensor([u - 1], device=dev)
        while rlo.numel():
            mid = (rlo + rhi) // 2
            hi_c = torch.minimum(chi, mid)
            lens = hi_c - clo + 1
            seg = torch.repeat_interleave(torch.arange(mid.numel(), device=dev), lens)
            offs = torch.cumsum(lens, 0) - lens
            j = clo[seg] + (torch.arange(seg.numel(), device=dev) - offs[seg])
            i = mid[seg]
            val = D[j - 1] + _seg_cost(s0, s1, s2, j, i + 1)
            minv = torch.full((mid.numel(),), float("inf"), dtype=torch.float64, device=dev)
            minv = minv.scatter_reduce(0, seg, val, "amin")
            big = torch.full_like(j, u)
            jb = big[: mid.numel()].clone().scatter_reduce(
                0, seg, torch.where(val == minv[seg], j, big), "amin"
            )
            Dn[mid] = minv
            J[mid] = jb
            left = mid - 1 >= rlo
            right = mid + 1 <= rhi
            rlo, rhi, clo, chi = (
                torch.cat([rlo[left], (mid + 1)[right]]),
                torch.cat([(mid - 1)[left], rhi[right]]),
                torch.cat([clo[left], jb[right]]),
                torch.cat([jb[left], chi[right]]),
            )
        D = Dn
        Js.append(J)
    B = [u]
    i = u - 1
    for m in range(k - 1, 0, -1):
        j = int(Js[m - 1][i])
        B.append(j)
        i = j - 1
    B.append(0)
    return torch.tensor(B[::-1], device=dev)


def _update_centers(H, S, prev, beta, diameter):
    """Exact minimizer of sum_j H_j (c_j - m_j)^2 + penalty(max c - min c), by enumeration."""
    act = H > 0
    c = prev.clone()
    c[act] = S[act] / H[act]
    if beta <= 0 or int(act.sum()) < 1:
        return c
    Ha, Sa = H[act], S[act]
    m = Sa / Ha
    A = m.numel()
    if A == 1:
        return torch.full_like(c, float(m[0]))
    cH = torch.cat([Ha.new_zeros(1), torch.cumsum(Ha, 0)])
    cS = torch.cat([Sa.new_zeros(1), torch.cumsum(Sa, 0)])
    cand = [(cS[A] / cH[A], cS[A] / cH[A])]  # full collapse
    for p in range(1, A):
        for q in range(1, A - p + 1):
            HL, SL = cH[p], cS[p]
            HU, SU = cH[A] - cH[A - q], cS[A] - cS[A - q]
            if diameter == "squared":
                det = HL * HU + beta * (HL + HU)
                a = (SL * (HU + beta) + beta * SU) / det
                b = (beta * SL + (HL + beta) * SU) / det
            else:
                a = (SL + 0.5 * beta) / HL
                b = (SU - 0.5 * beta) / HU
            if a <= b:
                cand.append((a, b))
    lo = torch.stack([a for a, _ in cand])
    hi = torch.stack([b for _, b in cand])
    cc = torch.minimum(torch.maximum(m[None, :], lo[:, None]), hi[:, None])
    f = (Ha[None, :] * (cc - m[None, :]) ** 2).sum(1) + _penalty(
        cc.max(1).values - cc.min(1).values, beta, diameter
    )
    best = int(torch.argmin(f))
    return torch.clamp(c, min=float(lo[best]), max=float(hi[best]))


def _objective(v, W, c, beta, diameter):
    mids = 0.5 * (c[1:] + c[:-1])
    lab = torch.searchsorted(mids, v, right=False)
    return (W * (v - c[lab]) ** 2).sum() + _penalty(c[-1] - c[0], beta, diameter)


def _lloyd(v, W, s0, s1, s2, c, beta, diameter, max_iter, tol):
    c = torch.sort(c).values
    B = torch.cat([
        c.new_zeros(1, dtype=torch.long),
        torch.searchsorted(v, 0.5 * (c[1:] + c[:-1]), right=True),
        torch.tensor([v.numel()], device=v.device),
    ])
    f = _objective(v, W, c, beta, diameter)
    it = 0
    while it < max_iter:
        H = s0[B[1:]] - s0[B[:-1]]
        S = s1[B[1:]] - s1[B[:-1]]
        c = torch.sort(_update_centers(H, S, c, beta, diameter)).values
        it += 1
        Bn = torch.cat([B[:1], torch.searchsorted(v, 0.5 * (c[1:] + c[:-1]), right=True), B[-1:]])
        fn = _objective(v, W, c, beta, diameter)
        same = bool(torch.equal(Bn, B))
        dec = float(f - fn)
        f = torch.minimum(f, fn)
        B = Bn
        if same or (tol > 0 and dec <= tol * abs(float(fn))):
            break
    return c, it


def _init(v, W, k, init, gen):
    if init == "linear":
        if k == 1:
            return ((W * v).sum() / W.sum()).reshape(1)
        return torch.linspace(0, 1, k, dtype=torch.float64, device=v.device) * (v[-1] - v[0]) + v[0]
    s0 = torch.cumsum(W, 0)
    if init == "quantile":
        q = (torch.arange(k, dtype=torch.float64, device=v.device) + 0.5) / k * s0[-1]
        return v[torch.clamp(torch.searchsorted(s0, q, right=True), max=v.numel() - 1)]
    # k-means++ (weighted D^2 sampling)
    c = v[torch.multinomial(W.cpu(), 1, generator=gen).to(v.device)]
    while c.numel() < k:
        d2 = ((v[:, None] - c[None, :]) ** 2).min(1).values * W
        if not bool((d2 > 0).any()):
            c = torch.cat([c, c[-1:].expand(k - c.numel())])
            break
        c = torch.cat([c, v[torch.multinomial(d2.cpu(), 1, generator=gen).to(v.device)]])
    return torch.sort(c).values


def kmeans1d_reference(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    rows, n = x.shape
    dev = x.device
    centers = torch.empty((rows, k), dtype=torch.float64, device=dev)
    labels = torch.empty((rows, n), dtype=torch.int32, device=dev)
    cost = torch.empty((rows,), dtype=torch.float64, device=dev)
    n_iter = torch.zeros((rows,), dtype=torch.int64, device=dev)
    gen = torch.Generator().manual_seed(int(seed))
    for r in range(rows):
        xr = x[r].to(torch.float64)
        wr = weights[r].to(torch.float64) if weights is not None else torch.ones_like(xr)
        vals, inv = torch.unique(xr, sorted=True, return_inverse=True)
        W = torch.zeros_like(vals).index_add_(0, inv, wr)
        u = vals.numel()
        shift = vals[u // 2]
        v = vals - shift
        s0, s1, s2 = _prefix(W, v)
        it = 0
        if k >= u:
            c = torch.cat([v, v[-1:].expand(k - u)])
            if beta > 0:
                c, it = _lloyd(v, W, s0, s1, s2, c, beta, diameter, max_iter, tol)
        elif method == "exact":
            B = _exact_partition(v, s0, s1, s2, k)
            H = s0[B[1:]] - s0[B[:-1]]
            S = s1[B[1:]] - s1[B[:-1]]
            # a cluster of zero-weight values sits at the middle of its values
            mid_vals = 0.5 * (v[B[:-1]] + v[B[1:] - 1])
            c = torch.where(H > 0, S / torch.where(H > 0, H, torch.ones_like(H)), mid_vals)
            if beta > 0:
                c, it = _lloyd(v, W, s0, s1, s2, c, beta, diameter, max_iter, tol)
        else:
            if init == "given":
                c = init_centers[r].to(torch.float64) - shift
            else:
                c = _init(v, W, k, init, gen)
            c, it = _lloyd(v, W, s0, s1, s2, c, beta, diameter, max_iter, tol)
        c = torch.sort(c).values + shift
        mids = 0.5 * (c[1:] + c[:-1])
        lab = torch.searchsorted(mids, xr, right=False)
        centers[r] = c
        labels[r] = lab
        cost[r] = (wr * (xr - c[lab]) ** 2).sum() + _penalty(c[-1] - c[0], beta, diameter)
        n_iter[r] = it
    return centers, labels, cost, n_iter


def kmeans1d_default(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed,
                     diameter):
    """The default kernel (every device without its own): the checks, then the reference."""
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    check_kmeans1d_values(x, weights, init_centers)
    return kmeans1d_reference(
        x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter
    )


LIB.impl("kmeans1d", kmeans1d_default, "CompositeExplicitAutograd")
