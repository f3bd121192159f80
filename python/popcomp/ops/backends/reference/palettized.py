"""The pure-torch references of popcomp::palettized_decode and popcomp::palettized_linear (the test oracles), their default kernels, the codebook rows of a range of weight rows, and the ops' autograd formula.

Decode: unpack the layout-2 indices (``quantize.packing.unpack_rows``), turn them into indices of
the flattened codebook (per tensor ``idx``, per channel ``r * K + idx``, per
group ``(r * G + c // g) * K + idx``) and gather. Linear: decode, then ``F.linear`` in float32,
cast to x's dtype. These materialize the whole weight: they are the oracle and the fallback on
devices without a compiled kernel, not the fast path.

The autograd formula (gradient w.r.t. x and bias only; the packed indices and the codebooks are
buffers): ``dx = dy @ W_hat``, computed over chunks of weight rows, each decoded by the decode op,
so the memory a backward adds does not grow with the layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ....quantize.packing import unpack_rows
from ..._library import LIB
from ...checks import check_palettized_decode, check_palettized_linear

__all__ = [
    "palettized_decode_reference", "palettized_linear_reference", "codebook_rows",
    "chunk_rows", "CHUNK_BYTES",
]

# bytes of one decoded chunk of weight rows (backward, large-batch forward): the extra memory
# of those paths, whatever the layer size
CHUNK_BYTES = 4 << 20


def codebook_rows(codebook: torch.Tensor, rows: int, r0: int, r1: int, in_features: int,
                  group_size: int) -> torch.Tensor:
    """The codebook rows that weight rows ``[r0, r1)`` of a ``rows``-row weight read (a view):
    all of a per-tensor codebook (one row), rows ``[r0, r1)`` per channel, rows
    ``[r0 * G, r1 * G)`` per group (G = ceil(in_features / group_size))."""
    if group_size > 0:
        G = -(-in_features // group_size)
        return codebook[r0 * G : r1 * G]
    if codebook.shape[0] == 1 and rows != 1:
        return codebook
    return codebook[r0:r1]


def chunk_rows(in_features: int, itemsize: int = 4, chunk_bytes: Optional[int] = None) -> int:
    """Weight rows per chunk: rows of ``in_features`` values of ``itemsize`` bytes that take
    about ``chunk_bytes`` (default CHUNK_BYTES; at least one row)."""
    nbytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, nbytes // max(1, in_features * itemsize))


def palettized_decode_reference(packed: torch.Tensor, codebook: torch.Tensor, bits: int,
                                in_features: int, group_size: int,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat ``(rows, in_features)`` in ``dtype``: ``W_hat[r, c] = codebook[g(r, c), idx[r, c]]``."""
    rows = packed.shape[0]
    K = codebook.shape[1]
    idx = unpack_rows(packed, bits, in_features)  # (rows, in) int64
    if group_size > 0:
        G = -(-in_features // group_size)
        r = torch.arange(rows, device=packed.device).unsqueeze(1)
        c = torch.arange(in_features, device=packed.device).unsqueeze(0)
        idx = idx + (r * G + c // group_size) * K
    elif codebook.shape[0] != 1 or rows == 1:
        idx = idx + torch.arange(rows, device=packed.device).unsqueeze(1) * K
    return codebook.reshape(-1).to(dtype)[idx]  # cast the codebook, not the gathered weight


def palettized_linear_reference(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor,
                                bias: Optional[torch.Tensor], bits: int, in_features: int,
                                group_size: int) -> torch.Tensor:
    """``x @ W_hat^T (+ bias)`` in float32, returned in x's dtype."""
    w = palettized_decode_reference(packed, codebook, bits, in_features, group_size)
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), w, b).to(x.dtype)


# ---- default kernels (every device without its own) -------------------------------------
def palettized_decode_default(packed, codebook, bits, in_features, group_size, dtype):
    check_palettized_decode(packed, codebook, bits, in_features, group_size, dtype)
    return palettized_decode_reference(packed, codebook, bits, in_features, group_size, dtype)


def palettized_linear_default(x, packed, codebook, bias, bits, in_features, group_size):
    check_palettized_linear(x, packed, codebook, bias, bits, in_features, group_size)
    return palettized_linear_reference(x, packed, codebook, bias, bits, in_features, group_size)


LIB.impl("palettized_decode", palettized_decode_default, "CompositeExplicitAutograd")
LIB.impl("palettized_linear", palettized_linear_default, "CompositeExplicitAutograd")


# ---- autograd: dx = dy @ W_hat by chunks of decoded rows -------------------------------------
def _linear_setup_context(ctx, inputs, output):
    x, packed, codebook, bias, bits, in_features, group_size = inputs
    ctx.save_for_backward(packed, codebook)
    ctx.meta = (bits, in_features, group_size, x.dtype, None if bias is None else bias.dtype)


def _linear_backward(ctx, grad):
    packed, codebook = ctx.saved_tensors
    bits, in_features, group_size, x_dtype, bias_dtype = ctx.meta
    rows = packed.shape[0]
    lead = grad.shape[:-1]
    dy = grad.reshape(-1, rows)
    # float32 on the CPU (like the forward's accumulation); the activation dtype on a GPU
    # (tensor cores; cuBLAS accumulates in float32)
    cdt = torch.float32 if grad.device.type == "cpu" else x_dtype
    dyc = dy.to(cdt)
    dx = dyc.new_zeros((dy.shape[0], in_features))
    step = chunk_rows(in_features, torch.finfo(cdt).bits // 8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = torch.ops.popcomp.palettized_decode(
            packed[r0:r1], codebook_rows(codebook, rows, r0, r1, in_features, group_size),
            bits, in_features, group_size, cdt)
        dx.addmm_(dyc[:, r0:r1], w)
    dx = dx.to(x_dtype).reshape(*lead, in_features) if ctx.needs_input_grad[0] else None
    db = None
    if bias_dtype is not None and ctx.needs_input_grad[3]:
        db = dy.sum(0, dtype=torch.float32).to(bias_dtype)
    return dx, None, None, db, None, None, None


torch.library.register_autograd("popcomp::palettized_linear", _linear_backward,
                                setup_context=_linear_setup_context)
