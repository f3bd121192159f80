"""Model and batch handling shared by every model-level API: modes, devices, batches, progress, module paths, ranks.

A leaf module (it imports nothing from popcomp), so ``hessian``, ``quantize``, ``spectral``,
``theory`` and the experiments all use one definition of each of these rules:

* a batch is ``(inputs, target)`` or ``inputs`` alone; ``inputs`` is a tensor, a tuple/list
  (positional arguments of ``model``) or a dict / Mapping (keyword arguments, as Hugging Face
  models take them) -- :func:`split_batch`, :func:`input_of`, :func:`call_model`;
* what a model returns (a tensor, a dict, a ``ModelOutput``-like dataclass or mapping, a tuple)
  is reduced to the one tensor a loss sees by :func:`output_tensor` (``.logits``, else the only
  tensor);
* :func:`eval_mode` puts every submodule in eval mode and restores each one's own mode after;
* :data:`ACTIVATIONS` is the one table of element-wise activation modules; the modules that
  compose it (the Hessian chain, spectral pruning) add what *their* rule allows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "ACTIVATIONS", "LAYER_TYPES", "all_names", "all_reduce_sum", "batch_size", "call_model",
    "eval_mode", "get_submodule", "input_of", "is_layer", "module_device", "output_tensor",
    "own_forward", "progress", "set_submodule", "slice_sample", "split_batch", "to_device",
]

# ---- module tables ----------------------------------------------------------------------------

# Activations applied element by element (their Jacobian is diagonal; they commute with the
# selection of units).
ACTIVATIONS: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink,
)

# The weight layers that popcomp quantizes, prunes or measures (a weight of shape (out, fan-in...)).
LAYER_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def own_forward(mod: nn.Module, classes: Iterable[type]) -> bool:
    """``mod`` is an instance of one of ``classes`` and does not override its ``forward``
    (a subclass with its own forward computes something else)."""
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in classes)


def is_layer(mod: nn.Module, classes: Iterable[type] = LAYER_TYPES) -> bool:
    """``mod`` is one of the weight layers ``classes`` with the stock forward."""
    return own_forward(mod, classes)


# ---- modes and devices ------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with every module of ``model`` in eval mode (no dropout noise, BatchNorm on
    its running statistics and not updating them); each module's own mode is restored after,
    also when the block raises (modes may be mixed)."""
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


def module_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the first parameter (else buffer) of ``model``; None when it has neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def to_device(obj: Any, device: Optional[torch.device]) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``
    (None: unchanged). Tensors already there are not copied."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return _same_mapping(obj, {k: to_device(v, device) for k, v in obj.items()})
    return obj


def _same_mapping(obj: Mapping, items: Dict[Any, Any]) -> Any:
    """``items`` in a mapping of ``obj``'s type where that type can be rebuilt from them
    (dict, OrderedDict, a ModelOutput-like dataclass), else a plain dict."""
    if type(obj) is dict:
        return items
    try:
        if dataclasses.is_dataclass(obj):
            return type(obj)(**items)
        return type(obj)(items)
    except Exception:  # a mapping type that cannot be rebuilt this way
        return items


# ---- batches ------------------------------------------------------------------------------------


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict (any Mapping), else
    ``model(inputs)``."""
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def split_batch(batch: Any, name: str = "data", target_optional: bool = False) -> Tuple[Any, Any]:
    """``(inputs, target)`` of a batch.

    A tuple/list batch is ``(inputs, target)`` (with ``target_optional``, ``(inputs,)`` too,
    target None); positional arguments go in a tuple as its ``inputs``: ``((a, b), target)``.
    With ``target_optional`` a tensor or a dict (keyword arguments) is ``inputs`` alone, target
    None. Anything else is a ValueError naming ``name``."""
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if target_optional and len(batch) == 1:
            return batch[0], None
    elif target_optional and isinstance(batch, (torch.Tensor, Mapping)):
        return batch, None
    allowed = ("(input, target) pairs, (input,) or inputs alone (a tensor or a dict of keyword "
               "arguments)" if target_optional else "(input, target) pairs")
    raise ValueError(
        f"{name} must yield {allowed}, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _tensor_items(out: Any) -> List[Tuple[str, torch.Tensor]]:
    """The (name, tensor) entries of a mapping, dataclass, tuple or list (not nested)."""
    if isinstance(out, Mapping):
        items = list(out.items())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    elif isinstance(out, (list, tuple)):
        items = [(f"[{i}]", o) for i, o in enumerate(out)]
    else:
        return []
    return [(str(k), v) for k, v in items if isinstance(v, torch.Tensor)]


def output_tensor(out: Any, name: str = "output_fn") -> torch.Tensor:
    """The tensor a loss sees of what a model returned: a tensor as is, else its ``logits``
    (attribute or entry), else the only tensor of a mapping / ModelOutput-like dataclass /
    tuple. Anything else is a TypeError naming ``name`` (the argument that picks the tensor)
    and listing the tensors found."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = _tensor_items(out)
    if len(items) == 1:
        return items[0][1]
    found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in items) or "none"
    raise TypeError(
        f"{name}: cannot tell which tensor of the model's output ({type(out).__name__}; tensors: "
        f"{found}) the loss should see; pass {name}=, e.g. {name}=lambda out: "
        "out['last_hidden_state']")


_INPUT_KEYS = ("input", "inputs", "x")


def input_of(batch: Any) -> Any:
    """The model input of a batch that may carry a target: the first element of a tuple/list,
    the ``input``/``inputs``/``x`` entry of a dict, else the batch itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(f"dict batches need one of the entries {_INPUT_KEYS} (or pass forward=)")
    return batch


def batch_size(*objs: Any, name: str = "data") -> int:
    """The leading dimension of the first tensor found in ``objs`` (tensors, or tuples/lists/
    dicts of them, searched in order)."""
    for obj in objs:
        if isinstance(obj, torch.Tensor) and obj.dim() > 0:
            return int(obj.shape[0])
        if isinstance(obj, (list, tuple, Mapping)):
            items = obj.values() if isinstance(obj, Mapping) else obj
            for o in items:
                if isinstance(o, torch.Tensor) and o.dim() > 0:
                    return int(o.shape[0])
    raise ValueError(f"{name}: cannot find the batch size (no tensor with a leading batch dimension)")


def slice_sample(obj: Any, s: int) -> Any:
    """Sample ``s`` of a batch (every tensor with a batch dimension sliced to ``[s:s+1]``,
    nested containers kept: tuples, lists, dicts and other mappings such as ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj[s : s + 1] if obj.dim() > 0 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_sample(o, s) for o in obj)
    if isinstance(obj, Mapping):
        return _same_mapping(obj, {k: slice_sample(v, s) for k, v in obj.items()})
    return obj


# ---- progress -----------------------------------------------------------------------------------


def progress(it: Iterable, desc: str = "", *, enabled: bool = True, total: Optional[int] = None,
             **kw: Any) -> Any:
    """``it`` wrapped in a tqdm bar on stderr (a tqdm object either way, so ``.update()`` and
    ``.close()`` work); the bar is disabled when ``enabled`` is False or the environment variable
    POPCOMP_NO_PROGRESS is set."""
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(it)  # type: ignore[arg-type]
        except TypeError:
            total = None
    kw.setdefault("leave", False)
    return tqdm(it, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled or bool(os.environ.get("POPCOMP_NO_PROGRESS")), **kw)


# ---- module paths -------------------------------------------------------------------------------


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` ('' is the model itself)."""
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (not '') by ``new``."""
    parent, _, child = path.rpartition(".")
    setattr(get_submodule(model, parent), child, new)


def all_names(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every name it is reachable under (a module reused at several places of the
    model is one object: replacing it means replacing it at all of them)."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        lst = names.setdefault(id(m), [])
        if n not in lst:
            lst.append(n)
    return names


# ---- ranks --------------------------------------------------------------------------------------


def all_reduce_sum(tensors: List[torch.Tensor], count: float = 0.0) -> Tuple[List[torch.Tensor], float]:
    """Sums ``tensors`` (copies, in one flat all-reduce) and ``count`` over the ranks of
    torch.distributed when it is initialized; otherwise returns copies and ``count`` as given.
    With the NCCL backend CPU tensors travel through the current CUDA device."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [t.clone() for t in tensors], count
    import torch.distributed as dist

    out = list(tensors)  # replaced by the reduced copies below
    dev = out[0].device if out else torch.device("cpu")
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    cnt = torch.tensor([float(count)], dtype=torch.float64, device=dev)
    dist.all_reduce(cnt)
    count = float(cnt.item())
    if out:
        # one all-reduce per dtype (a flat buffer of mixed dtypes would upcast)
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, t in enumerate(out):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([out[i].reshape(-1) for i in idx]).to(dev)
            dist.all_reduce(flat)
            off = 0
            for i in idx:
                n = out[i].numel()
                # its own storage (one copy; not a view of flat: safetensors refuses shared ones)
                out[i] = flat[off : off + n].view_as(out[i]).to(out[i].device, copy=True)
                off += n
    return out, count
