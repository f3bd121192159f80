"""Output helpers shared by the experiments: tables (CSV + Markdown), figures, progress, device."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import torch

from .._model import progress  # noqa: F401  (the experiments' progress bars)


class UserError(ValueError):
    """A mistake in the user's options: the CLI prints the message and exits non-zero."""


def resolve_device(name: str = "auto") -> torch.device:
    """``--device``: auto (GPU if available), cpu, cuda or cuda:N of a device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {name!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: must be auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {name}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return dev


SEED_MAX = 2**32 - 1


def fill_defaults(args, presets: Dict[str, Tuple[object, object]]) -> None:
    """Give every option of ``presets`` (dest -> (default, ``--quick`` default)) that the user
    left unset (None) its default: ``--quick`` changes only these defaults, so an option given
    explicitly always wins, with or without ``--quick``."""
    quick = bool(getattr(args, "quick", False))
    for dest, (full, small) in presets.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, small if quick else full)


# The upper bound of the numeric options the experiments share (dest -> (flag, hi)); each
# experiment checks the lower bounds. Beyond these a run would not finish or not fit in
# memory, or would crash a thread pool.
NUMERIC_MAX = {
    "threads": ("--threads", 1024),
    "epochs": ("--epochs", 100_000),
    "trials": ("--trials", 10_000_000),
    "models": ("--models", 10_000),
    "d": ("--d", 4096),
    "chunk": ("--chunk", 1_000_000),
}
HIDDEN_MAX = 65536  # the widest layer of --hidden


def check_max(flag: str, value, hi: int) -> None:
    """A UserError naming ``flag`` when ``value > hi``."""
    if value > hi:
        raise UserError(f"{flag} must be <= {hi}, got {value}")


def check_finite_lo(flag: str, value: float, strict: bool) -> None:
    """A UserError naming ``flag`` unless ``value`` is finite and > 0 (``strict``) or >= 0."""
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise UserError(f"{flag} must be finite and {'>' if strict else '>='} 0, got {value}")


def check_common(args) -> None:
    """The options every command has (``--seed``, ``--device``) and the shared numeric ones
    (``--threads``, ``--epochs``, ``--trials``, ``--models``, ``--d``, ``--hidden`` ... where
    the command has them), checked before any work; also that matplotlib is installed."""
    seed = getattr(args, "seed", 0)
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be in 0..{SEED_MAX}, got {seed}")
    resolve_device(getattr(args, "device", "auto"))
    for dest, (flag, hi) in NUMERIC_MAX.items():
        v = getattr(args, dest, None)
        if isinstance(v, int) and not isinstance(v, bool):
            check_max(flag, v, hi)
    hidden = getattr(args, "hidden", None)
    if isinstance(hidden, str):
        for h in int_list("--hidden", hidden):
            check_max("--hidden (each width)", h, HIDDEN_MAX)
    check_matplotlib()


def check_matplotlib() -> None:
    """A UserError saying which extra to install when matplotlib (the figures) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the figures need matplotlib, which is not installed: "
                        "pip install 'popcomp[demo]' (or pip install matplotlib)") from None


def resolve_options(args, presets: Dict[str, Tuple[object, object]], validate) -> None:
    """Defaults (``--quick``'s for the options not given), then the common and the experiment's
    own checks (``validate(args)``, which may add parsed fields). Idempotent."""
    fill_defaults(args, presets)
    check_common(args)
    validate(args)


def _list(flag: str, s: str, conv, what: str) -> list:
    try:
        return [conv(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of {what}, got {s!r}") from None


def int_list(flag: str, s: str) -> List[int]:
    """A comma-separated list of integers of option ``flag`` (a UserError naming it if not)."""
    return _list(flag, s, int, "integers")


def float_list(flag: str, s: str) -> List[float]:
    """A comma-separated list of numbers of option ``flag`` (a UserError naming it if not)."""
    return _list(flag, s, float, "numbers")


def start(args):
    """Common start of a training experiment: output folder, device (and CPU threads), clock."""
    import time

    out = ensure_out(args.out)
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    return out, dev, time.time()


def ensure_out(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path!r}: cannot create the output folder ({e.strerror})") from None
    # An existing folder may still refuse files (permissions, read-only or virtual file
    # systems, where even root cannot write): find out now, not after the run.
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--out {path!r}: the output folder is not writable ({e.strerror})") from None
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}"
    return str(v)


def write_table(rows: List[Dict[str, object]], out: str, stem: str, title: str = "",
                notes: Sequence[str] = ()) -> None:
    """Write ``stem.csv`` and ``stem.md`` (a Markdown table with a title and notes)."""
    if not rows:
        return
    cols = list(rows[0].keys())
    for r in rows[1:]:
        for c in r:
            if c not in cols:
                cols.append(c)
    with open(os.path.join(out, stem + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(markdown_table(rows, cols, title, notes))


def markdown_table(rows, cols=None, title: str = "", notes: Sequence[str] = ()) -> str:
    cols = cols or list(rows[0].keys())
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_json(obj, out: str, name: str = "results.json") -> None:
    def conv(o):
        if isinstance(o, torch.Tensor):
            return o.tolist()
        raise TypeError(type(o).__name__)

    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=2, default=conv)


def pyplot():
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def mean_se(x: torch.Tensor, dim: int = 0):
    x = x.double()
    m = x.mean(dim)
    se = x.std(dim) / math.sqrt(x.shape[dim]) if x.shape[dim] > 1 else torch.zeros_like(m)
    return m, se
