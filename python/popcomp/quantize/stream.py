"""quantize_checkpoint: a safetensors checkpoint palettized one tensor at a time into popcomp's packed format, for models larger than memory.

The output file is written as it is computed: its header (names, shapes, offsets of every
output tensor and popcomp's metadata, as ``serialization.save`` writes it: format 2) follows
from the input headers alone, so each input tensor is read, palettized (or copied) and written,
then freed; memory stays bounded by the largest tensor (and its Hessian), not the model.
``popcomp.load(model, out)`` loads the result into a model built from its config.

Which tensors are palettized: those whose name ends in ``.weight`` with two or more dims, of
a floating dtype, that ``filter_fn(name, shape)`` selects (default: all of them except
one-dimensional norms and biases, which have one dim anyway). A weight is taken as stored
``(out, fan-in...)`` (PyTorch's Linear / Conv / Embedding); checkpoints of Hugging Face
``Conv1D`` layers (GPT-2: ``(in, out)``) are not transposed here: leave them out with
``filter_fn`` or palettize the model in memory with ``quantize_``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .api import _palettize_weight
from .config import PalettizeConfig
from .modules import DTYPE_NAMES, PaletteMeta
from .packing import row_bytes
from .serialization import FORMAT

__all__ = ["quantize_checkpoint"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _plan(cfg: PalettizeConfig, name: str, shape: Tuple[int, ...], dtype: torch.dtype
          ) -> PaletteMeta:
    k, bits = cfg.resolve()
    gran = cfg.granularity_spec
    gran.check(shape, name)
    fan_in = math.prod(shape[1:])
    rows = {"per_tensor": 1, "per_channel": shape[0]}.get(gran.name)
    if rows is None:
        rows = shape[0] * (fan_in // gran.group_size)
    return PaletteMeta(tuple(shape), dtype, k, bits, gran.name, gran.group_size, rows)


def quantize_checkpoint(
    inputs: Sequence[str],
    out: str,
    config: PalettizeConfig,
    *,
    hessian: Optional[Sequence[str]] = None,
    filter_fn: Optional[Callable[[str, Tuple[int, ...]], bool]] = None,
    progress: bool = True,
) -> Dict[str, PaletteMeta]:
    """Palettize the weights of the safetensors files ``inputs`` (the shards of one checkpoint)
    into the popcomp file ``out``, one tensor at a time; returns name -> PaletteMeta of the
    palettized layers. ``hessian``: safetensors files holding the Hessian diagonal of (some
    of) the weights under the same names (``popcomp.hessian.diagonal``'s keys); a weight
    without one is clustered with plain K-means. Other tensors are copied unchanged."""
    from safetensors import safe_open

    from .._model import progress as bar

    if not isinstance(config, PalettizeConfig):
        raise TypeError(f"config must be a popcomp.PalettizeConfig, got {type(config).__name__}")
    config.validate()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("inputs: give at least one safetensors file")
    hfiles = [safe_open(str(p), framework="pt") for p in (hessian or [])]
    hwhere = {k: f for f in hfiles for k in f.keys()}
    # pass 1: headers only -> the output layout
    files = [safe_open(str(p), framework="pt") for p in inputs]
    entries: List[Tuple[str, object, Optional[PaletteMeta]]] = []  # (name, file, meta)
    seen = set()
    for f in files:
        for key in f.keys():
            if key in seen:
                raise ValueError(f"inputs: the tensor {key!r} is in more than one file")
            seen.add(key)
            sl = f.get_slice(key)
            dtype, shape = _ST_DTYPES[sl.get_dtype()], tuple(sl.get_shape())
            meta = None
            if (key.endswith(".weight") and len(shape) >= 2 and dtype in DTYPE_NAMES
                    and all(s > 0 for s in shape) and (filter_fn is None or filter_fn(key, shape))):
                meta = _plan(config, key[: -len(".weight")], shape, dtype)
            entries.append((key, f, meta))
    header: Dict[str, Dict] = {}
    off = 0

    def put(name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> None:
        nonlocal off
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes

    pal = {}
    for key, f, meta in entries:
        if meta is None:
            sl = f.get_slice(key)
            put(key, _ST_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
            continue
        n = key[: -len(".weight")]
        fan_in = math.prod(meta.weight_shape[1:])
        put(n + ".weight_packed", torch.uint8, (meta.weight_shape[0], row_bytes(fan_in, meta.bits)))
        put(n + ".weight_codebook", config.codebook_dtype, (meta.rows, 1 << meta.bits))
        pal[n] = meta
    info = {"format": FORMAT, "palettized": {n: m.to_json() for n, m in pal.items()},
            "shared": {}}
    head = dict(header)
    head["__metadata__"] = {"popcomp": json.dumps(info)}
    hb = json.dumps(head, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    # pass 2: one tensor at a time, written where the header says
    with open(str(out), "wb") as fo:
        fo.write(len(hb).to_bytes(8, "little"))
        fo.write(hb)
        for key, f, meta in bar(entries, "quantize", enabled=progress):
            t = f.get_tensor(key)
            if meta is None:
                outs = [t]
            else:
                h = hwhere[key].get_tensor(key) if key in hwhere else None
                if h is not None and tuple(h.shape) != tuple(t.shape):
                    raise ValueError(f"hessian[{key!r}] has shape {tuple(h.shape)}, the weight "
                                     f"{tuple(t.shape)}")
                packed, cb, _, _ = _palettize_weight(t, h, config, key[: -len(".weight")])
                outs = [packed, cb]
                del h
            for o in outs:
                o = o.detach().cpu().contiguous().reshape(-1)
                fo.write(o.view(torch.uint8).numpy().tobytes() if o.numel() else b"")
            del t, outs
    return pal
