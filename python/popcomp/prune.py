"""Spectral pruning of whole networks (Suzuki et al. 2020, "Spectral Pruning", sec. 2.1, 3.1).

For a layer with input activations phi (m units; for convolutions: channels, every spatial
position a sample) and the non-centered covariance Sigma = E[phi phi^T]:

* units J are chosen greedily (:func:`popcomp.greedy_select`) to minimize
  ``L(J) = theta Tr[Sigma_FF - Sigma_FJ (Sigma_JJ + I_tau)^-1 Sigma_JF] + (1 - theta) Tr{Z [...] Z^T}``;
* the full activation is reconstructed from the kept ones with
  ``A_J = Sigma_FJ (Sigma_JJ + I_tau)^-1`` (:func:`reconstruction`), so the next layer becomes
  ``W# = W[:, F] A_J`` (:func:`pruned_next_weight`) and the producing layer keeps its rows J;
* the degrees of freedom ``N(lambda) = Tr[Sigma (Sigma + lambda I)^-1]``, the output-aware
  ``N'(lambda; Z)``, the leverage scores and the width <-> lambda relation (eq. 3) are here too.

Paper defaults (every one overridable): ``lambda = 1e-6 Tr Sigma``, ``tau = m# lambda leverage``,
``theta = 0.5`` and ``Z`` from the next layer's weights (rows of the kept next units scaled by
``sqrt(m q_j) / max_j' ||W_j'||``, ``q`` proportional to the inverse leverage scores there).

:func:`spectral_prune` applies this to ``nn.Sequential`` MLPs, VGG-style CNNs
(Conv2d-BatchNorm-ReLU-pool stacks, Flatten, Linear head) and the inner channels of ResNet
BasicBlock / Bottleneck modules (recognized by their ``conv1, bn1, conv2, bn2[, conv3, bn3]``
attributes and standard forward), with the backward or the simultaneous procedure of sec. 3.1.
It returns a new plain-torch model (the input model is never modified) and a report.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _validate as V
from .covariance import (
    CovarianceAccumulator,
    check_covariance,
    check_tau,
    check_theta,
    greedy_select,
)

DEFAULT_LAMBDA_REL = 1e-6
DEFAULT_THETA = 0.5
EQ3_C1 = 5.0
EQ3_C2 = 80.0

# ---- spectral quantities ---------------------------------------------------------------------


def _cov64(cov: torch.Tensor, name: str = "cov") -> torch.Tensor:
    return check_covariance(name, cov, dtypes=(torch.float32, torch.float64)).to(torch.float64)


def _eigh(cov: torch.Tensor):
    mu, U = torch.linalg.eigh(_cov64(cov))
    return mu.clamp(min=0.0), U


def default_lambda(cov: torch.Tensor, rel: float = DEFAULT_LAMBDA_REL) -> float:
    """The paper's ``lambda = rel * Tr Sigma`` (rel = 1e-6)."""
    return float(rel * _cov64(cov).diagonal().sum())


def _check_lambda(lam) -> float:
    lam = V.check_real("lam", lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return lam


def degrees_of_freedom(cov: torch.Tensor, lam) -> Union[float, torch.Tensor]:
    """``N(lambda) = Tr[Sigma (Sigma + lambda I)^-1] = sum_j mu_j / (mu_j + lambda)``.

    ``lam`` may be a float (returns a float) or a tensor of lambdas (returns a tensor).
    """
    mu, _ = _eigh(cov)
    return _dof_from_eigs(mu, lam)


def _dof_from_eigs(mu: torch.Tensor, lam):
    if isinstance(lam, torch.Tensor):
        lam = lam.to(torch.float64).to(mu.device)
        if bool((lam < 0).any()):
            raise ValueError("lam must be >= 0")
        l = lam.reshape(-1, 1)
        r = torch.where(mu[None, :] > 0, mu[None, :] / (mu[None, :] + l), torch.zeros_like(mu[None, :]))
        return r.sum(1).reshape(lam.shape)
    lam = _check_lambda(lam)
    pos = mu > 0
    return float((mu[pos] / (mu[pos] + lam)).sum())


def output_degrees_of_freedom(cov: torch.Tensor, lam, Z: torch.Tensor) -> float:
    """``N'(lambda; Z) = Tr[Z Sigma (Sigma + lambda I)^-1 Z^T]``."""
    lam = _check_lambda(lam)
    mu, U = _eigh(cov)
    Z = V.as_tensor("Z", Z)
    if Z.dim() != 2 or Z.shape[1] != mu.numel():
        raise ValueError(f"Z must have shape (p, {mu.numel()}), got {tuple(Z.shape)}")
    d = torch.where(mu > 0, mu / (mu + lam), torch.zeros_like(mu))
    ZU = Z.to(torch.float64).to(U.device) @ U
    return float(((ZU**2) * d[None, :]).sum())


def leverage_scores(cov: torch.Tensor, lam) -> torch.Tensor:
    """``tau~_j = [Sigma (Sigma + lambda I)^-1]_jj / N(lambda)`` (sums to 1), float64 ``(m,)``.

    With ``N(lambda) = 0`` (Sigma = 0) the scores are uniform.
    """
    lam = _check_lambda(lam)
    mu, U = _eigh(cov)
    d = torch.where(mu > 0, mu / (mu + lam) if lam > 0 else torch.ones_like(mu), torch.zeros_like(mu))
    diag = (U**2 * d[None, :]).sum(1)
    tot = float(diag.sum())
    if not tot > 0:
        return torch.full_like(diag, 1.0 / diag.numel())
    return diag / tot


def width_from_lambda(cov: torch.Tensor, lam, c1: float = EQ3_C1, c2: float = EQ3_C2) -> int:
    """Smallest width ``m#`` with ``m# >= c1 N(lambda) log(c2 N(lambda))`` (eq. 3), in [1, m]."""
    mu, _ = _eigh(cov)
    return _width_from_eigs(mu, lam, c1, c2)


def _width_from_eigs(mu, lam, c1, c2) -> int:
    n = _dof_from_eigs(mu, lam)
    need = c1 * n * math.log(c2 * n) if c2 * n > 1 else 0.0
    return int(min(max(1, math.ceil(need - 1e-9)), mu.numel()))


def lambda_from_width(cov: torch.Tensor, width: int, c1: float = EQ3_C1, c2: float = EQ3_C2,
                      rtol: float = 1e-10) -> float:
    """``lambda = inf{lambda >= 0 : m# >= c1 N(lambda) log(c2 N(lambda))}`` (eq. 3).

    ``N`` decreases in lambda, so the infimum is found by bisection (relative tolerance
    ``rtol``). Returns 0 when the width already satisfies the condition at lambda = 0.
    """
    mu, _ = _eigh(cov)
    width = V.check_int("width", width, lo=1)

    def ok(lam):
        n = _dof_from_eigs(mu, lam)
        return c2 * n <= 1 or width >= c1 * n * math.log(c2 * n)

    if ok(0.0):
        return 0.0
    hi = max(float(mu.max()), 1e-300)
    while not ok(hi):
        hi *= 2.0
    lo = 0.0 if hi <= 0 else hi * 1e-30
    if ok(lo):
        lo = 0.0
    # bisection in log-space where possible
    for _ in range(400):
        mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
        if ok(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= rtol * hi:
            break
    return hi


def default_tau(cov: torch.Tensor, width: int, lam: Optional[float] = None,
                lam_rel: float = DEFAULT_LAMBDA_REL) -> torch.Tensor:
    """The paper's ridge ``tau = m# * lambda * leverage(lambda)`` (Theorem 1), float64 ``(m,)``;
    ``lambda`` defaults to ``lam_rel * Tr Sigma``."""
    if lam is None:
        lam = default_lambda(cov, lam_rel)
    return width * lam * leverage_scores(cov, lam)


def _as_index(J, m: int, device) -> torch.Tensor:
    J = torch.as_tensor(J, dtype=torch.int64, device=device).reshape(-1)
    if J.numel() == 0:
        raise ValueError("J must hold at least one index")
    if bool((J < 0).any()) or bool((J >= m).any()):
        raise ValueError(f"J must hold indices in [0, {m})")
    return J


def reconstruction(cov: torch.Tensor, J, tau=0.0) -> torch.Tensor:
    """``A_J = Sigma_FJ (Sigma_JJ + I_tau)^-1``: ``(m, |J|)`` float64 decoder of ``phi`` from
    ``phi_J`` (eq. 1). ``tau`` is a scalar or the ``(m,)`` vector of all units (indexed by J).
    A singular ``Sigma_JJ + I_tau`` uses the pseudo-inverse."""
    S = _cov64(cov)
    m = S.shape[0]
    J = _as_index(J, m, S.device)
    t = check_tau(tau, m, S.device)[J]
    G = S[J][:, J] + torch.diag(t)
    B = S[J]  # (|J|, m) = Sigma_JF
    try:
        X, info = torch.linalg.solve_ex(G, B)
        if int(info) != 0 or not bool(torch.isfinite(X).all()):
            raise RuntimeError
    except RuntimeError:
        X = torch.linalg.pinv(G, hermitian=True) @ B
    return X.T.contiguous()


def reconstruction_error(cov: torch.Tensor, J, tau=0.0, Z: Optional[torch.Tensor] = None,
                         theta: float = 1.0) -> float:
    """``L_tau^theta(J)`` by the closed form (explicit inverse; for checks and reports)."""
    S = _cov64(cov)
    m = S.shape[0]
    J = _as_index(J, m, S.device)
    t = check_tau(tau, m, S.device)[J]
    G = S[J][:, J] + torch.diag(t)
    R = S - S[:, J] @ torch.linalg.pinv(G, hermitian=True) @ S[J]
    theta = check_theta(theta)
    if Z is None:
        return float(R.diagonal().sum())
    Zd = Z.to(torch.float64).to(S.device)
    return float(theta * R.diagonal().sum() + (1 - theta) * ((Zd @ R) * Zd).sum())


def pruned_next_weight(W_next: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``W# = W_next[:, F] A_J`` for a Linear ``(out, m)``, a Conv ``(out, m, *kernel)`` or a
    Linear after Flatten viewed as ``(out, m, positions)``; returned in ``W_next``'s dtype."""
    if W_next.shape[1] != A.shape[0]:
        raise ValueError(f"W_next has {W_next.shape[1]} input units but A has {A.shape[0]} rows")
    Wd = W_next.to(torch.float64)
    Ad = A.to(torch.float64).to(Wd.device)
    out = torch.einsum("oc...,cj->oj...", Wd, Ad)
    return out.to(W_next.dtype)


def output_matrix(W_next: torch.Tensor, m: int, keep_next: Optional[torch.Tensor] = None,
                  leverage_next: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paper's ``Z`` (sec. 3.1): rows ``sqrt(m q_j) / max_j' ||W_j',:|| * W_j,:`` for the
    kept next units ``j`` (``keep_next``; None: all), ``q_j`` proportional to the inverse
    next-layer leverage scores over them (None: uniform). ``W_next`` is ``(out, m)``,
    ``(out, m, *kernel)`` or ``(out, m, positions)``; each output unit contributes one row per
    kernel position / position. Returns float64 ``(rows, m)``."""
    Wd = W_next.to(torch.float64)
    out = Wd.shape[0]
    W3 = Wd.reshape(out, Wd.shape[1], -1)  # (out, m, P)
    norms = W3.reshape(out, -1).norm(dim=1)
    mx = float(norms.max()) if out else 0.0
    if keep_next is None:
        keep_next = torch.arange(out, device=Wd.device)
    keep_next = keep_next.to(Wd.device)
    if leverage_next is None:
        inv = torch.ones(keep_next.numel(), dtype=torch.float64, device=Wd.device)
    else:
        lev = leverage_next.to(torch.float64).to(Wd.device)[keep_next]
        inv = 1.0 / lev.clamp(min=torch.finfo(torch.float64).tiny)
    q = inv / inv.sum()
    scale = torch.sqrt(m * q) / (mx if mx > 0 else 1.0)
    rows = W3[keep_next] * scale[:, None, None]  # (k, m, P)
    return rows.permute(0, 2, 1).reshape(-1, Wd.shape[1]).contiguous()


# ---- model structure -------------------------------------------------------------------------

# element-wise (or per-sample random, as dropout in training) layers: they commute with Flatten
# and with the selection of units
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
# pooling over the trailing (spatial) axes: per channel only for Conv2d outputs before a Flatten;
# after a Linear (units on the last axis) or a Flatten (features on it) it mixes neighbouring units
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = ("Linear, Conv2d (groups=1), BatchNorm1d/2d, element-wise activations, PReLU, Dropout, "
              "pooling, Flatten and ResNet BasicBlock/Bottleneck blocks")


def _is_block(mod: nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("conv1", "bn1", "conv2", "bn2")) and not isinstance(mod, nn.Sequential)


def _is_producer(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and type(mod) is nn.Conv2d)


@dataclasses.dataclass
class _Site:
    name: str           # path of the producing layer (its output units are pruned)
    producer: str
    norms: List[str]
    consumer: str
    capture: str        # module whose input is phi
    m: int
    next_site: Optional[str] = None
    # per norm: the rank of its input when dim 1 holds the produced units (a Linear's units are
    # on the last axis, so its BatchNorm1d/PReLU must see (B, m); a Conv2d's, (B, m, H, W))
    norm_dims: List[int] = dataclasses.field(default_factory=list)


def _leaves(mod: nn.Module, prefix: str, out: List[Tuple[str, nn.Module]]):
    for name, child in mod.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            _leaves(child, path + ".", out)
        else:
            out.append((path, child))


def _unsupported(path: str, mod: nn.Module, why: str = "") -> ValueError:
    what = f"layer '{path}' ({type(mod).__name__})" if path else f"model ({type(mod).__name__})"
    return ValueError(f"spectral_prune cannot rewrite {what}{': ' + why if why else ''}; "
                      f"supported: {_SUPPORTED}")


def _block_sites(path: str, blk: nn.Module) -> List[_Site]:
    p = f"{path}." if path else ""
    for a in ("conv1", "conv2") + (("conv3",) if hasattr(blk, "conv3") else ()):
        c = getattr(blk, a)
        if not (isinstance(c, nn.Conv2d) and c.groups == 1):
            raise _unsupported(p + a, c, "inner convolutions of a residual block must be Conv2d with groups=1")
    for a in ("bn1", "bn2") + (("bn3",) if hasattr(blk, "bn3") else ()):
        if not isinstance(getattr(blk, a), nn.BatchNorm2d):
            raise _unsupported(p + a, getattr(blk, a), "expected BatchNorm2d")
    sites = [_Site(p + "conv1", p + "conv1", [p + "bn1"], p + "conv2", p + "conv2", blk.conv1.out_channels,
                   norm_dims=[4])]
    if hasattr(blk, "conv3"):
        sites.append(_Site(p + "conv2", p + "conv2", [p + "bn2"], p + "conv3", p + "conv3", blk.conv2.out_channels,
                           norm_dims=[4]))
        sites[0].next_site = sites[1].name
    return sites


def find_sites(model: nn.Module, sample=None, *, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
               device: Optional[Union[str, torch.device]] = None) -> List["_Site"]:
    """Prunable layers of a model, in forward order (raises on layers it cannot rewrite).

    Without ``sample`` the answer is from the structure alone. BatchNorm1d and PReLU act on
    dim 1, which holds a Linear's units only for a 2-D input: a Linear applied to (B, T, n)
    puts T there. With ``sample`` (one batch, as in ``spectral_prune``'s data; ``forward`` and
    ``device`` as there) the model is run on it once (eval mode, no grad, modes restored) and
    the sites whose BatchNorm/PReLU layers do not see the produced units on dim 1 are dropped.
    """
    sites = _structural_sites(model)
    if sample is None:
        return sites
    modes = _modes(model)
    model.eval()
    try:
        return _units_on_dim1(model, sites, sample, forward, device)
    finally:
        _restore_modes(model, modes)


def _structural_sites(model: nn.Module) -> List["_Site"]:
    if _is_block(model):
        return _block_sites("", model)
    if not isinstance(model, nn.Sequential):
        if _is_producer(model):
            return []
        raise _unsupported("", model, "the model must be an nn.Sequential or a residual block")
    leaves: List[Tuple[str, nn.Module]] = []
    _leaves(model, "", leaves)
    kinds = []
    for path, mod in leaves:
        if _is_producer(mod):
            kinds.append("producer")
        elif isinstance(mod, _NORMS) or (isinstance(mod, nn.PReLU) and mod.num_parameters > 1):
            kinds.append("norm")  # per-channel parameters: the kept channels are selected
        elif isinstance(mod, _ELEMENTWISE):
            kinds.append("chan")
        elif isinstance(mod, _POOLS):
            kinds.append("pool")
        elif isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                raise _unsupported(path, mod, "only Flatten(start_dim=1, end_dim=-1)")
            kinds.append("flatten")
        elif _is_block(mod):
            kinds.append("block")
        else:
            raise _unsupported(path, mod)
    sites: List[_Site] = []
    for a, (path, mod) in enumerate(leaves):
        if kinds[a] == "producer":
            norms, norm_dims, flat = [], [], False
            m = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            for b in range(a + 1, len(leaves)):
                kb = kinds[b]
                if kb == "norm":
                    if _channel_count(leaves[b][1]) != m:  # not over the m produced units
                        break
                    norms.append(leaves[b][0])
                    norm_dims.append(2 if flat or isinstance(mod, nn.Linear) else 4)
                elif kb == "chan":
                    continue
                elif kb == "pool":
                    if flat or isinstance(mod, nn.Linear):
                        break  # pools over the units themselves: the pruned model would pool others
                elif kb == "flatten":
                    if flat:
                        break
                    flat = True
                elif kb == "producer":
                    cons_path, cons = leaves[b]
                    if flat and not isinstance(cons, nn.Linear):
                        break
                    if not flat and isinstance(cons, nn.Linear) != isinstance(mod, nn.Linear):
                        break  # Conv2d -> Linear without Flatten reads a spatial axis, not channels
                    in_units = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
                    if in_units % m != 0 or (in_units != m and (not flat or isinstance(mod, nn.Linear))):
                        # only a flattened (B, m, *spatial) Conv2d output is channel-major; a
                        # flattened (B, T, m) Linear output interleaves the units
                        break
                    # phi is the consumer's input, after every layer in between (a Linear after
                    # Flatten reads it as (B, m, positions))
                    sites.append(_Site(path, path, norms, cons_path, cons_path, m, norm_dims=norm_dims))
                    break
                else:  # block or end
                    break
        elif kinds[a] == "block":
            sites.extend(_block_sites(path, mod))
    by_producer = {s.producer: s for s in sites}
    for s in sites:
        if s.next_site is None and s.consumer in by_producer:
            s.next_site = by_producer[s.consumer].name
    return sites


def _units_on_dim1(model: nn.Module, sites: List["_Site"], sample, forward, device) -> List["_Site"]:
    """``sites`` less those with a BatchNorm/PReLU whose input, when ``model`` runs on ``sample``,
    does not have the rank that puts the produced units on dim 1 (e.g. BatchNorm1d(m) after a
    Linear on (B, T, m) normalizes the T positions: cutting it by unit index is wrong)."""
    # BatchNorm2d only takes 4-D inputs, so it is over a Conv2d's channels whenever it runs
    checks = [(s.name, nb, d) for s in sites for nb, d in zip(s.norms, s.norm_dims)
              if not isinstance(_get(model, nb), nn.BatchNorm2d)]
    if not checks:
        return sites
    seen: Dict[str, set] = {}

    def make_hook(path: str):
        def pre(mod, args):
            x = args[0]
            seen.setdefault(path, set()).add(x.dim() if isinstance(x, torch.Tensor) else -1)
        return pre

    hooks = [_get(model, nb).register_forward_pre_hook(make_hook(nb)) for nb in {c[1] for c in checks}]
    try:
        with torch.no_grad():
            _run(model, sample, forward, device)
    finally:
        for h in hooks:
            h.remove()
    bad = {name for name, nb, d in checks if seen.get(nb, {d}) != {d}}
    kept = [s for s in sites if s.name not in bad]
    for s in kept:
        if s.next_site in bad:
            s.next_site = None
    return kept


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent), name, new)


def _param_like(data: torch.Tensor, old: nn.Parameter) -> nn.Parameter:
    """A new parameter holding ``data`` with ``old``'s dtype, device and requires_grad."""
    return nn.Parameter(data.detach().to(device=old.device, dtype=old.dtype).clone(),
                        requires_grad=old.requires_grad)


def _select_out(mod: nn.Module, J: torch.Tensor) -> nn.Module:
    J = J.to(mod.weight.device)
    W = mod.weight.detach()[J]
    b = mod.bias.detach()[J] if mod.bias is not None else None
    if isinstance(mod, nn.Linear):
        new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    else:
        new = nn.Conv2d(W.shape[1], W.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                        dilation=mod.dilation, groups=1, bias=b is not None, padding_mode=mod.padding_mode,
                        device=W.device, dtype=W.dtype)
    new.weight = _param_like(W, mod.weight)
    if b is not None:
        new.bias = _param_like(b, mod.bias)
    new.train(mod.training)
    return new


def _channel_count(mod: nn.Module) -> int:
    return mod.num_parameters if isinstance(mod, nn.PReLU) else mod.num_features


def _select_bn(bn: nn.Module, J: torch.Tensor) -> nn.Module:
    if isinstance(bn, nn.PReLU):  # one slope per channel
        new = nn.PReLU(J.numel(), device=bn.weight.device, dtype=bn.weight.dtype)
        new.weight = _param_like(bn.weight.detach()[J.to(bn.weight.device)], bn.weight)
        new.train(bn.training)
        return new
    J = J.to(bn.running_mean.device if bn.running_mean is not None else bn.weight.device)
    new = type(bn)(J.numel(), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    new = new.to(device=J.device)
    with torch.no_grad():
        if bn.affine:
            new.weight = _param_like(bn.weight.detach()[J], bn.weight)
            new.bias = _param_like(bn.bias.detach()[J], bn.bias)
        if bn.track_running_stats and bn.running_mean is not None:
            new.running_mean = bn.running_mean[J].clone()
            new.running_var = bn.running_var[J].clone()
            new.num_batches_tracked = bn.num_batches_tracked.clone()
    new.train(bn.training)
    return new


def _consumer_units(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _consumer_weight(mod: nn.Module, m: int) -> torch.Tensor:
    """Consumer weight as (out, m, ...): Linear (out, m) or, after Flatten, (out, m, positions)."""
    W = mod.weight.detach()
    if isinstance(mod, nn.Linear) and mod.in_features != m:
        return W.reshape(W.shape[0], m, mod.in_features // m)
    return W


def _reconstruct_in(mod: nn.Module, A: torch.Tensor, m: int) -> nn.Module:
    W3 = _consumer_weight(mod, m)
    Wn = pruned_next_weight(W3, A.to(W3.device))
    k = A.shape[1]
    b = mod.bias.detach() if mod.bias is not None else None
    if isinstance(mod, nn.Linear):
        Wn = Wn.reshape(Wn.shape[0], -1)
        new = nn.Linear(Wn.shape[1], Wn.shape[0], bias=b is not None, device=Wn.device, dtype=Wn.dtype)
    else:
        new = nn.Conv2d(k, Wn.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                        dilation=mod.dilation, groups=1, bias=b is not None, padding_mode=mod.padding_mode,
                        device=Wn.device, dtype=Wn.dtype)
    new.weight = _param_like(Wn, mod.weight)
    if b is not None:
        new.bias = _param_like(b, mod.bias)
    new.train(mod.training)
    return new


# ---- data ------------------------------------------------------------------------------------


def _batches(data) -> List[Any]:
    if isinstance(data, torch.Tensor):
        return [data]
    if data is None:
        raise ValueError("data is required: an input tensor or an iterable of batches")
    if iter(data) is data:  # one-shot iterator: keep the batches for the second pass
        data = list(data)
    return data


def _input_of(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x"):
            if key in batch:
                return batch[key]
        raise ValueError("dict batches need an 'input', 'inputs' or 'x' entry (or pass forward=)")
    return batch


def _run(model, batch, forward, device):
    if forward is not None:
        return forward(model, batch)
    x = _input_of(batch)
    if device is not None and isinstance(x, torch.Tensor):
        x = x.to(device)
    return model(x)


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    if total is None:
        try:
            total = len(it)
        except TypeError:
            total = None
    return tqdm(it, desc=desc, total=total, leave=False)


def _check_calibration(sites, covs, inputs_checked: bool, dtype: torch.dtype) -> None:
    """Raises on the first layer (forward order) whose accumulated covariance is not finite
    (covariance_accumulate does not check the activations; this is the one cheap check)."""
    for s in sites:
        if bool(torch.isfinite(covs[s.name]).all()):
            continue
        cause = ("the model produced NaN/Inf from finite calibration data" if inputs_checked
                 else "the calibration data or the model produced NaN/Inf")
        if dtype == torch.float32:
            cause += " (or the squares of huge activations overflowed the float32 accumulator: try dtype=torch.float64)"
        raise ValueError(f"the activations at the input of layer '{s.capture}' (the units of layer "
                         f"'{s.name}') contain NaN or Inf after calibration: {cause}")


def _count_flops(model: nn.Module, sample, forward, device) -> int:
    """2 x multiply-adds of the Linear and Conv2d layers for one sample of ``sample``'s batch."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += 2 * out.numel() * k

    hs = [mm.register_forward_hook(hook) for mm in model.modules() if isinstance(mm, (nn.Linear, nn.Conv2d))]
    try:
        x = _input_of(sample)
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
        with torch.no_grad():
            _run(model, sample, forward, device)
    finally:
        for h in hs:
            h.remove()
    return int(total[0] // max(n, 1))


def _flat_out(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.reshape(y.shape[0], math.prod(y.shape[1:])) if y.dim() > 0 else y.reshape(1, 1)
    if isinstance(y, (tuple, list)):
        return torch.cat([_flat_out(t) for t in y], dim=1)
    raise TypeError(f"model outputs must be tensors (or tuples of tensors), got {type(y).__name__}")


# ---- the pruner ------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    name: str
    width_before: int
    width_after: int
    lam: float
    dof: float
    indices: torch.Tensor
    objective: float
    initial_objective: float


@dataclasses.dataclass
class PruneReport:
    """Result summary of :func:`spectral_prune`.

    widths_before / widths_after: units of every pruned layer (by producing-layer name).
    params_before / params_after: parameter counts. flops_before / flops_after: 2 x the
    multiply-adds of the Linear/Conv2d layers per sample. relative_error:
    ``||f - f#||_n / ||f||_n`` over the data. layers: per-layer details (lambda, N(lambda),
    the chosen indices in order, the objective before/after the selection).
    """

    widths_before: Dict[str, int]
    widths_after: Dict[str, int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    relative_error: float
    procedure: str
    layers: List[LayerReport]

    def __str__(self) -> str:
        lines = [f"spectral pruning ({self.procedure}): params {self.params_before} -> {self.params_after}, "
                 f"FLOPs {self.flops_before} -> {self.flops_after}, relative error {self.relative_error:.4g}"]
        for l in self.layers:
            lines.append(f"  {l.name}: {l.width_before} -> {l.width_after} (lambda={l.lam:.3g}, "
                         f"N(lambda)={l.dof:.1f}, L={l.objective:.4g} of {l.initial_objective:.4g})")
        return "\n".join(lines)


def _modes(model: nn.Module) -> Dict[str, bool]:
    """The train/eval flag of every submodule, by name (modes may be mixed)."""
    return {name: mod.training for name, mod in model.named_modules()}


def _restore_modes(model: nn.Module, modes: Dict[str, bool]) -> None:
    for name, mod in model.named_modules():
        if name in modes:
            mod.training = modes[name]


def _per_layer(spec, name: str, index: int, what: str = ""):
    if isinstance(spec, dict):
        return spec.get(name)
    if isinstance(spec, (list, tuple)):
        return spec[index] if index < len(spec) else None
    return spec


def spectral_prune(
    model: nn.Module,
    data,
    *,
    widths: Union[None, float, str, Sequence[Optional[int]], Dict[str, int]] = None,
    procedure: str = "backward",
    theta: float = DEFAULT_THETA,
    lam: Union[None, float, Dict[str, float]] = None,
    lam_rel: float = DEFAULT_LAMBDA_REL,
    tau: Union[None, float, Dict[str, Any]] = None,
    output_aware: bool = True,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> Tuple[nn.Module, PruneReport]:
    """Spectral pruning of a network; returns ``(pruned_model, report)``.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials allowed) of Linear / Conv2d /
            BatchNorm / activation / Dropout / pooling / Flatten layers and ResNet blocks, or a
            single residual block. The pruned units are the outputs of every Linear/Conv2d
            whose output reaches the next Linear/Conv2d through element-wise layers,
            BatchNorm/PReLU over those units, pooling over the spatial axes of Conv2d outputs
            and at most one Flatten before a Linear head (of a Conv2d output, or of a 2-D Linear
            output); the covariance is that of the consumer's input. Not prunable (left alone):
            pooling after a Flatten or a Linear (it pools neighbouring units), a flattened 3-D
            Linear output (units interleaved), a BatchNorm1d/PReLU after a Linear whose input in
            the data is not 2-D (it acts on dim 1, e.g. T of (B, T, m), not on the units; checked
            on the first batch). Also the inner channels of residual blocks
            (outputs of conv1, and of conv2 in a Bottleneck). Residual channels are untouched.
            The model is never modified; a copy is rewritten.
        data: an input tensor or a re-iterable of batches (tensors, or tuples/lists whose first
            element is the input). Used for the covariances and for the reported error.
            Input tensors with NaN/Inf raise ValueError naming the batch; so do non-finite
            activations (checked once per layer on its covariance), naming the layer.
        widths: units to keep: a dict ``{layer name: width}`` (names as in
            ``model.named_modules()``; layers not listed are left alone), a list in forward
            order (``None`` entries left alone), a float ratio in (0, 1] for every layer, or
            ``"lambda"``: the width of eq. (3) for the layer's lambda.
        procedure: ``"backward"`` (layers from the output back; the output matrix Z of a
            layer uses the units already kept in the next layer) or ``"simultaneous"`` (every
            layer independently, Z from all next units).
        theta: weight of the input information loss (paper default 0.5).
        lam: lambda per layer (float or dict); None: ``lam_rel * Tr Sigma`` (paper: 1e-6).
        tau: ridge per layer: None (``m# lambda leverage``), a float for every unit, or a dict
            ``{layer name: float or (m,) tensor}``.
        output_aware: build Z from the next layer's weights (paper); False uses Z = I.
        dtype: covariance accumulator dtype (float64 or float32).
        device: device the batches are moved to (default: left where they are).
        forward: ``forward(model, batch)`` for batches the model cannot take directly.
        max_batches: use at most this many batches for the covariances.
        progress: tqdm progress bars.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if procedure not in ("backward", "simultaneous"):
        raise ValueError(f"procedure must be 'backward' or 'simultaneous', got {procedure!r}")
    theta = check_theta(theta)
    if widths is None:
        raise ValueError("widths is required: a dict/list of widths, a ratio in (0, 1], or 'lambda'")
    if isinstance(widths, str) and widths != "lambda":
        raise ValueError(f"widths must be a dict, a list, a ratio or 'lambda', got {widths!r}")
    if isinstance(widths, float) and not 0.0 < widths <= 1.0:
        raise ValueError(f"a widths ratio must be in (0, 1], got {widths}")
    if max_batches is not None:
        max_batches = V.check_int("max_batches", max_batches, lo=1)
    sites = _structural_sites(model)  # raises on layers it cannot rewrite
    batches = _batches(data)
    work = copy.deepcopy(model)
    modes = _modes(model)  # per module: a model may mix train and eval submodules
    work.eval()
    first = next(iter(batches), None)
    if first is not None:  # drop the sites whose norms are not over the units for this data
        sites = _units_on_dim1(work, sites, first, forward, device)
    names = [s.name for s in sites]
    if isinstance(widths, dict):
        unknown = [n for n in widths if n not in names]
        if unknown:
            raise ValueError(f"widths names layers that cannot be pruned or do not exist: {unknown}; "
                             f"prunable layers: {names}")
    for what, spec in (("lam", lam), ("tau", tau)):
        if isinstance(spec, dict):
            unknown = [n for n in spec if n not in names]
            if unknown:
                raise ValueError(f"{what} names layers that cannot be pruned or do not exist: {unknown}; "
                                 f"prunable layers: {names}")
    if isinstance(widths, (list, tuple)) and len(widths) > len(sites):
        raise ValueError(f"widths has {len(widths)} entries but the model has {len(sites)} prunable layers: {names}")
    active = [s for i, s in enumerate(sites) if _per_layer(widths, s.name, i, "widths") is not None]
    if not active:
        raise ValueError(f"no layer to prune (prunable layers: {names})")

    # ---- one pass: covariances at every active layer (original network)
    accs = {s.name: CovarianceAccumulator(dtype=dtype) for s in sites}
    hooks = []

    def make_hook(acc: CovarianceAccumulator, m: int):
        def pre(mod, args):
            x = args[0]
            if isinstance(mod, nn.Linear):
                if x.shape[-1] == m:
                    acc.update(x.reshape(-1, m))
                else:  # after Flatten: (B, m * positions), channel-major
                    acc.update(x.reshape(x.shape[0], m, x.shape[-1] // m))
            else:
                acc.update(x)
        return pre

    for s in sites:
        cap = _get(work, s.capture)
        hooks.append(cap.register_forward_pre_hook(make_hook(accs[s.name], s.m)))
    n_batches = 0
    inputs_checked = forward is None  # with a custom forward the input is not known
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, "spectral_prune: covariances"):
                if forward is None:
                    x = _input_of(batch)
                    if not isinstance(x, torch.Tensor):
                        inputs_checked = False
                    elif x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
                        raise ValueError(f"data: batch {n_batches} contains NaN or Inf; "
                                         "the calibration inputs must be finite")
                _run(work, batch, forward, device)
                n_batches += 1
                if max_batches is not None and n_batches >= max_batches:
                    break
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("data holds no batches")
    covs = {s.name: accs[s.name].covariance() for s in sites}
    _check_calibration(sites, covs, inputs_checked, dtype)

    # ---- per-layer lambda, width, leverage
    by_name = {s.name: s for s in sites}
    info: Dict[str, Dict[str, Any]] = {}
    for i, s in enumerate(sites):
        S = covs[s.name]
        if S.shape[0] != s.m:
            raise _unsupported(s.capture, _get(work, s.capture),
                               f"its input has {S.shape[0]} channels, expected {s.m}")
        mu, U = _eigh(S)
        l = _per_layer(lam, s.name, i, "lam")
        l = default_lambda(S, lam_rel) if l is None else _check_lambda(l)
        w = _per_layer(widths, s.name, i, "widths")
        if w is None:
            info[s.name] = dict(lam=l, mu=mu, U=U, width=None)
            continue
        if isinstance(w, str):
            if w != "lambda":
                raise ValueError(f"widths['{s.name}'] must be a width, a ratio in (0, 1] or 'lambda', got {w!r}")
            k = _width_from_eigs(mu, l, EQ3_C1, EQ3_C2)
        elif isinstance(w, float):
            if not 0.0 < w <= 1.0:
                raise ValueError(f"widths['{s.name}']: a ratio must be in (0, 1], got {w}")
            k = max(1, min(s.m, int(round(w * s.m))))
        else:
            k = V.check_int(f"widths['{s.name}']", w, lo=1, hi=s.m)
        d = torch.where(mu > 0, mu / (mu + l) if l > 0 else torch.ones_like(mu), torch.zeros_like(mu))
        diag = (U**2 * d[None, :]).sum(1)
        lev = diag / diag.sum() if float(diag.sum()) > 0 else torch.full_like(diag, 1.0 / s.m)
        info[s.name] = dict(lam=l, mu=mu, U=U, width=k, lev=lev, dof=float(d.sum()))

    # ---- selection
    order = list(reversed(active)) if procedure == "backward" else list(active)
    sel: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    layer_reports: Dict[str, LayerReport] = {}
    for s in order:
        i = sites.index(s)
        S = covs[s.name]
        inf = info[s.name]
        k = inf["width"]
        t = _per_layer(tau, s.name, i, "tau")
        if t is None:
            t = k * inf["lam"] * inf["lev"]
        t = check_tau(t, s.m, S.device)
        Z = None
        if output_aware and theta < 1.0:
            cons = _get(work, s.consumer)
            W3 = _consumer_weight(cons, s.m)
            keep_next, lev_next = None, None
            if s.next_site is not None:
                nxt = info.get(s.next_site)
                if nxt is not None and nxt.get("width") is not None:
                    lev_next = nxt["lev"]
                    if procedure == "backward" and s.next_site in sel:
                        keep_next = sel[s.next_site][0]
            Z = output_matrix(W3, s.m, keep_next, lev_next).to(S.dtype).to(S.device)
        res = greedy_select(S, k, tau=t, theta=theta, Z=Z)
        J = res.indices
        A = reconstruction(S, J, t)
        sel[s.name] = (J, A)
        layer_reports[s.name] = LayerReport(s.name, s.m, k, inf["lam"], inf["dof"], J.cpu(),
                                            float(res.objective[-1]), res.initial_objective)

    # ---- rewrite the copy
    for s in active:
        J, A = sel[s.name]
        _set(work, s.producer, _select_out(_get(work, s.producer), J))
        for nb in s.norms:
            _set(work, nb, _select_bn(_get(work, nb), J))
        _set(work, s.consumer, _reconstruct_in(_get(work, s.consumer), A, s.m))

    # ---- report
    first = next(iter(batches))
    model.eval()
    try:
        flops_before = _count_flops(model, first, forward, device)
        flops_after = _count_flops(work, first, forward, device)
        num = den = 0.0
        seen = 0
        with torch.no_grad():
            for batch in _progress(batches, progress, "spectral_prune: error"):
                y = _flat_out(_run(model, batch, forward, device)).to(torch.float64)
                y2 = _flat_out(_run(work, batch, forward, device)).to(torch.float64)
                num += float(((y - y2) ** 2).sum())
                den += float((y**2).sum())
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break
    finally:
        _restore_modes(model, modes)
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))
    _restore_modes(work, modes)
    report = PruneReport(
        widths_before={s.name: s.m for s in active},
        widths_after={s.name: info[s.name]["width"] for s in active},
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in work.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        relative_error=rel,
        procedure=procedure,
        layers=[layer_reports[s.name] for s in active],
    )
    return work, report


__all__ = [
    "spectral_prune",
    "PruneReport",
    "LayerReport",
    "find_sites",
    "reconstruction",
    "reconstruction_error",
    "pruned_next_weight",
    "degrees_of_freedom",
    "output_degrees_of_freedom",
    "leverage_scores",
    "lambda_from_width",
    "width_from_lambda",
    "default_lambda",
    "default_tau",
    "output_matrix",
    "DEFAULT_LAMBDA_REL",
    "DEFAULT_THETA",
]
