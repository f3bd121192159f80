"""Packing of palettization indices into bytes and back: the only place bits are packed.

Layout 1 (what palettized modules hold and what ``popcomp.save`` writes as format 1): the
indices of a weight, row-major, as one little-endian bit stream of ``bits`` bits each (index j
occupies bits ``[j*bits, (j+1)*bits)`` of the stream), ``ceil(n * bits / 8)`` bytes.
"""
from __future__ import annotations

import torch

from .._validate import check_int

__all__ = ["pack_indices", "unpack_indices", "packed_bytes"]


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` indices of ``bits`` bits take when packed."""
    return (n * bits + 7) // 8


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2**bits) into a uint8 tensor of ceil(n*bits/8) bytes
    (``idx`` read in row-major order; it is not modified)."""
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
