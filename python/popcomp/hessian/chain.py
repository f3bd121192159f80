"""The hand-written backprop engine of fisher/ggn/ggn_mc: columns carried from the output of a
plain Sequential down to its lowest accumulated layer, without autograd.

The forward pass keeps each accumulated layer's input, each other weight layer's input shape
and each elementwise layer's derivative; the columns at the output are then backpropagated by
hand (one GEMM or input gradient of a convolution per layer, one product per activation) down
to the output of the lowest accumulated layer and never further: no parameter gradients, no
autograd graph, no vmap. Anything else (skip connections, pooling, hooks, active dropout, ...)
takes the generic autograd path (:mod:`.generic`).

A weight layer type is one entry of :data:`LAYERS` (how its input gradient is computed and
which configurations it accepts); the elementwise layers are :data:`popcomp._model.ACTIVATIONS`
plus BatchNorm1d on running statistics.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._model import ACTIVATIONS, own_forward
from .modules import Site

__all__ = ["Chain", "ELEMENTWISE", "LAYERS", "LayerBackward"]

# Their Jacobian is diagonal: the columns are multiplied by the derivative, which autograd gives
# for all units at once (BatchNorm1d is elementwise on running statistics, checked per batch).
ELEMENTWISE: Tuple[type, ...] = ACTIVATIONS + (nn.BatchNorm1d,)
_PASS = (nn.Identity, nn.Dropout, nn.Flatten)  # Dropout: in eval mode (or p = 0) only


class LayerBackward(NamedTuple):
    """How the chain carries columns (R, B, *out) through a weight layer: ``input_grad(m, z,
    in_shape)`` gives them at its input (R, *in_shape); ``accepts(m)`` says whether it can."""

    input_grad: Callable[[nn.Module, torch.Tensor, torch.Size], torch.Tensor]
    accepts: Callable[[nn.Module], bool] = lambda m: True


def _linear_input_grad(m: nn.Module, z: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    return z @ m.weight.detach()


def _conv_input_grad(fn: Callable) -> Callable:
    def input_grad(m: nn.Module, z: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
        zz = z.reshape(-1, *z.shape[2:])  # the R columns of the B samples as R * B inputs
        zz = fn((zz.shape[0], *in_shape[1:]), m.weight.detach(), zz, m.stride, m.padding,
                m.dilation, m.groups)
        return zz.reshape(z.shape[0], *in_shape)

    return input_grad


def _zero_padded(m: nn.Module) -> bool:
    return m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _conv_transpose_input_grad(fn: Callable) -> Callable:
    # the input gradient of a transposed convolution is the convolution of the columns with
    # the same weight (Cin, Cout/groups, *k), cut to the input size (output_padding >= stride,
    # allowed below the dilation, leaves extra positions)
    def input_grad(m: nn.Module, z: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
        zz = z.reshape(-1, *z.shape[2:])
        zz = fn(zz, m.weight.detach(), None, m.stride, m.padding, m.dilation, m.groups)
        zz = zz[(...,) + tuple(slice(0, n) for n in in_shape[2:])]
        return zz.reshape(z.shape[0], *in_shape)

    return input_grad


LAYERS: Dict[Type[nn.Module], LayerBackward] = {
    nn.Linear: LayerBackward(_linear_input_grad),
    nn.Conv1d: LayerBackward(_conv_input_grad(torch.nn.grad.conv1d_input), _zero_padded),
    nn.Conv2d: LayerBackward(_conv_input_grad(torch.nn.grad.conv2d_input), _zero_padded),
    nn.Conv3d: LayerBackward(_conv_input_grad(torch.nn.grad.conv3d_input), _zero_padded),
    nn.ConvTranspose1d: LayerBackward(_conv_transpose_input_grad(F.conv1d), _zero_padded),
    nn.ConvTranspose2d: LayerBackward(_conv_transpose_input_grad(F.conv2d), _zero_padded),
    nn.ConvTranspose3d: LayerBackward(_conv_transpose_input_grad(F.conv3d), _zero_padded),
}


def _layer_backward(m: nn.Module) -> Optional[LayerBackward]:
    for cls in type(m).__mro__:
        if cls in LAYERS:
            return LAYERS[cls]
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


class Chain:
    """An nn.Sequential (nested ones flattened) of weight layers (:data:`LAYERS`), elementwise
    layers, Flatten, Identity and inactive Dropout, run without autograd."""

    def __init__(self, layers: List[Tuple[str, nn.Module]], containers: List[nn.Module],
                 sites: Dict[str, Site], stop: int):
        self.layers = layers  # [(name, module)], input to output
        self.containers = containers
        self.sites = sites  # the accumulated layers by name
        self.stop = stop  # index of the lowest accumulated layer
        self._backward = [_layer_backward(m) for _, m in layers]
        self._elementwise = [isinstance(m, ELEMENTWISE) for _, m in layers]

    @classmethod
    def build(cls, model: nn.Module, sites: Sequence[Site]) -> Optional["Chain"]:
        """The chain of ``model`` accumulating ``sites``; None when the model is not one."""
        layers: List[Tuple[str, nn.Module]] = []
        containers: List[nn.Module] = []
        allowed = tuple(LAYERS) + ELEMENTWISE + _PASS

        def walk(prefix: str, mod: nn.Module) -> bool:
            if isinstance(mod, nn.Sequential):
                if type(mod).forward is not nn.Sequential.forward:
                    return False
                containers.append(mod)
                # what Sequential.forward runs (named_children would skip a repeated module)
                return all(c is not None and walk(f"{prefix}.{n}" if prefix else n, c)
                           for n, c in mod._modules.items())
            layers.append((prefix, mod))
            lb = _layer_backward(mod)
            if lb is not None and not lb.accepts(mod):
                return False
            return own_forward(mod, allowed)

        if not walk("", model):
            return None
        mods = [m for _, m in layers]
        if len({id(m) for m in mods}) != len(mods):  # a layer used twice: parameters shared
            return None
        if any(isinstance(m, nn.Flatten) and m.start_dim < 1 for m in mods):
            return None  # may flatten into the batch dimension
        by_name = {s.name: s for s in sites}
        idx = [i for i, (n, _) in enumerate(layers) if n in by_name]
        if not idx or any(_layer_backward(layers[i][1]) is None for i in idx):
            return None
        return cls(layers, containers, by_name, idx[0])

    def ready(self, inputs: Any) -> bool:
        """Whether this batch can take the chain (else the generic path)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            return False
        from torch.nn.modules import module as _m

        if any(getattr(_m, f"_global_{k}_hooks", None) for k in ("forward", "forward_pre",
                                                                 "backward", "backward_pre")):
            return False
        if any(_has_hooks(m) for m in self.containers + [m for _, m in self.layers]):
            return False
        return not any((isinstance(m, nn.Dropout) and m.training and m.p > 0) or (
            isinstance(m, nn.BatchNorm1d) and (m.training or m.running_mean is None))
            for _, m in self.layers)  # BatchNorm on batch statistics is not elementwise

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[Any]]:
        """The output, and per layer what its backprop needs (accumulated layer: its input,
        other weight layer and Flatten: the input shape, elementwise: the derivative)."""
        saved: List[Any] = [None] * len(self.layers)
        with torch.no_grad():
            for i, (name, m) in enumerate(self.layers):
                if i > self.stop and self._elementwise[i]:
                    x, saved[i] = self._derivative(m, x)
                    continue
                if name in self.sites:
                    saved[i] = x
                elif self._backward[i] is not None or isinstance(m, nn.Flatten):
                    saved[i] = x.shape
                x = m(x)
        return x, saved

    @staticmethod
    def _derivative(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The output of the elementwise layer m and its derivative at x (ReLU: a mask)."""
        if type(m) is nn.ReLU:
            y = m(x)
            return y, y > 0
        with torch.enable_grad():
            xi = x.detach().requires_grad_()
            y = m(xi.clone() if getattr(m, "inplace", False) else xi)
            return y.detach(), torch.autograd.grad(y, xi, torch.ones_like(y))[0]

    def backprop(self, saved: List[Any], cols: torch.Tensor
                 ) -> Iterator[Tuple[Site, torch.Tensor, torch.Tensor]]:
        """Yields (site, its input, columns at its output (R, B, ...)) for each accumulated
        layer, from the output down."""
        z, fresh = cols, False  # cols may alias a caller's tensor (a loss gradient): no in place
        for i in range(len(self.layers) - 1, self.stop - 1, -1):
            name, m = self.layers[i]
            lb = self._backward[i]
            if lb is not None:
                site = self.sites.get(name)
                if site is not None:
                    yield site, saved[i], z
                if i == self.stop:
                    break
                shape = saved[i].shape if site is not None else saved[i]
                z, fresh = lb.input_grad(m, z, shape), True
            elif self._elementwise[i]:
                z, fresh = (z.mul_(saved[i]) if fresh else z * saved[i]), True
            elif isinstance(m, nn.Flatten):
                z = z.reshape(z.shape[0], *saved[i])
