"""Drop-in palettization of PyTorch models with Hessian-weighted / diameter-regularized K-means.

    h = popcomp.hessian.diagonal(model, loss_fn, calib_loader)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4, granularity="per_channel"), hessian=h)
    print(popcomp.size_report(model))
    popcomp.save(model, "model.safetensors")

Each selected weight becomes indices packed at ceil(log2 k) bits per weight plus one codebook
(fp16 or fp32) per tensor / output row / group. The palettized modules subclass the dense ones
and expose ``weight`` as the dequantized tensor, so they compute exactly what the dense module
with the dequantized weight computes. The ``padding_idx`` row of an Embedding (which PyTorch
never updates) is left out of the clustering and kept exact, in a buffer ``weight_padding``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._validate import check_int, check_real

__all__ = [
    "PalettizeConfig", "quantize_", "dequantize_", "save", "load", "size_report", "SizeReport",
    "LayerSize", "select_beta", "BetaSelection", "PalettizedLinear", "PalettizedConv1d",
    "PalettizedConv2d", "PalettizedEmbedding", "pack_indices", "unpack_indices",
]

_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
_SENSITIVITIES = ("auto", "hessian", "uniform")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class PalettizeConfig:
    """How to palettize each selected weight.

    k / bits: number of centers, or bits per index (k = 2**bits); one of them (bits in 1..8,
      k in 2..256; with k given the indices take ceil(log2 k) bits).
    granularity: "per_tensor" (one codebook), "per_channel" (one per output row / channel),
      "per_group" (one per ``group_size`` consecutive inputs of a row).
    beta, diameter, method, init, max_iter, tol, seed: passed to popcomp.kmeans1d (beta > 0 is
      the diameter-regularized DRHW K-means of Bu et al.).
    sensitivity: "hessian" (K-means weights from the ``hessian`` mapping), "uniform" (plain
      K-means) or "auto" (hessian when a mapping is given).
    codebook_dtype: torch.float16 or torch.float32.
    """

    k: Optional[int] = None
    bits: Optional[int] = None
    granularity: str = "per_channel"
    group_size: Optional[int] = None
    beta: float = 0.0
    method: str = "lloyd"
    init: Any = "kmeans++"
    max_iter: int = 300
    tol: float = 0.0
    seed: Optional[int] = 0
    diameter: str = "squared"
    sensitivity: str = "auto"
    codebook_dtype: torch.dtype = torch.float16

    def resolve(self) -> Tuple[int, int]:
        """(k, bits per index), validated."""
        if self.k is None and self.bits is None:
            raise ValueError("PalettizeConfig: give k or bits")
        if self.bits is not None:
            bits = check_int("bits", self.bits, lo=1, hi=8)
            if self.k is not None:
                k = check_int("k", self.k, lo=2, hi=1 << bits)
            else:
                k = 1 << bits
        else:
            k = check_int("k", self.k, lo=2, hi=256)
        bits = max(1, math.ceil(math.log2(k)))
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError("group_size is required with granularity='per_group'")
            check_int("group_size", self.group_size, lo=1)
        if self.sensitivity not in _SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {_SENSITIVITIES}, got {self.sensitivity!r}")
        if self.codebook_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"codebook_dtype must be torch.float16 or torch.float32, got {self.codebook_dtype}")
        check_real("beta", self.beta, lo=0.0)
        return k, bits


# ---------------------------------------------------------------------------------------------
# index packing: little-endian bit stream, index j occupies bits [j*b, (j+1)*b)
def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2**bits) into a uint8 tensor of ceil(n*bits/8) bytes."""
    bits = check_int("bits", bits, lo=1, hi=8)
    v = idx.reshape(-1).to(torch.uint8)
    n = v.numel()
    if bits == 8:
        return v.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        v = v.view(-1, per)
        out = torch.zeros(v.shape[0], dtype=torch.uint8, device=v.device)
        for j in range(per):
            out |= v[:, j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.uint8, device=v.device)
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    stream = stream.view(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8, device=v.device)
    for j in range(8):
        out |= stream[:, j] << j
    return out


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_indices: the first n indices as int64."""
    p = packed.reshape(-1)
    if bits == 8:
        return p[:n].long()
    if 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        parts = [(p >> (j * bits)) & mask for j in range(per)]
        return torch.stack(parts, 1).reshape(-1)[:n].long()
    stream = torch.stack([(p >> j) & 1 for j in range(8)], 1).reshape(-1)[: n * bits]
    stream = stream.view(n, bits).long()
    shifts = torch.arange(bits, device=p.device)
    return (stream << shifts).sum(1)


# ---------------------------------------------------------------------------------------------
@dataclass
class PaletteMeta:
    weight_shape: Tuple[int, ...]
    weight_dtype: torch.dtype
    k: int
    bits: int
    granularity: str
    group_size: Optional[int]
    rows: int
    padding_rows: Tuple[int, ...] = ()  # rows of the weight kept exact (Embedding padding_idx)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["weight_dtype"] = _DTYPE_NAMES[self.weight_dtype]
        d["padding_rows"] = list(self.padding_rows)
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "PaletteMeta":
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        d["weight_dtype"] = _NAME_DTYPES[d["weight_dtype"]]
        d["padding_rows"] = tuple(d.get("padding_rows", ()))
        return PaletteMeta(**d)

    @property
    def numel(self) -> int:
        return int(math.prod(self.weight_shape))


class _Palettized:
    """Mixin: buffers ``weight_packed`` (uint8) and ``weight_codebook`` (rows, k), with
    ``palette.padding_rows`` also ``weight_padding`` (those rows of the weight, exact), metadata
    ``palette``; ``weight`` is the dequantized tensor (so the dense forward is reused as is)."""

    _dense_cls: type = nn.Module
    palette: PaletteMeta

    def labels(self) -> torch.Tensor:
        m = self.palette
        return unpack_indices(self.weight_packed, m.bits, m.numel).view(m.rows, -1)

    def dequantize_weight(self) -> torch.Tensor:
        m = self.palette
        cb = self.weight_codebook
        w = torch.gather(cb, 1, self.labels())
        w = w.reshape(m.weight_shape).to(m.weight_dtype)
        if m.padding_rows:
            w[list(m.padding_rows)] = self.weight_padding.to(m.weight_dtype)
        return w

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantize_weight()

    def extra_repr(self) -> str:
        m = self.palette
        base = self._dense_cls.extra_repr(self)
        return (f"{base}, k={m.k}, bits={m.bits}, {m.granularity}"
                + (f"(group_size={m.group_size})" if m.group_size else "")
                + f", codebook={_DTYPE_NAMES[self.weight_codebook.dtype]}")


class PalettizedLinear(_Palettized, nn.Linear):
    _dense_cls = nn.Linear


class PalettizedConv1d(_Palettized, nn.Conv1d):
    _dense_cls = nn.Conv1d


class PalettizedConv2d(_Palettized, nn.Conv2d):
    _dense_cls = nn.Conv2d


class PalettizedEmbedding(_Palettized, nn.Embedding):
    _dense_cls = nn.Embedding


_PALETTIZED = {nn.Linear: PalettizedLinear, nn.Conv1d: PalettizedConv1d,
               nn.Conv2d: PalettizedConv2d, nn.Embedding: PalettizedEmbedding}


def _dense_base(mod: nn.Module) -> Optional[type]:
    if isinstance(mod, _Palettized):
        return None
    for c in _PALETTIZED:
        if type(mod) is c or (isinstance(mod, c) and type(mod).forward is c.forward):
            return c
    return None


_PAL_BUFFERS = ("weight_packed", "weight_codebook", "weight_padding")


def _to_palettized(mod: nn.Module, packed: torch.Tensor, codebook: torch.Tensor,
                   meta: PaletteMeta, padding: Optional[torch.Tensor] = None) -> nn.Module:
    cls = _PALETTIZED[_dense_base(mod)]
    new = cls.__new__(cls)
    d = dict(mod.__dict__)
    d["_parameters"] = {k: v for k, v in mod._parameters.items() if k != "weight"}
    d["_buffers"] = dict(mod._buffers)
    d["_non_persistent_buffers_set"] = set(mod._non_persistent_buffers_set)
    d["_modules"] = dict(mod._modules)
    new.__dict__.update(d)
    new._weight_requires_grad = bool(mod.weight.requires_grad)  # for dequantize_
    new.register_buffer("weight_packed", packed)
    new.register_buffer("weight_codebook", codebook)
    if padding is not None:
        new.register_buffer("weight_padding", padding)
    new.palette = meta
    return new


def _to_dense(mod: _Palettized, weight: Optional[nn.Parameter] = None) -> nn.Module:
    """The dense module, with ``weight`` (a Parameter shared with a module it is tied to) or
    the dequantized weight."""
    cls = mod._dense_cls
    new = cls.__new__(cls)
    d = dict(mod.__dict__)
    d.pop("palette", None)
    requires_grad = d.pop("_weight_requires_grad", True)
    d["_parameters"] = dict(mod._parameters)
    d["_buffers"] = {k: v for k, v in mod._buffers.items() if k not in _PAL_BUFFERS}
    d["_modules"] = dict(mod._modules)
    new.__dict__.update(d)
    if weight is None:
        weight = nn.Parameter(mod.dequantize_weight().detach(), requires_grad=requires_grad)
    new.weight = weight
    # keep the parameter order of a dense module (weight first)
    new._parameters = {"weight": new._parameters.pop("weight"), **new._parameters}
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _all_names(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every name it is reachable under (a module reused at several places of the
    model is one object: it must be replaced at all of them)."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        lst = names.setdefault(id(m), [])
        if n not in lst:
            lst.append(n)
    return names


def _replace_module(model: nn.Module, names: Dict[int, List[str]], old: nn.Module,
                    new: nn.Module) -> None:
    for n in names.get(id(old), []):
        if n:
            _set_submodule(model, n, new)


def _rows_view(w: torch.Tensor, granularity: str, group_size: Optional[int], name: str) -> torch.Tensor:
    if granularity == "per_tensor":
        return w.reshape(1, -1)
    w2 = w.reshape(w.shape[0], -1)
    if granularity == "per_channel":
        return w2
    cols = w2.shape[1]
    if cols % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {cols} inputs per row of {name}"
        )
    return w2.reshape(-1, group_size)


def _warn_broken_ties(model: nn.Module, targets: List[Tuple[str, nn.Module]]) -> None:
    """Warn when a selected module's weight is tied to a dense module left out of the selection:
    that module keeps the dense weight, so the two no longer share one."""
    chosen = {id(m) for _, m in targets}
    weights = {id(m.weight) for _, m in targets}
    left = [name for name, mod in model.named_modules()
            if id(mod) not in chosen and not isinstance(mod, _Palettized)
            and isinstance(getattr(mod, "weight", None), torch.Tensor)
            and id(mod.weight) in weights]
    if left:
        warnings.warn(
            f"quantize_: {left} share their weight with selected modules but are not selected; "
            "they keep the dense weight, so the tie is broken (select them too to keep one "
            "shared palettized weight)", stacklevel=3)


def _select(model: nn.Module, filter_fn) -> List[Tuple[str, nn.Module]]:
    """The modules to palettize. A palettized module selected again (by filter_fn, or by default)
    is an error: quantizing its dequantized weight again is not what a second call should do
    silently, and skipping it would silently keep the first configuration."""
    out = []
    again = []
    for name, mod in model.named_modules():
        if isinstance(mod, _Palettized):
            if filter_fn is None or filter_fn(mod, name):
                again.append(name)
            continue
        if filter_fn is None:
            if _dense_base(mod) is not None:
                out.append((name, mod))
        elif filter_fn(mod, name):
            if _dense_base(mod) is None:
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


def _hessian_key(hessian: Mapping, n: str, m: nn.Module, pnames: Mapping[int, str]) -> str:
    """The mapping's key for module ``n``'s weight: "<n>.weight", or the name the parameter has
    in ``model.named_parameters()`` (a weight tied to an earlier module's appears once there)."""
    own = f"{n}.weight" if n else "weight"
    if own in hessian:
        return own
    return pnames.get(id(m.weight), own)


def _check_hessian(hessian, targets, pnames) -> Dict[str, torch.Tensor]:
    if not isinstance(hessian, Mapping):
        raise TypeError(f"hessian must be a mapping parameter name -> tensor, got {type(hessian).__name__}")
    res = {}
    keys = [_hessian_key(hessian, n, m, pnames) for n, m in targets]
    missing = [key for key in keys if key not in hessian]
    if missing:
        hint = ""
        if any(isinstance(key, str) and key.startswith("module.") for key in hessian):
            hint = (" (the mapping's names start with 'module.': it was computed on the "
                    "DistributedDataParallel/DataParallel wrapper; pass the same model to both, "
                    "or strip the prefix)")
        raise ValueError(f"hessian: missing entries for {missing}{hint}")
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
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"hessian[{key!r}] contains NaN or Inf")
        if bool((h < 0).any()):
            raise ValueError(f"hessian[{key!r}] has negative entries (a Hessian diagonal estimate "
                             "must be non-negative; clamp it, or use method='fisher'/'ggn')")
        res[key] = h
    return res


def _palettize_tensor(w: torch.Tensor, h: Optional[torch.Tensor], cfg: PalettizeConfig, k: int,
                      bits: int, name: str, padding_rows: Tuple[int, ...] = ()
                      ) -> Tuple[torch.Tensor, torch.Tensor, PaletteMeta, Optional[torch.Tensor]]:
    """Packed indices, codebooks, metadata and the exact ``padding_rows`` of ``w`` (given
    weight 0 in the clustering) or None."""
    from .kmeans import kmeans1d

    x = _rows_view(w.detach().float(), cfg.granularity, cfg.group_size, name).contiguous()
    wt = None
    if h is not None:
        h = h.detach().to(device=w.device, dtype=torch.float32)
    if padding_rows:  # weight 0 (on a copy: h may be the caller's tensor)
        h = torch.ones_like(w, dtype=torch.float32) if h is None else h.clone()
        h[list(padding_rows)] = 0.0
    if h is not None:
        wt = _rows_view(h, cfg.granularity, cfg.group_size, name).contiguous()
        zero_rows = wt.sum(1) <= 0
        if bool(zero_rows.any()):  # no sensitivity information in a row: plain K-means there
            wt = wt.clone()
            wt[zero_rows] = 1.0
    res = kmeans1d(x, k, wt, beta=float(cfg.beta), method=cfg.method, init=cfg.init,
                   max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed, diameter=cfg.diameter)
    centers = res.centers.reshape(x.shape[0], k).to(cfg.codebook_dtype)
    if not bool(torch.isfinite(centers).all()):
        big = float(res.centers.abs().max())
        raise ValueError(
            f"codebook_dtype={cfg.codebook_dtype}: a center of {name} ({big:.6g}) is outside its "
            f"range (max {torch.finfo(cfg.codebook_dtype).max:.6g}); use codebook_dtype=torch.float32"
        )
    packed = pack_indices(res.labels, bits)
    meta = PaletteMeta(tuple(w.shape), w.dtype, k, bits, cfg.granularity,
                       cfg.group_size if cfg.granularity == "per_group" else None, x.shape[0],
                       tuple(padding_rows))
    padding = w.detach()[list(padding_rows)].clone() if padding_rows else None
    return packed, centers.contiguous(), meta, padding


def quantize_(
    model: nn.Module,
    config: PalettizeConfig,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Palettize the weights of ``model`` in place (torchao-style) and return it.

    ``filter_fn(module, fqn) -> bool`` selects the modules (default: every Linear, Conv1d,
    Conv2d and Embedding). ``hessian`` maps "<fqn>.weight" to the Hessian diagonal
    (``popcomp.hessian.diagonal``), used as K-means weights. The ``padding_idx`` row of an
    Embedding is left out of the clustering and kept exact. A module that is already palettized
    and selected (by default every one) is a ValueError. All weights are quantized before
    any module is replaced: on an error the model is left unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PalettizeConfig):
        raise TypeError(f"config must be a popcomp.PalettizeConfig, got {type(config).__name__}")
    k, bits = config.resolve()
    sens = config.sensitivity
    if sens == "auto":
        sens = "hessian" if hessian is not None else "uniform"
    if sens == "hessian" and hessian is None:
        raise ValueError("hessian: sensitivity='hessian' needs a hessian mapping")
    targets = _select(model, filter_fn)
    if any(n == "" for n, _ in targets):
        raise ValueError("model: the root module itself cannot be replaced in place; wrap it "
                         "(e.g. nn.Sequential(model)) or exclude it with filter_fn")
    _warn_broken_ties(model, targets)
    pnames = {id(p): pn for pn, p in model.named_parameters()}
    hmap = _check_hessian(hessian, targets, pnames) if sens == "hessian" else {}
    for n, m in targets:  # validate devices and shapes before any work
        if m.weight.is_meta:
            raise ValueError(f"model: {n or '<root>'}.weight is on the 'meta' device (no values to "
                             "quantize); materialize the model first (e.g. load its weights)")
        _rows_view(m.weight.detach(), config.granularity, config.group_size, n or "<root>")
    # the padding rows of each weight (of every selected Embedding it is the weight of)
    pad: Dict[int, set] = {}
    for n, m in targets:
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            pad.setdefault(id(m.weight), set()).add(int(m.padding_idx))
    replacements = []
    done: Dict[int, Tuple[torch.Tensor, torch.Tensor, PaletteMeta, Optional[torch.Tensor]]] = {}
    for n, m in targets:
        if id(m.weight) not in done:  # a weight tied to several modules: palettized once, shared
            key = _hessian_key(hessian, n, m, pnames) if hmap else None
            done[id(m.weight)] = _palettize_tensor(m.weight, hmap.get(key), config, k, bits,
                                                   n or "<root>",
                                                   tuple(sorted(pad.get(id(m.weight), ()))))
        replacements.append((m, _to_palettized(m, *done[id(m.weight)])))
    names = _all_names(model)
    for old, new in replacements:
        _replace_module(model, names, old, new)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every palettized module of ``model`` by the dense module with its dequantized
    weight (in place); returns the model. The weight gets the ``requires_grad`` it had before
    ``quantize_`` (or, for a module rebuilt by ``load``, that of the weight it replaced).
    Modules sharing one palettized weight (tied weights) get one shared Parameter."""
    names = _all_names(model)
    params: Dict[int, nn.Parameter] = {}
    for n, m in list(model.named_modules()):
        if isinstance(m, _Palettized) and n:
            new = _to_dense(m, params.get(id(m.weight_packed)))
            params.setdefault(id(m.weight_packed), new.weight)
            _replace_module(model, names, m, new)
    return model


def palettized_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Palettized)}


# ---------------------------------------------------------------------------------------------
# size report
@dataclass
class LayerSize:
    name: str
    shape: Tuple[int, ...]
    numel: int
    k: int
    codebooks: int
    index_bits: int
    packed_bytes: int          # indices + codebooks (+ the exact padding rows)
    bits_per_weight: float     # packed_bytes * 8 / numel
    original_bits: int         # numel * bits of the original dtype
    entropy_bits: float        # sum over codebooks of n_row * H(labels_row) + 32 per center
                               # (+ the exact padding rows)
    ratio_packed: float        # original_bits / (packed_bytes * 8)
    ratio_entropy: float       # original_bits / entropy_bits


@dataclass
class SizeReport:
    layers: List[LayerSize]
    total: LayerSize
    other_params_bytes: int = 0  # parameters and buffers of the model left dense

    def __str__(self) -> str:
        hdr = (f"{'layer':<32} {'shape':>16} {'k':>4} {'bits/w':>7} {'bytes':>12} "
               f"{'x packed':>9} {'x entropy':>10}")
        lines = [hdr, "-" * len(hdr)]
        for r in self.layers + [self.total]:
            lines.append(
                f"{r.name:<32} {'x'.join(map(str, r.shape)):>16} {r.k:>4} "
                f"{r.bits_per_weight:>7.3f} {r.packed_bytes:>12d} {r.ratio_packed:>9.2f} "
                f"{r.ratio_entropy:>10.2f}"
            )
        lines.append(f"dense parameters and buffers left: {self.other_params_bytes} bytes")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _entropy_bits(labels: torch.Tensor, k: int) -> float:
    rows, n = labels.shape
    counts = torch.zeros(rows, k, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    p = counts / n
    h = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)
    return float((h * n).sum())


def size_report(model: nn.Module) -> SizeReport:
    """Per palettized layer and in total: bits per weight, bytes, and the compression ratios
    over the original weight's bits of the packed fixed-length form and of the entropy-coded
    form (n * H(labels) bits per codebook plus 32 bits per center, as in Bu et al.)."""
    layers = []
    pal_ids = set()
    for n, m in model.named_modules():
        if not isinstance(m, _Palettized) or id(m.weight_packed) in pal_ids:
            continue  # (a palettized weight tied to several modules is counted once)
        meta = m.palette
        pal_ids.update({id(m.weight_packed), id(m.weight_codebook)})
        numel = meta.numel
        cb = m.weight_codebook
        packed_bytes = m.weight_packed.numel() + cb.numel() * cb.element_size()
        orig_bits = numel * torch.finfo(meta.weight_dtype).bits
        ent = _entropy_bits(m.labels(), meta.k) + 32.0 * meta.rows * meta.k
        if meta.padding_rows:  # kept exact
            pal_ids.add(id(m.weight_padding))
            pad_bytes = m.weight_padding.numel() * m.weight_padding.element_size()
            packed_bytes += pad_bytes
            ent += 8.0 * pad_bytes
        layers.append(LayerSize(n, meta.weight_shape, numel, meta.k, meta.rows, meta.bits,
                                packed_bytes, packed_bytes * 8 / numel, orig_bits, ent,
                                orig_bits / (packed_bytes * 8), orig_bits / ent))
    tn = sum(r.numel for r in layers)
    tb = sum(r.packed_bytes for r in layers)
    to = sum(r.original_bits for r in layers)
    te = sum(r.entropy_bits for r in layers)
    total = LayerSize("total", (tn,), tn, max([r.k for r in layers], default=0),
                      sum(r.codebooks for r in layers), max([r.index_bits for r in layers], default=0),
                      tb, (tb * 8 / tn) if tn else 0.0, to, te,
                      (to / (tb * 8)) if tb else 0.0, (to / te) if te else 0.0)
    other = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in pal_ids or id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
    return SizeReport(layers, total, other)


# ---------------------------------------------------------------------------------------------
# safetensors
def _safetensors():
    try:
        import safetensors.torch as st  # noqa: F401
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover
        raise ImportError("popcomp.save/load need safetensors: pip install safetensors") from e
    return st, safe_open


def save(model: nn.Module, path: str) -> None:
    """Write the state of ``model`` (palettized layers in packed form) to a safetensors file.

    A tensor the state dict holds under several names (tied weights, a module reused at several
    places) is stored once; the other names are recorded in the metadata as aliases, which
    ``popcomp.load`` ties again."""
    st, _ = _safetensors()
    tensors = {}
    shared: Dict[str, str] = {}  # alias -> the name it is stored under
    first: Dict[Tuple, str] = {}
    ptrs = set()
    for k, v in model.state_dict().items():
        if v.numel():
            ident = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
                     v.stride(), v.dtype)
            if ident in first:
                shared[k] = first[ident]
                continue
            first[ident] = k
        t = v.detach().cpu().contiguous()
        p = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if p is not None and (p in ptrs or t.numel() != t.untyped_storage().nbytes() // max(t.element_size(), 1)):
            t = t.clone()  # safetensors wants one tensor per storage
            p = (t.untyped_storage().data_ptr(), 0)
        if p is not None:
            ptrs.add(p)
        tensors[k] = t
    meta = {n: m.palette.to_json() for n, m in palettized_modules(model).items()}
    info = {"format": 1, "palettized": meta, "shared": shared}
    st.save_file(tensors, str(path), metadata={"popcomp": json.dumps(info)})


def load(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a file written by ``popcomp.save`` into ``model`` (same architecture, dense or
    already palettized): the layers palettized in the file are rebuilt in packed form and all
    tensors are copied bit-exactly into a model of the same dtypes; as with
    ``load_state_dict``, a tensor of another dtype than the model's is converted to the
    model's, and a palettized layer keeps the file's codebooks and dequantizes to the dtype of
    the model's weight. Palettized weights tied in the file (one tensor under
    several names) are tied again: the modules share one ``weight_packed`` / ``weight_codebook``.
    Returns the model."""
    st, safe_open = _safetensors()
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(md.get("popcomp", '{"palettized": {}}'))
    shared = info.get("shared", {})
    for alias, key in shared.items():
        if key not in tensors:
            raise ValueError(f"path: the file {path} is corrupt (the alias {alias!r} names "
                             f"{key!r}, which it does not hold)")
        tensors[alias] = tensors[key]
    names = _all_names(model)
    undo: List[Callable[[], None]] = []  # on any error the model is put back as it was
    try:
        for n, d in info.get("palettized", {}).items():
            meta = PaletteMeta.from_json(d)
            mod = model.get_submodule(n)
            pre = f"{n}."
            packed = tensors[pre + "weight_packed"]
            cb = tensors[pre + "weight_codebook"]
            padding = tensors[pre + "weight_padding"] if meta.padding_rows else None
            # the model's weight dtype wins (as in load_state_dict): the file's codebooks are
            # kept and dequantize to it
            if isinstance(mod, _Palettized):
                shape, dtype = mod.palette.weight_shape, mod.palette.weight_dtype
            elif _dense_base(mod) is None:
                raise ValueError(f"model: {n} ({type(mod).__name__}) cannot hold a palettized weight")
            else:
                shape, dtype = tuple(mod.weight.shape), mod.weight.dtype
            if shape != meta.weight_shape:
                raise ValueError(f"model: {n}.weight has shape {shape}, the file holds "
                                 f"{meta.weight_shape}")
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"model: {n}.weight has dtype {dtype}; a palettized weight "
                                 f"dequantizes to one of {list(_DTYPE_NAMES)}")
            meta = dataclasses.replace(meta, weight_dtype=dtype)
            if padding is not None:
                padding = padding.to(dtype)
            if isinstance(mod, _Palettized):
                def restore(mod=mod, b=dict(mod._buffers), m=mod.palette):
                    mod._buffers.clear()
                    mod._buffers.update(b)
                    mod.palette = m
                undo.append(restore)
                dev = mod.weight_packed.device
                for b, t in zip(_PAL_BUFFERS, (packed, cb, padding)):
                    mod._buffers.pop(b, None)
                    if t is not None:
                        mod.register_buffer(b, t.to(dev).clone())
                mod.palette = meta
                continue
            dev = mod.weight.device
            new = _to_palettized(mod, torch.empty_like(packed, device=dev),
                                 torch.empty_like(cb, device=dev), meta,
                                 None if padding is None else torch.empty_like(padding, device=dev))
            _replace_module(model, names, mod, new)
            undo.append(lambda mod=mod: _replace_module(model, names, mod, mod))  # mod back at its names
        # tie again the palettized buffers the file holds once (load_state_dict then fills them)
        for alias, key in shared.items():
            (an, _, ab), (kn, _, kb) = alias.rpartition("."), key.rpartition(".")
            if ab != kb or ab not in _PAL_BUFFERS:
                continue
            am, km = model.get_submodule(an), model.get_submodule(kn)
            if (isinstance(am, _Palettized) and isinstance(km, _Palettized) and ab in am._buffers
                    and ab in km._buffers and am._buffers[ab] is not km._buffers[ab]):
                undo.append(lambda am=am, ab=ab, t=am._buffers[ab]: am._buffers.__setitem__(ab, t))
                am._buffers[ab] = km._buffers[ab]
        # check keys and shapes before copying anything (load_state_dict copies what fits
        # before it reports what does not)
        own = model.state_dict()
        bad = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
               for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if strict:
            bad += [f"{k}: missing in the file" for k in own if k not in tensors]
            bad += [f"{k}: not in the model" for k in tensors if k not in own]
        if bad:
            raise RuntimeError(f"load: the file {path} does not fit the model: " + "; ".join(bad))
        model.load_state_dict(tensors, strict=strict)
    except BaseException:
        for f in reversed(undo):
            f()
        raise
    return model


# ---------------------------------------------------------------------------------------------
# beta selection by cross-validation
@dataclass
class BetaSelection:
    best_beta: float
    table: List[Dict[str, Any]]  # one row per beta: beta, val_loss (mean over folds), fold_losses

    def __str__(self) -> str:
        lines = [f"{'beta':>12} {'val loss':>14}"]
        for r in self.table:
            mark = "  <- best" if r["beta"] == self.best_beta else ""
            lines.append(f"{r['beta']:>12.6g} {r['val_loss']:>14.6g}{mark}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: Callable, data: Iterable) -> float:
    """Average per-sample loss over ``data`` (batch losses weighted by batch size), with the
    model in eval mode (each module's mode is restored afterwards)."""
    from .hessian import _batch_size, _call, _eval_mode, _module_device, _split_batch, _to

    dev = _module_device(model)
    tot, cnt = 0.0, 0
    with _eval_mode(model):  # validation: no dropout noise, BatchNorm on its running statistics
        for batch in data:
            x, y = _split_batch(batch)
            x, y = _to(x, dev), _to(y, dev)
            B = _batch_size(x, y)
            tot += float(loss_fn(_call(model, x), y)) * B
            cnt += B
    if cnt == 0:
        raise ValueError("data: no samples to evaluate")
    return tot / cnt


def select_beta(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    betas: Sequence[float],
    config: PalettizeConfig,
    *,
    val_data: Optional[Iterable] = None,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    folds: int = 3,
    method: str = "fisher",
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    progress: bool = False,
) -> BetaSelection:
    """Choose the diameter penalty beta by cross-validation (Bu et al. §6-7).

    With ``val_data``: the Hessian comes from ``data`` (or ``hessian``), each beta quantizes a
    copy of the model and is scored by its loss on ``val_data``. Without: ``data``'s batches
    are split into ``folds`` folds; for each fold the Hessian is accumulated on the others and
    the quantized copies are scored on it. Returns the table of validation losses (mean over
    folds) and the best beta. ``model`` itself is not modified."""
    from .hessian import diagonal

    betas = [check_real("betas", b, lo=0.0) for b in betas]
    if not betas:
        raise ValueError("betas must hold at least one value")
    if not isinstance(config, PalettizeConfig):
        raise TypeError(f"config must be a popcomp.PalettizeConfig, got {type(config).__name__}")
    config.resolve()
    batches = list(data)
    if not batches:
        raise ValueError("data: no batches")
    if val_data is not None:
        val_batches = list(val_data)
        if not val_batches:
            raise ValueError("val_data: no batches")
        splits = [(batches, val_batches)]
    else:
        folds = check_int("folds", folds, lo=2, hi=len(batches))
        splits = []
        for f in range(folds):
            val = [b for i, b in enumerate(batches) if i % folds == f]
            train = [b for i, b in enumerate(batches) if i % folds != f]
            splits.append((train, val))
    use_h = config.sensitivity != "uniform"
    # the Hessian of the weights quantize_ will select, and of nothing else (other modules may
    # be ones the method cannot handle; a selected weight may be frozen)
    pnames = {id(p): pn for pn, p in model.named_parameters()}
    params = list(dict.fromkeys(pnames[id(m.weight)] for n, m in _select(model, filter_fn)
                                if n and id(m.weight) in pnames))
    losses = [[0.0] * len(splits) for _ in betas]
    for s, (train, val) in enumerate(splits):
        h = None
        if use_h:
            if hessian is not None:
                h = hessian
            elif params:
                h = diagonal(model, loss_fn, train, method, params=params, progress=progress)
                # estimates (hutchinson) can be negative where the curvature is ~0: clamp, as
                # quantize_ asks of a given mapping
                h = {key: v.clamp_min(0) for key, v in h.items()}
            else:
                h = {}
        for i, b in enumerate(betas):
            m = copy.deepcopy(model)
            quantize_(m, dataclasses.replace(config, beta=b), hessian=h, filter_fn=filter_fn)
            losses[i][s] = evaluate_loss(m, loss_fn, val)
    table = [{"beta": b, "val_loss": sum(l) / len(l), "fold_losses": l} for b, l in zip(betas, losses)]
    best = min(table, key=lambda r: r["val_loss"])["beta"]
    return BetaSelection(best, table)
