"""select_beta: the diameter penalty beta of DRHW K-means chosen by cross-validation (Bu et al. §6-7), and evaluate_loss, the validation loss it scores with."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .._model import batch_size, call_model, eval_mode, module_device, split_batch, to_device
from .._validate import check_int, check_real
from .api import FilterFn, quantize_, select_modules
from .config import PalettizeConfig

__all__ = ["select_beta", "BetaSelection", "evaluate_loss", "DEFAULT_BETA_REL_GRID"]


# select_beta's grid of PalettizeConfig.beta_rel when no betas are given
DEFAULT_BETA_REL_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class BetaSelection:
    best_beta: float
    table: List[Dict[str, Any]]  # one row per beta: beta, val_loss (mean over folds), fold_losses
    relative: bool = False       # the betas are beta_rel values (PalettizeConfig.beta_rel)

    def config(self, config: PalettizeConfig) -> PalettizeConfig:
        """``config`` with the best beta (as ``beta_rel`` when the grid was relative)."""
        if self.relative:
            return dataclasses.replace(config, beta=0.0, beta_rel=self.best_beta)
        return dataclasses.replace(config, beta=self.best_beta, beta_rel=None)

    def __str__(self) -> str:
        lines = [f"{'beta_rel' if self.relative else 'beta':>12} {'val loss':>14}"]
        for r in self.table:
            mark = "  <- best" if r["beta"] == self.best_beta else ""
            lines.append(f"{r['beta']:>12.6g} {r['val_loss']:>14.6g}{mark}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: Callable, data: Iterable) -> float:
    """Average per-sample loss over ``data`` (batch losses weighted by batch size), with the
    model in eval mode (each module's mode is restored afterwards)."""
    dev = module_device(model)
    tot, cnt = 0.0, 0
    with eval_mode(model):  # validation: no dropout noise, BatchNorm on its running statistics
        for batch in data:
            x, y = split_batch(batch)
            x, y = to_device(x, dev), to_device(y, dev)
            B = batch_size(x, y)
            tot += float(loss_fn(call_model(model, x), y)) * B
            cnt += B
    if cnt == 0:
        raise ValueError("data: no samples to evaluate")
    return tot / cnt


def select_beta(
    model: nn.Module,
    loss_fn: Callable,
    data: Optional[Iterable] = None,
    betas: Optional[Sequence[float]] = None,
    config: Optional[PalettizeConfig] = None,
    *,
    val_data: Optional[Iterable] = None,
    hessian: Optional[Mapping[str, torch.Tensor]] = None,
    folds: int = 3,
    method: str = "fisher",
    filter_fn: Optional[FilterFn] = None,
    progress: bool = False,
) -> BetaSelection:
    """Choose the diameter penalty beta by cross-validation (Bu et al. §6-7).

    ``betas``: the values tried, as ``config``'s kind of beta: relative (``beta_rel``) when
    ``config.beta_rel`` is set, absolute otherwise; None tries the relative grid
    :data:`DEFAULT_BETA_REL_GRID` (``0, 1e-5 .. 1e-1``). With ``val_data``: the Hessian is
    ``hessian`` or comes from ``data`` (``data`` is not needed when ``hessian`` is given), each
    beta quantizes a copy of the model and is scored by its loss on ``val_data``. Without:
    ``data``'s batches are split into ``folds`` folds; for each fold the Hessian is accumulated
    on the others and the quantized copies are scored on it. Returns the table of validation
    losses (mean over folds) and the best beta (``.config(config)``: the config with it).
    ``model`` itself is not modified."""
    from ..hessian import diagonal

    if not isinstance(config, PalettizeConfig):
        raise TypeError(f"config must be a popcomp.PalettizeConfig, got {type(config).__name__}")
    relative = betas is None or config.beta_rel is not None
    if betas is None:
        betas = DEFAULT_BETA_REL_GRID
    name = "betas (beta_rel values)" if relative else "betas"
    betas = [check_real(name, b, lo=0.0) for b in betas]
    if not betas:
        raise ValueError("betas must hold at least one value")
    use_h = config.sensitivity != "uniform"
    if data is None:
        if val_data is None:
            raise ValueError("data: needed for the cross-validation folds (give data, or "
                             "val_data with a hessian)")
        if use_h and hessian is None:
            raise ValueError("data: needed to compute the Hessian (or give hessian=)")
        batches = []
    else:
        batches = list(data)
        if not batches:
            raise ValueError("data: no batches")
    if val_data is not None:
        val_batches = list(val_data)
        if not val_batches:
            raise ValueError("val_data: no batches")
        splits = [(batches, val_batches)]
    else:
        folds = check_int("folds", folds, lo=2, hi=len(batches))
        splits = []
        for f in range(folds):
            val = [b for i, b in enumerate(batches) if i % folds == f]
            train = [b for i, b in enumerate(batches) if i % folds != f]
            splits.append((train, val))
    # the Hessian of the weights quantize_ will select, and of nothing else (other modules may
    # be ones the method cannot handle; a selected weight may be frozen)
    pnames = {id(p): pn for pn, p in model.named_parameters()}
    params = list(dict.fromkeys(pnames[id(m.weight)] for n, m in select_modules(model, filter_fn)
                                if n and id(m.weight) in pnames))
    losses = [[0.0] * len(splits) for _ in betas]
    for s, (train, val) in enumerate(splits):
        h = None
        if use_h:
            if hessian is not None:
                h = hessian
            elif params:
                h = diagonal(model, loss_fn, train, method, params=params, progress=progress)
                # estimates (hutchinson) can be negative where the curvature is ~0: clamp, as
                # quantize_ asks of a given mapping
                h = {key: v.clamp_min(0) for key, v in h.items()}
            else:
                h = {}
        for i, b in enumerate(betas):
            m = copy.deepcopy(model)
            cfg = (dataclasses.replace(config, beta=0.0, beta_rel=b) if relative
                   else dataclasses.replace(config, beta=b))
            quantize_(m, cfg, hessian=h, filter_fn=filter_fn)
            losses[i][s] = evaluate_loss(m, loss_fn, val)
    table = [{"beta": b, "val_loss": sum(l) / len(l), "fold_losses": l} for b, l in zip(betas, losses)]
    best = min(table, key=lambda r: r["val_loss"])["beta"]
    return BetaSelection(best, table, relative)
