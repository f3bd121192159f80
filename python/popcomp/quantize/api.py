"""quantize_ and dequantize_: which modules of a model are quantized, with which Hessian entries, by the handler registered for the config's type.

``quantize_`` owns what every scheme shares: the module selection (``filter_fn``), the
matching and checks of the Hessian mapping, tied weights (modules sharing one weight are
quantized once, together) and the all-or-nothing swap (every handler runs before any module is
replaced). A scheme is a config (``config.QuantizeConfig``) plus one handler registered here
(torchao's config -> handler registry); PalettizeConfig's handler runs HW / DRHW K-means.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._model import all_names
from .._validate import check_finite
from .config import PalettizeConfig, QuantizeConfig, resolve_beta
from .modules import (
    PaletteMeta, Palettized, dense_base, replace_module, to_dense, to_palettized, weight_matrix,
)
from .packing import pack_rows

__all__ = ["quantize_", "dequantize_", "register_handler", "select_modules"]

FilterFn = Callable[[nn.Module, str], bool]
# handler(modules, config, hessian) -> replacements: ``modules`` are the (name, module) pairs
# that share one weight (usually one pair), ``hessian`` that weight's Hessian diagonal or None;
# returns one new module per pair, in order, and modifies nothing (quantize_ swaps them in).
Handler = Callable[[Sequence[Tuple[str, nn.Module]], QuantizeConfig, Optional[torch.Tensor]],
                   List[nn.Module]]

_HANDLERS: Dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``quantize_(model, config)`` with a config of ``config_type`` (a subclass of
    ``QuantizeConfig``) calls the decorated handler."""
    if not (isinstance(config_type, type) and issubclass(config_type, QuantizeConfig)):
        raise TypeError(f"config_type must be a subclass of QuantizeConfig, got {config_type!r}")

    def register(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return register


def _handler_for(config) -> Handler:
    for c in type(config).__mro__:
        if c in _HANDLERS:
            return _HANDLERS[c]
    known = ", ".join(c.__name__ for c in _HANDLERS)
    raise TypeError(f"config must be a popcomp quantization config ({known}), "
                    f"got {type(config).__name__}")


# ---- selection ------------------------------------------------------------------------------


def select_modules(model: nn.Module, filter_fn: Optional[FilterFn]) -> List[Tuple[str, nn.Module]]:
    """The modules to quantize: those ``filter_fn(module, name)`` selects, by default every
    Linear, Conv1d, Conv2d and Embedding (and Hugging Face Conv1D). A palettized module selected again (by filter_fn, or
    by default) is an error: quantizing its dequantized weight again is not what a second call
    should do silently, and skipping it would silently keep the first configuration."""
    out = []
    again = []
    for name, mod in model.named_modules():
        if isinstance(mod, Palettized):
            if filter_fn is None or filter_fn(mod, name):
                again.append(name)
            continue
        if filter_fn is None:
            if dense_base(mod) is not None:
                out.append((name, mod))
        elif filter_fn(mod, name):
            if dense_base(mod) is None:
                raise ValueError(
                    f"filter_fn selected {name or '<root>'} ({type(mod).__name__}), which cannot be "
                    "palettized (supported: Linear, Conv1d, Conv2d, Embedding)"
                )
            out.append((name, mod))
    if again:
        raise ValueError(
            f"model: {again} already palettized; to quantize them again with this config call "
            "popcomp.dequantize_(model) first (their dequantized weights are then quantized), "
            "to palettize only the other layers pass a filter_fn that leaves them out"
        )
    return out


def _warn_broken_ties(model: nn.Module, targets: List[Tuple[str, nn.Module]]) -> None:
    """Warn when a selected module's weight is tied to a dense module left out of the selection:
    that module keeps the dense weight, so the two no longer share one."""
    chosen = {id(m) for _, m in targets}
    weights = {id(m.weight) for _, m in targets}
    left = [name for name, mod in model.named_modules()
            if id(mod) not in chosen and not isinstance(mod, Palettized)
            and isinstance(getattr(mod, "weight", None), torch.Tensor)
            and id(mod.weight) in weights]
    if left:
        warnings.warn(
            f"quantize_: {left} share their weight with selected modules but are not selected; "
            "they keep the dense weight, so the tie is broken (select them too to keep one "
            "shared palettized weight)", stacklevel=3)


# ---- the Hessian mapping ----------------------------------------------------------------------


def _hessian_key(hessian: Mapping, n: str, m: nn.Module, pnames: Mapping[int, str]) -> str:
    """The mapping's key for module ``n``'s weight: "<n>.weight" (the parameter's name), "<n>"
    (the module's name), or the name the parameter has in ``model.named_parameters()`` (a weight
    tied to an earlier module's appears once there)."""
    own = f"{n}.weight" if n else "weight"
    if own in hessian:
        return own
    if n and n in hessian:
        return n
    return pnames.get(id(m.weight), own)


def _prefix_hint(hessian: Mapping, missing: List[str]) -> str:
    """A hint when one prefix added to (or removed from) the module name of every missing key
    finds it in the mapping: it was computed on a wrapper of this model, or on a submodule."""
    def mod(k: str) -> str:
        return k[: -len(".weight")] if k.endswith(".weight") else ("" if k == "weight" else k)

    have = {mod(k) for k in hessian if isinstance(k, str)}
    want = [mod(k) for k in missing]
    cands = set()
    for h in have:
        if want[0] and h.endswith("." + want[0]):   # the mapping's names are longer
            cands.add((h[: len(h) - len(want[0])], ""))
        if h and want[0].endswith("." + h):         # the model's names are longer
            cands.add(("", want[0][: len(want[0]) - len(h)]))
    for strip, add in sorted(cands, key=lambda c: len(c[0]) + len(c[1])):
        if all((strip + w if strip else w[len(add):]) in have
               and (not add or w.startswith(add)) for w in want):
            if strip:
                ddp = (" (computed on the DistributedDataParallel/DataParallel wrapper?)"
                       if strip == "module." else "")
                return (f" (the mapping's names start with {strip!r}{ddp}: it was computed on a "
                        "module wrapping this one; pass the same model to both, or strip the "
                        f"prefix: {{k[{len(strip)}:]: v for k, v in h.items()}})")
            return (f" (the model's names start with {add!r} where the mapping's do not: it was "
                    "computed on a submodule of this model; pass the same model to both, or add "
                    f"the prefix: {{{add!r} + k: v for k, v in h.items()}})")
    return ""


def _check_hessian(hessian, targets: List[Tuple[str, nn.Module]], pnames: Mapping[int, str]
                   ) -> Dict[str, torch.Tensor]:
    """key -> Hessian diagonal of every selected weight, each checked (shape, dtype, finite,
    non-negative). Keys are "<module>.weight" or "<module>"."""
    if not isinstance(hessian, Mapping):
        raise TypeError(f"hessian must be a mapping parameter name -> tensor, got {type(hessian).__name__}")
    res = {}
    keys = [_hessian_key(hessian, n, m, pnames) for n, m in targets]
    missing = [key for key in keys if key not in hessian]
    if missing:
        raise ValueError(f"hessian: missing entries for {missing}{_prefix_hint(hessian, missing)}")
    for (n, m), key in zip(targets, keys):
        h = hessian[key]
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"hessian[{key!r}] must be a tensor, got {type(h).__name__}")
        if tuple(h.shape) != tuple(m.weight.shape):
            raise ValueError(
                f"hessian[{key!r}] has shape {tuple(h.shape)}, expected {tuple(m.weight.shape)}"
            )
        if not h.is_floating_point():
            raise TypeError(f"hessian[{key!r}] must be floating point, got {h.dtype}")
        check_finite(f"hessian[{key!r}]", h)
        if bool((h < 0).any()):
            raise ValueError(f"hessian[{key!r}] has negative entries (a Hessian diagonal estimate "
                             "must be non-negative; clamp it, or use method='fisher'/'ggn')")
        res[key] = h
    return res


# ---- quantize_ / dequantize_ --------------------------------------------------------------------


def quantize_(
    model: nn.Module,
    config: QuantizeConfig,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Quantize (palettize) the weights of ``model`` in place (torchao-style) and return it.

    ``filter_fn(module, fqn) -> bool`` selects the modules (default: every Linear, Conv1d,
    Conv2d and Embedding). ``hessian`` maps "<fqn>.weight" to the Hessian diagonal
    (``popcomp.hessian.diagonal``), used as K-means weights. The ``padding_idx`` row of an
    Embedding is left out of the clustering and kept exact. A module that is already palettized
    and selected (by default every one) is a ValueError. All weights are quantized before
    any module is replaced: on an error the model is left unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    handler = _handler_for(config)
    config.validate()
    use_hessian = config.uses_hessian(hessian is not None)
    targets = select_modules(model, filter_fn)
    if any(n == "" for n, _ in targets):
        raise ValueError("model: the root module itself cannot be replaced in place; wrap it "
                         "(e.g. nn.Sequential(model)) or exclude it with filter_fn")
    _warn_broken_ties(model, targets)
    pnames = {id(p): pn for pn, p in model.named_parameters()}
    hmap = _check_hessian(hessian, targets, pnames) if use_hessian else {}
    for n, m in targets:  # validate devices and shapes before any work
        if m.weight.is_meta:
            raise ValueError(f"model: {n}.weight is on the 'meta' device (no values to "
                             "quantize); materialize the model first (e.g. load its weights)")
        config.check_weight(weight_matrix(m), n)
    # modules sharing one weight (tied weights) are quantized once, together
    ties: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for n, m in targets:
        ties.setdefault(id(m.weight), []).append((n, m))
    replacements = []
    for group in ties.values():
        n, m = group[0]
        h = hmap[_hessian_key(hessian, n, m, pnames)] if hmap else None
        replacements += zip((mod for _, mod in group), handler(group, config, h))
    names = all_names(model)
    for old, new in replacements:
        replace_module(model, names, old, new)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every palettized module of ``model`` by the dense module with its dequantized
    weight (in place); returns the model. The weight gets the ``requires_grad`` it had before
    ``quantize_`` (or, for a module rebuilt by ``load``, that of the weight it replaced).
    Modules sharing one palettized weight (tied weights) get one shared Parameter."""
    names = all_names(model)
    params: Dict[int, nn.Parameter] = {}
    for n, m in list(model.named_modules()):
        if isinstance(m, Palettized) and n:
            new = to_dense(m, params.get(id(m.weight_packed)))
            params.setdefault(id(m.weight_packed), new.weight)
            replace_module(model, names, m, new)
    return model


# ---- PalettizeConfig's handler: HW / DRHW K-means per codebook ---------------------------------


def _palettize_weight(w: torch.Tensor, h: Optional[torch.Tensor], cfg: PalettizeConfig, name: str,
                      padding_rows: Tuple[int, ...] = ()
                      ) -> Tuple[torch.Tensor, torch.Tensor, PaletteMeta, Optional[torch.Tensor]]:
    """Packed indices, codebooks, metadata and the exact ``padding_rows`` of ``w`` (given
    weight 0 in the clustering) or None."""
    from ..kmeans import kmeans1d

    k, bits = cfg.resolve()
    gran = cfg.granularity_spec
    x = gran.rows(w.detach().float(), name).contiguous()
    wt = None
    beta = float(cfg.beta)
    if h is not None:
        h = h.detach().to(device=w.device)
        # The objective sum h (w - c)^2 + beta diam^2 has the same minimizer after dividing h and
        # beta by one positive scale: a Hessian beyond float32's range (e.g. 1e300 from a float64
        # model) is rescaled instead of overflowing in the float32 K-means weights.
        hmax = float(h.abs().max()) if h.numel() else 0.0
        if hmax == 0.0:
            warnings.warn(
                f"quantize_: the Hessian diagonal of layer {name!r} is all zero (no sensitivity "
                "information: e.g. a Fisher at a minimum of the loss, or a layer the loss does "
                "not reach); plain K-means is used for it. For a model without labels compute "
                "the label-free diagonal (hessian.diagonal(model, None, data))", stacklevel=4)
        if math.isfinite(hmax) and hmax > 0 and not 1e-30 <= hmax <= 1e30:
            h, beta = h.double() / hmax, beta / hmax
        h = h.to(torch.float32)
    if padding_rows:  # weight 0 (on a copy: h may be the caller's tensor)
        h = torch.ones_like(w, dtype=torch.float32) if h is None else h.clone()
        h[list(padding_rows)] = 0.0
    if h is not None:
        wt = gran.rows(h, name).contiguous()
        zero_rows = wt.sum(1) <= 0
        if bool(zero_rows.any()):  # no sensitivity information in a row: plain K-means there
            wt = wt.clone()
            wt[zero_rows] = 1.0
    if cfg.beta_rel is not None:  # scale-free: from the weights K-means sees (rescaled or not)
        beta = resolve_beta(cfg, x, wt)
    try:
        res = kmeans1d(x, k, wt, beta=beta, method=cfg.method, init=cfg.init,
                       max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed, diameter=cfg.diameter)
    except ValueError as e:  # name the layer and its tensor, not K-means' arguments
        msg = str(e)
        if msg.startswith("x "):
            msg = f"the weight of layer {name!r} " + msg[2:]
        elif msg.startswith("weights "):
            msg = f"the Hessian diagonal (K-means weights) of layer {name!r} " + msg[8:]
        else:
            msg = f"layer {name!r}: {msg}"
        raise ValueError(msg.replace("(row ", "(codebook row ")) from None
    centers = res.centers.reshape(x.shape[0], k).to(cfg.codebook_dtype)
    if not bool(torch.isfinite(centers).all()):
        big = float(res.centers.abs().max())
        raise ValueError(
            f"codebook_dtype={cfg.codebook_dtype}: a center of {name} ({big:.6g}) is outside its "
            f"range (max {torch.finfo(cfg.codebook_dtype).max:.6g}); use codebook_dtype=torch.float32"
        )
    # the indices as the (out, fan-in) matrix of the weight, packed row by row (layout 2)
    packed = pack_rows(res.labels.reshape(w.shape[0], -1), bits)
    if k < 1 << bits:  # every index a packed byte can hold reads a center (copies of the last)
        centers = torch.cat([centers, centers[:, -1:].expand(-1, (1 << bits) - k)], 1)
    meta = PaletteMeta(tuple(w.shape), w.dtype, k, bits, gran.name, gran.group_size, x.shape[0],
                       tuple(padding_rows))
    padding = w.detach()[list(padding_rows)].clone() if padding_rows else None
    return packed, centers.contiguous(), meta, padding


@register_handler(PalettizeConfig)
def _palettize(modules: Sequence[Tuple[str, nn.Module]], config: PalettizeConfig,
               hessian: Optional[torch.Tensor]) -> List[nn.Module]:
    """One palettized weight for the modules sharing it (the padding rows of every Embedding
    among them kept exact), one palettized module each."""
    name, first = modules[0]
    pad = sorted({int(m.padding_idx) for _, m in modules
                  if isinstance(m, nn.Embedding) and m.padding_idx is not None})
    h = None if hessian is None else weight_matrix(first, hessian)  # Conv1D: both transposed
    packed, codebook, meta, padding = _palettize_weight(weight_matrix(first), h, config, name,
                                                        tuple(pad))
    return [to_palettized(m, packed, codebook, meta, padding) for _, m in modules]
