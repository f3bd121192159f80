"""Loading of the compiled core and the report of which backends are built and usable."""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

try:  # the compiled core; absent only in an unbuilt source checkout
    from . import _C  # type: ignore[attr-defined]
except ImportError as _err:  # pragma: no cover - exercised only without a build
    _C = None
    _IMPORT_ERROR: Optional[BaseException] = _err
else:
    _IMPORT_ERROR = None

# Constants shared with the kernels (dtype codes, op codes, ...) are read from the compiled
# core, which exports them from its C++ enums (csrc/bindings.cpp). Only an unbuilt checkout
# (no _C: popcomp runs on its pure-torch references) uses the fallback copy its reader passes
# to core_constant; tests/test_op_checks.py checks every such copy against the compiled value.
_CORE_FALLBACKS: Dict[str, Any] = {}


def core_constant(name: str, fallback: Any) -> Any:
    """``_C.<name>`` (a copy), or ``fallback`` when the compiled core is not built."""
    _CORE_FALLBACKS[name] = fallback
    value = getattr(_C, name) if _C is not None else fallback
    return dict(value) if isinstance(value, dict) else value


def core_fallbacks() -> Dict[str, Any]:
    """name -> the fallback copy of every constant read with core_constant so far."""
    return dict(_CORE_FALLBACKS)


# Element type codes of csrc/common/hd.h (enum class DType), by torch dtype, in code order.
DTYPE_CODES = {
    getattr(torch, name): code
    for name, code in sorted(
        core_constant(
            "dtype_codes", {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}
        ).items(),
        key=lambda item: item[1],
    )
}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def compiled() -> Any:
    """The compiled module, or None when popcomp runs on its pure-torch references only."""
    return _C


def cuda_built() -> bool:
    return _C is not None and bool(_C.has_cuda)


def cuda_usable() -> bool:
    """CUDA kernels were built and torch sees a CUDA device."""
    return cuda_built() and torch.cuda.is_available() and _C.cuda_device_count() > 0


def num_threads() -> int:
    """Threads used by the CPU kernels: POPCOMP_NUM_THREADS, else torch's intra-op count."""
    env = os.environ.get("POPCOMP_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            warnings.warn(f"ignoring POPCOMP_NUM_THREADS={env!r}: not an integer")
    return max(1, torch.get_num_threads())


def backends() -> Dict[str, Dict[str, Any]]:
    """Which backends were built into this install and which can run now.

    >>> popcomp.backends()["cpu"]["usable"]
    True
    """
    info: Dict[str, Dict[str, Any]] = {
        "cpu": {
            "built": _C is not None,
            "usable": _C is not None,
            "openmp": bool(_C is not None and _C.has_openmp),
            "threads": num_threads(),
        },
        "cuda": {
            "built": cuda_built(),
            "usable": cuda_usable(),
            "build_cuda_version": int(_C.cuda_build_version()) if _C is not None else 0,
            "devices": int(_C.cuda_device_count()) if cuda_built() else 0,
        },
        "reference": {"built": True, "usable": True},
    }
    if _IMPORT_ERROR is not None:
        info["cpu"]["error"] = repr(_IMPORT_ERROR)
    return info


def cuda_stream_args(t: torch.Tensor):
    """(device index, cudaStream_t address) of torch's current stream for t's device."""
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return dev, torch.cuda.current_stream(dev).cuda_stream


def cuda_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch memory for a kernel, from torch's caching allocator."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)
