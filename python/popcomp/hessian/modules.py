"""Per-module reducers keyed by module type (a module's parameter terms from its inputs and the
columns at its output, through popcomp::sumsq_outer_acc) and the choice of the modules to
accumulate.

Types of optional libraries are keyed by their qualified name in :data:`LAZY_REDUCERS` (no
import of the library): Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear
with the weight stored (in, out)).

A reducer is called with ``pairs``, one (input, columns) pair per call of the module in the
batch, the columns shaped (R, B, ..., out) like R stacked gradients of the module's output, and
``acc``, the accumulators of the module's selected parameters by their own name ("weight",
"bias"): float32, or float64 for a float64 parameter (then every product is formed in float64).
Supporting another module type is adding one :class:`ModuleReducer` to :data:`REDUCERS`.

Which parameters are accumulated (:func:`select_sites`), one rule: the parameters named in
``params=`` when it is given (frozen ones included: naming one asks for it); otherwise the
trainable ones (``requires_grad=True``) of the modules ``filter_fn`` selects (all modules
without it). No work is spent on the others: a module none of whose parameters is asked for is
not accumulated at all, and may be of any type.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import SUMSQ_DTYPES

__all__ = ["LAZY_REDUCERS", "REDUCERS", "ModuleReducer", "Site", "asked_params", "bias_sumsq",
           "reducer_for", "select_sites", "sumsq"]

Pairs = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def acc_dtype(p: torch.Tensor) -> torch.dtype:
    """The accumulator dtype of parameter ``p`` (and the dtype the loss factors of a model
    output ``p`` are computed in): float64 for float64, else float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as_op_dtype(t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    if acc.dtype == torch.float64:
        return t.double()
    return t if t.dtype in SUMSQ_DTYPES else t.float()


def sumsq(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2, g (B,R,T,out), x (B,T,in), by the
    fused op ``popcomp::sumsq_outer_acc`` (in float64 when acc is float64)."""
    torch.ops.popcomp.sumsq_outer_acc(acc, _as_op_dtype(g, acc), _as_op_dtype(x, acc))


def bias_sumsq(g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_b sum_r (sum_t g[b,r,t,o])^2 for g (B, R, T, out), reduced in g's memory order, in
    ``dtype`` (the accumulator's)."""
    s = g.transpose(0, 1)  # (R, B, T, out): usually the contiguous order
    s = s[:, :, 0] if s.shape[2] == 1 else s.sum(2)
    s = s.reshape(-1, s.shape[-1]).to(dtype)
    return (s.new_ones(1, s.shape[0]) @ (s * s))[0]  # a GEMV: much faster than a column sum


def _cat(ts: List[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class ModuleReducer:
    """Adds one module type's Hessian-diagonal terms to its parameters' accumulators."""

    def refuse(self, m: nn.Module) -> Optional[str]:
        """Why this module's configuration is not supported (None: it is)."""
        return None

    def __call__(self, m: nn.Module, pairs: Pairs, acc: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class LinearReducer(ModuleReducer):
    """nn.Linear on (B, ..., in): positions t are the flattened middle dimensions."""

    def __call__(self, m, pairs, acc):
        xs, gs = [], []
        for inp, g in pairs:  # g: (R, B, ..., out)
            R, B = g.shape[0], g.shape[1]
            xs.append(inp.reshape(B, -1, m.in_features))
            gs.append(g.reshape(R, B, -1, m.out_features).permute(1, 0, 2, 3))
        x, g = _cat(xs, 1), _cat(gs, 2)
        if "weight" in acc:
            sumsq(acc["weight"], g, x)
        if "bias" in acc:
            acc["bias"].add_(bias_sumsq(g, acc["bias"].dtype))


class TransposedLinearReducer(LinearReducer):
    """A Linear whose weight is stored transposed, (in, out), with ``y = x @ weight + bias``
    (Hugging Face's Conv1D in GPT-2): the Linear reducer into the transposed accumulator."""

    def __call__(self, m, pairs, acc):
        w = m.weight
        shim = _Dims(in_features=w.shape[0], out_features=w.shape[1])
        if "weight" in acc:
            tmp = torch.zeros(w.shape[1], w.shape[0], dtype=acc["weight"].dtype, device=w.device)
            sub = dict(acc, weight=tmp)
            super().__call__(shim, pairs, sub)
            acc["weight"].add_(tmp.t())
        else:
            super().__call__(shim, pairs, acc)


class _Dims(NamedTuple):
    in_features: int
    out_features: int


class ConvReducer(ModuleReducer):
    """nn.Conv1d / nn.Conv2d / nn.Conv3d: a Linear of each group over the unfolded patches
    (positions t are the output locations)."""

    def __call__(self, m, pairs, acc):
        xs, gs = [], []
        for inp, g in pairs:
            xu, gu = self.unfold(m, inp, g)
            xs.append(xu)
            gs.append(gu)
        x = _cat(xs, 1)  # (B, L, groups, cin_g*kk)
        g = _cat(gs, 2)  # (B, R, L, groups, cout_g)
        if "weight" in acc:
            G = m.groups
            cout_g = m.out_channels // G
            aw = acc["weight"].view(m.out_channels, -1)
            for gi in range(G):
                sumsq(aw[gi * cout_g : (gi + 1) * cout_g], g[..., gi, :], x[..., gi, :])
        if "bias" in acc:
            acc["bias"].add_(bias_sumsq(g.flatten(-2), acc["bias"].dtype))

    @staticmethod
    def unfold(m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patches (B, L, groups, cin_g*kk) and output columns (B, R, L, groups, cout_g)."""
        R, B = g.shape[0], g.shape[1]
        if m.padding_mode == "zeros":
            xp = F.pad(x, m._reversed_padding_repeated_twice)
        else:
            xp = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        if isinstance(m, nn.Conv1d):
            xp = xp.unsqueeze(2)
            ks, dil, st = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        else:
            ks, dil, st = m.kernel_size, m.dilation, m.stride
        if len(ks) == 2:
            xu = F.unfold(xp, ks, dilation=dil, padding=0, stride=st)  # (B, Cin*kk, L)
        else:  # Conv3d (torch has no 3-D unfold)
            L_out = g.shape[3:]
            xu = unfold_nd(xp, ks, dil, st, L_out).flatten(1, 1 + len(ks)).flatten(2)
        L = xu.shape[-1]
        G = m.groups
        xu = xu.view(B, G, -1, L).permute(0, 3, 1, 2)  # (B, L, G, cin_g*kk) strided view
        gu = g.reshape(R, B, G, m.out_channels // G, L).permute(1, 0, 4, 2, 3)
        return xu, gu


def unfold_nd(xp: torch.Tensor, kernel: Sequence[int], dilation: Sequence[int],
              stride: Sequence[int], out_size: Sequence[int]) -> torch.Tensor:
    """The patches of the (already padded) input xp (N, C, *spatial) as a strided view
    (N, C, *kernel, *out_size): [n, c, k..., o...] = xp[n, c, o*stride + k*dilation ...]
    (F.unfold for any number of spatial dimensions, without the copy)."""
    xp = xp.contiguous()
    sp = xp.stride()[2:]
    size = (*xp.shape[:2], *kernel, *out_size)
    strides = (*xp.stride()[:2], *(s * d for s, d in zip(sp, dilation)),
               *(s * t for s, t in zip(sp, stride)))
    return xp.as_strided(size, strides, xp.storage_offset())


class ConvTransposeReducer(ModuleReducer):
    """nn.ConvTranspose1d/2d/3d: y[co, i*s + k*d - p] += x[ci, i] w[ci, co, k], so the
    weight gradient is sum_i x[ci, i] gp[co, k, i] with gp the columns' patches at the input
    positions i (the zero-padded columns unfolded with the layer's kernel, dilation and
    stride): a Linear of each group from the columns' patches (out: co*kk) and the input (in:
    ci), accumulated transposed into the (Cin, Cout/groups, *kernel) weight."""

    def refuse(self, m):
        if m.padding_mode != "zeros":
            return f"{type(m).__name__} with padding_mode={m.padding_mode!r}"
        return None

    def __call__(self, m, pairs, acc):
        G = m.groups
        cin_g, cout_g = m.in_channels // G, m.out_channels // G
        kk = int(torch.Size(m.kernel_size).numel())
        xs, gus, gs = [], [], []
        for inp, g in pairs:
            R, B = g.shape[0], g.shape[1]
            L_in = inp.shape[2:]
            xs.append(inp.reshape(B, G, cin_g, -1).permute(0, 3, 1, 2))  # (B, L, G, cin_g)
            if "weight" in acc:
                pad = [q for p in reversed(m.padding) for q in (p, p)]
                gp = F.pad(g.reshape(R * B, *g.shape[2:]), pad)
                gu = unfold_nd(gp, m.kernel_size, m.dilation, m.stride, L_in)  # (RB, Co, k.., L..)
                gu = gu.reshape(R, B, G, cout_g * kk, -1).permute(1, 0, 4, 2, 3)
                gus.append(gu)  # (B, R, L, G, cout_g*kk)
            gs.append(g.reshape(R, B, m.out_channels, -1).permute(1, 0, 3, 2))  # (B, R, Lo, Co)
        if "weight" in acc:
            x, gu = _cat(xs, 1), _cat(gus, 2)
            aw = acc["weight"].view(G, cin_g, cout_g * kk)
            for gi in range(G):
                tmp = torch.zeros(cout_g * kk, cin_g, dtype=aw.dtype, device=aw.device)
                sumsq(tmp, gu[..., gi, :], x[..., gi, :])
                aw[gi].add_(tmp.t())
        if "bias" in acc:
            acc["bias"].add_(bias_sumsq(_cat(gs, 2), acc["bias"].dtype))


class BatchNormReducer(ModuleReducer):
    """nn.BatchNorm1d/2d/3d with affine parameters: y = x_hat * weight + bias per channel, so a
    sample's gradients are sum over positions of g * x_hat (weight) and of g (bias). x_hat is
    normalized with the statistics the forward used: the running ones in eval mode, the batch's
    in training mode (then exact for the BatchNorm's own parameters; samples are coupled below
    it, which the methods refuse)."""

    def __call__(self, m, pairs, acc):
        for inp, g in pairs:
            R, B, C = g.shape[0], g.shape[1], g.shape[2]
            dt = next(iter(acc.values())).dtype
            gg = g.reshape(R, B, C, -1).to(dt)
            if "weight" in acc:
                x = inp.reshape(B, C, -1).to(dt)
                if m.training or m.running_mean is None:
                    mean = x.mean((0, 2))
                    var = x.var((0, 2), unbiased=False)
                else:
                    mean, var = m.running_mean.to(dt), m.running_var.to(dt)
                xh = (x - mean.view(1, C, 1)) * torch.rsqrt(var.view(1, C, 1) + m.eps)
                acc["weight"].add_(torch.einsum("rbcl,bcl->rbc", gg, xh).square().sum((0, 1)))
            if "bias" in acc:
                acc["bias"].add_(gg.sum(3).square().sum((0, 1)))


class EmbeddingReducer(ModuleReducer):
    """nn.Embedding: a sample's gradient of row v sums its columns over the positions holding
    index v; the padding row gets none."""

    def refuse(self, m):
        if m.scale_grad_by_freq or m.max_norm is not None:
            return "Embedding with scale_grad_by_freq/max_norm"
        return None

    def __call__(self, m, pairs, acc):
        if "weight" not in acc:
            return
        idx_l, g_l = [], []
        for inp, g in pairs:
            R, B = g.shape[0], g.shape[1]
            idx_l.append(inp.reshape(B, -1))
            g_l.append(g.reshape(R, B, -1, m.embedding_dim))
        idx, g = _cat(idx_l, 1), _cat(g_l, 2)
        R, B, T, D = g.shape
        V = m.num_embeddings
        b_ix = torch.arange(B, device=idx.device).view(B, 1).expand(B, T)
        keys = (b_ix * V + idx).reshape(-1)  # (sample, row) pairs
        gf = g.reshape(R, B * T, D).to(acc["weight"].dtype)
        if m.padding_idx is not None:
            keep = idx.reshape(-1) != m.padding_idx
            keys, gf = keys[keep], gf[:, keep]
        uk, inv = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(R, uk.numel(), D, dtype=gf.dtype, device=gf.device)
        sums.index_add_(1, inv, gf)
        acc["weight"].index_add_(0, uk % V, sums.square().sum(0))


_CONV = ConvReducer()
_CONV_T = ConvTransposeReducer()
_BN = BatchNormReducer()
REDUCERS: Dict[Type[nn.Module], ModuleReducer] = {
    nn.Linear: LinearReducer(),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV_T,
    nn.ConvTranspose2d: _CONV_T,
    nn.ConvTranspose3d: _CONV_T,
    nn.BatchNorm1d: _BN,
    nn.BatchNorm2d: _BN,
    nn.BatchNorm3d: _BN,
    nn.Embedding: EmbeddingReducer(),
}


# qualified class name -> reducer, for types of optional libraries (matched without importing them)
LAZY_REDUCERS: Dict[str, ModuleReducer] = {
    "transformers.pytorch_utils.Conv1D": TransposedLinearReducer(),
}


def reducer_for(m: nn.Module) -> Optional[ModuleReducer]:
    """The reducer of ``m``'s type (or nearest base class in :data:`REDUCERS` /
    :data:`LAZY_REDUCERS`), provided ``m`` runs that class's own forward (a subclass with its own
    forward computes something else)."""
    for cls in type(m).__mro__:
        r = REDUCERS.get(cls) or LAZY_REDUCERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if r is not None:
            return r if type(m).forward is cls.forward else None
    return None


def supported_kinds() -> str:
    """The module types the reducers handle, for messages."""
    return ", ".join([c.__name__ for c in REDUCERS] + [k.rpartition(".")[2] + " (transformers)"
                                                      for k in LAZY_REDUCERS])


class Site(NamedTuple):
    """A module whose parameters are accumulated: its name, the module, its reducer."""

    name: str
    module: nn.Module
    reducer: ModuleReducer

    def param_names(self) -> List[Tuple[str, str]]:
        """(name in the model, name in the module) of each of the module's own parameters (the
        name in the model is "<module name>.<parameter name>")."""
        pre = f"{self.name}." if self.name else ""
        return [(pre + pn, pn) for pn, _ in self.module.named_parameters(recurse=False)]

    def accumulators(self, acc: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The accumulators in ``acc`` of this module's parameters, by their name in the module."""
        return {pn: acc[fn] for fn, pn in self.param_names() if fn in acc}


FilterFn = Callable[[nn.Module, str], bool]


def asked_params(model: nn.Module, params: Optional[Iterable[str]],
                 filter_fn: Optional[FilterFn] = None) -> List[str]:
    """The names of the parameters asked for, in ``model.named_parameters()`` order: those
    named in ``params`` (frozen or not), else the trainable ones; with ``filter_fn(module,
    name)`` only those of the modules it selects (asked of the modules holding parameters)."""
    named = dict(model.named_parameters())
    sel = None if params is None else set(params)
    chosen = None
    if filter_fn is not None:
        pname = {id(p): n for n, p in named.items()}
        chosen = set()
        for mname, mod in model.named_modules():
            own = [pname[id(p)] for p in mod.parameters(recurse=False)]
            if own and filter_fn(mod, mname):
                chosen.update(own)
    return [n for n, p in named.items() if (chosen is None or n in chosen)
            and (n in sel if sel is not None else p.requires_grad)]


def select_sites(model: nn.Module, params: Optional[Iterable[str]], method: str,
                 filter_fn: Optional[FilterFn] = None) -> Tuple[List[Site], List[str]]:
    """The modules of ``model`` to accumulate and the parameter names (in module order, as in
    ``model.named_parameters()``). The parameters asked for are those named in ``params``
    (frozen or not), else the trainable ones; with ``filter_fn(module, name)`` only those of
    the modules it selects (the other modules are left alone, supported or not). A module is
    accumulated when some of its parameters are asked for; such a module without a reducer,
    or an asked-for parameter shared with another module, is a ValueError naming the modules
    and the ways out."""
    named = dict(model.named_parameters())
    pname = {id(p): n for n, p in named.items()}
    params = None if params is None else list(params)
    asked = set(asked_params(model, params, filter_fn))
    holders: Dict[int, List[str]] = {}  # id(parameter) -> the modules holding it
    for mname, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(mname or "<root>")
    sites: List[Site] = []
    unsupported: List[str] = []
    names: List[str] = []
    for mname, mod in model.named_modules():
        own = [(pname.get(id(p), pn), p) for pn, p in mod.named_parameters(recurse=False)]
        if filter_fn is not None and own and not filter_fn(mod, mname):
            continue  # (it may share an asked-for parameter with a module filter_fn selects)
        wanted = [(fn, p) for fn, p in own if fn in asked]
        if not wanted:
            continue  # nothing asked for: no work, any type
        red = reducer_for(mod)
        why = None if red is None else red.refuse(mod)
        if red is None or why is not None:
            unsupported.append(f"{mname or '<root>'} ({why or type(mod).__name__})")
            continue
        for fn, p in wanted:
            if len(holders[id(p)]) > 1:
                raise ValueError(
                    f"model: parameter {fn} is shared by the modules {holders[id(p)]}; method "
                    f"{method!r} needs each accumulated parameter in one module: leave all but "
                    "one out (filter_fn= / params=), or use method='hutchinson'"
                )
        sites.append(Site(mname, mod, red))
        names += [fn for fn, _ in wanted if fn not in names]
    if unsupported:
        how = ("change filter_fn" if filter_fn is not None else
               "select the modules with filter_fn=, freeze them (requires_grad=False), or "
               "restrict params=")
        raise ValueError(
            f"model: method {method!r} handles {supported_kinds()} (with any other modules in "
            f"between), but these modules have parameters it cannot handle: "
            f"{', '.join(unsupported)}. Use method='hutchinson', or {how}."
        )
    if params is not None:
        bad = [p for p in params if p not in names]
        if bad:
            raise ValueError(f"params: {bad} do not belong to modules supported by {method!r}"
                             + (" and selected by filter_fn" if filter_fn is not None else ""))
    order = {n: i for i, n in enumerate(named)}
    return sites, sorted(names, key=order.__getitem__)
