"""Drop-in palettization of PyTorch models with Hessian-weighted / diameter-regularized K-means: the public names of the quantize package.

    h = popcomp.hessian.diagonal(model, loss_fn, calib_loader)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4, granularity="per_channel"), hessian=h)
    print(popcomp.size_report(model))
    popcomp.save(model, "model.safetensors")

Each selected weight becomes indices packed at ceil(log2 k) bits per weight (rows padded to
blocks of 32 indices) plus one codebook (fp16 or fp32, 2**bits entries) per tensor / output row /
group; the palettized modules compute with them directly (``popcomp::palettized_linear``, a
lookup-table matmul, and ``popcomp::palettized_decode``). The package:

* ``config``: PalettizeConfig (validated when built) and the granularities PerTensor,
  PerChannel, PerGroup;
* ``api``: quantize_ / dequantize_, module selection, Hessian matching, tied weights, and the
  config -> handler registry (``register_handler``);
* ``packing``: index packing, layout 2 (``pack_rows`` / ``unpack_rows``) and the layout 1 of
  format-1 files (the only place bits are packed);
* ``modules``: the palettized modules and the dense <-> palettized swaps;
* ``serialization``: save / load (versioned safetensors);
* ``report``: size_report;
* ``select_beta``: beta by cross-validation (default: a grid of the scale-free beta_rel),
  evaluate_loss;
* ``stream``: quantize_checkpoint, safetensors checkpoints palettized one tensor at a time
  (``popcomp quantize`` on the command line).

Hugging Face ``Conv1D`` layers (GPT-2) are palettized like Linear layers (recognized by name,
without importing transformers).
"""
from __future__ import annotations

from .api import dequantize_, quantize_, register_handler
from .config import (
    Granularity, PalettizeConfig, PerChannel, PerGroup, PerTensor, QuantizeConfig,
)
from .modules import (
    PaletteMeta, Palettized, PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding,
    PalettizedLinear, palettized_modules,
)
from .packing import pack_indices, pack_rows, row_bytes, unpack_indices, unpack_rows
from .report import LayerSize, SizeReport, size_report
from .select_beta import DEFAULT_BETA_REL_GRID, BetaSelection, evaluate_loss, select_beta
from .serialization import load, save
from .stream import quantize_checkpoint

__all__ = [
    "PalettizeConfig", "QuantizeConfig", "Granularity", "PerTensor", "PerChannel", "PerGroup",
    "quantize_", "dequantize_", "register_handler", "save", "load", "size_report", "SizeReport",
    "LayerSize", "select_beta", "BetaSelection", "evaluate_loss", "PaletteMeta", "Palettized",
    "PalettizedLinear", "PalettizedConv1d", "PalettizedConv2d", "PalettizedEmbedding",
    "palettized_modules", "pack_rows", "unpack_rows", "row_bytes", "pack_indices",
    "unpack_indices", "quantize_checkpoint", "DEFAULT_BETA_REL_GRID",
]
