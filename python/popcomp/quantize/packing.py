"""Packing of palettization indices into bytes and back: the only place bits are packed.

Layout 2 (what palettized modules hold, what the palettized kernels read and what
``popcomp.save`` writes as format 2): the indices as a matrix
``(rows, in)`` (the weight's output rows by its fan-in), each row packed on its own into
``row_bytes(in, bits)`` bytes. A row is padded with index 0 to a multiple of 32 indices and cut
into blocks of 32 consecutive indices; a block takes ``4 * bits`` bytes (3-bit indices are not
padded to 4). ``bits`` is written as a sum of pieces of widths 8, 4, 2, 1 (``PIECES``: 3 = 2+1,
5 = 4+1, 6 = 4+2, 7 = 4+2+1); the block is the concatenation of its pieces, the first holding
the low bits of each index. A piece of width ``w`` takes ``4 * w`` bytes: byte ``t`` holds the
indices ``t + j * 4w`` (``j < 8 / w``) in its bits ``[j*w, (j+1)*w)`` (``w = 4``: byte ``t``
holds index ``t`` in its low nibble and ``t + 16`` in its high one).

Layout 1 (format-1 files only, read by ``popcomp.load`` and repacked as layout 2): all indices
of a weight, row-major, as one little-endian bit stream of ``bits`` bits each
(``ceil(n * bits / 8)`` bytes).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .._validate import check_int

__all__ = [
    "BLOCK", "PIECES", "row_bytes", "pack_rows", "unpack_rows", "pack_indices",
    "unpack_indices", "packed_bytes",
]

BLOCK = 32  # indices per block of layout 2
# bits -> the widths of the pieces of a layout-2 block, low bits first
PIECES: Dict[int, Tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1),
                                      6: (4, 2), 7: (4, 2, 1), 8: (8,)}


# ---- layout 2: rows of 32-index blocks --------------------------------------------------------
def row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row of ``in_features`` indices of ``bits`` bits (layout 2)."""
    return -(-in_features // BLOCK) * 4 * bits


def _shifts(per: int, w: int, device) -> torch.Tensor:
    return (torch.arange(per, dtype=torch.int32, device=device) * w).view(1, 1, per, 1)


def pack_rows(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the integer matrix ``idx`` (rows, in) with values in [0, 2**bits) into layout 2:
    uint8 ``(rows, row_bytes(in, bits))`` (``idx`` is not modified)."""
    bits = check_int("bits", bits, lo=1, hi=8)
    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D (rows, in_features), got shape {tuple(idx.shape)}")
    R, n = idx.shape
    nb = -(-n // BLOCK)
    v = idx.to(torch.int32)
    if nb * BLOCK != n:
        v = torch.nn.functional.pad(v, (0, nb * BLOCK - n))
    v = v.reshape(R, nb, BLOCK)
    parts, shift = [], 0
    for w in PIECES[bits]:
        per = 8 // w
        p = ((v >> shift) & ((1 << w) - 1)).view(R, nb, per, 4 * w)
        parts.append((p << _shifts(per, w, v.device)).sum(2))
        shift += w
    return torch.cat(parts, 2).to(torch.uint8).reshape(R, nb * 4 * bits)


def unpack_rows(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_rows: the indices ``(rows, in_features)`` as int64."""
    bits = check_int("bits", bits, lo=1, hi=8)
    R = packed.shape[0]
    if tuple(packed.shape) != (R, row_bytes(in_features, bits)):
        raise ValueError(f"packed must have shape (rows, row_bytes) = "
                         f"({R}, {row_bytes(in_features, bits)}), got {tuple(packed.shape)}")
    nb = packed.shape[1] // (4 * bits)
    b = packed.reshape(R, nb, 4 * bits).to(torch.int32)
    out = torch.zeros(R, nb, BLOCK, dtype=torch.int32, device=packed.device)
    off = shift = 0
    for w in PIECES[bits]:
        per = 8 // w
        p = (b[:, :, off : off + 4 * w].unsqueeze(2) >> _shifts(per, w, packed.device)) & ((1 << w) - 1)
        out |= p.reshape(R, nb, BLOCK) << shift
        off += 4 * w
        shift += w
    return out.view(R, nb * BLOCK)[:, :in_features].long()


# ---- layout 1: one bit stream per weight (format-1 files) -----------------------------------
def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` indices of ``bits`` bits take in layout 1."""
    return (n * bits + 7) // 8


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2**bits) into layout 1, a uint8 tensor of ceil(n*bits/8)
    bytes (``idx`` read in row-major order; it is not modified). Writes format-1 data only
    (tests of the format-1 reader); palettized modules hold layout 2 (:func:`pack_rows`)."""
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
    """Inverse of pack_indices (layout 1): the first n indices as int64."""
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
