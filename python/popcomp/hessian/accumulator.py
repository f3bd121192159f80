"""The streaming accumulator of Hessian diagonals (HessianAccumulator), its result
(HessianDiagonal) and the one-call ``diagonal``."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .._model import all_reduce_sum, batch_size, module_device, split_batch, to_device
from .._model import eval_mode as _eval_mode, progress as _progress  # names of arguments here
from .._validate import check_int
from .methods import LABEL_FREE, REGISTRY, NonFiniteBatch, Options
from .modules import FilterFn, acc_dtype

__all__ = ["HessianAccumulator", "HessianDiagonal", "diagonal"]


class HessianDiagonal(dict):
    """parameter name -> tensor shaped like the parameter (a sum over samples): float32, or
    float64 for a float64 parameter.

    The keys are the parameters' names in ``model.named_parameters()`` of the model the
    diagonal was computed on ("<module path>.weight", "<module path>.bias"): computed on the
    model handed to ``quantize_`` they are the names it looks up. ``num_samples`` is the number
    of samples accumulated; ``mean()`` returns the per-sample average as a new mapping,
    ``clamp()`` one with its negative entries (Hutchinson noise) raised to a floor."""

    def __init__(self, data: Mapping[str, torch.Tensor], num_samples: int, method: str):
        super().__init__(data)
        self.num_samples = int(num_samples)
        self.method = method

    def mean(self) -> "HessianDiagonal":
        if self.num_samples <= 0:
            raise ValueError("cannot take the mean over 0 samples")
        return HessianDiagonal(
            {k: v / self.num_samples for k, v in self.items()}, self.num_samples, self.method
        )

    def clamp(self, min: float = 0.0) -> "HessianDiagonal":
        """A copy with every entry below ``min`` set to ``min``: the form of a Hutchinson
        estimate that K-means weights (nonnegative) need. The estimate stays unbiased only
        where it is already above ``min``."""
        return HessianDiagonal({k: v.clamp(min=min) for k, v in self.items()}, self.num_samples,
                               self.method)

    def __repr__(self) -> str:
        return (f"HessianDiagonal(method={self.method!r}, num_samples={self.num_samples}, "
                f"params={list(self.keys())})")


class HessianAccumulator:
    """Streaming accumulator of the Hessian diagonal of ``loss_fn(output_fn(model(input)),
    target)``.

    ``update(input, target)`` adds one batch, ``accumulate(data)`` a whole iterable (with a
    tqdm progress bar), ``result()`` returns the sums so far (all-reduced over ranks when
    torch.distributed is initialized) while the accumulator can keep going.

    Args:
      model, loss_fn: the network and a loss ``loss_fn(output, target) -> scalar``; None is the
        label-free loss 1/2 ||f - f0||^2 around the current outputs (its Hessian: the
        Gauss-Newton diag(J^T J), what keeping the outputs unchanged needs; see
        :mod:`popcomp.hessian`).
      method: "fisher", "ggn", "ggn_mc" or "hutchinson" (see :mod:`popcomp.hessian`).
      filter_fn: ``filter_fn(module, name) -> bool`` selects the modules whose parameters are
        accumulated, as in ``quantize_`` (e.g. ``lambda m, n: isinstance(m, nn.Linear)``); the
        other modules may be anything (LayerNorm, attention, ...), fisher/ggn/ggn_mc only need
        the selected ones to be supported.
      output_fn: maps what the model returns to what the loss sees (e.g. ``lambda out:
        out.last_hidden_state``); default: a tensor as is, else its ``logits``, else its only
        tensor (a dict, a ``ModelOutput``, a dataclass, a tuple).
      params: names of the parameters to accumulate, frozen ones included (naming one asks for
        it); default: the trainable ones (``requires_grad=True``), for every method. With
        ``filter_fn`` both must hold. Parameters not asked for cost nothing: a module none of
        whose parameters is asked for is not accumulated and may be of any type.
      reduction: "mean" or "sum", how loss_fn reduces over the batch; None reads
        ``loss_fn.reduction`` or probes the first batch.
      num_probes: Rademacher probes per batch (hutchinson).
      mc_samples: sampled columns per sample (ggn_mc).
      seed: seed of the probes / sampled labels.
      max_columns: limit on the columns of the loss-Hessian factor per sample (ggn).
      eval_mode: evaluate the model in eval mode (default; dropout off, BatchNorm on its running
        statistics), each module's mode restored after every batch; False keeps the modules'
        current modes (e.g. to include dropout noise).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable],
        method: str = "fisher",
        *,
        filter_fn: Optional[FilterFn] = None,
        output_fn: Optional[Callable[[Any], Any]] = None,
        params: Optional[Iterable[str]] = None,
        reduction: Optional[str] = None,
        num_probes: int = 1,
        mc_samples: int = 1,
        seed: Optional[int] = None,
        max_columns: int = 4096,
        eval_mode: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable (output, target) -> scalar loss, or None "
                            "(label-free)")
        for arg, fn in (("filter_fn", filter_fn), ("output_fn", output_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{arg} must be callable or None, got {type(fn).__name__}")
        if method not in REGISTRY:
            raise ValueError(f"method must be one of {tuple(REGISTRY)}, got {method!r}")
        if reduction not in (None, "mean", "sum"):
            raise ValueError(f"reduction must be None, 'mean' or 'sum', got {reduction!r}")
        if not isinstance(eval_mode, bool):
            raise TypeError(f"eval_mode must be a bool, got {type(eval_mode).__name__}")
        opts = Options(reduction=reduction, num_probes=check_int("num_probes", num_probes, lo=1),
                       mc_samples=check_int("mc_samples", mc_samples, lo=1), seed=seed,
                       max_columns=check_int("max_columns", max_columns, lo=1),
                       filter_fn=filter_fn, output_fn=output_fn)
        named = dict(model.named_parameters())
        if params is not None:
            params = list(params)
            missing = [p for p in params if p not in named]
            if missing:
                raise ValueError(f"params: no parameters named {missing} in the model")
        self.model, self.loss_fn, self.method, self.eval_mode = model, loss_fn, method, eval_mode
        self.options = opts
        cls = REGISTRY[method] if loss_fn is not None else LABEL_FREE[method]
        self._estimator = cls(model, loss_fn, params, opts)
        names = self._estimator.names
        if not names:
            arg = "filter_fn" if filter_fn is not None else "params"
            raise ValueError(f"{arg}: nothing to accumulate (the model has no selected parameters; "
                             "frozen ones (requires_grad=False) are accumulated only when named "
                             "in params=)")
        self._params = [named[n] for n in names]
        self._acc: Dict[str, torch.Tensor] = {
            n: torch.zeros(p.shape, dtype=acc_dtype(p), device=p.device)
            for n, p in zip(names, self._params)}
        self.num_samples = 0

    def update(self, inputs, targets=None) -> None:
        """Add one batch: ``inputs`` (a tensor, a tuple of positional arguments or a dict of
        keyword arguments of the model) and ``targets`` (what loss_fn takes; None for a
        label-free loss or one that needs none)."""
        device = module_device(self.model)
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        B = batch_size(inputs, targets)
        if B == 0:
            return
        flags = [p.requires_grad for p in self._params]
        try:
            for p in self._params:
                p.requires_grad_(True)
            with torch.enable_grad(), _eval_mode(self.model, self.eval_mode):
                try:
                    self._estimator.update(self._acc, inputs, targets, B)
                except NonFiniteBatch as e:  # checked on output-sized values; name the cause
                    _check_finite(inputs, "inputs")
                    _check_finite(targets, "targets")
                    raise ValueError(
                        f"model: {e} is NaN or Inf on a batch whose data is finite (the Hessian "
                        "diagonal would be NaN): check the model's parameters and the loss"
                    ) from None
        finally:
            for p, f in zip(self._params, flags):
                p.requires_grad_(f)
        self.num_samples += B

    def accumulate(self, data: Iterable, progress: bool = True) -> "HessianAccumulator":
        """Add every batch of ``data``: ``(inputs, target)`` pairs, or inputs alone (a tensor
        or a dict of keyword arguments; ``(inputs,)``), see :func:`diagonal`; a tqdm bar shows
        the progress."""
        for batch in _progress(data, f"hessian ({self.method})", enabled=progress, unit="batch"):
            self.update(*split_batch(batch, target_optional=True))
        return self

    def result(self, mean: bool = False, all_reduce: bool = True) -> HessianDiagonal:
        """The accumulated diagonal (copies), summed over ranks when torch.distributed is
        initialized (and ``all_reduce``); ``mean=True`` divides by the sample count."""
        names = list(self._acc)  # the same order on every rank
        tensors = list(self._acc.values())
        count = self.num_samples
        if all_reduce:
            tensors, total = all_reduce_sum(tensors, float(count))
            count = int(round(total))
        else:
            tensors = [t.clone() for t in tensors]
        bad = [n for n, t in zip(names, tensors) if not bool(torch.isfinite(t).all())]
        if bad:
            big = any(t.dtype == torch.float32 for n, t in zip(names, tensors) if n in bad)
            raise ValueError(
                f"model: the Hessian diagonal of {bad} is not finite (NaN or Inf): "
                + ("its entries exceed the float32 range (~3.4e38) or the model computes "
                   "NaN/Inf; accumulate a float64 copy of the model (model.double()) to get "
                   "a float64 diagonal, or rescale the loss" if big else
                   "the model or the loss computes NaN/Inf on the data"))
        res = HessianDiagonal({n: t for n, t in zip(names, tensors)}, count, self.method)
        why = self._estimator.warning() if count > 0 else None
        if why:
            warnings.warn(why, stacklevel=2)
        return res.mean() if mean else res

    def reset(self) -> None:
        """Zero the sums and the sample count."""
        for t in self._acc.values():
            t.zero_()
        self.num_samples = 0


def _check_finite(obj: Any, what: str) -> None:
    """A ValueError naming ``what`` when a floating tensor of ``obj`` (a tensor, or a tuple /
    list / dict of them) holds NaN or Inf: it would make the whole diagonal NaN. Run only once
    the model output or the loss was found non-finite (a pass over the data costs)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            raise ValueError(f"data: the batch's {what} contain NaN or Inf (the Hessian diagonal "
                             "would be NaN); remove or repair those samples")
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _check_finite(v, what)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _check_finite(v, what)


def diagonal(
    model: nn.Module,
    loss_fn: Optional[Callable],
    data: Iterable,
    method: str = "fisher",
    *,
    filter_fn: Optional[FilterFn] = None,
    output_fn: Optional[Callable[[Any], Any]] = None,
    mean: bool = False,
    progress: bool = True,
    params: Optional[Iterable[str]] = None,
    reduction: Optional[str] = None,
    num_probes: int = 1,
    mc_samples: int = 1,
    seed: Optional[int] = None,
    max_columns: int = 4096,
    eval_mode: bool = True,
) -> HessianDiagonal:
    """Diagonal of the loss Hessian of ``model`` over ``data`` (an iterable / DataLoader of
    batches), as a mapping parameter name -> tensor shaped like the parameter (float32; float64
    for a float64 parameter), holding
    the sum over samples (``mean=True``: divided by ``num_samples``). The keys are the names in
    ``model.named_parameters()`` ("<module path>.weight"), the names ``quantize_(model, ...)``
    looks up.

    A batch is ``(inputs, target)`` or inputs alone (target None), where inputs is a tensor
    (``model(x)``), a tuple (positional arguments: ``((x, mask), target)``) or a dict (keyword
    arguments, as Hugging Face models take them)::

        diagonal(mlp, nn.CrossEntropyLoss(), [(x, y)])
        diagonal(bert, None, [{"input_ids": ids, "attention_mask": mask}],       # label-free
                 filter_fn=lambda m, n: isinstance(m, nn.Linear),
                 output_fn=lambda out: out.last_hidden_state)
        diagonal(gpt2, next_token_ce, [({"input_ids": ids}, ids)],                # .logits
                 filter_fn=lambda m, n: n.startswith("transformer.h."))

    The model is evaluated in eval mode unless ``eval_mode=False`` (each module's mode is
    restored). See :mod:`popcomp.hessian` for the methods and ``loss_fn=None``; keyword
    arguments go to HessianAccumulator."""
    acc = HessianAccumulator(model, loss_fn, method, filter_fn=filter_fn, output_fn=output_fn,
                             params=params, reduction=reduction,
                             num_probes=num_probes, mc_samples=mc_samples, seed=seed,
                             max_columns=max_columns, eval_mode=eval_mode)
    acc.accumulate(data, progress=progress)
    res = acc.result()
    if res.num_samples == 0:
        raise ValueError("data: no samples (the iterable was empty)")
    return res.mean() if mean else res
