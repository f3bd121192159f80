"""Spectral pruning (suzuki2020 §2-3) for the experiments' small MLP/CNN.

Selection uses ``popcomp.greedy_select`` (issue 4) when it is installed; otherwise the same
residual rank-one greedy in plain torch below (FALLBACK, clearly internal: the lead can swap in
``popcomp.prune.spectral_prune`` once it lands). The reconstruction Â_J = Σ_FJ(Σ_JJ + I_τ)⁻¹,
the defaults τ = m♯·λ·leverage, λ = 1e-6·Tr Σ, θ = 0.5, and the *simultaneous* procedure (every
layer pruned from the original network's covariances, Z = the original next-layer weight) follow
the paper.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


def leverage(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """τ̃_j = [Σ(Σ + λI)⁻¹]_jj / N̂(λ) (suzuki2020 §4.1)."""
    m = cov.shape[0]
    A = torch.linalg.solve(cov + lam * torch.eye(m, dtype=cov.dtype, device=cov.device), cov)
    d = torch.clamp(torch.diagonal(A), min=0)
    return d / d.sum().clamp_min(1e-300)


def _greedy_torch(cov: torch.Tensor, k: int, tau: torch.Tensor, theta: float,
                  Z: Optional[torch.Tensor]) -> List[int]:
    m = cov.shape[0]
    R = cov.clone()
    if Z is None or theta >= 1.0:
        Mm = torch.eye(m, dtype=cov.dtype, device=cov.device)
    else:
        Mm = theta * torch.eye(m, dtype=cov.dtype, device=cov.device) + (1 - theta) * (Z.T @ Z)
    MR = Mm @ R
    chosen: List[int] = []
    avail = torch.ones(m, dtype=torch.bool, device=cov.device)
    for _ in range(k):
        gain = (R * MR).sum(0) / (torch.diagonal(R) + tau).clamp_min(1e-300)
        gain = torch.where(avail, gain, torch.full_like(gain, -float("inf")))
        j = int(torch.argmax(gain))
        chosen.append(j)
        avail[j] = False
        piv = R[j, j] + tau[j]
        if float(piv) <= 0:
            continue
        r = R[:, j].clone()
        mr = MR[:, j].clone()
        R -= torch.outer(r, r) / piv
        MR -= torch.outer(mr, r) / piv
    return chosen


def select(cov: torch.Tensor, k: int, tau: torch.Tensor, theta: float = 0.5,
           Z: Optional[torch.Tensor] = None) -> Tuple[List[int], str]:
    """Greedy minimization of L_τ^(θ)(J); returns the indices in order and the backend used."""
    import popcomp

    gs = getattr(popcomp, "greedy_select", None)
    if gs is not None:
        try:
            res = gs(cov, k, tau=tau, theta=theta, Z=Z)
            idx = res[0] if isinstance(res, (tuple, list)) else getattr(res, "indices", res)
            return [int(i) for i in torch.as_tensor(idx).flatten().tolist()], "popcomp.greedy_select"
        except Exception:  # noqa: BLE001 - fall back to the reference below
            pass
    return _greedy_torch(cov, k, tau, theta, Z), "torch greedy (internal fallback)"


def reconstruction(cov: torch.Tensor, J: Sequence[int], tau: torch.Tensor) -> torch.Tensor:
    """Â_J = Σ_FJ (Σ_JJ + I_τ)⁻¹ (m × |J|), eq. (1)'s closed form."""
    J = torch.as_tensor(list(J), device=cov.device)
    S_JJ = cov[J][:, J] + torch.diag(tau[J])
    # dead units (zero rows of Σ, leverage 0) make S_JJ singular: a relative jitter keeps the
    # solve defined and gives them zero reconstruction weight
    jit = 1e-12 * float(torch.trace(cov)) / cov.shape[0] + 1e-300
    S_JJ = S_JJ + jit * torch.eye(len(J), dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve(S_JJ, cov[J, :]).T  # (Σ_JJ+I_τ)^{-1} Σ_JF, transposed


def plan_layer(cov: torch.Tensor, width: int, Z: Optional[torch.Tensor], lam_factor: float = 1e-6,
               theta: float = 0.5, lam: Optional[float] = None) -> Dict[str, object]:
    """Choose J of size ``width`` for one hidden layer and its reconstruction matrix."""
    cov = cov.double()
    m = cov.shape[0]
    width = int(max(1, min(width, m)))
    lam = float(lam if lam is not None else lam_factor * float(torch.trace(cov)))
    lam = max(lam, 1e-300)
    tau = width * lam * leverage(cov, lam)
    Zd = Z.double() if Z is not None else None
    J, backend = select(cov, width, tau, theta, Zd)
    A = reconstruction(cov, J, tau)
    return {"J": J, "A": A, "lam": lam, "backend": backend}


def _linears(model: nn.Sequential) -> List[int]:
    return [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]


def hidden_covariances(model: nn.Sequential, x: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Σ̂ of the input of every module index of ``model`` that is a Linear or Conv2d, for Conv
    over channels with all spatial positions as samples (float64)."""
    covs: Dict[int, torch.Tensor] = {}
    hooks = []
    for i, mod in enumerate(model):
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            def f(m, inp, out, i=i):
                a = inp[0].detach().double()
                if isinstance(m, nn.Conv2d):
                    a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
                else:
                    a = a.flatten(1)
                covs[i] = a.T @ a / a.shape[0]
            hooks.append(mod.register_forward_hook(f))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return covs


def prune_mlp(model: nn.Sequential, covs: Dict[int, torch.Tensor], widths: Sequence[Optional[int]],
              lam_factor: float = 1e-6, theta: float = 0.5) -> Tuple[nn.Sequential, List[str]]:
    """Simultaneous spectral pruning of a Sequential MLP's hidden layers.

    ``widths[h]`` is the new width of the h-th hidden layer (None keeps it). Returns a genuinely
    smaller copy and the selection backends used.
    """
    new = copy.deepcopy(model)
    lin = _linears(new)
    if len(widths) != len(lin) - 1:
        raise ValueError(f"widths must give {len(lin) - 1} hidden widths, got {len(widths)}")
    plans = []
    backends = []
    for h, w in enumerate(widths):
        nxt = lin[h + 1]
        if w is None or w >= new[lin[h]].out_features:
            plans.append(None)
            continue
        p = plan_layer(covs[nxt], w, model[nxt].weight.detach(), lam_factor, theta)
        plans.append(p)
        backends.append(p["backend"])
    with torch.no_grad():
        for h, li in enumerate(lin):
            L = new[li]
            W = model[li].weight.detach().double()
            b = model[li].bias.detach().double() if model[li].bias is not None else None
            if h > 0 and plans[h - 1] is not None:  # reconstruct the input side
                W = W @ plans[h - 1]["A"]
            if h < len(plans) and plans[h] is not None:  # keep the chosen units
                J = torch.as_tensor(plans[h]["J"])
                W = W[J]
                b = b[J] if b is not None else None
            nl = nn.Linear(W.shape[1], W.shape[0], bias=b is not None).to(L.weight)
            nl.weight.copy_(W.to(L.weight.dtype))
            if b is not None:
                nl.bias.copy_(b.to(L.weight.dtype))
            new[li] = nl
    return new, backends


def prune_cnn(model: nn.Sequential, covs: Dict[int, torch.Tensor], conv1_width: Optional[int],
              hidden_width: Optional[int], lam_factor: float = 1e-6,
              theta: float = 0.5) -> Tuple[nn.Sequential, List[str]]:
    """Spectral pruning of :func:`~popcomp.experiments._nn.make_cnn`: the output channels of the
    first conv (with its BatchNorm; the second conv reconstructs its input per kernel tap) and
    the hidden units of the Linear head. The simultaneous procedure."""
    new = copy.deepcopy(model)
    conv1, bn1, conv2 = new[0], new[1], new[3]
    lin1, lin2 = new[8], new[10]
    backends = []
    with torch.no_grad():
        if conv1_width is not None and conv1_width < conv1.out_channels:
            Z = model[3].weight.detach().permute(0, 2, 3, 1).reshape(-1, conv1.out_channels)
            p = plan_layer(covs[3], conv1_width, Z, lam_factor, theta)
            backends.append(p["backend"])
            J = torch.as_tensor(p["J"])
            c1 = nn.Conv2d(1, len(J), conv1.kernel_size, padding=conv1.padding).to(conv1.weight)
            c1.weight.copy_(conv1.weight[J])
            c1.bias.copy_(conv1.bias[J])
            b1 = nn.BatchNorm2d(len(J)).to(conv1.weight)
            b1.weight.copy_(bn1.weight[J])
            b1.bias.copy_(bn1.bias[J])
            b1.running_mean.copy_(bn1.running_mean[J])
            b1.running_var.copy_(bn1.running_var[J])
            b1.eps = bn1.eps
            c2 = nn.Conv2d(len(J), conv2.out_channels, conv2.kernel_size, padding=conv2.padding).to(conv2.weight)
            c2.weight.copy_(torch.einsum("oikl,ij->ojkl", conv2.weight.double(), p["A"]).to(conv2.weight))
            c2.bias.copy_(conv2.bias)
            new[0], new[1], new[3] = c1, b1, c2
        if hidden_width is not None and hidden_width < lin1.out_features:
            p = plan_layer(covs[10], hidden_width, model[10].weight.detach(), lam_factor, theta)
            backends.append(p["backend"])
            J = torch.as_tensor(p["J"])
            l1 = nn.Linear(lin1.in_features, len(J)).to(lin1.weight)
            l1.weight.copy_(lin1.weight[J])
            l1.bias.copy_(lin1.bias[J])
            l2 = nn.Linear(len(J), lin2.out_features).to(lin2.weight)
            l2.weight.copy_((lin2.weight.double() @ p["A"]).to(lin2.weight))
            l2.bias.copy_(lin2.bias)
            new[8], new[10] = l1, l2
    return new, backends


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def relative_error(f: nn.Module, g: nn.Module, x: torch.Tensor) -> float:
    """‖f − f♯‖_n / ‖f‖_n on the inputs x (suzuki2020 Fig. 1b)."""
    f.eval()
    g.eval()
    a, b = f(x).double(), g(x).double()
    return float((a - b).norm() / a.norm())
