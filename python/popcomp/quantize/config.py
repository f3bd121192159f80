"""The quantization configs ``quantize_`` dispatches on: PalettizeConfig and its codebook granularities, each validated when it is built.

A config is a dataclass that checks itself in ``__post_init__`` (torchao's ``AOBaseConfig``):
a bad value fails where the config is written, with a ValueError/TypeError naming the field.
Checks that need the layer (a group size that does not divide a row) run in ``quantize_``,
before any module is replaced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch

from .._validate import check_int, check_real

__all__ = [
    "QuantizeConfig", "PalettizeConfig", "Granularity", "PerTensor", "PerChannel", "PerGroup",
    "granularity_of", "DEFAULT_GROUP_SIZE", "resolve_beta",
]


# ---- granularity: which weights share one codebook -------------------------------------------


class Granularity:
    """Base of the granularities: how a weight ``(out, ...)`` is cut into codebook rows."""

    name: ClassVar[str] = ""
    group_size: ClassVar[Optional[int]] = None

    def check(self, shape: Tuple[int, ...], name: str) -> None:
        """Raise ValueError naming layer ``name`` when a weight of ``shape`` cannot be cut."""

    def rows(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """``w`` viewed as ``(codebooks, values per codebook)``, row-major: the values of one
        codebook are one row."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One codebook for the whole weight."""

    name: ClassVar[str] = "per_tensor"
    group_size: ClassVar[Optional[int]] = None

    def rows(self, w: torch.Tensor, name: str) -> torch.Tensor:
        return w.reshape(1, -1)


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One codebook per output row / channel (``weight[r]``, all its fan-in)."""

    name: ClassVar[str] = "per_channel"
    group_size: ClassVar[Optional[int]] = None

    def rows(self, w: torch.Tensor, name: str) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One codebook per ``group_size`` consecutive inputs of an output row; codebook rows are
    ordered by (row, group)."""

    name: ClassVar[str] = "per_group"
    group_size: int

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size, lo=1)

    def check(self, shape: Tuple[int, ...], name: str) -> None:
        cols = math.prod(shape[1:])
        if cols % self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} does not divide the {cols} inputs per row of {name}"
            )

    def rows(self, w: torch.Tensor, name: str) -> torch.Tensor:
        self.check(tuple(w.shape), name)
        return w.reshape(-1, self.group_size)


GRANULARITIES: Dict[str, type] = {c.name: c for c in (PerTensor, PerChannel, PerGroup)}
DEFAULT_GROUP_SIZE = 128  # of granularity="per_group" (as GPTQ / AWQ / torchao's int4)


def granularity_of(granularity: Union[str, Granularity], group_size: Optional[int] = None
                   ) -> Granularity:
    """The Granularity object of a name (``"per_tensor"``, ``"per_channel"``, ``"per_group"``
    with ``group_size``) or of an object (a ``group_size`` given beside ``PerGroup(g)`` must be
    ``g``; ``"per_group"`` without one is :data:`DEFAULT_GROUP_SIZE`). ``group_size`` is
    ignored by the other granularities."""
    if group_size is not None:
        group_size = check_int("group_size", group_size, lo=1)
    if isinstance(granularity, Granularity):
        g = granularity
        if isinstance(g, PerGroup) and group_size is not None and group_size != g.group_size:
            raise ValueError(f"group_size={group_size} contradicts granularity={g!r}")
        return g
    if not isinstance(granularity, str):
        raise TypeError("granularity must be a name or a PerTensor/PerChannel/PerGroup object, "
                        f"got {type(granularity).__name__}")
    cls = GRANULARITIES.get(granularity)
    if cls is None:
        raise ValueError(f"granularity must be one of {tuple(GRANULARITIES)} (or a PerTensor/"
                         f"PerChannel/PerGroup object), got {granularity!r}")
    if cls is PerGroup:
        return PerGroup(DEFAULT_GROUP_SIZE if group_size is None else group_size)
    return cls()


# ---- configs --------------------------------------------------------------------------------


class QuantizeConfig:
    """Base of the configs ``quantize_`` accepts; ``quantize_`` calls the handler registered
    for the config's type (``popcomp.quantize.register_handler``)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field. Run when the config is built
        and again by ``quantize_`` (a field may have been assigned since)."""

    def uses_hessian(self, given: bool) -> bool:
        """Whether the handler gets the Hessian diagonal of each weight (``given``: a mapping
        was passed to ``quantize_``). Raises ValueError where the config needs one."""
        return given

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        """Raise ValueError naming layer ``name`` if ``weight`` cannot be quantized by this
        config (run for every selected layer before any work)."""


_SENSITIVITIES = ("auto", "hessian", "uniform")
_CODEBOOK_DTYPES = (torch.float16, torch.float32)


@dataclass
class PalettizeConfig(QuantizeConfig):
    """How to palettize each selected weight.

    k / bits: number of centers, or bits per index (k = 2**bits); one of them (bits in 1..8,
      k in 2..256; with k given the indices take ceil(log2 k) bits).
    granularity: ``"per_tensor"`` / ``PerTensor()`` (one codebook), ``"per_channel"`` /
      ``PerChannel()`` (one per output row / channel), ``"per_group"`` with ``group_size``
      (default 128) / ``PerGroup(group_size)`` (one per ``group_size`` consecutive inputs of a
      row).
    beta: the diameter penalty of DRHW K-means (Bu et al.; 0: HW K-means), absolute: the same
      value for every layer, in the units of the Hessian diagonal (times weight^2 / diameter^2).
    beta_rel: the same penalty, scale-free (give beta or beta_rel): each layer's K-means runs
      with ``beta = beta_rel * s`` where ``s`` is the mean over its codebooks of the sum of
      their K-means weights (the Hessian diagonal, or 1 per weight without one), times the
      layer's weight range (max - min) for ``diameter="linear"``. The objective of a codebook
      divided by ``s * range^2`` is then ``weighted mean of ((w - c) / range)^2 + beta_rel *
      (diameter / range)^2``: the same beta_rel means the same trade-off in every layer,
      whatever its Hessian's and weights' scales. 4-bit errors are about 3e-4 of the range
      squared, so useful values lie around 1e-5..1e-1 (``select_beta``'s default grid).
    diameter, method, init, max_iter, tol, seed: passed to popcomp.kmeans1d. The default
      ``method="exact"`` is the global optimum at beta = 0 by dynamic programming (DRHW
      iterations from it with beta > 0), about 2x Lloyd's time and still a fraction of a second
      for a 4096x4096 weight per channel; ``"lloyd"`` (with ``init``) is the alternative.
    sensitivity: "hessian" (K-means weights from the ``hessian`` mapping), "uniform" (plain
      K-means) or "auto" (hessian when a mapping is given).
    codebook_dtype: torch.float16 or torch.float32.

    Every field is checked when the config is built (ValueError/TypeError naming it); the names
    of ``method``, ``init`` and ``diameter`` are checked by ``kmeans1d`` when ``quantize_`` runs.
    The fields keep the values given (``dataclasses.replace`` works as usual);
    :attr:`granularity_spec` is the granularity as an object.
    """

    k: Optional[int] = None
    bits: Optional[int] = None
    granularity: Union[str, Granularity] = "per_channel"
    group_size: Optional[int] = None
    beta: float = 0.0
    beta_rel: Optional[float] = None
    method: str = "exact"
    init: Any = "kmeans++"
    max_iter: int = 300
    tol: float = 0.0
    seed: Optional[int] = 0
    diameter: str = "squared"
    sensitivity: str = "auto"
    codebook_dtype: torch.dtype = torch.float16

    def validate(self) -> None:
        self.resolve()
        granularity_of(self.granularity, self.group_size)
        check_real("beta", self.beta, lo=0.0)
        if self.beta_rel is not None:
            check_real("beta_rel", self.beta_rel, lo=0.0)
            if self.beta != 0:
                raise ValueError(f"give beta (absolute) or beta_rel (relative), not both: got "
                                 f"beta={self.beta!r}, beta_rel={self.beta_rel!r}")
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a str, got {type(self.method).__name__}")
        if not isinstance(self.diameter, str):
            raise TypeError(f"diameter must be a str, got {type(self.diameter).__name__}")
        if not isinstance(self.init, (str, torch.Tensor)):
            raise TypeError(f"init must be a str or a tensor of centers, got {type(self.init).__name__}")
        check_int("max_iter", self.max_iter, lo=0)
        check_real("tol", self.tol, lo=0.0)
        if self.seed is not None:
            check_int("seed", self.seed)
        if self.sensitivity not in _SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {_SENSITIVITIES}, got {self.sensitivity!r}")
        if self.codebook_dtype not in _CODEBOOK_DTYPES:
            raise ValueError("codebook_dtype must be torch.float16 or torch.float32, got "
                             f"{self.codebook_dtype}")

    def resolve(self) -> Tuple[int, int]:
        """(k, bits per index)."""
        if self.k is None and self.bits is None:
            raise ValueError("PalettizeConfig: give k or bits")
        if self.bits is not None:
            bits = check_int("bits", self.bits, lo=1, hi=8)
            k = check_int("k", self.k, lo=2, hi=1 << bits) if self.k is not None else 1 << bits
        else:
            k = check_int("k", self.k, lo=2, hi=256)
        return k, max(1, math.ceil(math.log2(k)))

    @property
    def granularity_spec(self) -> Granularity:
        """The granularity as an object (PerTensor, PerChannel or PerGroup)."""
        return granularity_of(self.granularity, self.group_size)

    def uses_hessian(self, given: bool) -> bool:
        if self.sensitivity == "hessian" and not given:
            raise ValueError("hessian: sensitivity='hessian' needs a hessian mapping")
        return self.sensitivity == "hessian" or (self.sensitivity == "auto" and given)

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        self.granularity_spec.check(tuple(weight.shape), name)


def resolve_beta(cfg: PalettizeConfig, rows: torch.Tensor, weights: Optional[torch.Tensor]) -> float:
    """The absolute beta for one layer: ``cfg.beta``, or ``cfg.beta_rel`` times the layer's
    scale (see PalettizeConfig) for its codebook ``rows`` ``(codebooks, n)`` and their K-means
    ``weights`` (None: all ones)."""
    if cfg.beta_rel is None:
        return float(cfg.beta)
    if cfg.beta_rel == 0:
        return 0.0
    s = float(weights.double().sum(1).mean()) if weights is not None else float(rows.shape[1])
    if cfg.diameter == "linear":
        s *= float(rows.max() - rows.min())
    return float(cfg.beta_rel) * s
