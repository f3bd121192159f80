"""The generic autograd path of fisher/ggn/ggn_mc for any model: module inputs and outputs
recorded by forward hooks, columns backpropagated to those outputs by (vmapped) autograd
(:func:`backprop_columns`, also hutchinson's backward of its probes)."""
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


def _forward(forward: Callable[[Any], Any], inputs, sites: Sequence[Site], safe: bool,
             watch: Sequence[torch.nn.Module] = ()):
    recs: Dict[str, List[_Record]] = {s.name: [] for s in sites}
    handles = []
    events: List[Tuple[int, int]] = []  # (0: site call / 1: watched call, id(module)), in order

    def watch_hook(mod, inp, out):
        events.append((1, id(mod)))

    def make_hook(name):
        def hook(mod, inp, out):
            if watch:
                events.append((0, id(mod)))
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
        for w in watch:
            handles.append(w.register_forward_hook(watch_hook))
        out = forward(inputs)
    finally:
        for h in handles:
            h.remove()
    if not safe and any(r.modified() for lst in recs.values() for r in lst):
        return None
    if watch:
        names = {id(s.module): s.name for s in sites}
        seen: List[str] = []
        for kind, mid in events:
            if kind == 0:
                seen.append(names[mid])
            elif any(names.get(mid) != n for n in seen):
                raise ValueError(
                    f"model: a BatchNorm in training mode (batch statistics) runs after the "
                    f"accumulated module(s) {sorted(set(seen))}: it couples the samples of a batch, "
                    "so their per-sample gradients are not defined. Use eval_mode=True (the "
                    "default: running statistics), accumulate only modules after the "
                    "training-mode BatchNorms (filter_fn= / params=), or method='hutchinson'")
    return out, recs


def record(forward: Callable[[Any], Any], inputs: Any, sites: Sequence[Site],
           watch: Sequence[torch.nn.Module] = ()
           ) -> Tuple[Any, List[Tuple[Site, List[Tuple[Any, torch.Tensor]]]]]:
    """Runs ``forward(inputs)`` (the model and what picks the loss's view of its output;
    autograd on) and returns its output and, for each site the forward called, its calls as
    (input, output) pairs. When the model modifies a recorded tensor in place, the forward is
    rerun with copies. ``watch``: modules coupling the samples of a batch (BatchNorm in
    training mode); a ValueError when one runs after a site other than itself."""
    res = _forward(forward, inputs, sites, safe=False, watch=watch)
    if res is None:  # an output/input was modified in place: rerun with copies
        res = _forward(forward, inputs, sites, safe=True, watch=watch)
    out, recs = res
    return out, [(s, [(r.inp, r.out) for r in recs[s.name]]) for s in sites if recs[s.name]]


def backprop_columns(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                     cols: Sequence[torch.Tensor], *, retain_graph: bool = False,
                     batched: bool = True) -> Tuple[List[Optional[torch.Tensor]], bool]:
    """The R columns ``cols`` (one (R, *output.shape) tensor per tensor of ``outputs``) carried
    back to each of ``inputs``: (R, *input.shape) per input (None where it does not reach the
    outputs), by one vmapped backward (when ``batched`` and R > 1), else -- or where the graph
    has no batching rule -- one backward per column. The graph is kept through the vmapped
    attempt (a failed one may have freed part of it) and after the last backward when
    ``retain_graph``. Also returns ``batched``, False once the vmapped backward failed (the
    caller may skip it next time)."""
    R = cols[0].shape[0]
    if batched and R > 1:
        try:
            return list(torch.autograd.grad(outputs, inputs, cols, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)), True
        except RuntimeError:
            batched = False
    res: List[List[Optional[torch.Tensor]]] = [[] for _ in inputs]
    for c in range(R):
        gs = torch.autograd.grad(outputs, inputs, [col[c] for col in cols],
                                 retain_graph=retain_graph or c + 1 < R, allow_unused=True)
        for lst, g in zip(res, gs):
            lst.append(g)
    return [None if lst[0] is None else lst[0].unsqueeze(0) if R == 1 else torch.stack(lst)
            for lst in res], batched
