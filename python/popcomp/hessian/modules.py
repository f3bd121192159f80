"""Per-module reducers keyed by module type (a module's parameter terms from its inputs and the
columns at its output, through popcomp::sumsq_outer_acc) and the choice of the modules to
accumulate.

A reducer is called with ``pairs``, one (input, columns) pair per call of the module in the
batch, the columns shaped (R, B, ..., out) like R stacked gradients of the module's output, and
``acc``, the float32 accumulators of the module's selected parameters by their own name
("weight", "bias"). Supporting another module type is adding one :class:`ModuleReducer` to
:data:`REDUCERS`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["REDUCERS", "ModuleReducer", "Site", "bias_sumsq", "reducer_for", "select_sites",
           "sumsq"]

_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Pairs = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def _as_op_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _OP_DTYPES else t.float()


def sumsq(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc[o,i] += sum_b sum_r (sum_t g[b,r,t,o] x[b,t,i])^2, g (B,R,T,out), x (B,T,in), by the
    fused op ``popcomp::sumsq_outer_acc``."""
    torch.ops.popcomp.sumsq_outer_acc(acc, _as_op_dtype(g), _as_op_dtype(x))


def bias_sumsq(g: torch.Tensor) -> torch.Tensor:
    """sum_b sum_r (sum_t g[b,r,t,o])^2 for g (B, R, T, out), reduced in g's memory order."""
    s = g.transpose(0, 1)  # (R, B, T, out): usually the contiguous order
    s = s[:, :, 0] if s.shape[2] == 1 else s.sum(2)
    s = s.reshape(-1, s.shape[-1]).float()
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
            acc["bias"].add_(bias_sumsq(g))


class ConvReducer(ModuleReducer):
    """nn.Conv1d / nn.Conv2d: a Linear of each group over the unfolded patches (positions t
    are the output locations)."""

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
            acc["bias"].add_(bias_sumsq(g.flatten(-2)))

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
        xu = F.unfold(xp, ks, dilation=dil, padding=0, stride=st)  # (B, Cin*kk, L)
        L = xu.shape[-1]
        G = m.groups
        xu = xu.view(B, G, -1, L).permute(0, 3, 1, 2)  # (B, L, G, cin_g*kk) strided view
        gu = g.reshape(R, B, G, m.out_channels // G, L).permute(1, 0, 4, 2, 3)
        return xu, gu


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
        gf = g.reshape(R, B * T, D).float()
        if m.padding_idx is not None:
            keep = idx.reshape(-1) != m.padding_idx
            keys, gf = keys[keep], gf[:, keep]
        uk, inv = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(R, uk.numel(), D, dtype=torch.float32, device=gf.device)
        sums.index_add_(1, inv, gf)
        acc["weight"].index_add_(0, uk % V, sums.square().sum(0))


_CONV = ConvReducer()
REDUCERS: Dict[Type[nn.Module], ModuleReducer] = {
    nn.Linear: LinearReducer(),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Embedding: EmbeddingReducer(),
}


def reducer_for(m: nn.Module) -> Optional[ModuleReducer]:
    """The reducer of ``m``'s type (or nearest base class in :data:`REDUCERS`), provided ``m``
    runs that class's own forward (a subclass with its own forward computes something else)."""
    for cls in type(m).__mro__:
        r = REDUCERS.get(cls)
        if r is not None:
            return r if type(m).forward is cls.forward else None
    return None


class Site(NamedTuple):
    """A module whose parameters are accumulated: its name, the module, its reducer."""

    name: str
    module: nn.Module
    reducer: ModuleReducer

    def param_names(self) -> List[Tuple[str, str]]:
        """(name in the model, name in the module) of each of the module's own parameters."""
        pre = f"{self.name}." if self.name else ""
        return [(pre + pn, pn) for pn, _ in self.module.named_parameters(recurse=False)]

    def accumulators(self, acc: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The accumulators in ``acc`` of this module's parameters, by their name in the module."""
        return {pn: acc[fn] for fn, pn in self.param_names() if fn in acc}


def select_sites(model: nn.Module, params: Optional[Iterable[str]], method: str
                 ) -> Tuple[List[Site], List[str]]:
    """The modules of ``model`` to accumulate and the parameter names (in module order):
    those of ``params``, else every parameter of a supported module. A trainable (or selected)
    parameter of a module without a reducer, or a parameter shared between modules, is a
    ValueError naming the modules and the ways out."""
    named = dict(model.named_parameters())
    params = None if params is None else list(params)
    sel = None if params is None else set(params)
    sites: List[Site] = []
    unsupported: List[str] = []
    seen: Dict[int, str] = {}
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        own = [(pre + pn, p) for pn, p in mod.named_parameters(recurse=False)]
        if not own:
            continue
        red = reducer_for(mod)
        why = None if red is None else red.refuse(mod)
        if red is None or why is not None:
            if why is not None:
                unsupported.append(f"{mname} ({why})")
            elif any((p.requires_grad if sel is None else fn in sel) for fn, p in own):
                unsupported.append(f"{mname or '<root>'} ({type(mod).__name__})")
            continue
        for fn, p in own:
            if id(p) in seen:
                raise ValueError(
                    f"model: parameter {fn} is shared with {seen[id(p)]}; method {method!r} needs "
                    "each parameter in one module, use method='hutchinson'"
                )
            seen[id(p)] = fn
        sites.append(Site(mname, mod, red))
    if unsupported:
        kinds = ", ".join(c.__name__ for c in REDUCERS)
        raise ValueError(
            f"model: method {method!r} handles {kinds} (with parameter-free activations and "
            f"containers), but these modules have parameters it cannot handle: "
            f"{', '.join(unsupported)}. Use method='hutchinson', freeze them "
            "(requires_grad=False), or restrict params=."
        )
    names = [fn for s in sites for fn, _ in s.param_names()
             if fn in named and (sel is None or fn in sel)]  # not in named: shared elsewhere
    if sel is not None:
        bad = [p for p in params if p not in names]
        if bad:
            raise ValueError(f"params: {bad} do not belong to modules supported by {method!r}")
    keep = {n.rpartition(".")[0] for n in names}
    return [s for s in sites if s.name in keep], names

