"""Argument checks shared by the public APIs: each error names the offending argument."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._backend import FLOAT_DTYPES


def as_tensor(name: str, x) -> torch.Tensor:
    """``x`` as a tensor (numpy arrays wrapped); a TypeError naming ``name`` for anything else,
    a ValueError for a meta-device tensor (it holds no values to compute with)."""
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            raise ValueError(f"{name} is on meta (a meta-device tensor holds no data); "
                             "materialize it on cpu or cuda first")
        return x
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{name} must be a torch.Tensor (or numpy array), got {type(x).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float64, float32, float16, bfloat16), got {t.dtype}"
        )


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_nonnegative(name: str, t: torch.Tensor) -> None:
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative (found negative entries)")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_bounds(name: str, v, lo, hi) -> None:
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")


def check_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None):
    """An int (or numpy integer) within [lo, hi]. A torch.SymInt (an int made symbolic by
    torch.compile, seen by fake kernels) is checked and returned as it is."""
    if isinstance(v, torch.SymInt):
        _check_bounds(name, v, lo, hi)
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np

            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    _check_bounds(name, v, lo, hi)
    return int(v)


def check_real(name: str, v, lo: Optional[float] = None, hi: Optional[float] = None):
    """A finite real number within [lo, hi], as a float. A torch.SymFloat / SymInt (made
    symbolic by torch.compile) is checked and returned as it is."""
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        _check_bounds(name, v, lo, hi)
        return v
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got bool")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v}")
    _check_bounds(name, f, lo, hi)
    return f
