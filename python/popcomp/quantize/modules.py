"""The palettized modules (Linear, Conv1d, Conv2d, Embedding holding packed indices and codebooks) and the swaps between them and the dense modules.

A palettized module subclasses its dense module and holds only its packed indices (layout 2,
``packing``) and its codebooks, as buffers: no dense weight is kept. ``PalettizedLinear`` runs the
op ``popcomp::palettized_linear`` (a lookup-table matmul reading the packed weight),
``PalettizedEmbedding`` decodes only the rows it looks up, ``PalettizedConv1d/2d`` decode their
weight with ``popcomp::palettized_decode`` for each forward; ``weight`` is the dequantized tensor,
so each module computes what the dense module with that weight computes. The ``padding_idx`` row
of an Embedding (which PyTorch never updates) is kept exact, in a buffer ``weight_padding``, and
so are those rows of a Linear tied to it.

Types of optional libraries are recognized by their qualified name in :data:`LAZY_DENSE` (no
import of the library): Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear,
``y = x @ weight + bias`` with ``weight`` stored ``(in, out)``). Its palettized class
(:func:`palettized_class`, made once per Conv1D class: it subclasses it) packs the transposed
``(out, in)`` matrix like a Linear's and runs ``popcomp::palettized_linear``; its ``weight`` is
the dequantized ``(in, out)`` tensor. ``PaletteMeta.weight_shape`` is always the packed
``(out, fan-in...)`` matrix's shape (:func:`matrix_shape`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._model import own_forward, set_submodule
from .packing import unpack_rows

__all__ = [
    "PaletteMeta", "Palettized", "PalettizedLinear", "PalettizedConv1d", "PalettizedConv2d",
    "PalettizedEmbedding", "PALETTIZED", "PAL_BUFFERS", "DTYPE_NAMES", "dense_base",
    "to_palettized", "to_dense", "replace_module", "palettized_modules", "LAZY_DENSE",
    "palettized_class", "weight_matrix", "matrix_shape",
]

# the dtypes a palettized weight dequantizes to, by the names the file metadata uses
DTYPE_NAMES: Dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16",
                                       torch.bfloat16: "bfloat16", torch.float64: "float64"}
_NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

# the buffers a palettized module adds to its dense module
PAL_BUFFERS = ("weight_packed", "weight_codebook", "weight_padding")
# the dtypes the palettized ops compute in (activations, decoded weights); another dtype (float64)
# runs the dense forward on the dequantized weight
OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class PaletteMeta:
    """What a palettized weight is: its dense shape and dtype, k centers per codebook, index
    bits, the granularity (name and group size), the number of codebooks and the rows kept
    exact."""

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
        d["weight_dtype"] = DTYPE_NAMES[self.weight_dtype]
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


class Palettized:
    """Mixin of the palettized modules: buffers ``weight_packed`` (uint8 ``(out, row_bytes)``,
    layout 2) and ``weight_codebook`` (codebooks, 2**bits; a codebook of k < 2**bits centers
    padded with copies of its last one), with ``palette.padding_rows`` also ``weight_padding``
    (those rows of the weight, exact), metadata ``palette``; ``weight`` is the dequantized
    tensor."""

    _dense_cls: type = nn.Module
    palette: PaletteMeta

    @property
    def fan_in(self) -> int:
        """Columns of the packed ``(out, fan-in)`` index matrix: the product of the weight's
        other dims."""
        return int(math.prod(self.palette.weight_shape[1:]))

    def labels(self) -> torch.Tensor:
        """The index of every weight in its codebook, int64 ``(codebooks, values per codebook)``."""
        m = self.palette
        return unpack_rows(self.weight_packed, m.bits, self.fan_in).view(m.rows, -1)

    def _decode(self, packed, codebook) -> torch.Tensor:
        """The dequantized rows of ``packed`` (reading ``codebook``) in the weight's dtype,
        through ``popcomp::palettized_decode``."""
        m = self.palette
        dt = m.weight_dtype if m.weight_dtype in OP_DTYPES else torch.float32
        w = torch.ops.popcomp.palettized_decode(packed, codebook, m.bits, self.fan_in,
                                                m.group_size or 0, dt)
        return w.to(m.weight_dtype)

    def dequantize_weight(self) -> torch.Tensor:
        m = self.palette
        w = self._decode(self.weight_packed, self.weight_codebook)
        if m.padding_rows:
            w[list(m.padding_rows)] = self.weight_padding.to(w.dtype)
        return w.reshape(m.weight_shape)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantize_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """``load_state_dict``: the buffers of a state dict of the same palettized model load as
        they are; a dense ``weight`` or packed buffers of another configuration (bits,
        granularity: the metadata a state dict does not carry) are an error naming the layer,
        also with ``strict=False`` (the layer would silently keep its old weight)."""
        name = prefix[:-1] or "<root>"
        if prefix + "weight" in state_dict and prefix + "weight_packed" not in state_dict:
            error_msgs.append(
                f"{name} is palettized but the state dict holds a dense {name}.weight: load it "
                "into the dense model (popcomp.dequantize_ this one first) and quantize_ again")
            return
        for b in PAL_BUFFERS:
            t, own = state_dict.get(prefix + b), self._buffers.get(b)
            if isinstance(t, torch.Tensor) and own is not None and t.shape != own.shape:
                error_msgs.append(
                    f"{name}.{b} has shape {tuple(t.shape)} in the state dict, {tuple(own.shape)} "
                    f"in the model: palettized with another configuration (k={self.palette.k}, "
                    f"bits={self.palette.bits}, {self.palette.granularity} here), which a state "
                    "dict does not record; save and load with popcomp.save / popcomp.load, "
                    "which carry it")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        m = self.palette
        base = self._dense_cls.extra_repr(self)
        return (f"{base}, k={m.k}, bits={m.bits}, {m.granularity}"
                + (f"(group_size={m.group_size})" if m.group_size else "")
                + f", codebook={DTYPE_NAMES[self.weight_codebook.dtype]}")


class PalettizedLinear(Palettized, nn.Linear):
    _dense_cls = nn.Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype not in OP_DTYPES:
            return F.linear(input, self.weight, self.bias)
        m = self.palette
        y = torch.ops.popcomp.palettized_linear(input, self.weight_packed, self.weight_codebook,
                                                self.bias, m.bits, self.fan_in, m.group_size or 0)
        pad = m.padding_rows
        if pad:  # rows kept exact (tied to an Embedding's padding_idx): their outputs exactly
            rows = torch.tensor(pad, device=y.device)
            b = None if self.bias is None else self.bias.index_select(0, rows).to(input.dtype)
            exact = F.linear(input, self.weight_padding.to(input.dtype), b)
            y = y.index_copy(-1, rows, exact)
        return y


class PalettizedConv1d(Palettized, nn.Conv1d):
    _dense_cls = nn.Conv1d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class PalettizedConv2d(Palettized, nn.Conv2d):
    _dense_cls = nn.Conv2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class PalettizedEmbedding(Palettized, nn.Embedding):
    _dense_cls = nn.Embedding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None:  # renormalizes the rows it reads: the dense path
            return F.embedding(input, self.weight, self.padding_idx, self.max_norm,
                               self.norm_type, self.scale_grad_by_freq, self.sparse)
        m = self.palette
        ids = input.reshape(-1)
        packed = self.weight_packed.index_select(0, ids)  # (also rejects ids out of range)
        cb = self.weight_codebook
        if m.group_size:  # (rows, groups) codebooks per row
            cb = cb.view(m.weight_shape[0], -1, cb.shape[1]).index_select(0, ids)
            cb = cb.reshape(-1, cb.shape[2])
        elif m.granularity == "per_channel":
            cb = cb.index_select(0, ids)
        rows = self._decode(packed, cb)
        for j, r in enumerate(m.padding_rows):  # rows kept exact
            rows = torch.where((ids == r).unsqueeze(1), self.weight_padding[j].to(rows.dtype), rows)
        return rows.view(*input.shape, rows.shape[1])


# dense module type -> its palettized module type
PALETTIZED: Dict[type, type] = {nn.Linear: PalettizedLinear, nn.Conv1d: PalettizedConv1d,
                                nn.Conv2d: PalettizedConv2d, nn.Embedding: PalettizedEmbedding}


class _PalettizedTransposedLinear(Palettized):
    """Mixin of the palettized Hugging Face ``Conv1D`` (``y = x @ weight + bias``, ``weight``
    ``(in, out)``): the packed matrix is ``weight.T`` ``(out, in)``, run as a Linear's."""

    transposed = True

    def dequantize_weight(self) -> torch.Tensor:
        return super().dequantize_weight().t().contiguous()  # (in, out), as the module stores it

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype not in OP_DTYPES:
            return F.linear(input, self.weight.t(), self.bias)
        m = self.palette
        return torch.ops.popcomp.palettized_linear(input, self.weight_packed, self.weight_codebook,
                                                   self.bias, m.bits, self.fan_in, m.group_size or 0)


def _is_conv1d(mod: nn.Module, cls: type) -> bool:
    """``mod`` (an instance of ``cls``, Hugging Face's Conv1D by name) is what that class is:
    ``nf`` outputs, a 2-D ``(in, nf)`` weight, a bias of ``nf``."""
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    nf = getattr(mod, "nf", None)
    return (isinstance(nf, int) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] == nf and (b is None or (isinstance(b, torch.Tensor)
                                                     and tuple(b.shape) == (nf,))))


# qualified class name of an optional library's layer -> how to recognize an instance
LAZY_DENSE: Dict[str, Any] = {"transformers.pytorch_utils.Conv1D": _is_conv1d}
_LAZY_PALETTIZED: Dict[type, type] = {}


def _lazy_base(mod: nn.Module) -> Optional[type]:
    for cls in type(mod).__mro__:
        check = LAZY_DENSE.get(f"{cls.__module__}.{cls.__qualname__}")
        if check is not None:
            return cls if type(mod).forward is cls.forward and check(mod, cls) else None
    return None


def dense_base(mod: nn.Module) -> Optional[type]:
    """The dense type of :data:`PALETTIZED` (or of :data:`LAZY_DENSE`) that ``mod`` is (with
    its stock forward), or None (also for a module that is already palettized)."""
    if isinstance(mod, Palettized):
        return None
    return next((c for c in PALETTIZED if own_forward(mod, (c,))), None) or _lazy_base(mod)


def palettized_class(base: type) -> type:
    """The palettized module type of dense type ``base`` (one of :data:`PALETTIZED`, or a
    class of :data:`LAZY_DENSE`: made on first use, subclassing it)."""
    if base in PALETTIZED:
        return PALETTIZED[base]
    cls = _LAZY_PALETTIZED.get(base)
    if cls is None:
        cls = type(f"Palettized{base.__name__}", (_PalettizedTransposedLinear, base),
                   {"_dense_cls": base, "__module__": __name__, "__repr__": nn.Module.__repr__,
                    "__doc__": f"Palettized {base.__module__}.{base.__qualname__} (weight (in, out))."})
        _LAZY_PALETTIZED[base] = cls
        globals().setdefault(cls.__name__, cls)  # found by name (pickle, torch.save)
    return cls


def __getattr__(name: str) -> type:
    """``Palettized<Name>`` of a :data:`LAZY_DENSE` class, made on first access (so that a
    pickled palettized Conv1D loads in a fresh process)."""
    import importlib

    for qual in LAZY_DENSE:
        mod_name, _, cls_name = qual.rpartition(".")
        if name == f"Palettized{cls_name}":
            return palettized_class(getattr(importlib.import_module(mod_name), cls_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def weight_matrix(mod: nn.Module, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight of dense module ``mod`` (or ``t``, a tensor of the weight's shape such as its
    Hessian diagonal) as the ``(out, fan-in...)`` matrix that is packed: as is, or transposed
    for a Conv1D (a view either way)."""
    t = mod.weight if t is None else t
    base = dense_base(mod)
    return t.t() if base is not None and base not in PALETTIZED else t


def matrix_shape(mod: nn.Module) -> Tuple[int, ...]:
    """The shape of :func:`weight_matrix` (for a palettized module: ``palette.weight_shape``)."""
    if isinstance(mod, Palettized):
        return tuple(mod.palette.weight_shape)
    return tuple(weight_matrix(mod).shape)


def to_palettized(mod: nn.Module, packed: torch.Tensor, codebook: torch.Tensor,
                  meta: PaletteMeta, padding: Optional[torch.Tensor] = None) -> nn.Module:
    """A palettized module with ``mod``'s other parameters, buffers, submodules and attributes
    (shared, not copied) and the given packed weight; ``mod`` is not modified."""
    cls = palettized_class(dense_base(mod))
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


def to_dense(mod: Palettized, weight: Optional[nn.Parameter] = None) -> nn.Module:
    """The dense module, with ``weight`` (a Parameter shared with a module it is tied to) or
    the dequantized weight."""
    cls = mod._dense_cls
    new = cls.__new__(cls)
    d = dict(mod.__dict__)
    d.pop("palette", None)
    requires_grad = d.pop("_weight_requires_grad", True)
    d["_parameters"] = dict(mod._parameters)
    d["_buffers"] = {k: v for k, v in mod._buffers.items() if k not in PAL_BUFFERS}
    d["_modules"] = dict(mod._modules)
    new.__dict__.update(d)
    if weight is None:
        weight = nn.Parameter(mod.dequantize_weight().detach(), requires_grad=requires_grad)
    new.weight = weight
    # keep the parameter order of a dense module (weight first)
    new._parameters = {"weight": new._parameters.pop("weight"), **new._parameters}
    return new


def replace_module(model: nn.Module, names: Mapping[int, List[str]], old: nn.Module,
                   new: nn.Module) -> None:
    """Put ``new`` at every name of ``old`` in ``model`` (``names``: ``_model.all_names``)."""
    for n in names.get(id(old), []):
        if n:
            set_submodule(model, n, new)


def palettized_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """name -> module for every palettized module of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Palettized)}
