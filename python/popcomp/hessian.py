"""Diagonal of the loss Hessian over calibration data (the sensitivities of HW / DRHW K-means).

    h = popcomp.hessian.diagonal(model, loss_fn, loader, method="fisher")
    h["fc1.weight"]          # float32, shaped like the parameter, summed over samples
    h.num_samples            # how many samples were seen; h.mean() divides by it

A sample's loss l_s is what ``loss_fn`` returns for a batch holding that sample alone; with a
"mean" reduction the batch loss is (1/B) sum_s l_s and the per-sample quantities are rescaled
accordingly (detected from ``loss_fn.reduction``, or by probing the first batch). The model is
evaluated in eval mode (no dropout noise, BatchNorm on its running statistics; each module's
mode is restored after every batch) unless ``eval_mode=False``.

Methods
  fisher      sum_s (d l_s / d w)^2, exact, without materializing per-sample gradients: the
              gradients w.r.t. each layer's output are combined with its input by the fused op
              ``popcomp::sumsq_outer_acc`` (Linear, Conv1d/Conv2d on unfolded patches, Embedding).
  ggn         exact diagonal of the generalized Gauss-Newton matrix sum_s J_s^T H_s J_s for
              nn.MSELoss, nn.CrossEntropyLoss and nn.BCEWithLogitsLoss: the columns of a square
              root of H_s (C - 1 per position for CrossEntropy) are backpropagated and reduced
              by the same op.
  ggn_mc      Monte-Carlo GGN: ``mc_samples`` columns per sample drawn from the model's
              predictive distribution (sampled labels), an unbiased estimate of ``ggn``.
  hutchinson  E[z * (H z)] with Rademacher probes z, for any differentiable model and any
              parameter (the Hessian of sum_s l_s).

fisher/ggn/ggn_mc backpropagate their columns by hand, without autograd, through Sequentials
of Linear/Conv layers and elementwise layers (``_Chain``), and with (vmapped) autograd through
any other model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ops  # noqa: F401  (registers popcomp::sumsq_outer_acc)

__all__ = ["diagonal", "HessianAccumulator", "HessianDiagonal", "METHODS", "SUPPORTED_MODULES"]

METHODS = ("fisher", "ggn", "ggn_mc", "hutchinson")
SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_GGN_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class HessianDiagonal(dict):
    """parameter name -> float32 tensor shaped like the parameter (a sum over samples).

    ``num_samples`` is the number of samples accumulated; ``mean()`` returns the per-sample
    average as a new mapping."""

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

    def __repr__(self) -> str:
        return (f"HessianDiagonal(method={self.method!r}, num_samples={self.num_samples}, "
                f"params={list(self.keys())})")


# ---------------------------------------------------------------------------------------------
# helpers
def _as_op_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _OP_DTYPES else t.float()


def _sumsq(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2, g (B,R,T,out), x (B,T,in)."""
    torch.ops.popcomp.sumsq_outer_acc(acc, _as_op_dtype(g), _as_op_dtype(x))


def _bias_sumsq(g: torch.Tensor) -> torch.Tensor:
    """sum_b sum_r (sum_t g[b,r,t,o])^2 for g (B, R, T, out), reduced in g's memory order."""
    s = g.transpose(0, 1)  # (R, B, T, out): usually the contiguous order
    s = s[:, :, 0] if s.shape[2] == 1 else s.sum(2)
    s = s.reshape(-1, s.shape[-1]).float()
    return (s.new_ones(1, s.shape[0]) @ (s * s))[0]  # a GEMV: much faster than a column sum


def _module_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _to(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batch_size(inputs, targets) -> int:
    for obj in (inputs, targets):
        if isinstance(obj, torch.Tensor) and obj.dim() > 0:
            return int(obj.shape[0])
        if isinstance(obj, (list, tuple)):
            for o in obj:
                if isinstance(o, torch.Tensor) and o.dim() > 0:
                    return int(o.shape[0])
    raise ValueError("data: cannot find the batch size (no tensor with a leading batch dimension)")


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool = True):
    """Run the block with every module of ``model`` in eval mode (no dropout noise, BatchNorm on
    its running statistics and not updating them); each module's own mode is restored after."""
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def _call(model, inputs):
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _split_batch(batch) -> Tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"data must yield (input, target) pairs, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _slice_sample(obj, s: int):
    if isinstance(obj, torch.Tensor):
        return obj[s : s + 1]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice_sample(o, s) for o in obj)
    return obj


def _is_supported(mod: nn.Module) -> bool:
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in SUPPORTED_MODULES)


class _Record:
    __slots__ = ("inp", "out", "inp_version", "out_version")

    def __init__(self, inp, out):
        self.inp, self.out = inp, out
        self.inp_version = inp._version if isinstance(inp, torch.Tensor) else 0
        self.out_version = out._version


# ---------------------------------------------------------------------------------------------
# Elementwise layers of a chain: the columns are multiplied by the derivative, which autograd
# gives for all units at once (BatchNorm1d is elementwise on running statistics in eval mode).
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.Sigmoid, nn.LogSigmoid,
                nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.BatchNorm1d)
_PASS = (nn.Identity, nn.Dropout, nn.Flatten)  # Dropout: in eval mode (or p = 0) only


def _own_forward(m: nn.Module, classes) -> bool:
    return any(isinstance(m, c) and type(m).forward is c.forward for c in classes)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


class _Chain:
    """An nn.Sequential (nested ones flattened) of Linear and Conv1d/Conv2d layers, elementwise
    activations, Flatten, Identity and inactive Dropout, run without autograd for
    fisher/ggn/ggn_mc.

    The forward pass keeps each Linear/Conv layer's input and each elementwise layer's
    derivative; the columns at the output are then backpropagated by hand (one GEMM or input
    gradient of a convolution per layer, one product per activation) down to the output of the
    lowest accumulated layer and never further: no parameter gradients, no autograd graph, no
    vmap. Anything else (skip connections, pooling, hooks, active dropout, ...) takes the
    generic autograd path."""

    def __init__(self, layers, containers, accumulated, stop):
        self.layers = layers  # [(name, module)], input to output
        self.containers = containers
        self.accumulated = accumulated  # names of the layers whose parameters are summed
        self.stop = stop  # index of the lowest accumulated layer

    @classmethod
    def build(cls, model: nn.Module, modules) -> Optional["_Chain"]:
        layers: List[Tuple[str, nn.Module]] = []
        containers: List[nn.Module] = []

        def walk(prefix, mod) -> bool:
            if isinstance(mod, nn.Sequential):
                if type(mod).forward is not nn.Sequential.forward:
                    return False
                containers.append(mod)
                # what Sequential.forward runs (named_children would skip a repeated module)
                return all(c is not None and walk(f"{prefix}.{n}" if prefix else n, c)
                           for n, c in mod._modules.items())
            layers.append((prefix, mod))
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
                mod.padding_mode != "zeros" or isinstance(mod.padding, str)
            ):
                return False
            return _own_forward(mod, (nn.Linear, nn.Conv1d, nn.Conv2d) + _ELEMENTWISE + _PASS)

        if not walk("", model):
            return None
        mods = [m for _, m in layers]
        if len({id(m) for m in mods}) != len(mods):  # a layer used twice: parameters shared
            return None
        if any(isinstance(m, nn.Flatten) and m.start_dim < 1 for m in mods):
            return None  # may flatten into the batch dimension
        accumulated = {mn for mn, _ in modules}
        idx = [i for i, (n, m) in enumerate(layers) if n in accumulated]
        if not idx or any(not isinstance(layers[i][1], (nn.Linear, nn.Conv1d, nn.Conv2d))
                          for i in idx):
            return None
        return cls(layers, containers, accumulated, idx[0])

    def ready(self, inputs) -> bool:
        """Whether this batch can take the chain (else the generic path)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            return False
        from torch.nn.modules import module as _m

        if any(getattr(_m, f"_global_{k}_hooks", None) for k in ("forward", "forward_pre",
                                                                 "backward", "backward_pre")):
            return False
        if any(_has_hooks(c) for c in self.containers) or any(_has_hooks(m) for _, m in self.layers):
            return False
        return not any((isinstance(m, nn.Dropout) and m.training and m.p > 0) or (
            isinstance(m, nn.BatchNorm1d) and (m.training or m.running_mean is None))
            for _, m in self.layers)  # BatchNorm on batch statistics is not elementwise

    def forward(self, x: torch.Tensor):
        """The output, and per layer what its backprop needs (Conv and accumulated Linear: its
        input, elementwise: the derivative, Flatten: the input shape)."""
        saved: List[Any] = [None] * len(self.layers)
        with torch.no_grad():
            for i, (name, m) in enumerate(self.layers):
                if i > self.stop and isinstance(m, _ELEMENTWISE):
                    x, saved[i] = self._derivative(m, x)
                    continue
                if isinstance(m, nn.Flatten):
                    saved[i] = x.shape
                elif name in self.accumulated or isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    saved[i] = x
                x = m(x)
        return x, saved

    @staticmethod
    def _derivative(m: nn.Module, x: torch.Tensor):
        """The output of the elementwise layer m and its derivative at x (ReLU: a mask)."""
        if type(m) is nn.ReLU:
            y = m(x)
            return y, y > 0
        with torch.enable_grad():
            xi = x.detach().requires_grad_()
            y = m(xi.clone() if getattr(m, "inplace", False) else xi)
            return y.detach(), torch.autograd.grad(y, xi, torch.ones_like(y))[0]

    def backprop(self, saved, cols: torch.Tensor):
        """Yields (name, module, input, columns at its output (R, B, ...)) for each accumulated
        layer, from the output down."""
        z, fresh = cols, False  # cols may alias a caller's tensor (a loss gradient): no in place
        for i in range(len(self.layers) - 1, self.stop - 1, -1):
            name, m = self.layers[i]
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                if name in self.accumulated:
                    yield name, m, saved[i], z
                if i == self.stop:
                    break
                fresh = True
                if isinstance(m, nn.Linear):
                    z = z @ m.weight.detach()
                else:  # the R columns of the B samples as one batch of R * B inputs
                    x = saved[i]
                    zz = z.reshape(-1, *z.shape[2:])
                    grad = (torch.nn.grad.conv1d_input if isinstance(m, nn.Conv1d)
                            else torch.nn.grad.conv2d_input)
                    zz = grad((zz.shape[0], *x.shape[1:]), m.weight.detach(), zz, m.stride,
                              m.padding, m.dilation, m.groups)
                    z = zz.reshape(z.shape[0], *x.shape)
            elif isinstance(m, _ELEMENTWISE):
                z, fresh = (z.mul_(saved[i]) if fresh else z * saved[i]), True
            elif isinstance(m, nn.Flatten):
                z = z.reshape(z.shape[0], *saved[i])


# ---------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Streaming accumulator of the Hessian diagonal of ``loss_fn(model(input), target)``.

    ``update(input, target)`` adds one batch, ``accumulate(data)`` a whole iterable (with a
    tqdm progress bar), ``result()`` returns the sums so far (all-reduced over ranks when
    torch.distributed is initialized) while the accumulator can keep going.

    Args:
      model, loss_fn: the network and a loss ``loss_fn(output, target) -> scalar``.
      method: "fisher", "ggn", "ggn_mc" or "hutchinson".
      params: names of the parameters to accumulate (default: all parameters of the supported
        modules for fisher/ggn/ggn_mc, all trainable parameters for hutchinson).
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
        loss_fn: Callable,
        method: str = "fisher",
        *,
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
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable (output, target) -> scalar loss")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if reduction not in (None, "mean", "sum"):
            raise ValueError(f"reduction must be None, 'mean' or 'sum', got {reduction!r}")
        if not isinstance(eval_mode, bool):
            raise TypeError(f"eval_mode must be a bool, got {type(eval_mode).__name__}")
        from ._validate import check_int

        self.num_probes = check_int("num_probes", num_probes, lo=1)
        self.mc_samples = check_int("mc_samples", mc_samples, lo=1)
        self.max_columns = check_int("max_columns", max_columns, lo=1)
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.eval_mode = eval_mode
        self._reduction = reduction
        self._seed = seed
        self._gen: Dict[torch.device, torch.Generator] = {}
        self._vmap_ok = True
        self._probe_chunk = 64
        self.num_samples = 0

        named = dict(model.named_parameters())
        if params is not None:
            params = list(params)
            missing = [p for p in params if p not in named]
            if missing:
                raise ValueError(f"params: no parameters named {missing} in the model")
        if method == "hutchinson":
            names = params if params is not None else [n for n, p in named.items() if p.requires_grad]
            self._names = list(names)
            self._modules: List[Tuple[str, nn.Module]] = []
        else:
            self._setup_modules(model, named, params)
        if not self._names:
            raise ValueError("params: nothing to accumulate (the model has no selected parameters)")
        self._params = [named[n] for n in self._names]
        self._chain = None if method == "hutchinson" else _Chain.build(model, self._modules)
        self._acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                     for n, p in zip(self._names, self._params)}
        if method in ("ggn", "ggn_mc"):
            if not isinstance(loss_fn, _GGN_LOSSES):
                raise ValueError(
                    f"loss_fn: method {method!r} supports nn.MSELoss, nn.CrossEntropyLoss and "
                    f"nn.BCEWithLogitsLoss, got {type(loss_fn).__name__}; use method='fisher' "
                    "or 'hutchinson' for other losses"
                )
            if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
                raise ValueError("loss_fn: CrossEntropyLoss with class weights is not supported by ggn")
            if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
                loss_fn.weight is not None or loss_fn.pos_weight is not None
            ):
                raise ValueError("loss_fn: BCEWithLogitsLoss with weight/pos_weight is not supported by ggn")
            if loss_fn.reduction not in ("mean", "sum"):
                raise ValueError("loss_fn: reduction='none' is not supported; use 'mean' or 'sum'")

    # -- module bookkeeping --------------------------------------------------------------------
    def _setup_modules(self, model, named, params):
        owner: Dict[int, str] = {}
        unsupported = []
        modules = []
        seen_param: Dict[int, str] = {}
        for mname, mod in model.named_modules():
            own = [(pn, p) for pn, p in mod.named_parameters(recurse=False)]
            if not own:
                continue
            full = [f"{mname}.{pn}" if mname else pn for pn, _ in own]
            if _is_supported(mod):
                if isinstance(mod, nn.Embedding) and (mod.scale_grad_by_freq or mod.max_norm is not None):
                    unsupported.append(f"{mname} (Embedding with scale_grad_by_freq/max_norm)")
                    continue
                modules.append((mname, mod))
                for (pn, p), fn in zip(own, full):
                    if id(p) in seen_param:
                        raise ValueError(
                            f"model: parameter {fn} is shared with {seen_param[id(p)]}; "
                            f"method {self.method!r} needs each parameter in one module, use "
                            "method='hutchinson'"
                        )
                    seen_param[id(p)] = fn
                    owner[id(p)] = mname
            else:
                sel = [fn for (pn, p), fn in zip(own, full)
                       if (params is None and p.requires_grad) or (params is not None and fn in params)]
                if sel:
                    unsupported.append(f"{mname or '<root>'} ({type(mod).__name__})")
        if unsupported:
            raise ValueError(
                f"model: method {self.method!r} handles {', '.join(c.__name__ for c in SUPPORTED_MODULES)} "
                f"(with parameter-free activations and containers), but these modules have "
                f"parameters it cannot handle: {', '.join(unsupported)}. Use method='hutchinson', "
                "freeze them (requires_grad=False), or restrict params=."
            )
        names = []
        for mname, mod in modules:
            for pn, p in mod.named_parameters(recurse=False):
                fn = f"{mname}.{pn}" if mname else pn
                if fn not in named:  # shared elsewhere under another name
                    continue
                if params is None or fn in params:
                    names.append(fn)
        if params is not None:
            bad = [p for p in params if p not in names]
            if bad:
                raise ValueError(f"params: {bad} do not belong to modules supported by {self.method!r}")
        keep = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        self._modules = [(mn, m) for mn, m in modules if mn in keep]
        self._names = names

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._gen.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(int(self._seed))
            self._gen[device] = g
        return g

    # -- reduction: per-sample loss = scale * (contribution to the batch loss) ------------------
    def _scale(self, out, targets, B: int) -> float:
        red = self._reduction
        if red is None:
            red = getattr(self.loss_fn, "reduction", None)
            if red not in ("mean", "sum"):
                red = self._probe(out, targets, B)
            self._reduction = red
        return float(B) if red == "mean" else 1.0

    def _probe(self, out, targets, B: int) -> str:
        if B == 1:
            return "sum"
        with torch.no_grad():
            total = float(self.loss_fn(out, targets))
            parts = sum(float(self.loss_fn(_slice_sample(out, s), _slice_sample(targets, s)))
                        for s in range(B))
        if math.isclose(parts, total, rel_tol=1e-4, abs_tol=1e-12):
            return "sum"
        if math.isclose(parts, B * total, rel_tol=1e-4, abs_tol=1e-12):
            return "mean"
        raise ValueError(
            "loss_fn: the batch loss is neither the sum nor the mean of the per-sample losses; "
            "pass reduction='sum' or 'mean' explicitly"
        )

    # -- public --------------------------------------------------------------------------------
    def update(self, inputs, targets) -> None:
        """Add one batch (inputs, targets) to the accumulators."""
        device = _module_device(self.model)
        inputs, targets = _to(inputs, device), _to(targets, device)
        B = _batch_size(inputs, targets)
        if B == 0:
            return
        flags = [p.requires_grad for p in self._params]
        try:
            for p in self._params:
                p.requires_grad_(True)
            with torch.enable_grad(), _eval_mode(self.model, self.eval_mode):
                if self.method == "hutchinson":
                    self._update_hutchinson(inputs, targets, B)
                else:
                    self._update_exact(inputs, targets, B)
        finally:
            for p, f in zip(self._params, flags):
                p.requires_grad_(f)
        self.num_samples += B

    def accumulate(self, data: Iterable, progress: bool = True) -> "HessianAccumulator":
        """Add every (input, target) batch of ``data``; a tqdm bar shows the progress."""
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
        it = data
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(data, total=total, desc=f"hessian ({self.method})", unit="batch",
                      leave=False)
        for batch in it:
            x, y = _split_batch(batch)
            self.update(x, y)
        return self

    def result(self, mean: bool = False, all_reduce: bool = True) -> HessianDiagonal:
        """The accumulated diagonal (copies), summed over ranks when torch.distributed is
        initialized (and ``all_reduce``); ``mean=True`` divides by the sample count."""
        acc = {n: t.clone() for n, t in self._acc.items()}
        count = self.num_samples
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed as dist

            names = sorted(acc)
            flat = torch.cat([acc[n].reshape(-1) for n in names]) if names else None
            dev = flat.device if flat is not None else torch.device("cpu")
            if dist.get_backend() == "nccl" and dev.type != "cuda":
                dev = torch.device("cuda", torch.cuda.current_device())
            cnt = torch.tensor([float(count)], dtype=torch.float64, device=dev)
            dist.all_reduce(cnt)
            count = int(round(cnt.item()))
            if flat is not None:
                f = flat.to(dev)
                dist.all_reduce(f)
                f = f.to(flat.device)
                off = 0
                for n in names:
                    k = acc[n].numel()
                    acc[n] = f[off : off + k].view_as(acc[n]).clone()
                    off += k
        res = HessianDiagonal(acc, count, self.method)
        return res.mean() if mean else res

    def reset(self) -> None:
        for t in self._acc.values():
            t.zero_()
        self.num_samples = 0

    # -- hutchinson ----------------------------------------------------------------------------
    def _update_hutchinson(self, inputs, targets, B):
        out = _call(self.model, inputs)
        loss = self.loss_fn(out, targets) * self._scale(out, targets, B)
        grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        pairs = [(n, p, g) for n, p, g in zip(self._names, self._params, grads)
                 if g is not None and g.requires_grad]
        if not pairs:
            return
        ps = [p for _, p, _ in pairs]
        gs = [g for _, _, g in pairs]
        left = self.num_probes
        while left > 0:
            n = min(left, self._probe_chunk)
            left -= n
            last = left == 0
            zs = []
            for p in ps:
                gen = self._generator(p.device)
                z = torch.randint(0, 2, (n, *p.shape), generator=gen, device=p.device).to(p.dtype)
                zs.append(z.mul_(2).sub_(1))
            hz = None
            if n > 1 and self._vmap_ok:
                try:  # all probes of the chunk in one vmapped double-backward
                    hz = torch.autograd.grad(gs, ps, zs, retain_graph=not last, allow_unused=True,
                                             is_grads_batched=True)
                except RuntimeError:
                    self._vmap_ok = False
            if hz is None:
                cols: List[List[Optional[torch.Tensor]]] = [[] for _ in ps]
                for j in range(n):
                    hj = torch.autograd.grad(gs, ps, [z[j] for z in zs],
                                             retain_graph=not (last and j == n - 1),
                                             allow_unused=True)
                    for c, h in zip(cols, hj):
                        c.append(h)
                hz = [None if c[0] is None else torch.stack(c) for c in cols]
            for (name, _, _), z, h in zip(pairs, zs, hz):
                if h is not None:
                    self._acc[name].add_((z * h).float().sum(0), alpha=1.0 / self.num_probes)

    # -- fisher / ggn / ggn_mc -----------------------------------------------------------------
    def _update_exact(self, inputs, targets, B):
        if self._chain is not None and self._chain.ready(inputs):
            out, saved = self._chain.forward(inputs)
            cols = self._output_columns(out, targets, B)
            if cols is not None:
                for mn, m, inp, g in self._chain.backprop(saved, cols):
                    self._accumulate_module(mn, m, [(inp, g)])
            return
        records = self._forward(inputs, targets, safe=False)
        if records is None:  # an output/input was modified in place: rerun with copies
            records = self._forward(inputs, targets, safe=True)
        out, recs = records
        mods = [(mn, m) for mn, m in self._modules if recs.get(mn)]
        layer_outs = [r.out for mn, _ in mods for r in recs[mn]]
        if not layer_outs:
            return
        if self.method == "fisher":  # from the loss itself: the output need not be one tensor
            loss = self.loss_fn(out, targets)
            scale = self._scale(out, targets, B)
            grads = torch.autograd.grad(loss * scale, layer_outs, allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            cols = self._output_columns(out, targets, B)
            if cols is None:
                return
            grads = self._backprop_columns(out, layer_outs, cols)
        k = 0
        for mn, m in mods:
            pairs = []
            for r in recs[mn]:
                pairs.append((r.inp, grads[k]))
                k += 1
            pairs = [(x, g) for x, g in pairs if g is not None]
            if pairs:
                self._accumulate_module(mn, m, pairs)

    def _output_columns(self, out, targets, B) -> Optional[torch.Tensor]:
        """The columns (R, *out.shape) to backpropagate from the model output: the gradient of
        the per-sample losses (fisher), or a square-root factor of the per-sample loss Hessians
        (ggn, ggn_mc); None when there is nothing to backpropagate."""
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model: method {self.method!r} needs the model to return a single tensor")
        if self.method == "fisher":
            with torch.enable_grad():
                o = out.detach().requires_grad_()
                loss = self.loss_fn(o, targets) * self._scale(o, targets, B)
                return torch.autograd.grad(loss, o)[0].unsqueeze(0)
        cols = self._loss_factor(out.detach(), targets)
        return cols if cols.shape[0] > 0 else None  # none: CrossEntropy of one class (zero Hessian)

    def _backprop_columns(self, out, layer_outs, cols):
        if cols.shape[0] == 1:  # one column (ggn_mc with one sample): no vmap needed
            gs = torch.autograd.grad(out, layer_outs, cols[0], allow_unused=True)
            return [None if g is None else g.unsqueeze(0) for g in gs]
        try:
            return list(torch.autograd.grad(out, layer_outs, cols, is_grads_batched=True,
                                            allow_unused=True))
        except RuntimeError:
            # no batching rule somewhere in the graph: one backward per column
            res: List[List[Optional[torch.Tensor]]] = [[] for _ in layer_outs]
            R = cols.shape[0]
            for c in range(R):
                gs = torch.autograd.grad(out, layer_outs, cols[c], retain_graph=c + 1 < R,
                                         allow_unused=True)
                for lst, g in zip(res, gs):
                    lst.append(g)
            return [None if lst[0] is None else torch.stack(lst) for lst in res]

    def _forward(self, inputs, targets, safe: bool):
        recs: Dict[str, List[_Record]] = {mn: [] for mn, _ in self._modules}
        handles = []

        def make_hook(mn):
            def hook(mod, inp, out):
                x = inp[0] if inp else None
                if safe:
                    x = x.detach().clone() if isinstance(x, torch.Tensor) else x
                    out2 = out.clone()
                    recs[mn].append(_Record(x, out))
                    return out2
                recs[mn].append(_Record(x, out))
                return None

            return hook

        try:
            for mn, m in self._modules:
                handles.append(m.register_forward_hook(make_hook(mn)))
            out = _call(self.model, inputs)
        finally:
            for h in handles:
                h.remove()
        if not safe:
            for lst in recs.values():
                for r in lst:
                    if r.out._version != r.out_version or (
                        isinstance(r.inp, torch.Tensor) and r.inp._version != r.inp_version
                    ):
                        return None
        return out, recs

    # -- square-root factors of the per-sample loss Hessians (columns, batched first) ----------
    def _loss_factor(self, out: torch.Tensor, targets) -> torch.Tensor:
        lf = self.loss_fn
        mc = self.method == "ggn_mc"
        M = self.mc_samples
        B = out.shape[0]
        mean = lf.reduction == "mean"
        f = out.float()
        if isinstance(lf, nn.CrossEntropyLoss):
            if f.dim() == 1:
                raise ValueError("model: CrossEntropyLoss needs batched logits (B, C, ...)")
            C = f.shape[1]
            P = int(math.prod(f.shape[2:]))
            p = torch.softmax(f, dim=1).reshape(B, C, P)
            if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
                valid = (targets.reshape(B, P) != lf.ignore_index).to(p.dtype)
            else:
                valid = torch.ones(B, P, dtype=p.dtype, device=p.device)
            w = valid
            if mean:
                w = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
            sw = w.sqrt()  # (B, P)
            if mc:
                gen = self._generator(p.device)
                idx = torch.multinomial(p.permute(0, 2, 1).reshape(-1, C), M, replacement=True,
                                        generator=gen)  # (B*P, M)
                onehot = F.one_hot(idx.t().reshape(M, B, P), C).permute(0, 1, 3, 2).to(p.dtype)
                cols = (p.unsqueeze(0) - onehot) * sw.view(1, B, 1, P) / math.sqrt(M)
                return cols.reshape(M, *out.shape).to(out.dtype)
            # The Hessian diag(p) - p p^T = D (I - q q^T) D with q = sqrt(p), D = diag(q), has rank
            # C - 1: its factor is D U, U = the first C - 1 columns of the Householder reflection
            # I - v v^T / (1 + q_C), v = q + e_C, which maps q to -e_C (so U U^T = I - q q^T):
            # A[j, b, i, p] = q_i (delta_ij - q_j v_i / (1 + q_C)), j < C - 1.
            R = (C - 1) * P
            self._check_columns(R)
            q = p.sqrt()
            v = torch.cat([q[:, :-1], q[:, -1:] + 1], 1)
            coef = (q[:, :-1] / v[:, -1:]).permute(1, 0, 2).unsqueeze(2)  # (C-1, B, 1, P)
            eye = torch.eye(C - 1, C, dtype=p.dtype, device=p.device).view(C - 1, 1, C, 1)
            A = q.unsqueeze(0) * (eye - coef * v.unsqueeze(0))
            A = A * sw.view(1, B, 1, P)
            if P > 1:  # the columns of position p are zero at the other positions
                A = torch.einsum("cbkp,pq->cpbkq", A, torch.eye(P, dtype=p.dtype, device=p.device))
            return A.reshape(R, *out.shape).to(out.dtype)
        n = int(math.prod(f.shape[1:]))
        w = 1.0 / n if mean else 1.0
        if isinstance(lf, nn.MSELoss):
            d = torch.full_like(f, 2.0 * w)
        else:  # BCEWithLogits
            s = torch.sigmoid(f)
            d = s * (1 - s) * w
        d = d.reshape(B, n)
        if mc:
            gen = self._generator(f.device)
            if isinstance(lf, nn.MSELoss):
                eps = torch.randn((M, B, n), generator=gen, device=f.device, dtype=f.dtype)
                cols = eps * d.sqrt()
            else:
                s = s.reshape(B, n)
                y = torch.bernoulli(s.expand(M, B, n), generator=gen)
                cols = (s - y) * math.sqrt(w)
            return (cols / math.sqrt(M)).reshape(M, *out.shape).to(out.dtype)
        self._check_columns(n)
        cols = torch.diag_embed(d.sqrt()).permute(1, 0, 2)  # (n, B, n): cols[j, b, j]
        return cols.reshape(n, *out.shape).to(out.dtype)

    def _check_columns(self, R: int) -> None:
        if R > self.max_columns:
            raise ValueError(
                f"method 'ggn' needs {R} backpropagated columns per sample (outputs per sample), "
                f"more than max_columns={self.max_columns}; use method='ggn_mc' or raise max_columns"
            )

    # -- per-module reduction with the fused op ------------------------------------------------
    @torch.no_grad()  # recorded inputs may require grad: the accumulators must not
    def _accumulate_module(self, mn: str, m: nn.Module, pairs):
        """Add the module's parameters' terms for (input, columns at its output) pairs, one per
        call of the module in the batch; columns are shaped (R, B, ..., out)."""
        pre = f"{mn}." if mn else ""
        wname, bname = pre + "weight", pre + "bias"
        acc_w = self._acc.get(wname)
        acc_b = self._acc.get(bname)
        if isinstance(m, nn.Linear):
            xs, gs = [], []
            for inp, g in pairs:  # g: (R, B, ..., out)
                Rr, Bb = g.shape[0], g.shape[1]
                xs.append(inp.reshape(Bb, -1, m.in_features))
                gs.append(g.reshape(Rr, Bb, -1, m.out_features).permute(1, 0, 2, 3))
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
            g = gs[0] if len(gs) == 1 else torch.cat(gs, 2)
            if acc_w is not None:
                _sumsq(acc_w, g, x)
            if acc_b is not None:
                acc_b.add_(_bias_sumsq(g))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            xs, gs = [], []
            for inp, g in pairs:
                xu, gu = self._unfold_conv(m, inp, g)
                xs.append(xu)
                gs.append(gu)
            x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)  # (B, L, groups, cin_g*kk)
            g = gs[0] if len(gs) == 1 else torch.cat(gs, 2)  # (B, R, L, groups, cout_g)
            G = m.groups
            cout_g = m.out_channels // G
            if acc_w is not None:
                aw = acc_w.view(m.out_channels, -1)
                for gi in range(G):
                    _sumsq(aw[gi * cout_g : (gi + 1) * cout_g], g[..., gi, :], x[..., gi, :])
            if acc_b is not None:
                acc_b.add_(_bias_sumsq(g.flatten(-2)))
        elif isinstance(m, nn.Embedding):
            idx_l, g_l = [], []
            for inp, g in pairs:
                Rr, Bb = g.shape[0], g.shape[1]
                idx_l.append(inp.reshape(Bb, -1))
                g_l.append(g.reshape(Rr, Bb, -1, m.embedding_dim))
            idx = idx_l[0] if len(idx_l) == 1 else torch.cat(idx_l, 1)
            g = g_l[0] if len(g_l) == 1 else torch.cat(g_l, 2)
            Rr, Bb, T, D = g.shape
            V = m.num_embeddings
            b_ix = torch.arange(Bb, device=idx.device).view(Bb, 1).expand(Bb, T)
            keys = (b_ix * V + idx).reshape(-1)
            gf = g.reshape(Rr, Bb * T, D).float()
            if m.padding_idx is not None:
                keep = idx.reshape(-1) != m.padding_idx
                keys, gf = keys[keep], gf[:, keep]
            uk, inv = torch.unique(keys, return_inverse=True)
            sums = torch.zeros(Rr, uk.numel(), D, dtype=torch.float32, device=gf.device)
            sums.index_add_(1, inv, gf)
            if acc_w is not None:
                acc_w.index_add_(0, uk % V, sums.square().sum(0))

    @staticmethod
    def _unfold_conv(m, x, g):
        """Patches (B, L, groups, cin_g*kk) and output grads (B, R, L, groups, cout_g)."""
        Rr, Bb = g.shape[0], g.shape[1]
        one_d = isinstance(m, nn.Conv1d)
        if m.padding_mode == "zeros":
            xp = F.pad(x, m._reversed_padding_repeated_twice)
        else:
            xp = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        if one_d:
            xp = xp.unsqueeze(2)
            ks, dil, st = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        xu = F.unfold(xp, ks, dilation=dil, padding=0, stride=st)  # (B, Cin*kk, L)
        L = xu.shape[-1]
        G = m.groups
        xu = xu.view(Bb, G, -1, L).permute(0, 3, 1, 2)  # (B, L, G, cin_g*kk) strided view
        gu = g.reshape(Rr, Bb, G, m.out_channels // G, L).permute(1, 0, 4, 2, 3)
        return xu, gu


def diagonal(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    method: str = "fisher",
    *,
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
    (input, target) batches), as a mapping parameter name -> float32 tensor shaped like the
    parameter, holding the sum over samples (``mean=True``: divided by ``num_samples``).

    The model is evaluated in eval mode unless ``eval_mode=False`` (each module's mode is
    restored). See the module docstring for the methods; keyword arguments go to
    HessianAccumulator."""
    acc = HessianAccumulator(model, loss_fn, method, params=params, reduction=reduction,
                             num_probes=num_probes, mc_samples=mc_samples, seed=seed,
                             max_columns=max_columns, eval_mode=eval_mode)
    acc.accumulate(data, progress=progress)
    res = acc.result()
    if res.num_samples == 0:
        raise ValueError("data: no samples (the iterable was empty)")
    return res.mean() if mean else res
