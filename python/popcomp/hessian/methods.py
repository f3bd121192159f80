"""The estimators of the Hessian diagonal (fisher, ggn, ggn_mc, hutchinson), one class each,
registered by name in :data:`REGISTRY`.

An estimator is bound to a model and a loss at construction, where it chooses the parameters it
accumulates (``names``) and refuses what it cannot handle; ``update(acc, inputs, targets, B)``
adds one batch to the float32 accumulators ``acc`` (parameter name -> tensor). The accumulator
calls it with autograd enabled, the model in the mode it should run in and the selected
parameters requiring grad. A new method is one subclass of :class:`Method` and one entry.

fisher/ggn/ggn_mc share :class:`ThroughModules`: columns at the model output (the per-sample
loss gradient, or a factor of the per-sample loss Hessian from :mod:`.losses`) are carried to
each accumulated module's output -- by the hand-written :class:`~.chain.Chain` when the model is
a plain Sequential, by autograd (:mod:`.generic`) otherwise -- and reduced there with the
module's input by its reducer (:mod:`.modules`).

Without a loss (``loss_fn=None``, label-free) :data:`LABEL_FREE` picks the estimator of each
method name: the loss factor is the identity (:class:`~.losses.OutputFactor`) and "fisher" is
its sampled form (the empirical Fisher of a loss at its own outputs is zero).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from .._model import call_model, output_tensor
from .chain import Chain
from .generic import backprop_columns, record
from .losses import LossFactor, SampleScale, check_scalar_loss, loss_factor
from .modules import FilterFn, Site, asked_params, select_sites

__all__ = ["LABEL_FREE", "REGISTRY", "Fisher", "GGN", "GGNMC", "Hutchinson", "Method",
           "NonFiniteBatch", "Options", "ThroughModules"]

Acc = Dict[str, torch.Tensor]


class NonFiniteBatch(ValueError):
    """The model output or the loss is NaN/Inf on a batch: the diagonal would be NaN. Raised
    from checks on output-sized values only; the accumulator then names the cause (the data,
    or the model)."""


def _finite(v: float, what: str) -> None:
    if not math.isfinite(v):
        raise NonFiniteBatch(what)


@dataclass(frozen=True)
class Options:
    """The accumulator's validated settings (each method reads the ones it uses)."""

    reduction: Optional[str] = None  # how loss_fn reduces over the batch; None: read or probe
    num_probes: int = 1  # hutchinson: Rademacher probes per batch
    mc_samples: int = 1  # ggn_mc: sampled columns per sample
    seed: Optional[int] = None  # of the probes / sampled labels
    max_columns: int = 4096  # ggn: limit on the loss-factor columns per sample
    filter_fn: Optional[FilterFn] = None  # filter_fn(module, name): the modules accumulated
    output_fn: Optional[Callable[[Any], Any]] = None  # model output -> what the loss sees


class Method:
    """Base of the estimators; ``names`` are the parameters it accumulates. ``loss_fn`` None
    is the label-free loss (the output-preserving Gauss-Newton, :mod:`popcomp.hessian`)."""

    name = ""
    per_sample = True  # the estimate needs per-sample losses
    needs_tensor = False  # the loss must see one tensor (else a structured output may pass)

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable], params: Optional[List[str]],
                 opts: Options):
        self.model, self.loss_fn, self.opts = model, loss_fn, opts
        self.scale = SampleScale(loss_fn, opts.reduction, per_sample=self.per_sample,
                                 method=f"method {self.name!r}")
        self._gen: Dict[torch.device, torch.Generator] = {}
        self.names: List[str] = []

    def output(self, out: Any) -> Any:
        """What the loss sees of the model's output ``out``: ``output_fn(out)``, else
        :func:`popcomp._model.output_tensor` (a structured output passes unchanged to a loss
        that may take it, for methods that do not need one tensor)."""
        fn = self.opts.output_fn
        if fn is not None:
            o = fn(out)
            if self.needs_tensor and not isinstance(o, torch.Tensor):
                raise TypeError(f"output_fn must return a tensor for method {self.name!r} "
                                f"{'without a loss ' if self.loss_fn is None else ''}"
                                f"(got {type(o).__name__})")
            return o
        if isinstance(out, torch.Tensor):
            return out
        try:
            return output_tensor(out, "output_fn")
        except TypeError:
            if self.needs_tensor:
                raise
            return out

    def forward(self, inputs: Any) -> Any:
        """The model on ``inputs`` (:func:`popcomp._model.call_model`), through :meth:`output`."""
        return self.output(call_model(self.model, inputs))

    def warning(self) -> Optional[str]:
        """Why the estimate so far may not be what the user wants (None: no reason)."""
        return None

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded with ``opts.seed`` (random when None)."""
        g = self._gen.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.opts.seed is None:
                g.seed()
            else:
                g.manual_seed(int(self.opts.seed))
            self._gen[device] = g
        return g

    def update(self, acc: Acc, inputs: Any, targets: Any, B: int) -> None:
        raise NotImplementedError


class ThroughModules(Method):
    """Columns at the model output, carried to the accumulated modules and reduced there."""

    def __init__(self, model, loss_fn, params, opts):
        super().__init__(model, loss_fn, params, opts)
        self.sites, self.names = select_sites(model, params, self.name, opts.filter_fn)
        # the chain runs the model by hand: only when the loss sees its output as is
        self.chain = None if opts.output_fn is not None else Chain.build(model, self.sites)
        self._bound: Optional[Acc] = None  # the accumulators _site_acc was built for
        self._site_acc: Dict[str, Acc] = {}
        self._batched = True  # the columns' vmapped backward works (generic path)
        # BatchNorms: in training mode they couple the samples (checked per batch)
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()  # recorded inputs may require grad: the accumulators must not
    def _reduce(self, site: Site, pairs: Sequence[Tuple[Any, torch.Tensor]], acc: Acc) -> None:
        if acc is not self._bound:
            self._site_acc = {s.name: s.accumulators(acc) for s in self.sites}
            self._bound = acc
        site.reducer(site.module, pairs, self._site_acc[site.name])

    def output_columns(self, out: torch.Tensor, targets: Any, B: int) -> Optional[torch.Tensor]:
        """The columns (R, *out.shape) to backpropagate from the model output; None when there
        is nothing to backpropagate."""
        raise NotImplementedError

    def layer_grads(self, out: Any, targets: Any, B: int, layer_outs: List[torch.Tensor]
                    ) -> List[Optional[torch.Tensor]]:
        """The columns (R, *layer_out.shape) at each recorded module output (generic path)."""
        cols = self.output_columns(out, targets, B)
        if cols is None:
            return [None] * len(layer_outs)
        grads, self._batched = backprop_columns([out], layer_outs, [cols], batched=self._batched)
        return grads

    def update(self, acc, inputs, targets, B):
        if self.chain is not None and self.chain.ready(inputs):
            out, saved = self.chain.forward(inputs)
            cols = self.output_columns(out, targets, B)
            if cols is not None:
                for site, inp, g in self.chain.backprop(saved, cols):
                    self._reduce(site, [(inp, g)], acc)
            return
        watch = [m for m in self._norms if m.training or m.running_mean is None]
        out, calls = record(self.forward, inputs, self.sites, watch)
        layer_outs = [o for _, pairs in calls for _, o in pairs]
        if not layer_outs:
            return
        grads = iter(self.layer_grads(out, targets, B, layer_outs))
        for site, pairs in calls:
            got = [(x, g) for (x, _), g in zip(pairs, grads) if g is not None]
            if got:
                self._reduce(site, got, acc)


class Fisher(ThroughModules):
    """sum_s (d l_s / d w)^2, exact: the per-sample gradients at each module's output combined
    with its input by the fused op, never materializing per-sample parameter gradients."""

    name = "fisher"
    # all loss gradients at the output below this fraction of the output: "zero" Fisher
    zero_ratio = 1e-6

    def __init__(self, model, loss_fn, params, opts):
        super().__init__(model, loss_fn, params, opts)
        self._gmax = 0.0  # max |d l_s / d out| seen
        self._omax = 0.0  # max |out| seen

    def _track(self, out: torch.Tensor, g: Optional[torch.Tensor]) -> None:
        om = float(out.detach().abs().max()) if out.numel() else 0.0
        _finite(om, "the model output")
        self._omax = max(self._omax, om)
        if g is not None and g.numel():
            gm = float(g.abs().max())
            _finite(gm, "the loss gradient")
            self._gmax = max(self._gmax, gm)

    def output_columns(self, out, targets, B):
        with torch.enable_grad():
            o = out.detach().requires_grad_()
            loss = check_scalar_loss(self.loss_fn(o, targets)) * self.scale(o, targets, B)
            g = torch.autograd.grad(loss, o)[0]
        self._track(out, g)
        return g.unsqueeze(0)

    def layer_grads(self, out, targets, B, layer_outs):
        # from the loss itself: the model output need not be one tensor
        loss = check_scalar_loss(self.loss_fn(out, targets))
        _finite(float(loss.detach()), "the loss")
        scale = self.scale(out, targets, B)
        at_out = isinstance(out, torch.Tensor) and out.requires_grad
        grads = torch.autograd.grad(loss * scale, list(layer_outs) + ([out] if at_out else []),
                                    allow_unused=True)
        if at_out:
            self._track(out, grads[-1])
            grads = grads[:-1]
        return [None if g is None else g.unsqueeze(0) for g in grads]

    def warning(self):
        if self._omax > 0 and self._gmax <= self.zero_ratio * self._omax:
            return (f"hessian: the fisher diagonal is (nearly) zero: the per-sample loss "
                    f"gradients at the model output are all tiny (max |dl/dout| = "
                    f"{self._gmax:.3g}, max |out| = {self._omax:.3g}), as for a loss whose "
                    "targets are the model's own outputs (e.g. MSE to the original embedding); "
                    "the empirical Fisher then carries no sensitivity. For 'keep the outputs "
                    "unchanged' use loss_fn=None (the label-free Gauss-Newton diag(J^T J)), or "
                    "method='ggn' / 'ggn_mc'")
        return None


class GGN(ThroughModules):
    """Exact diagonal of the generalized Gauss-Newton matrix sum_s J_s^T H_s J_s: the columns
    of a square root of each H_s (:mod:`.losses`) backpropagated and reduced."""

    name = "ggn"
    needs_tensor = True
    wide = 256  # columns per sample above which the exact GGN warns about its cost

    def __init__(self, model, loss_fn, params, opts):
        super().__init__(model, loss_fn, params, opts)
        self.factor: LossFactor = loss_factor(loss_fn, self.name)
        self._warned = False

    def output_columns(self, out, targets, B):
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"model: method {self.name!r} needs the model to return a single tensor "
                "(pass output_fn= to pick it)")
        self.scale(out, targets, B)  # the per-sample check on the first batch
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteBatch("the model output")
        cols = self.columns(out.detach(), targets)
        return cols if cols.shape[0] > 0 else None  # none: CrossEntropy of one class (zero Hessian)

    def columns(self, out: torch.Tensor, targets: Any) -> torch.Tensor:
        R = self.factor.num_columns(out)
        label_free = "loss_fn=None with " if self.loss_fn is None else ""
        if R > self.opts.max_columns:
            raise ValueError(
                f"method 'ggn' needs {R} backpropagated columns per sample (outputs per sample), "
                f"more than max_columns={self.opts.max_columns}; use {label_free}"
                "method='ggn_mc' (mc_samples columns per sample) or raise max_columns"
            )
        if R > self.wide and not self._warned:
            self._warned = True
            warnings.warn(
                f"hessian: method 'ggn' backpropagates {R} columns per sample (one per output "
                f"of a sample), about {R} backward passes each; {label_free}method='ggn_mc' "
                "estimates the same diagonal from mc_samples sampled columns per sample, at a "
                "cost independent of the output width", stacklevel=5)
        return self.factor.exact(out, targets)


class GGNMC(GGN):
    """Monte-Carlo GGN: ``mc_samples`` columns per sample drawn from the model's predictive
    distribution (sampled labels), an unbiased estimate of ``ggn``."""

    name = "ggn_mc"

    def columns(self, out, targets):
        return self.factor.sampled(out, targets, self.opts.mc_samples, self.generator(out.device))


class Hutchinson(Method):
    """E[z * (H z)] with Rademacher probes z, for any differentiable model and any parameter
    (the Hessian of sum_s l_s); the probes of a batch go through one vmapped double backward
    per chunk of ``probe_chunk`` where the graph allows it."""

    name = "hutchinson"
    per_sample = False  # the Hessian of the batch loss: any loss
    probe_chunk = 64

    def __init__(self, model, loss_fn, params, opts):
        super().__init__(model, loss_fn, params, opts)
        named = dict(model.named_parameters())
        self.names = asked_params(model, params, opts.filter_fn)  # any module type
        self._params = [named[n] for n in self.names]
        self._batched = True  # the probes' vmapped double backward works

    def update(self, acc, inputs, targets, B):
        # fused attention kernels (flash / memory-efficient SDPA) have no double backward: the
        # forward runs scaled_dot_product_attention on its math kernel
        with _math_attention():
            self._update(acc, inputs, targets, B)

    def _update(self, acc, inputs, targets, B):
        out = self.forward(inputs)
        if self.loss_fn is None:  # 0.5 ||f - f0||^2 at f = f0: its Hessian is exactly J^T J
            if not isinstance(out, torch.Tensor):
                raise TypeError("output_fn: the label-free loss needs one output tensor")
            loss = 0.5 * (out - out.detach()).float().square().sum()
        else:
            loss = check_scalar_loss(self.loss_fn(out, targets)) * self.scale(out, targets, B)
        _finite(float(loss.detach()), "the loss")
        grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        pairs = [(n, p, g) for n, p, g in zip(self.names, self._params, grads)
                 if g is not None and g.requires_grad]
        if not pairs:
            return
        ps = [p for _, p, _ in pairs]
        gs = [g for _, _, g in pairs]
        left = self.opts.num_probes
        while left > 0:
            n = min(left, self.probe_chunk)
            left -= n
            zs = []
            for p in ps:
                z = torch.randint(0, 2, (n, *p.shape), generator=self.generator(p.device),
                                  device=p.device, dtype=p.dtype)  # no int64 copy
                zs.append(z.mul_(2).sub_(1))
            # all probes of the chunk in one vmapped double backward where the graph allows it
            hz, self._batched = backprop_columns(gs, ps, zs, retain_graph=left > 0,
                                                 batched=self._batched)
            for (name, _, _), z, h in zip(pairs, zs, hz):
                if h is not None:  # summed in the accumulator's dtype (float64 stays float64)
                    a = acc[name]
                    a.add_(torch.sum(z * h, 0, dtype=a.dtype), alpha=1.0 / self.opts.num_probes)


def _math_attention():
    """A context running scaled_dot_product_attention on its math kernel (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


REGISTRY: Dict[str, Type[Method]] = {c.name: c for c in (Fisher, GGN, GGNMC, Hutchinson)}

# the estimator of each method without a loss (loss_fn=None): the empirical Fisher of the
# label-free loss is zero at f = f0, so "fisher" is its sampled Fisher, the ggn_mc probes
LABEL_FREE: Dict[str, Type[Method]] = {"fisher": GGNMC, "ggn": GGN, "ggn_mc": GGNMC,
                                       "hutchinson": Hutchinson}
