"""Helpers shared by the three papers' modules of :mod:`popcomp.theory`: number checks, tensor conversion and the weight layers the diagnostics read."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .. import _validate as V
from .._model import is_layer

# the layers whose weights (out, in[, kernel]) the diagnostics measure
WEIGHT_LAYERS: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def check_pos(name: str, v, strict: bool = True) -> float:
    """A finite number > 0 (``strict``) or >= 0, as a float; errors name ``name``."""
    f = V.check_real(name, v, lo=0.0)
    if strict and f == 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return f


def as_t(x) -> torch.Tensor:
    """``x`` as a tensor (numbers and sequences as float64)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear / Conv1d / Conv2d of ``model`` (stock forward), in order."""
    return [(n, m) for n, m in model.named_modules() if is_layer(m, WEIGHT_LAYERS)]
