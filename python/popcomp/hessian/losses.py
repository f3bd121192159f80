"""Loss factors keyed by loss type (each sample's loss Hessian in the model output as a sum of
column outer products) and the per-sample scale of the batch loss.

A sample's loss is what ``loss_fn`` returns on a batch holding that sample alone. The batch loss
is their sum (``reduction="sum"``) or their mean, so ``scale * batch loss`` is their sum with
scale = B or 1 (:class:`SampleScale`, read from the loss or probed on the first batch).

:data:`LOSS_FACTORS` maps a loss type to its factor class; ``ggn``/``ggn_mc`` accept the losses
in it, and supporting another loss is adding one entry: a :class:`LossFactor` subclass that
knows ``num_columns``, ``exact`` (A with A A^T = H_s, the columns batched first) and
``sampled`` (columns drawn from the model's predictive distribution, E[A A^T] = H_s).

torch's functional losses are recognized too (:data:`FUNCTIONAL_LOSSES`, function -> loss
type): ``F.cross_entropy``, ``F.mse_loss``, ``F.binary_cross_entropy_with_logits``, bare or as a
``functools.partial`` with keyword arguments only (e.g. ``partial(F.cross_entropy,
reduction="sum")``); :func:`loss_module` gives the equivalent module. A lambda or any other
wrapper cannot be read: pass the loss module instead.

The factors are computed in float64 for a float64 model output, else in float32.

``loss_fn=None`` is the label-free loss l_s = 1/2 ||f_s - f_s0||^2 around the current outputs
f_s0, whose Hessian in the outputs is I (:class:`OutputFactor`): its GGN is diag(J_s^T J_s).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._model import slice_sample
from .modules import acc_dtype

__all__ = ["FUNCTIONAL_LOSSES", "LOSS_FACTORS", "LossFactor", "OutputFactor", "SampleScale",
           "check_scalar_loss", "loss_factor", "loss_module", "probe_reduction"]


class LossFactor:
    """A square root of the per-sample loss Hessians of one ``loss_fn`` in the model output.

    Constructed from the loss module, whose settings it checks (a ValueError naming
    ``loss_fn`` when the factor does not apply). ``out`` is the model output (B, ...); columns
    come back shaped (R, *out.shape) in ``out``'s dtype, computed in float32 (float64 for a
    float64 output)."""

    def __init__(self, loss_fn: nn.Module, method: str):
        if loss_fn.reduction not in ("mean", "sum"):
            raise ValueError(f"loss_fn: reduction={loss_fn.reduction!r} is not supported by "
                             f"{method} (a scalar batch loss is needed); use 'mean' or 'sum'")
        self.loss_fn = loss_fn
        self.mean = loss_fn.reduction == "mean"

    def num_columns(self, out: torch.Tensor) -> int:
        """Columns per sample of :meth:`exact`."""
        raise NotImplementedError

    def exact(self, out: torch.Tensor, targets: Any) -> torch.Tensor:
        """A (R, *out.shape) with sum_r A[r, s] A[r, s]^T = H_s for every sample s."""
        raise NotImplementedError

    def sampled(self, out: torch.Tensor, targets: Any, M: int,
                gen: torch.Generator) -> torch.Tensor:
        """M columns per sample with E[sum_r A[r, s] A[r, s]^T] = H_s."""
        raise NotImplementedError


class CrossEntropyFactor(LossFactor):
    """nn.CrossEntropyLoss on logits (B, C, ...): per position, diag(p) - p p^T (rank C - 1),
    weighted by 1 / (valid positions of the sample) under a mean; ``ignore_index`` positions
    have no columns' weight."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss, method: str):
        super().__init__(loss_fn, method)
        if loss_fn.weight is not None:
            raise ValueError(
                f"loss_fn: CrossEntropyLoss with class weights is not supported by {method}")

    @staticmethod
    def _shape(out: torch.Tensor):
        if out.dim() == 1:
            raise ValueError("model: CrossEntropyLoss needs batched logits (B, C, ...)")
        return out.shape[0], out.shape[1], int(math.prod(out.shape[2:]))

    def num_columns(self, out):
        _, C, P = self._shape(out)
        return (C - 1) * P

    def _probs(self, out, targets):
        """Softmax (B, C, P) and the square roots of the positions' weights (B, P)."""
        B, C, P = self._shape(out)
        p = torch.softmax(out.to(acc_dtype(out)), dim=1).reshape(B, C, P)
        if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            w = (targets.reshape(B, P) != self.loss_fn.ignore_index).to(p.dtype)
        else:
            w = torch.ones(B, P, dtype=p.dtype, device=p.device)
        if self.mean:
            w = w / w.sum(1, keepdim=True).clamp_min(1.0)
        return p, w.sqrt()

    def exact(self, out, targets):
        # The Hessian diag(p) - p p^T = D (I - q q^T) D with q = sqrt(p), D = diag(q), has rank
        # C - 1: its factor is D U, U = the first C - 1 columns of the Householder reflection
        # I - v v^T / (1 + q_C), v = q + e_C, which maps q to -e_C (so U U^T = I - q q^T):
        # A[j, b, i, p] = q_i (delta_ij - q_j v_i / (1 + q_C)), j < C - 1.
        B, C, P = self._shape(out)
        p, sw = self._probs(out, targets)
        q = p.sqrt()
        v = torch.cat([q[:, :-1], q[:, -1:] + 1], 1)
        coef = (q[:, :-1] / v[:, -1:]).permute(1, 0, 2).unsqueeze(2)  # (C-1, B, 1, P)
        eye = torch.eye(C - 1, C, dtype=p.dtype, device=p.device).view(C - 1, 1, C, 1)
        A = q.unsqueeze(0) * (eye - coef * v.unsqueeze(0))
        A = A * sw.view(1, B, 1, P)
        if P > 1:  # the columns of position p are zero at the other positions
            A = torch.einsum("cbkp,pq->cpbkq", A, torch.eye(P, dtype=p.dtype, device=p.device))
        return A.reshape((C - 1) * P, *out.shape).to(out.dtype)

    def sampled(self, out, targets, M, gen):
        B, C, P = self._shape(out)
        p, sw = self._probs(out, targets)
        idx = torch.multinomial(p.permute(0, 2, 1).reshape(-1, C), M, replacement=True,
                                generator=gen)  # (B*P, M)
        onehot = F.one_hot(idx.t().reshape(M, B, P), C).permute(0, 1, 3, 2).to(p.dtype)
        cols = (p.unsqueeze(0) - onehot) * sw.view(1, B, 1, P) / math.sqrt(M)
        return cols.reshape(M, *out.shape).to(out.dtype)


class _ElementwiseFactor(LossFactor):
    """A loss whose Hessian in the outputs is diagonal, d = :meth:`diag` (B, n) per output
    element; the exact factor is sqrt(d) on one output per column."""

    def _n_w(self, out):
        n = int(math.prod(out.shape[1:]))
        return n, (1.0 / n if self.mean else 1.0)

    def num_columns(self, out):
        return self._n_w(out)[0]

    def diag(self, f: torch.Tensor, w: float) -> torch.Tensor:
        raise NotImplementedError

    def exact(self, out, targets):
        n, w = self._n_w(out)
        d = self.diag(out.to(acc_dtype(out)), w).reshape(out.shape[0], n)
        cols = torch.diag_embed(d.sqrt()).permute(1, 0, 2)  # (n, B, n): cols[j, b, j]
        return cols.reshape(n, *out.shape).to(out.dtype)


class MSEFactor(_ElementwiseFactor):
    """nn.MSELoss: H = 2 w I (w = 1 / outputs per sample under a mean); sampled columns are
    Gaussian, sqrt(2 w) eps."""

    def diag(self, f, w):
        return torch.full_like(f, 2.0 * w)

    def sampled(self, out, targets, M, gen):
        n, w = self._n_w(out)
        f = out.to(acc_dtype(out))
        d = self.diag(f, w).reshape(out.shape[0], n)
        eps = torch.randn((M, out.shape[0], n), generator=gen, device=f.device, dtype=f.dtype)
        return (eps * d.sqrt() / math.sqrt(M)).reshape(M, *out.shape).to(out.dtype)


class OutputFactor(_ElementwiseFactor):
    """The label-free loss (``loss_fn=None``), H_s = I on every output: the exact factor is one
    unit column per output of a sample; sampled columns are Rademacher probes eps / sqrt(M)
    (E[eps eps^T] = I; lower variance than Gaussian probes: Var[(eps^T a)^2] = 2 (|a|^4 -
    sum_j a_j^4) against 2 |a|^4), M per sample, whatever the output width."""

    def __init__(self, method: str):
        self.loss_fn = None
        self.mean = False

    def diag(self, f, w):
        return torch.ones_like(f)

    def sampled(self, out, targets, M, gen):
        n = int(math.prod(out.shape[1:]))
        eps = torch.randint(0, 2, (M, out.shape[0], n), generator=gen, device=out.device,
                            dtype=acc_dtype(out))  # no int64 copy
        eps = eps.mul_(2).sub_(1).div_(math.sqrt(M))
        return eps.reshape(M, *out.shape).to(out.dtype)


class BCEWithLogitsFactor(_ElementwiseFactor):
    """nn.BCEWithLogitsLoss: H = w s (1 - s), s = sigmoid(logits); sampled columns are
    sqrt(w) (s - y) with y ~ Bernoulli(s)."""

    def __init__(self, loss_fn: nn.BCEWithLogitsLoss, method: str):
        super().__init__(loss_fn, method)
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError(
                f"loss_fn: BCEWithLogitsLoss with weight/pos_weight is not supported by {method}")

    def diag(self, f, w):
        s = torch.sigmoid(f)
        return s * (1 - s) * w

    def sampled(self, out, targets, M, gen):
        n, w = self._n_w(out)
        s = torch.sigmoid(out.to(acc_dtype(out))).reshape(out.shape[0], n)
        y = torch.bernoulli(s.expand(M, *s.shape), generator=gen)
        return ((s - y) * math.sqrt(w) / math.sqrt(M)).reshape(M, *out.shape).to(out.dtype)


LOSS_FACTORS: Dict[Type[nn.Module], Type[LossFactor]] = {
    nn.MSELoss: MSEFactor,
    nn.CrossEntropyLoss: CrossEntropyFactor,
    nn.BCEWithLogitsLoss: BCEWithLogitsFactor,
}


# torch's functional losses -> the loss type (module) computing the same thing
FUNCTIONAL_LOSSES: Dict[Callable, Type[nn.Module]] = {
    F.mse_loss: nn.MSELoss,
    F.cross_entropy: nn.CrossEntropyLoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


def loss_module(loss_fn: Optional[Callable]) -> Optional[Callable]:
    """``loss_fn`` itself, or for a functional loss of :data:`FUNCTIONAL_LOSSES` (bare, or a
    ``functools.partial`` with keyword arguments only) the equivalent loss module."""
    fn, kw = loss_fn, {}
    if isinstance(fn, functools.partial) and not fn.args:
        fn, kw = fn.func, dict(fn.keywords)
    try:
        cls = FUNCTIONAL_LOSSES.get(fn)
    except TypeError:  # unhashable callable
        cls = None
    if cls is None:
        return loss_fn
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"loss_fn: {fn.__name__} with keywords {sorted(kw)} has no "
                         f"nn.{cls.__name__} equivalent ({e})") from e


def loss_factor(loss_fn: Optional[Callable], method: str) -> LossFactor:
    """The factor of ``loss_fn`` (its type or nearest base class in :data:`LOSS_FACTORS`, a
    recognized functional loss (:func:`loss_module`); None: the label-free
    :class:`OutputFactor`); a ValueError naming ``loss_fn`` when there is none or its settings
    are not supported."""
    if loss_fn is None:
        return OutputFactor(method)
    loss_fn = loss_module(loss_fn)
    for cls in type(loss_fn).__mro__:
        factor = LOSS_FACTORS.get(cls)
        if factor is not None:
            return factor(loss_fn, method)
    names = ", ".join(f"nn.{c.__name__}" for c in LOSS_FACTORS)
    funcs = ", ".join(f"F.{f.__name__}" for f in FUNCTIONAL_LOSSES)
    got = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise ValueError(
        f"loss_fn: method {method!r} supports {names}, the functionals {funcs} (bare or as "
        f"functools.partial with keyword arguments) and loss_fn=None (label-free), got {got} "
        "(a lambda or wrapper cannot be read: pass the loss module); use method='fisher' or "
        "'hutchinson' for other losses"
    )


def check_scalar_loss(loss: Any) -> Any:
    """``loss`` when it is a one-element tensor (or a number); a ValueError naming ``loss_fn``
    otherwise (e.g. ``reduction='none'``)."""
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar batch loss, got a tensor of shape {tuple(loss.shape)} "
            "(reduction='none'?); use reduction='sum' or 'mean'")
    return loss


# ---- the per-sample scale of the batch loss ------------------------------------------------------


_IN_BATCH = (
    "{method} needs per-sample losses (the batch loss a sum or mean of losses each computed on "
    "one sample alone); an in-batch loss (contrastive, InfoNCE, anything comparing samples of "
    "a batch) has none. Use method='hutchinson' with reduction='mean' (the Hessian of the batch "
    "loss times the batch size: a batch-level estimate) or loss_fn=None (label-free)")


def _per_sample_losses(loss_fn: Callable, out: Any, targets: Any, B: int, method: str) -> float:
    """The sum of the losses of the samples one by one; a ValueError explaining per-sample
    losses when ``loss_fn`` fails on a batch of one sample."""
    try:
        with torch.no_grad():
            return sum(float(loss_fn(slice_sample(out, s), slice_sample(targets, s)))
                       for s in range(B))
    except (IndexError, RuntimeError, ValueError) as e:
        raise ValueError(f"loss_fn fails on a batch holding one sample ({type(e).__name__}: "
                         f"{e}); " + _IN_BATCH.format(method=method)) from e


def probe_reduction(loss_fn: Callable, out: Any, targets: Any, B: int,
                    method: str = "this method") -> str:
    """'sum' or 'mean': how ``loss_fn`` reduces over the batch, found by comparing the batch
    loss with the losses of its samples one by one (a batch of one is 'sum')."""
    if B == 1:
        return "sum"
    with torch.no_grad():
        total = float(check_scalar_loss(loss_fn(out, targets)))
    parts = _per_sample_losses(loss_fn, out, targets, B, method)
    if math.isclose(parts, total, rel_tol=1e-4, abs_tol=1e-12):
        return "sum"
    if math.isclose(parts, B * total, rel_tol=1e-4, abs_tol=1e-12):
        return "mean"
    raise ValueError(
        "loss_fn: the batch loss is neither the sum nor the mean of the per-sample losses; "
        "pass reduction='sum' or 'mean' explicitly if it is one of them. "
        + _IN_BATCH.format(method=method)
    )


class SampleScale:
    """``scale(out, targets, B)``: the factor (B for a mean, 1 for a sum) that makes
    ``scale * loss_fn(out, targets)`` the sum of the per-sample losses. The reduction is the
    one given, else ``loss_fn.reduction``, else probed on the first batch (and kept). For a
    per-sample method (``per_sample``) the first batch with several samples also checks that a
    ``loss_fn`` other than torch's own losses can be evaluated on one sample (an in-batch loss
    cannot). The label-free loss (``loss_fn`` None) is a sum."""

    def __init__(self, loss_fn: Optional[Callable], reduction: Optional[str] = None,
                 per_sample: bool = False, method: str = "this method"):
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.per_sample = per_sample
        self.method = method
        if getattr(loss_module(loss_fn), "reduction", None) == "none":
            raise ValueError(
                f"loss_fn: reduction='none' gives per-element losses; {method} needs a scalar "
                "batch loss: use reduction='sum' or 'mean'")
        # torch's own losses are per-sample by construction (given their reduction)
        self._checked = loss_fn is None or not per_sample or isinstance(
            loss_module(loss_fn), nn.modules.loss._Loss)

    def __call__(self, out: Any, targets: Any, B: int) -> float:
        if self.loss_fn is None:
            return 1.0
        if self.reduction is None:
            red = getattr(loss_module(self.loss_fn), "reduction", None)
            if red in ("mean", "sum"):
                self.reduction = red
            else:
                self.reduction = probe_reduction(self.loss_fn, out, targets, B, self.method)
                self._checked = True
        if not self._checked and B > 1:
            _per_sample_losses(self.loss_fn, out, targets, B, self.method)
            self._checked = True
        return float(B) if self.reduction == "mean" else 1.0
