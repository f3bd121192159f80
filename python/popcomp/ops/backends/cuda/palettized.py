"""The CUDA kernels of popcomp::palettized_linear and popcomp::palettized_decode (the compiled lookup-table kernels on torch's current stream; decoded row chunks and cuBLAS for large batches).

Batches of up to ``GEMM_MIN_M`` rows run the compiled matmul (GEMV / split-K tiles reading the
packed indices and codebooks). Larger batches decode chunks of weight rows in x's dtype
(``CHUNK_BYTES`` each) and multiply them with cuBLAS (tensor cores, float32 accumulation) into
the output's columns. No host synchronization, no allocation beyond the output and one chunk:
CUDA-graph capturable.
"""
from __future__ import annotations

import torch

from ...._backend import compiled, cuda_fallback, cuda_stream_args
from ..._library import LIB
from ...checks import check_palettized_decode, check_palettized_linear
from ..cpu.palettized import as_rows, decode_args, decoded_gemm, linear_args
from ..reference.palettized import palettized_decode_reference, palettized_linear_reference

__all__ = ["GEMM_MIN_M", "CHUNK_BYTES", "palettized_linear_cuda", "palettized_decode_cuda"]

GEMM_MIN_M = 32        # larger batches: decoded chunks + cuBLAS
CHUNK_BYTES = 8 << 20  # one decoded chunk (enough rows to keep a GEMM busy)


def palettized_linear_cuda(x, packed, codebook, bias, bits, in_features, group_size):
    check_palettized_linear(x, packed, codebook, bias, bits, in_features, group_size)
    if cuda_fallback(x, "palettized_linear"):  # popcomp's CUDA runtime cannot use the device
        return palettized_linear_reference(x, packed, codebook, bias, bits, in_features,
                                           group_size)
    rows = packed.shape[0]
    x2 = as_rows(x, in_features)
    M = x2.shape[0]
    y = torch.empty((M, rows), dtype=x.dtype, device=x.device)
    if M and rows:
        C = compiled()
        device, stream = cuda_stream_args(x)
        packed, codebook = packed.contiguous(), codebook.contiguous()
        bias = bias.contiguous() if bias is not None else None
        if M > GEMM_MIN_M:
            def decode(out, r0, n):
                C.palettized_decode_cuda(**decode_args(packed, codebook, bits, in_features,
                                                       group_size, out, r0, n),
                                         device=device, stream=stream)

            decoded_gemm(x2, bias, y, decode, x.dtype, CHUNK_BYTES)
        else:
            C.palettized_linear_cuda(**linear_args(x2, packed, codebook, bias, y, bits,
                                                   in_features, group_size),
                                     device=device, stream=stream)
    return y.view(*x.shape[:-1], rows)


def palettized_decode_cuda(packed, codebook, bits, in_features, group_size, dtype):
    check_palettized_decode(packed, codebook, bits, in_features, group_size, dtype)
    if cuda_fallback(packed, "palettized_decode"):
        return palettized_decode_reference(packed, codebook, bits, in_features, group_size, dtype)
    out = torch.empty((packed.shape[0], in_features), dtype=dtype, device=packed.device)
    if packed.shape[0]:
        device, stream = cuda_stream_args(packed)
        packed, codebook = packed.contiguous(), codebook.contiguous()
        compiled().palettized_decode_cuda(
            **decode_args(packed, codebook, bits, in_features, group_size, out),
            device=device, stream=stream)
    return out


if hasattr(compiled(), "palettized_linear_cuda"):  # (a core built before the kernels: reference)
    LIB.impl("palettized_linear", palettized_linear_cuda, "CUDA")
    LIB.impl("palettized_decode", palettized_decode_cuda, "CUDA")
