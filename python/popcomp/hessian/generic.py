"""The generic autograd path of fisher/ggn/ggn_mc for any model: module inputs and outputs
recorded by forward hooks, columns backpropagated to those outputs by (vmapped) autograd."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .modules import Site

__all__ = ["backprop_columns", "record"]


class _Record:
    """One call of a module: its input and output, with their versions at the call (an
    in-place change afterwards would make the recorded tensors wrong)."""

    __slots__ = ("inp", "out", "inp_version", "out_version")

    def __init__(self, inp: Any, out: torch.Tensor):
        self.inp, self.out = inp, out
        self.inp_version = inp._version if isinstance(inp, torch.Tensor) else 0
        self.out_version = out._version

    def modified(self) -> bool:
        return self.out._version != self.out_version or (
            isinstance(self.inp, torch.Tensor) and self.inp._version != self.inp_version)


def _forward(forward: Callable[[Any], Any], inputs, sites: Sequence[Site], safe: bool):
    recs: Dict[str, List[_Record]] = {s.name: [] for s in sites}
    handles = []

    def make_hook(name):
        def hook(mod, inp, out):
            x = inp[0] if inp else None
            if safe:  # keep copies, hand the model a fresh output
                x = x.detach().clone() if isinstance(x, torch.Tensor) else x
                recs[name].append(_Record(x, out))
                return out.clone()
            recs[name].append(_Record(x, out))
            return None

        return hook

    try:
        for s in sites:
            handles.append(s.module.register_forward_hook(make_hook(s.name)))
        out = forward(inputs)
    finally:
        for h in handles:
            h.remove()
    if not safe and any(r.modified() for lst in recs.values() for r in lst):
        return None
    return out, recs


def record(forward: Callable[[Any], Any], inputs: Any, sites: Sequence[Site]
           ) -> Tuple[Any, List[Tuple[Site, List[Tuple[Any, torch.Tensor]]]]]:
    """Runs ``forward(inputs)`` (the model and what picks the loss's view of its output;
    autograd on) and returns its output and, for each site the forward called, its calls as
    (input, output) pairs. When the model modifies a recorded tensor in place, the forward is
    rerun with copies."""
    res = _forward(forward, inputs, sites, safe=False)
    if res is None:  # an output/input was modified in place: rerun with copies
        res = _forward(forward, inputs, sites, safe=True)
    out, recs = res
    return out, [(s, [(r.inp, r.out) for r in recs[s.name]]) for s in sites if recs[s.name]]


def backprop_columns(out: torch.Tensor, layer_outs: Sequence[torch.Tensor], cols: torch.Tensor
                     ) -> List[Optional[torch.Tensor]]:
    """The columns (R, *out.shape) at the model output carried back to each of ``layer_outs``
    (R, *layer_out.shape; None where a layer output does not reach the model output): one
    vmapped backward, or one backward per column where the graph has no batching rule."""
    if cols.shape[0] == 1:  # one column (ggn_mc with one sample): no vmap needed
        gs = torch.autograd.grad(out, layer_outs, cols[0], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    try:
        return list(torch.autograd.grad(out, layer_outs, cols, is_grads_batched=True,
                                        allow_unused=True))
    except RuntimeError:
        res: List[List[Optional[torch.Tensor]]] = [[] for _ in layer_outs]
        R = cols.shape[0]
        for c in range(R):
            gs = torch.autograd.grad(out, layer_outs, cols[c], retain_graph=c + 1 < R,
                                     allow_unused=True)
            for lst, g in zip(res, gs):
                lst.append(g)
        return [None if lst[0] is None else torch.stack(lst) for lst in res]
