"""Loading of the compiled core and the report of which backends are built and usable."""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Dict, Optional, Tuple

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
    """The compiled core has CUDA kernels."""
    return _C is not None and bool(_C.has_cuda)


def _version(v: int) -> str:
    """A CUDA version number (12040) as text ("12.4")."""
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=None)
def _cuda_runtime_state() -> Tuple[int, str]:
    """(devices popcomp's CUDA runtime sees, why it sees none or ""), queried once."""
    if not cuda_built():
        return 0, "popcomp was built without CUDA"
    count = int(_C.cuda_device_count())
    return count, "" if count > 0 else (str(_C.cuda_device_error()) or "no CUDA device")


def cuda_usable() -> bool:
    """CUDA kernels were built, torch sees a CUDA device and so does popcomp's CUDA runtime
    (linked statically: it needs a driver that supports the CUDA version it was built with)."""
    return cuda_built() and torch.cuda.is_available() and _cuda_runtime_state()[0] > 0


def cuda_unusable_reason() -> Optional[str]:
    """Why popcomp's CUDA kernels cannot run (with the fix), or None when they can."""
    if cuda_usable():
        return None
    if not cuda_built():
        return ("popcomp was built without CUDA kernels (no nvcc at build time); reinstall from "
                "source with a CUDA toolkit: pip install --no-build-isolation .")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    build, driver = int(_C.cuda_build_version()), int(_C.cuda_driver_version())
    why = _cuda_runtime_state()[1]
    if driver and driver < build:
        why = (f"its CUDA runtime (built with CUDA {_version(build)}, linked statically) needs a "
               f"driver that supports CUDA {_version(build)} or newer, and the installed driver "
               f"supports CUDA {_version(driver)} ({why})")
    else:
        why = (f"its CUDA runtime (built with CUDA {_version(build)}) cannot use the device: "
               f"{why}; driver: {'CUDA ' + _version(driver) if driver else 'not found'}")
    return (f"torch sees a CUDA device but popcomp cannot use it: {why}. Update the driver, or "
            "rebuild popcomp from source with a CUDA toolkit the driver supports (CUDACXX="
            "<that toolkit>/bin/nvcc pip install --no-build-isolation --force-reinstall "
            "--no-deps <popcomp source>)")


_FALLBACK_WARNED = False


def cuda_fallback(t: torch.Tensor, op: str) -> bool:
    """True when t is a CUDA tensor that popcomp's compiled CUDA kernels cannot run on (see
    cuda_unusable_reason); the kernel of ``op`` then runs the op's pure-torch reference on the
    device instead. The first such call of the process warns (RuntimeWarning) with the reason."""
    global _FALLBACK_WARNED
    if t.device.type != "cuda" or cuda_usable():
        return False
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(f"popcomp::{op} on CUDA runs its pure-torch reference (slower): "
                      f"{cuda_unusable_reason()}", RuntimeWarning, stacklevel=3)
    return True


MAX_THREADS = 1024  # the most threads a CPU kernel starts (more crash the OpenMP runtime)


@functools.lru_cache(maxsize=None)
def _thread_cap() -> int:
    """A sane thread count ceiling: 4 per logical CPU, at most MAX_THREADS (computed once:
    os.cpu_count() costs microseconds on every op call otherwise)."""
    return max(1, min(MAX_THREADS, 4 * (os.cpu_count() or 1)))


def num_threads() -> int:
    """Threads used by the CPU kernels: POPCOMP_NUM_THREADS, else torch's intra-op count;
    clamped (with a RuntimeWarning) to 4 per logical CPU, at most MAX_THREADS."""
    env = os.environ.get("POPCOMP_NUM_THREADS")
    n = None
    if env:
        try:
            n = max(1, int(env))
        except ValueError:
            warnings.warn(f"ignoring POPCOMP_NUM_THREADS={env!r}: not an integer")
    src = "POPCOMP_NUM_THREADS" if n is not None else "torch.get_num_threads()"
    if n is None:
        n = max(1, torch.get_num_threads())
    cap = _thread_cap()
    if n > cap:
        warnings.warn(f"{src} = {n} exceeds {cap} (4 per logical CPU, at most {MAX_THREADS}); "
                      f"using {cap} threads", RuntimeWarning, stacklevel=2)
        n = cap
    return n


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
            "driver_cuda_version": int(_C.cuda_driver_version()) if cuda_built() else 0,
            "devices": _cuda_runtime_state()[0],
        },
        "reference": {"built": True, "usable": True},
    }
    if _IMPORT_ERROR is not None:
        info["cpu"]["error"] = repr(_IMPORT_ERROR)
    if cuda_built() and not info["cuda"]["usable"]:
        info["cuda"]["error"] = cuda_unusable_reason()
    return info


def cuda_dp_budget(device: torch.device) -> int:
    """Bytes the exact K-means DP on CUDA may take for its tables (about (k + 3) x 4 bytes per
    distinct value of a row; rows are solved in chunks that fit, a row that alone needs more is
    solved alone): POPCOMP_CUDA_DP_BUDGET, else 1/8 of the device's memory, at least 1 GiB."""
    env = os.environ.get("POPCOMP_CUDA_DP_BUDGET")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            warnings.warn(f"ignoring POPCOMP_CUDA_DP_BUDGET={env!r}: not an integer")
    if device.type != "cuda":  # (only a test's stand-in core gets here with another device)
        return 1 << 30
    total = torch.cuda.get_device_properties(device).total_memory
    return max(1 << 30, total // 8)


def cuda_capturing(t: torch.Tensor) -> bool:
    """t is a CUDA tensor and torch's current stream is capturing a CUDA graph (no host
    transfer may run now)."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cuda_stream_args(t: torch.Tensor):
    """(device index, cudaStream_t address) of torch's current stream for t's device."""
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return dev, torch.cuda.current_stream(dev).cuda_stream


def cuda_workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch memory for a kernel, from torch's caching allocator."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)
