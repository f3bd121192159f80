"""Pure-torch references of popcomp::covariance_accumulate and popcomp::greedy_select.

Written independently of the compiled kernels so that they serve as test oracles:
  * accumulation: one matmul in the accumulator dtype;
  * greedy: the explicit residual R and MR (M = theta I + (1 - theta) Z^T Z) in float64, both
    updated by rank-one terms every step (the textbook form of the algorithm; the kernels
    keep R in factored form instead).
"""
from __future__ import annotations

import torch

# Gain guard shared with the kernels (csrc/covariance/covariance_math.h, greedy_gain): a unit
# whose residual variance and ridge tau_j are both rel_guard * Sigma_jj or below scores 0.
REL_GUARD = {torch.float64: 1e3 * torch.finfo(torch.float64).eps,
             torch.float32: 1e3 * torch.finfo(torch.float32).eps}


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """(N, m) or (B, m, S) -> (N, m) samples (a copy for the 3-D layout)."""
    if x.dim() == 2:
        return x
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def covariance_accumulate_reference(x, acc, count):
    xs = as_samples(x).to(acc.dtype)
    acc.add_(xs.T @ xs)
    count.add_(xs.shape[0])


def greedy_operator(cov, theta, Z):
    """M = theta I + (1 - theta) Z^T Z in float64 (Z = None stands for Z = I: M = I)."""
    m = cov.shape[0]
    eye = torch.eye(m, dtype=torch.float64, device=cov.device)
    if Z is None:
        return eye
    Zd = Z.to(torch.float64)
    return theta * eye + (1.0 - theta) * (Zd.T @ Zd)


def greedy_select_reference(cov, k, tau, theta, Z):
    S = cov.to(torch.float64)
    m = S.shape[0]
    dev = S.device
    rel = REL_GUARD.get(cov.dtype, REL_GUARD[torch.float32])
    tau = tau.to(torch.float64).to(dev)
    M = greedy_operator(S, theta, Z)
    R = S.clone()
    P = M @ R
    s_diag = S.diagonal().clone()
    chosen = torch.zeros(m, dtype=torch.bool, device=dev)
    idx = torch.empty(k, dtype=torch.int64, device=dev)
    obj = torch.empty(k, dtype=torch.float64, device=dev)
    for t in range(k):
        num = (R * P).sum(0)
        diag = R.diagonal()
        d = diag + tau
        gain = torch.where(d > 0, num / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
        explained = (tau <= rel * s_diag) & (diag <= rel * s_diag)
        gain = torch.where(explained, torch.zeros_like(gain), gain)
        gain = gain.clamp(min=0.0)
        gain = torch.where(chosen, torch.full_like(gain, -1.0), gain)
        j = int(torch.argmax(gain))  # first maximal index: ties go to the lowest index
        idx[t] = j
        chosen[j] = True
        dj = float(d[j])
        if dj > 0 and not bool(explained[j]):  # an explained unit's column is rounding noise
            r = R[:, j].clone()
            pr = P[:, j].clone()
            R -= torch.outer(r, r) / dj
            P -= torch.outer(pr, r) / dj
        obj[t] = P.diagonal().sum()
    return idx, obj
