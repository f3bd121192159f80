"""save and load: a model's state with its palettized layers in packed form, in one versioned safetensors file.

The file's metadata entry ``"popcomp"`` is JSON ``{"format": N, "palettized": {name:
PaletteMeta}, "shared": {alias: name}}``. ``format`` says how the packed indices are laid out:
format 2 (written now): ``packing``'s layout 2, ``weight_packed`` uint8 ``(out, row_bytes)`` and
``weight_codebook`` ``(codebooks, 2**bits)``; format 1: layout 1 (one bit stream per weight)
and codebooks ``(codebooks, k)``, repacked as format 2 when loaded. ``load`` reads every format in
:data:`READ_FORMATS`, refuses any other naming it, and checks every palettized layer's metadata
against its tensors before it touches the model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._model import all_names
from .config import GRANULARITIES
from .modules import (
    DTYPE_NAMES, PAL_BUFFERS, PaletteMeta, Palettized, dense_base, matrix_shape, palettized_modules,
    replace_module, to_palettized,
)
from .packing import pack_rows, packed_bytes, row_bytes, unpack_indices

__all__ = ["save", "load", "FORMAT", "READ_FORMATS"]

FORMAT = 2               # the format save writes
READ_FORMATS = (1, 2)    # the formats load reads
CODEBOOK_DTYPES = (torch.float16, torch.float32)


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
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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
    info = {"format": FORMAT, "palettized": meta, "shared": shared}
    st.save_file(tensors, str(path), metadata={"popcomp": json.dumps(info)})


def _corrupt(path, what: str) -> ValueError:
    return ValueError(f"path: the file {path} is corrupt ({what})")


def _meta(path, n: str, d: Any) -> PaletteMeta:
    """The PaletteMeta of layer ``n``, each field checked (ValueError naming the layer)."""
    try:
        meta = PaletteMeta.from_json(d)
        shape = tuple(int(v) for v in meta.weight_shape)
        ok = (len(shape) >= 2 and all(v >= 1 for v in shape) and isinstance(meta.bits, int)
              and 1 <= meta.bits <= 8 and isinstance(meta.k, int) and 2 <= meta.k <= 1 << meta.bits
              and meta.granularity in GRANULARITIES and isinstance(meta.rows, int))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _corrupt(path, f"the metadata of {n} cannot be read: {d!r}") from None
    if not ok:
        raise _corrupt(path, f"the metadata of {n} is out of range: {d!r}")
    fan_in = math.prod(shape[1:])
    g = meta.group_size
    if meta.granularity == "per_group":
        if not isinstance(g, int) or g < 1 or fan_in % g:
            raise _corrupt(path, f"{n}: group_size {g!r} does not divide the {fan_in} inputs "
                                 "per row")
        rows = shape[0] * (fan_in // g)
    else:
        if g is not None:
            raise _corrupt(path, f"{n}: group_size {g!r} with granularity {meta.granularity}")
        rows = 1 if meta.granularity == "per_tensor" else shape[0]
    if meta.rows != rows:
        raise _corrupt(path, f"{n}: {meta.rows} codebooks, its granularity makes {rows}")
    if any(not isinstance(r, int) or not 0 <= r < shape[0] for r in meta.padding_rows):
        raise _corrupt(path, f"{n}: padding_rows {list(meta.padding_rows)} outside "
                             f"0..{shape[0] - 1}")
    return dataclasses.replace(meta, weight_shape=shape)


def _layer(path, fmt: int, n: str, meta: PaletteMeta, tensors: Mapping[str, torch.Tensor],
           repacked: Dict[int, Tuple[torch.Tensor, torch.Tensor]]
           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(packed, codebook, padding) of layer ``n`` in format 2, checked against ``meta``; a
    format-1 layer is repacked (``repacked``: id of a file tensor -> (it, its format-2 form), so
    tensors shared by tied layers stay shared)."""
    pre = f"{n}."
    names = [pre + "weight_packed", pre + "weight_codebook"]
    if meta.padding_rows:
        names.append(pre + "weight_padding")
    missing = [k for k in names if k not in tensors]
    if missing:
        raise _corrupt(path, f"the palettized layer {n} has no {missing}")
    packed, cb = tensors[names[0]], tensors[names[1]]
    out, fan_in, K = meta.weight_shape[0], math.prod(meta.weight_shape[1:]), 1 << meta.bits
    if fmt == 1:
        need = packed_bytes(meta.numel, meta.bits)
        if packed.dtype != torch.uint8 or packed.numel() != need:
            raise _corrupt(path, f"{n}.weight_packed holds {packed.numel()} {packed.dtype} "
                                 f"values, the layer needs {need} uint8")
        cb_shape = (meta.rows, meta.k)
    else:
        need_shape = (out, row_bytes(fan_in, meta.bits))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != need_shape:
            raise _corrupt(path, f"{n}.weight_packed is {packed.dtype} of shape "
                                 f"{tuple(packed.shape)}, the layer needs uint8 of shape {need_shape}")
        cb_shape = (meta.rows, K)
    if cb.dtype not in CODEBOOK_DTYPES or tuple(cb.shape) != cb_shape:
        raise _corrupt(path, f"{n}.weight_codebook is {cb.dtype} of shape {tuple(cb.shape)}, "
                             f"the layer needs float16 or float32 of shape {cb_shape}")
    padding = None
    if meta.padding_rows:
        padding = tensors[names[2]]
        pshape = (len(meta.padding_rows), *meta.weight_shape[1:])
        if not padding.is_floating_point() or tuple(padding.shape) != pshape:
            raise _corrupt(path, f"{n}.weight_padding is {padding.dtype} of shape "
                                 f"{tuple(padding.shape)}, the layer needs {pshape}")
    if fmt == 1:
        if id(packed) not in repacked:
            labels = unpack_indices(packed, meta.bits, meta.numel)
            if meta.k < K and bool((labels >= meta.k).any()):
                raise _corrupt(path, f"{n}.weight_packed holds indices >= k = {meta.k}")
            repacked[id(packed)] = (packed, pack_rows(labels.view(out, fan_in), meta.bits))
        if id(cb) not in repacked and meta.k < K:  # padded with copies of the last center
            repacked[id(cb)] = (cb, torch.cat([cb, cb[:, -1:].expand(-1, K - meta.k)], 1))
        packed = repacked[id(packed)][1]
        cb = repacked[id(cb)][1] if id(cb) in repacked else cb
    return packed, cb, padding


def load(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a file written by ``popcomp.save`` into ``model`` (same architecture, dense or
    already palettized): the layers palettized in the file are rebuilt in packed form and all
    tensors are copied bit-exactly into a model of the same dtypes; as with
    ``load_state_dict``, a tensor of another dtype than the model's is converted to the
    model's, and a palettized layer keeps the file's codebooks and dequantizes to the dtype of
    the model's weight. Palettized weights tied in the file (one tensor under
    several names) are tied again: the modules share one ``weight_packed`` / ``weight_codebook``.
    Files of format 1 are repacked as format 2 (an index >= k is refused). Every palettized
    layer's metadata is checked against its tensors and the model before the model is touched;
    on any error the model is left as it was. Returns the model."""
    st, safe_open = _safetensors()
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        info = json.loads(md.get("popcomp", '{"palettized": {}}'))
        fmt = info.get("format", 1)
        shared = dict(info.get("shared", {}))
        pal = dict(info.get("palettized", {}))
    except (ValueError, TypeError, AttributeError):
        raise _corrupt(path, "its popcomp metadata cannot be read") from None
    if fmt not in READ_FORMATS:
        raise ValueError(f"path: the file {path} has popcomp format {fmt!r}; this version of "
                         f"popcomp reads formats {READ_FORMATS} (a newer popcomp wrote it?)")
    for alias, key in shared.items():
        if key not in tensors:
            raise _corrupt(path, f"the alias {alias!r} names {key!r}, which it does not hold")
        tensors[alias] = tensors[key]
    # every palettized layer checked against its tensors (format 1 repacked), then against the
    # model, before anything is changed
    repacked: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    layers = []
    for n, d in pal.items():
        meta = _meta(path, n, d)
        packed, cb, padding = _layer(path, fmt, n, meta, tensors, repacked)
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"model: it has no module {n!r}, which the file holds palettized") from None
        # the model's weight dtype wins (as in load_state_dict): the file's codebooks are
        # kept and dequantize to it
        if isinstance(mod, Palettized):
            shape, dtype = mod.palette.weight_shape, mod.palette.weight_dtype
        elif dense_base(mod) is None:
            raise ValueError(f"model: {n} ({type(mod).__name__}) cannot hold a palettized weight")
        else:
            shape, dtype = matrix_shape(mod), mod.weight.dtype  # (a Conv1D's transposed)
        if shape != meta.weight_shape:
            raise ValueError(f"model: {n}.weight has shape {shape}, the file holds "
                             f"{meta.weight_shape}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"model: {n}.weight has dtype {dtype}; a palettized weight "
                             f"dequantizes to one of {list(DTYPE_NAMES)}")
        meta = dataclasses.replace(meta, weight_dtype=dtype)
        layers.append((n, mod, meta, packed, cb, None if padding is None else padding.to(dtype)))
    for key, t in list(tensors.items()):  # the format-2 forms, under every name
        if id(t) in repacked:
            tensors[key] = repacked[id(t)][1]
    names = all_names(model)
    undo: List[Callable[[], None]] = []  # on any error the model is put back as it was
    try:
        for n, mod, meta, packed, cb, padding in layers:
            pre = f"{n}."
            if padding is not None:
                tensors[pre + "weight_padding"] = padding
            if isinstance(mod, Palettized):
                def restore(mod=mod, b=dict(mod._buffers), m=mod.palette):
                    mod._buffers.clear()
                    mod._buffers.update(b)
                    mod.palette = m
                undo.append(restore)
                dev = mod.weight_packed.device
                for b, t in zip(PAL_BUFFERS, (packed, cb, padding)):
                    mod._buffers.pop(b, None)
                    if t is not None:  # of the file's shape; load_state_dict fills it
                        mod.register_buffer(b, torch.empty_like(t, device=dev))
                mod.palette = meta
                continue
            dev = mod.weight.device
            new = to_palettized(mod, torch.empty_like(packed, device=dev),
                                torch.empty_like(cb, device=dev), meta,
                                None if padding is None else torch.empty_like(padding, device=dev))
            replace_module(model, names, mod, new)
            undo.append(lambda mod=mod: replace_module(model, names, mod, mod))  # mod back at its names
        # tie again the palettized buffers the file holds once (load_state_dict then fills them)
        for alias, key in shared.items():
            (an, _, ab), (kn, _, kb) = alias.rpartition("."), key.rpartition(".")
            if ab != kb or ab not in PAL_BUFFERS:
                continue
            am, km = model.get_submodule(an), model.get_submodule(kn)
            if (isinstance(am, Palettized) and isinstance(km, Palettized) and ab in am._buffers
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
