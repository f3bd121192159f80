"""save and load: a model's state with its palettized layers in packed form, in one versioned safetensors file.

The file's metadata entry ``"popcomp"`` is JSON ``{"format": N, "palettized": {name:
PaletteMeta}, "shared": {alias: name}}``. ``format`` says how the packed indices are laid out
(format 1: ``packing``'s layout 1, one bit stream per weight); ``load`` reads every format in
:data:`READ_FORMATS` and refuses any other, naming it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from .._model import all_names
from .modules import (
    DTYPE_NAMES, PAL_BUFFERS, PaletteMeta, Palettized, dense_base, palettized_modules,
    replace_module, to_palettized,
)
from .packing import packed_bytes

__all__ = ["save", "load", "FORMAT", "READ_FORMATS"]

FORMAT = 1             # the format save writes
READ_FORMATS = (1,)    # the formats load reads


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
    info = {"format": FORMAT, "palettized": meta, "shared": shared}
    st.save_file(tensors, str(path), metadata={"popcomp": json.dumps(info)})


def _check_packed(path, n: str, meta: PaletteMeta, packed: torch.Tensor, cb: torch.Tensor) -> None:
    """The sizes a format-1 layer of ``meta`` must have in the file."""
    need = packed_bytes(meta.numel, meta.bits)
    if packed.dtype != torch.uint8 or packed.numel() != need:
        raise ValueError(f"path: the file {path} is corrupt ({n}.weight_packed holds "
                         f"{packed.numel()} {packed.dtype} values, the layer needs {need} uint8)")
    if tuple(cb.shape) != (meta.rows, meta.k):
        raise ValueError(f"path: the file {path} is corrupt ({n}.weight_codebook has shape "
                         f"{tuple(cb.shape)}, the layer needs {(meta.rows, meta.k)})")


def load(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a file written by ``popcomp.save`` into ``model`` (same architecture, dense or
    already palettized): the layers palettized in the file are rebuilt in packed form and all
    tensors are copied bit-exactly into a model of the same dtypes; as with
    ``load_state_dict``, a tensor of another dtype than the model's is converted to the
    model's, and a palettized layer keeps the file's codebooks and dequantizes to the dtype of
    the model's weight. Palettized weights tied in the file (one tensor under
    several names) are tied again: the modules share one ``weight_packed`` / ``weight_codebook``.
    On any error the model is left as it was. Returns the model."""
    st, safe_open = _safetensors()
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(md.get("popcomp", '{"palettized": {}}'))
    fmt = info.get("format", 1)
    if fmt not in READ_FORMATS:
        raise ValueError(f"path: the file {path} has popcomp format {fmt!r}; this version of "
                         f"popcomp reads formats {READ_FORMATS} (a newer popcomp wrote it?)")
    shared = info.get("shared", {})
    for alias, key in shared.items():
        if key not in tensors:
            raise ValueError(f"path: the file {path} is corrupt (the alias {alias!r} names "
                             f"{key!r}, which it does not hold)")
        tensors[alias] = tensors[key]
    names = all_names(model)
    undo: List[Callable[[], None]] = []  # on any error the model is put back as it was
    try:
        for n, d in info.get("palettized", {}).items():
            meta = PaletteMeta.from_json(d)
            mod = model.get_submodule(n)
            pre = f"{n}."
            packed = tensors[pre + "weight_packed"]
            cb = tensors[pre + "weight_codebook"]
            padding = tensors[pre + "weight_padding"] if meta.padding_rows else None
            _check_packed(path, n, meta, packed, cb)
            # the model's weight dtype wins (as in load_state_dict): the file's codebooks are
            # kept and dequantize to it
            if isinstance(mod, Palettized):
                shape, dtype = mod.palette.weight_shape, mod.palette.weight_dtype
            elif dense_base(mod) is None:
                raise ValueError(f"model: {n} ({type(mod).__name__}) cannot hold a palettized weight")
            else:
                shape, dtype = tuple(mod.weight.shape), mod.weight.dtype
            if shape != meta.weight_shape:
                raise ValueError(f"model: {n}.weight has shape {shape}, the file holds "
                                 f"{meta.weight_shape}")
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"model: {n}.weight has dtype {dtype}; a palettized weight "
                                 f"dequantizes to one of {list(DTYPE_NAMES)}")
            meta = dataclasses.replace(meta, weight_dtype=dtype)
            if padding is not None:
                padding = padding.to(dtype)
            if isinstance(mod, Palettized):
                def restore(mod=mod, b=dict(mod._buffers), m=mod.palette):
                    mod._buffers.clear()
                    mod._buffers.update(b)
                    mod.palette = m
                undo.append(restore)
                dev = mod.weight_packed.device
                for b, t in zip(PAL_BUFFERS, (packed, cb, padding)):
                    mod._buffers.pop(b, None)
                    if t is not None:
                        mod.register_buffer(b, t.to(dev).clone())
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
