"""The pure-torch reference of popcomp::greedy_select (the test oracle), and its default kernel.

Written independently of the compiled kernels: the explicit residual R and MR
(M = theta I + (1 - theta) Z^T Z) in float64, both updated by rank-one terms every step (the
textbook form of the algorithm; the kernels keep R in factored form instead).
"""
from __future__ import annotations

import torch

from ..._library import LIB
from ...checks import GREEDY_REL_GUARD, check_greedy_select, check_greedy_select_values


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
    rel = GREEDY_REL_GUARD.get(cov.dtype, GREEDY_REL_GUARD[torch.float32])
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


def greedy_select_default(cov, k, tau, theta, Z):
    """The default kernel (every device without its own): the checks, then the reference."""
    check_greedy_select(cov, k, tau, theta, Z)
    check_greedy_select_values(cov, tau, Z)
    return greedy_select_reference(cov, k, tau, theta, Z)


LIB.impl("greedy_select", greedy_select_default, "CompositeExplicitAutograd")
