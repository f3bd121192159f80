"""size_report: the bits per weight, bytes and compression ratios (packed and entropy-coded) of a model's palettized layers.

Computed from the modules as they are in memory (their packed indices, layout 2: rows padded to
blocks of 32 indices, and their codebooks of 2**bits entries), so it counts exactly what
``popcomp.save`` writes for them and what they hold in memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .modules import Palettized

__all__ = ["size_report", "SizeReport", "LayerSize"]


@dataclass
class LayerSize:
    name: str
    shape: Tuple[int, ...]
    numel: int
    k: int
    codebooks: int
    index_bits: int
    packed_bytes: int          # packed indices + codebooks as held (+ the exact padding rows)
    bits_per_weight: float     # packed_bytes * 8 / numel
    original_bits: int         # numel * bits of the original dtype
    entropy_bits: float        # sum over codebooks of n_row * H(labels_row) + the bits of
                               # each of its k centers in the codebook dtype stored
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
    form (n * H(labels) bits per codebook plus its k centers in the codebook dtype stored, as in
    Bu et al. with their 32 bits per center replaced by what the packed form stores)."""
    layers = []
    pal_ids = set()
    for n, m in model.named_modules():
        if not isinstance(m, Palettized) or id(m.weight_packed) in pal_ids:
            continue  # (a palettized weight tied to several modules is counted once)
        meta = m.palette
        pal_ids.update({id(m.weight_packed), id(m.weight_codebook)})
        numel = meta.numel
        cb = m.weight_codebook
        packed_bytes = m.weight_packed.numel() + cb.numel() * cb.element_size()
        orig_bits = numel * torch.finfo(meta.weight_dtype).bits
        # each codebook's k centers in the dtype they are stored in (fp16 by default)
        ent = _entropy_bits(m.labels(), cb.shape[1]) + 8.0 * cb.element_size() * meta.rows * meta.k
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
