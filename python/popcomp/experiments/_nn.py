"""Small-network helpers shared by the nn/spectral/bounds/demo experiments."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._model import eval_mode, is_layer


def make_mlp(n_in: int, hidden: Sequence[int], n_out: int, dropout: float = 0.0,
             init: str = "default") -> nn.Sequential:
    """Linear-ReLU(-Dropout) stack: n_in → hidden... → n_out (bu2020 §7 uses 256-256, Dropout 0.2).

    ``init``: ``"default"`` (torch's Linear initialization) or ``"xavier"`` (Xavier-uniform
    weights, zero biases, as the paper's code)."""
    if init not in ("default", "xavier"):
        raise ValueError(f"init must be 'default' or 'xavier', got {init!r}")
    layers: List[nn.Module] = [nn.Flatten()]
    prev = n_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = h
    layers.append(nn.Linear(prev, n_out))
    if init == "xavier":
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def make_cnn(n_out: int = 10, c1: int = 16, c2: int = 32, hidden: int = 64) -> nn.Sequential:
    """A small VGG-style CNN for 1×8×8 digits: conv-BN-ReLU ×2 with a pool, then a Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, n_out),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-2,
          momentum: float = 0.9, batch_size: int = 32, seed: int = 0, weight_decay: float = 0.0,
          bar=None) -> nn.Module:
    """Plain SGD with momentum and cross-entropy, shuffled minibatches (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        if bar is not None:
            bar.update(1)
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (every module's mode restored)."""
    with eval_mode(model):
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear / Conv2d layers the experiments quantize."""
    return [(n, m) for n, m in model.named_modules() if is_layer(m, (nn.Linear, nn.Conv2d))]


def hessian_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     method: str = "ggn", batch_size: int = 256) -> Tuple[Dict[str, torch.Tensor], str]:
    """Diagonal of the training-loss Hessian (sum over samples of the per-sample
    cross-entropy) of every parameter, by ``popcomp.hessian.diagonal`` (issue 3), in eval mode.
    ``"ggn"`` is the exact Hessian diagonal of a ReLU network with cross-entropy."""
    from ..hessian import diagonal

    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    with eval_mode(model):
        res = diagonal(model, nn.CrossEntropyLoss(reduction="sum"), batches, method=method, progress=False)
    return {k: v.detach().float() for k, v in res.items()}, f"popcomp.hessian.diagonal(method={method!r})"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def entropy_bits(labels: torch.Tensor, k: int) -> torch.Tensor:
    """n·H(labels) in bits along the last dim (the entropy-coded size of the indices)."""
    cnt = torch.zeros(*labels.shape[:-1], k, dtype=torch.float64, device=labels.device)
    cnt.scatter_add_(-1, labels, torch.ones_like(labels, dtype=torch.float64))
    p = cnt / labels.shape[-1]
    h = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(-1)
    return h * labels.shape[-1]
