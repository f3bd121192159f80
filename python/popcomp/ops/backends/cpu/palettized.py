"""The CPU kernels of popcomp::palettized_linear and popcomp::palettized_decode (the compiled lookup-table kernels; torch's GEMM on decoded row chunks for large batches without AVX-512), and the compiled core's arguments for both devices.

The compiled matmul reads the packed indices and the codebooks directly. On a CPU with
AVX-512 it serves every batch: from 24 rows of x on, its large-batch kernel decodes panels of
12 weight rows into a buffer of its own and runs them as register-blocked outer products at
about the FMA peak. Elsewhere batches above ``GEMM_MIN_M`` rows are compute bound and the
row kernels' 8-row passes fall behind a BLAS GEMM: chunks of weight rows (``CHUNK_BYTES`` of
float32 each) are decoded by the compiled decode kernel into one buffer and multiplied by
torch's GEMM straight into the output's columns, so the extra memory stays one chunk whatever
the layer size.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from ...._backend import DTYPE_CODES, compiled, num_threads
from ..._library import LIB
from ...checks import check_palettized_decode, check_palettized_linear
from ..reference.palettized import chunk_rows

__all__ = ["GEMM_MIN_M", "has_large_batch_kernel", "params", "linear_args", "decode_args", "palettized_linear_cpu",
           "palettized_decode_cpu"]

# Batches above this many rows take the decode + GEMM path. Measured on the 2-core AVX-512
# machine, 4 bits, 2 threads, after the kernel's padded x stride and 8-row passes: the compiled
# matmul is ahead of decode + GEMM at every batch up to 64 (Linear(4096, 4096) batch 16: 3.3 ms
# against 12.5 ms, dense 31 ms; Linear(384, 1536) batch 64: 0.59 ms against 0.74 ms) and behind
# from about 128 (Linear(384, 1536) batch 128: 1.15 ms against 1.04 ms, dense 0.81 ms).
GEMM_MIN_M = 96


@functools.lru_cache(maxsize=None)
def has_large_batch_kernel() -> bool:
    """Whether the compiled CPU matmul has its large-batch kernel (an AVX-512 CPU)."""
    C = compiled()
    return C is not None and getattr(C, "palettized_cpu_isa", lambda: "")() == "avx512"


# ---- the compiled core's arguments (shared with the CUDA kernels) ---------------------------
def params(packed, codebook, bits, in_features, group_size):
    """The weight's description (palettized.h, Params): its sizes, codebooks and bits."""
    return dict(rows=packed.shape[0], in_features=in_features, bits=bits,
                k=codebook.shape[1], group_size=group_size, cb_rows=codebook.shape[0],
                cb_dtype=DTYPE_CODES[codebook.dtype])


def linear_args(x2, packed, codebook, bias, y, bits, in_features, group_size):
    """Keyword arguments of palettized_linear_{cpu,cuda} for x2 (M, in) with unit column
    stride (any row stride), y (M, rows) contiguous; packed, codebook contiguous."""
    return dict(
        params(packed, codebook, bits, in_features, group_size),
        x=x2.data_ptr(), x_row_stride=x2.stride(0), x_dtype=DTYPE_CODES[x2.dtype],
        M=x2.shape[0], packed=packed.data_ptr(), codebook=codebook.data_ptr(),
        bias=bias.data_ptr() if bias is not None else 0,
        bias_dtype=DTYPE_CODES[bias.dtype] if bias is not None else DTYPE_CODES[x2.dtype],
        y=y.data_ptr(),
    )


def decode_args(packed, codebook, bits, in_features, group_size, out, row_begin=0, n=None):
    """Keyword arguments of palettized_decode_{cpu,cuda}: rows [row_begin, row_begin + n) of
    the weight into out (n, in) contiguous."""
    return dict(
        params(packed, codebook, bits, in_features, group_size),
        packed=packed.data_ptr(), codebook=codebook.data_ptr(), row_ids=0,
        row_begin=row_begin, n=packed.shape[0] if n is None else n, out=out.data_ptr(),
        out_dtype=DTYPE_CODES[out.dtype],
    )


def as_rows(x, in_features):
    """x as an (M, in) matrix with unit column stride (a view where one exists)."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(1) == 1 or in_features == 1 else x2.contiguous()


_SCRATCH = threading.local()


def cpu_scratch(shape, dtype) -> torch.Tensor:
    """A CPU buffer of ``shape`` and ``dtype`` kept by the calling thread between calls: the
    decode + GEMM path's chunk, which would otherwise be fresh pages to fault in on every call
    (a measurable share of a small layer's time). Its contents are scratch, valid until the
    thread's next call."""
    n = math.prod(shape) * (torch.finfo(dtype).bits // 8)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.uint8)
    return buf[:n].view(dtype).view(shape)


def decoded_gemm(x2, bias, y, decode, dtype, chunk_bytes=None, scratch=None):
    """y = x2 @ W_hat^T (+ bias) for x2 (M, in_features) and y (M, rows), by chunks of weight
    rows: ``decode(out, row_begin, n)`` writes rows [row_begin, row_begin + n) of W_hat into
    out; the GEMM runs in ``dtype`` and writes y's columns (through a chunk buffer when y has
    another dtype). A chunk takes about ``chunk_bytes`` (default: the reference module's
    CHUNK_BYTES); ``scratch(shape, dtype)`` gives its buffer (default: a new tensor on x2's
    device)."""
    rows, in_features = y.shape[1], x2.shape[1]
    step = min(rows, chunk_rows(in_features, torch.finfo(dtype).bits // 8, chunk_bytes))
    if scratch is None:
        w = torch.empty((step, in_features), dtype=dtype, device=x2.device)
    else:
        w = scratch((step, in_features), dtype)
    xc = x2 if x2.dtype == dtype else x2.to(dtype)
    bc = None if bias is None else bias.to(dtype)
    tmp = None if y.dtype == dtype else torch.empty((x2.shape[0], w.shape[0]), dtype=dtype,
                                                     device=x2.device)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        wc = w[:n]
        decode(wc, r0, n)
        dst = y[:, r0 : r0 + n] if tmp is None else tmp[:, :n]
        if bc is None:
            torch.mm(xc, wc.t(), out=dst)
        else:
            torch.addmm(bc[r0 : r0 + n], xc, wc.t(), out=dst)
        if tmp is not None:
            y[:, r0 : r0 + n].copy_(dst)


def palettized_linear_cpu(x, packed, codebook, bias, bits, in_features, group_size):
    check_palettized_linear(x, packed, codebook, bias, bits, in_features, group_size)
    rows = packed.shape[0]
    x2 = as_rows(x, in_features)
    M = x2.shape[0]
    y = torch.empty((M, rows), dtype=x.dtype)
    if M and rows:
        C = compiled()
        packed, codebook = packed.contiguous(), codebook.contiguous()  # (views: no copy)
        bias = bias.contiguous() if bias is not None else None
        if M > GEMM_MIN_M and not has_large_batch_kernel():
            def decode(out, r0, n):
                C.palettized_decode_cpu(**decode_args(packed, codebook, bits, in_features,
                                                      group_size, out, r0, n),
                                        num_threads=num_threads())

            decoded_gemm(x2, bias, y, decode, torch.float32, scratch=cpu_scratch)
        else:
            C.palettized_linear_cpu(**linear_args(x2, packed, codebook, bias, y, bits,
                                                  in_features, group_size),
                                    num_threads=num_threads())
    return y.view(*x.shape[:-1], rows)


def palettized_decode_cpu(packed, codebook, bits, in_features, group_size, dtype):
    check_palettized_decode(packed, codebook, bits, in_features, group_size, dtype)
    out = torch.empty((packed.shape[0], in_features), dtype=dtype)
    if packed.shape[0]:
        packed, codebook = packed.contiguous(), codebook.contiguous()
        compiled().palettized_decode_cpu(
            **decode_args(packed, codebook, bits, in_features, group_size, out),
            num_threads=num_threads())
    return out


if hasattr(compiled(), "palettized_linear_cpu"):  # (a core built before the kernels: reference)
    LIB.impl("palettized_linear", palettized_linear_cpu, "CPU")
    LIB.impl("palettized_decode", palettized_decode_cpu, "CPU")
