"""The CUDA kernel of popcomp::kmeans1d (the compiled core, on torch's current stream), with the rows its float64 exact DP cannot vouch for solved again on the CPU."""
from __future__ import annotations

import torch

from ...._backend import (compiled, cuda_capturing, cuda_dp_budget, cuda_fallback,
                          cuda_stream_args, cuda_workspace)
from ..._library import LIB
from ...checks import check_kmeans1d, check_kmeans1d_values
from .. import compiled_args
from ..reference.kmeans1d import kmeans1d_reference

# The exact DP keeps (k - 1) x 4 bytes per distinct value of each row it solves at once (rows
# are solved in chunks of POPCOMP_CUDA_DP_BUDGET bytes; a row that alone needs more, alone).
_EXACT_HINT = ("; the exact DP of one row needs about (k + 3) x 4 bytes per distinct value: "
               "use method='lloyd', a smaller k, or the CPU for rows this large")


_EPS = 2.0 ** -53


def exact_untrusted_rows(x, weights, labels, k: int, ratio: float, budget: int = 1 << 23):
    """Rows of an exact result found by a float64 DP on prefix sums whose partition may be above
    the optimum by more than rounding: the CPU's trust bound (csrc/kmeans/exact_dp_precise.h),
    eps (W v_max^2 + S2) <= ratio D, D the cost of the labels with their clusters' exact means,
    in a conservative form that needs no median: W v_max^2 + S2 <= 2 W range^2 (range: from
    the least to the largest value of positive weight, which holds the DP's centring point).
    Evaluated on values mapped to [0, 1] and weights divided by their largest (the ratio is
    invariant to both: no overflow), a few passes of ``budget`` elements at a time. A row
    whose clusters each hold one value of positive weight costs 0 and is optimal. Any device;
    a bool tensor (rows,)."""
    rows, n = x.shape
    out = torch.zeros(rows, dtype=torch.bool, device=x.device)
    rstep = max(1, budget // max(n, 1))
    cstep = max(1, min(n, budget))
    for r0 in range(0, rows, rstep):
        r1 = min(rows, r0 + rstep)
        R = r1 - r0

        def convert():
            for c0 in range(0, n, cstep):
                xs = x[r0:r1, c0 : c0 + cstep].double()
                ws = (weights[r0:r1, c0 : c0 + cstep].double() if weights is not None
                      else torch.ones_like(xs))
                yield xs, ws, labels[r0:r1, c0 : c0 + cstep].long()

        # the float64 copies made once for the three passes where a row chunk is one piece
        # (rows of at most ``budget`` values), else again for each pass
        kept = list(convert()) if n <= cstep else None

        def chunks():
            return kept if kept is not None else convert()

        inf = float("inf")
        lo = torch.full((R,), inf, dtype=torch.float64, device=x.device)
        hi, wmax = torch.full_like(lo, -inf), torch.zeros_like(lo)
        for xs, ws, _ in chunks():
            pos = ws > 0
            lo = torch.minimum(lo, torch.where(pos, xs, inf).amin(1))
            hi = torch.maximum(hi, torch.where(pos, xs, -inf).amax(1))
            wmax = torch.maximum(wmax, ws.amax(1))
        span = torch.where(hi > lo, hi - lo, torch.ones_like(lo))  # (0: one value, cost 0)
        wdiv = torch.where(wmax > 0, wmax, torch.ones_like(wmax))

        def normalized(xs, ws):
            wn = ws / wdiv[:, None]
            vn = torch.where(ws > 0, (xs - lo[:, None]) / span[:, None], torch.zeros_like(xs))
            return vn, wn

        H = torch.zeros(R, k, dtype=torch.float64, device=x.device)
        S = torch.zeros_like(H)
        vlo, vhi = torch.full_like(H, inf), torch.full_like(H, -inf)
        Wn = torch.zeros_like(lo)
        for xs, ws, lab in chunks():
            vn, wn = normalized(xs, ws)
            H.scatter_add_(1, lab, wn)
            S.scatter_add_(1, lab, wn * vn)
            pos = ws > 0
            vlo.scatter_reduce_(1, lab, torch.where(pos, vn, inf), "amin")
            vhi.scatter_reduce_(1, lab, torch.where(pos, vn, -inf), "amax")
            Wn += wn.sum(1)
        # a cluster's exact mean; a cluster of one value of positive weight is that value (its
        # cost exactly 0, where S / H may round)
        c = torch.where(H > 0, S / torch.where(H > 0, H, torch.ones_like(H)), torch.zeros_like(H))
        c = torch.where(vlo == vhi, vlo, c)
        D = torch.zeros_like(lo)
        for xs, ws, lab in chunks():
            vn, wn = normalized(xs, ws)
            D += (wn * (vn - c.gather(1, lab)) ** 2).sum(1)
        out[r0:r1] = (D > 0) & (2.0 * _EPS * Wn > ratio * D)
    return out


def solve_untrusted_on_cpu(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed,
                           diameter, outs):
    """The exact method's rows the CUDA DP cannot vouch for (exact_untrusted_rows), solved
    again by the CPU backend (its trust check and double-double DP) and written into outs =
    (centers, labels, cost, n_iter). One transfer to the host for the row mask; the rows sent
    are copied both ways."""
    centers, labels, cost, n_iter = outs
    ratio = compiled().kmeans_exact_trust_ratio
    idx = exact_untrusted_rows(x, weights, labels, k, ratio).nonzero().flatten()
    if idx.numel() == 0:
        return
    w = weights.index_select(0, idx).cpu() if weights is not None else None
    ic = init_centers.index_select(0, idx).cpu() if init_centers is not None else None
    res = torch.ops.popcomp.kmeans1d.default(x.index_select(0, idx).cpu(), w, k, beta, method,
                                             init, ic, max_iter, tol, seed, diameter)
    for dst, src in zip((centers, labels, cost, n_iter), res):
        dst.index_copy_(0, idx, src.to(device=dst.device, dtype=dst.dtype))


def kmeans1d_cuda(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    # before any device address reaches the kernel: shapes, dtypes, devices, then the values
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    # the values: one transfer to the host for all of them, skipped while a CUDA graph is
    # captured (a transfer cannot be captured, and a replay runs on other values anyway)
    if not cuda_capturing(x):
        check_kmeans1d_values(x, weights, init_centers)
    if cuda_fallback(x, "kmeans1d"):  # popcomp's CUDA runtime cannot use the device
        return kmeans1d_reference(x, weights, k, beta, method, init, init_centers, max_iter, tol,
                                  seed, diameter)
    C = compiled()

    def run(**kwargs):
        device, stream = cuda_stream_args(x)
        budget = cuda_dp_budget(x.device)
        nbytes = C.kmeans1d_cuda_workspace(
            rows=kwargs["rows"], n=kwargs["n"], k=kwargs["k"], method=kwargs["method"],
            x_dtype=kwargs["x_dtype"], device=device, dp_budget=budget,
        )
        try:
            ws = cuda_workspace(nbytes, x.device)
        except torch.cuda.OutOfMemoryError as err:
            raise torch.cuda.OutOfMemoryError(
                f"kmeans1d on CUDA: {nbytes / 2**30:.2f} GiB of workspace for {kwargs['rows']} "
                f"row(s) of {kwargs['n']} values (method {method!r}, k = {k}) do not fit the "
                f"device's free memory{_EXACT_HINT if method == 'exact' else ''}: {err}"
            ) from err
        C.kmeans1d_cuda(**kwargs, workspace=ws.data_ptr(), workspace_bytes=ws.numel(),
                        device=device, stream=stream, dp_budget=budget)

    outs = compiled_args.kmeans1d(
        x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter, run
    )
    # the exact DP runs in float64 alone here: rows on which that may not be exact (badly
    # scaled data) are solved again on the CPU, except while a CUDA graph is being captured
    if method == "exact" and x.numel() and not cuda_capturing(x):
        solve_untrusted_on_cpu(x, weights, k, beta, method, init, init_centers, max_iter, tol,
                               seed, diameter, outs)
    return outs


LIB.impl("kmeans1d", kmeans1d_cuda, "CUDA")
