"""quantize_checkpoint: a safetensors checkpoint palettized one tensor at a time into popcomp's packed format, for models larger than memory.

The output file is written as it is computed: its header (names, shapes, offsets of every
output tensor and popcomp's metadata, as ``serialization.save`` writes it: format 2) follows
from the input headers alone, so each input tensor is read, palettized (or copied) and written,
then freed; memory stays bounded by the largest tensor (and its Hessian), not the model.
``popcomp.load(model, out)`` loads the result into a model built from its config.

Under ``torchrun --nproc-per-node N`` (or on several machines) the tensors are split across the
ranks of ``torch.distributed`` (the process group already initialized, else one initialized
from torchrun's environment variables with gloo): each rank palettizes its share (balanced by
element count; the same deterministic assignment on every rank), rank 0 writes the header and
sizes the file, and each rank writes its tensors at their planned offsets, so the file is
byte-identical to the one a single process writes. Memory is bounded per rank by its largest
tensor (N ranks on one machine: up to N such tensors at once). On several machines ``out`` must
lie on a filesystem that every rank sees. A failure on one rank is shared with the others
through an all-reduce of a status flag, so every rank raises instead of waiting.

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
from .._model import all_reduce_sum

__all__ = ["quantize_checkpoint"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _plan(cfg: PalettizeConfig, name: str, shape: Tuple[int, ...], dtype: torch.dtype
          ) -> PaletteMeta:
    k, bits = cfg.resolve()
    gran = cfg.granularity_spec
    # the codebook rows of a weight of this shape (checked), from a tensor without data
    rows = gran.rows(torch.empty(shape, device="meta"), name).shape[0]
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
    own_group = _init_distributed()
    try:
        rank, world = _rank_world()
        plan = None
        try:
            plan = _layout(inputs, config, hessian, filter_fn, safe_open)
        finally:  # every rank reaches the status all-reduce, failed or not
            _check_ranks(plan is not None, world, rank, "reading the inputs")
        entries, header, pal, hb, hwhere = plan
        base = 8 + len(hb)
        total = base + max([v["data_offsets"][1] for v in header.values()], default=0)
        ok = False
        try:
            if rank == 0:  # header first, then the file at its final size (filled by all ranks)
                with open(str(out), "wb") as fo:
                    fo.write(len(hb).to_bytes(8, "little"))
                    fo.write(hb)
                    fo.truncate(total)
            ok = True
        finally:
            _check_ranks(ok, world, rank, f"creating {out}")
        mine = [entries[i] for i in _assign([e[3] for e in entries], world)[rank]]
        ok = False
        try:
            with open(str(out), "r+b") as fo:
                for key, f, meta, _, names in bar(mine, "quantize", enabled=progress and rank == 0):
                    _write_one(fo, base, header, key, f, meta, names, hwhere, config, safe_open)
            ok = True
        finally:
            failed = _check_ranks(ok, world, rank, f"palettizing into {out}", raise_=False)
            if failed and rank == 0 and os.path.exists(str(out)):
                os.remove(str(out))
            if failed and ok:
                raise RuntimeError(f"quantize_checkpoint: rank(s) {failed} failed writing {out} "
                                   f"(see their error); {out} removed")
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return pal


def _init_distributed() -> bool:
    """Initializes a gloo process group from torchrun's environment variables when they name
    more than one process and none is initialized yet; True when it did (the caller destroys it)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1 or not all(
            v in env for v in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        return False
    dist.init_process_group("gloo")
    return True


def _rank_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_ranks(ok: bool, world: int, rank: int, what: str, raise_: bool = True) -> List[int]:
    """All-reduces one failure flag per rank; the ranks that failed (this one's own exception
    propagates from its ``finally``). With ``raise_`` a rank that did not fail raises a
    RuntimeError naming the failed ranks."""
    if world == 1:
        return [] if ok else [0]
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = 0.0 if ok else 1.0
    (flags,), _ = all_reduce_sum([flags])
    failed = [r for r in range(world) if flags[r].item() > 0]
    if failed and ok and raise_:
        raise RuntimeError(f"quantize_checkpoint: rank(s) {failed} failed {what} (see their error)")
    return failed


def _assign(costs: Sequence[int], world: int) -> List[List[int]]:
    """Entry indices per rank: largest cost first to the least-loaded rank (ties: lower index,
    lower rank), each rank's share in file order. Deterministic, so every rank computes the same."""
    load = [0] * world
    share: List[List[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += costs[i]
        share[r].append(i)
    return [sorted(s) for s in share]


def _layout(inputs, config, hessian, filter_fn, safe_open):
    """Pass 1, headers only: the entries (key, file path, meta, element count, output names),
    the output header, the palettized layers, the encoded header and the Hessian file per key."""
    hwhere = {}
    for p in hessian or []:
        with safe_open(str(p), framework="pt") as f:
            hwhere.update((k, str(p)) for k in f.keys())
    entries = []
    seen = set()
    for p in inputs:
        with safe_open(str(p), framework="pt") as f:
            for key in f.keys():
                if key in seen:
                    raise ValueError(f"inputs: the tensor {key!r} is in more than one file")
                seen.add(key)
                sl = f.get_slice(key)
                dtype, shape = _ST_DTYPES[sl.get_dtype()], tuple(sl.get_shape())
                meta = None
                if (key.endswith(".weight") and len(shape) >= 2 and dtype in DTYPE_NAMES
                        and all(s > 0 for s in shape)
                        and (filter_fn is None or filter_fn(key, shape))):
                    meta = _plan(config, key[: -len(".weight")], shape, dtype)
                entries.append([key, str(p), meta, math.prod(shape), (dtype, shape)])
    header: Dict[str, Dict] = {}
    off = 0

    def put(name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> str:
        nonlocal off
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
        return name

    pal = {}
    for e in entries:
        key, meta = e[0], e[2]
        if meta is None:
            e[4] = [put(key, *e[4])]
            continue
        n = key[: -len(".weight")]
        fan_in = math.prod(meta.weight_shape[1:])
        e[4] = [put(n + ".weight_packed", torch.uint8,
                    (meta.weight_shape[0], row_bytes(fan_in, meta.bits))),
                put(n + ".weight_codebook", config.codebook_dtype, (meta.rows, 1 << meta.bits))]
        pal[n] = meta
    info = {"format": FORMAT, "palettized": {n: m.to_json() for n, m in pal.items()},
            "shared": {}}
    head = dict(header)
    head["__metadata__"] = {"popcomp": json.dumps(info)}
    hb = json.dumps(head, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return [tuple(e) for e in entries], header, pal, hb, hwhere


def _read(safe_open, path: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, the file's mapping released at once (mapped pages of
    tensors already done would otherwise stay resident until the end)."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _write_one(fo, base: int, header: Dict[str, Dict], key: str, path: str,
               meta: Optional[PaletteMeta], names: List[str], hwhere: Dict[str, str],
               config: PalettizeConfig, safe_open) -> None:
    """Pass 2 for one input tensor: read, palettize (or copy), write at its planned offsets."""
    t = _read(safe_open, path, key)
    if meta is None:
        outs = [t]
    else:
        h = _read(safe_open, hwhere[key], key) if key in hwhere else None
        if h is not None and tuple(h.shape) != tuple(t.shape):
            raise ValueError(f"hessian[{key!r}] has shape {tuple(h.shape)}, the weight "
                             f"{tuple(t.shape)}")
        packed, cb, _, _ = _palettize_weight(t, h, config, key[: -len(".weight")])
        outs = [packed, cb]
        del h
    for name, o in zip(names, outs):
        o = o.detach().cpu().contiguous().reshape(-1)
        data = o.view(torch.uint8).numpy().tobytes() if o.numel() else b""
        start, end = header[name]["data_offsets"]
        if len(data) != end - start:  # pragma: no cover - the plan and the kernel disagree
            raise RuntimeError(f"{name}: {len(data)} bytes computed, {end - start} planned")
        fo.seek(base + start)
        fo.write(data)
