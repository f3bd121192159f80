"""Where a model can be pruned and how its modules are rewritten: site discovery (Sequential stacks, Flatten heads, ResNet blocks) and the producer / norm / consumer rewrites of a pruned site.

A *site* is a layer (Linear or Conv2d, the *producer*) whose output units can be cut to a
subset J: the units reach the next Linear/Conv2d (the *consumer*) only through element-wise
layers, BatchNorm/PReLU over those units, pooling over the spatial axes of Conv2d outputs and at
most one Flatten. The covariance of a site is that of the consumer's input; pruning keeps the
producer's rows J (and the norms' channels J) and replaces the consumer's weight by
``W♯ = W[:, F] Â_J`` (Suzuki et al. 2020, sec. 3.1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .._model import (
    ACTIVATIONS, call_model, eval_mode, get_submodule, input_of, is_layer, own_forward,
    set_submodule, to_device,
)
from .reconstruct import pruned_next_weight

__all__ = ["Site", "find_sites", "structural_sites", "rewrite_site", "run_batch", "run_hooked",
           "consumer_weight", "unsupported"]

# element-wise (or per-sample random, as dropout in training) layers: they commute with Flatten
# and with the selection of units (the shared activations plus what this rule allows)
CHANNELWISE: Tuple[type, ...] = ACTIVATIONS + (
    nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
# pooling over the trailing (spatial) axes: per channel only for Conv2d outputs before a Flatten;
# after a Linear (units on the last axis) or a Flatten (features on it) it mixes neighbouring units
POOLS: Tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
NORMS: Tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = ("Linear, Conv2d (groups=1), BatchNorm1d/2d, element-wise activations, PReLU, Dropout, "
              "pooling, Flatten and ResNet BasicBlock/Bottleneck blocks")


@dataclasses.dataclass
class Site:
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


def unsupported(path: str, mod: nn.Module, why: str = "") -> ValueError:
    what = f"layer '{path}' ({type(mod).__name__})" if path else f"model ({type(mod).__name__})"
    return ValueError(f"spectral_prune cannot rewrite {what}{': ' + why if why else ''}; "
                      f"supported: {_SUPPORTED}")


def run_batch(model: nn.Module, batch: Any, forward: Optional[Callable[[nn.Module, Any], Any]],
              device) -> Any:
    """``forward(model, batch)``, else the model on the batch's input moved to ``device``."""
    if forward is not None:
        return forward(model, batch)
    return call_model(model, to_device(input_of(batch), None if device is None else torch.device(device)))


def run_hooked(model: nn.Module, hooks: List[Any], batch: Any,
               forward: Optional[Callable[[nn.Module, Any], Any]], device) -> Any:
    """:func:`run_batch` without grad, then the ``hooks`` (handles registered for this run)
    removed, also when it raises."""
    try:
        with torch.no_grad():
            return run_batch(model, batch, forward, device)
    finally:
        for h in hooks:
            h.remove()


# ---- structure -----------------------------------------------------------------------------------


def _is_block(mod: nn.Module) -> bool:
    return all(hasattr(mod, a) for a in ("conv1", "bn1", "conv2", "bn2")) and not isinstance(mod, nn.Sequential)


def _is_producer(mod: nn.Module) -> bool:
    """A Linear with the stock forward, or a plain Conv2d with groups = 1 (a Conv2d subclass may
    change ``_conv_forward``; the rewrite builds plain Conv2d modules)."""
    return is_layer(mod, (nn.Linear,)) or (type(mod) is nn.Conv2d and mod.groups == 1)


def _channel_count(mod: nn.Module) -> int:
    return mod.num_parameters if isinstance(mod, nn.PReLU) else mod.num_features


def _kind(path: str, mod: nn.Module) -> str:
    """The role of a leaf of a Sequential: producer, norm (per-unit parameters: the kept units
    are selected), chan (element-wise), pool, flatten or block."""
    if _is_producer(mod):
        return "producer"
    if own_forward(mod, NORMS) or (own_forward(mod, (nn.PReLU,)) and mod.num_parameters > 1):
        return "norm"
    if own_forward(mod, CHANNELWISE):
        return "chan"
    if own_forward(mod, POOLS):
        return "pool"
    if own_forward(mod, (nn.Flatten,)):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise unsupported(path, mod, "only Flatten(start_dim=1, end_dim=-1)")
        return "flatten"
    if _is_block(mod):
        return "block"
    raise unsupported(path, mod)


def _leaves(mod: nn.Module, prefix: str, out: List[Tuple[str, nn.Module]]) -> None:
    for name, child in mod.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            _leaves(child, path + ".", out)
        else:
            out.append((path, child))


def _block_sites(path: str, blk: nn.Module) -> List[Site]:
    p = f"{path}." if path else ""
    for a in ("conv1", "conv2") + (("conv3",) if hasattr(blk, "conv3") else ()):
        c = getattr(blk, a)
        if not (isinstance(c, nn.Conv2d) and c.groups == 1):
            raise unsupported(p + a, c, "inner convolutions of a residual block must be Conv2d with groups=1")
    for a in ("bn1", "bn2") + (("bn3",) if hasattr(blk, "bn3") else ()):
        if not isinstance(getattr(blk, a), nn.BatchNorm2d):
            raise unsupported(p + a, getattr(blk, a), "expected BatchNorm2d")
    sites = [Site(p + "conv1", p + "conv1", [p + "bn1"], p + "conv2", p + "conv2", blk.conv1.out_channels,
                  norm_dims=[4])]
    if hasattr(blk, "conv3"):
        sites.append(Site(p + "conv2", p + "conv2", [p + "bn2"], p + "conv3", p + "conv3", blk.conv2.out_channels,
                          norm_dims=[4]))
        sites[0].next_site = sites[1].name
    return sites


def _site_after(leaves: List[Tuple[str, nn.Module]], kinds: List[str], a: int) -> Optional[Site]:
    """The site of the producer ``leaves[a]``: follow its units to the next producer."""
    path, mod = leaves[a]
    linear = isinstance(mod, nn.Linear)
    m = mod.out_features if linear else mod.out_channels
    norms: List[str] = []
    norm_dims: List[int] = []
    flat = False
    for b in range(a + 1, len(leaves)):
        kb = kinds[b]
        if kb == "norm":
            if _channel_count(leaves[b][1]) != m:  # not over the m produced units
                return None
            norms.append(leaves[b][0])
            norm_dims.append(2 if flat or linear else 4)
        elif kb == "chan":
            continue
        elif kb == "pool":
            if flat or linear:
                return None  # pools over the units themselves: the pruned model would pool others
        elif kb == "flatten":
            if flat:
                return None
            flat = True
        elif kb == "producer":
            cons_path, cons = leaves[b]
            if flat and not isinstance(cons, nn.Linear):
                return None
            if not flat and isinstance(cons, nn.Linear) != linear:
                return None  # Conv2d -> Linear without Flatten reads a spatial axis, not channels
            in_units = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
            if in_units % m != 0 or (in_units != m and (not flat or linear)):
                # only a flattened (B, m, *spatial) Conv2d output is channel-major; a
                # flattened (B, T, m) Linear output interleaves the units
                return None
            # phi is the consumer's input, after every layer in between (a Linear after
            # Flatten reads it as (B, m, positions))
            return Site(path, path, norms, cons_path, cons_path, m, norm_dims=norm_dims)
        else:  # a block
            return None
    return None


def structural_sites(model: nn.Module) -> List[Site]:
    """The prunable sites of ``model`` from its structure alone, in forward order (raises
    ValueError naming the first layer it cannot rewrite)."""
    if _is_block(model):
        return _block_sites("", model)
    if not isinstance(model, nn.Sequential):
        if _is_producer(model):
            return []
        raise unsupported("", model, "the model must be an nn.Sequential or a residual block")
    leaves: List[Tuple[str, nn.Module]] = []
    _leaves(model, "", leaves)
    kinds = [_kind(path, mod) for path, mod in leaves]
    sites: List[Site] = []
    for a, (path, mod) in enumerate(leaves):
        if kinds[a] == "producer":
            s = _site_after(leaves, kinds, a)
            if s is not None:
                sites.append(s)
        elif kinds[a] == "block":
            sites.extend(_block_sites(path, mod))
    by_producer = {s.producer: s for s in sites}
    for s in sites:
        if s.next_site is None and s.consumer in by_producer:
            s.next_site = by_producer[s.consumer].name
    return sites


def units_on_dim1(model: nn.Module, sites: List[Site], sample, forward, device) -> List[Site]:
    """``sites`` less those with a BatchNorm/PReLU whose input, when ``model`` runs on ``sample``
    (as it is: the caller sets the modes), does not have the rank that puts the produced units
    on dim 1 (e.g. BatchNorm1d(m) after a Linear on (B, T, m) normalizes the T positions:
    cutting it by unit index is wrong)."""
    # BatchNorm2d only takes 4-D inputs, so it is over a Conv2d's channels whenever it runs
    checks = [(s.name, nb, d) for s in sites for nb, d in zip(s.norms, s.norm_dims)
              if not isinstance(get_submodule(model, nb), nn.BatchNorm2d)]
    if not checks:
        return sites
    seen: Dict[str, set] = {}

    def make_hook(path: str):
        def pre(mod, args):
            x = args[0]
            seen.setdefault(path, set()).add(x.dim() if isinstance(x, torch.Tensor) else -1)
        return pre

    run_hooked(model, [get_submodule(model, nb).register_forward_pre_hook(make_hook(nb))
                       for nb in {c[1] for c in checks}], sample, forward, device)
    bad = {name for name, nb, d in checks if seen.get(nb, {d}) != {d}}
    kept = [s for s in sites if s.name not in bad]
    for s in kept:
        if s.next_site in bad:
            s.next_site = None
    return kept


def find_sites(model: nn.Module, sample=None, *, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
               device: Optional[Union[str, torch.device]] = None) -> List[Site]:
    """Prunable layers of a model, in forward order (raises on layers it cannot rewrite).

    Without ``sample`` the answer is from the structure alone. BatchNorm1d and PReLU act on
    dim 1, which holds a Linear's units only for a 2-D input: a Linear applied to (B, T, n)
    puts T there. With ``sample`` (one batch, as in ``spectral_prune``'s data; ``forward`` and
    ``device`` as there) the model is run on it once (eval mode, no grad, modes restored) and
    the sites whose BatchNorm/PReLU layers do not see the produced units on dim 1 are dropped.
    """
    sites = structural_sites(model)
    if sample is None:
        return sites
    with eval_mode(model):
        return units_on_dim1(model, sites, sample, forward, device)


# ---- rewriting -----------------------------------------------------------------------------------


def _param_like(data: torch.Tensor, old: nn.Parameter) -> nn.Parameter:
    """A new parameter holding ``data`` with ``old``'s dtype, device and requires_grad."""
    return nn.Parameter(data.detach().to(device=old.device, dtype=old.dtype).clone(),
                        requires_grad=old.requires_grad)


def _like(mod: nn.Module, W: torch.Tensor, b: Optional[torch.Tensor], in_units: int) -> nn.Module:
    """A plain Linear / Conv2d with ``mod``'s hyper-parameters, ``in_units`` inputs, weight
    ``W`` and bias ``b`` (parameters as ``mod``'s: dtype, device, requires_grad) and its mode."""
    if isinstance(mod, nn.Linear):
        new = nn.Linear(in_units, W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    else:
        new = nn.Conv2d(in_units, W.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                        dilation=mod.dilation, groups=1, bias=b is not None, padding_mode=mod.padding_mode,
                        device=W.device, dtype=W.dtype)
    new.weight = _param_like(W, mod.weight)
    if b is not None:
        new.bias = _param_like(b, mod.bias)
    new.train(mod.training)
    return new


def _select_out(mod: nn.Module, J: torch.Tensor) -> nn.Module:
    """The producer keeping its output units J."""
    J = J.to(mod.weight.device)
    W = mod.weight.detach()[J]
    b = mod.bias.detach()[J] if mod.bias is not None else None
    return _like(mod, W, b, W.shape[1])


def _select_norm(bn: nn.Module, J: torch.Tensor) -> nn.Module:
    """The BatchNorm / per-channel PReLU keeping its channels J."""
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


def consumer_weight(mod: nn.Module, m: int) -> torch.Tensor:
    """Consumer weight as (out, m, ...): Linear (out, m) or, after Flatten, (out, m, positions)."""
    W = mod.weight.detach()
    if isinstance(mod, nn.Linear) and mod.in_features != m:
        return W.reshape(W.shape[0], m, mod.in_features // m)
    return W


def _reconstruct_in(mod: nn.Module, A: torch.Tensor, m: int) -> nn.Module:
    """The consumer reading the kept units: weight ``W♯ = W[:, F] Â_J``."""
    W3 = consumer_weight(mod, m)
    Wn = pruned_next_weight(W3, A.to(W3.device))
    b = mod.bias.detach() if mod.bias is not None else None
    if isinstance(mod, nn.Linear):
        Wn = Wn.reshape(Wn.shape[0], -1)
        return _like(mod, Wn, b, Wn.shape[1])
    return _like(mod, Wn, b, A.shape[1])


def rewrite_site(model: nn.Module, site: Site, J: torch.Tensor, A: torch.Tensor) -> None:
    """Prune ``site`` of ``model`` in place to the units ``J`` with the decoder ``A`` (``Â_J``):
    new producer, norms and consumer modules (the replaced ones' modes and parameter flags)."""
    set_submodule(model, site.producer, _select_out(get_submodule(model, site.producer), J))
    for nb in site.norms:
        set_submodule(model, nb, _select_norm(get_submodule(model, nb), J))
    set_submodule(model, site.consumer, _reconstruct_in(get_submodule(model, site.consumer), A, site.m))
