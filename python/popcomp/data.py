"""Bundled real data: the UCI handwritten digits that ship inside scikit-learn.

``sklearn.datasets.load_digits`` reads 1797 8×8 grey-level images (values 0..16, 10 classes) from
a file installed with scikit-learn: nothing is downloaded at run time. scikit-learn is in the
``demo`` extra (``pip install popcomp[demo]``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Digits:
    """A fixed train/test split of the digits; inputs scaled to [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())

    num_classes: int = 10

    def to(self, device) -> "Digits":
        return Digits(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                      self.y_test.to(device))


def load_digits(test_fraction: float = 0.3, split_seed: int = 0, images: bool = False,
                device: Optional[torch.device] = None, dtype=torch.float32) -> Digits:
    """The 1797 sklearn digits as torch tensors, split once into train and test.

    Args:
        test_fraction: share of the images held out as the test split (stratified by class).
        split_seed: seed of the split (fixed by default so that every run sees the same split).
        images: ``(N, 1, 8, 8)`` inputs for CNNs instead of flat ``(N, 64)`` vectors.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "the bundled digits need scikit-learn: pip install 'popcomp[demo]' (or scikit-learn)"
        ) from None
    ds = _sk_load()
    x = torch.as_tensor(ds.data, dtype=dtype) / 16.0
    y = torch.as_tensor(ds.target, dtype=torch.long)
    g = torch.Generator().manual_seed(int(split_seed))
    test_idx, train_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(test_fraction * idx.numel()))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(tr.numel(), generator=g)]
    te = te[torch.randperm(te.numel(), generator=g)]
    if images:
        x = x.view(-1, 1, 8, 8)
    d = Digits(x[tr], y[tr], x[te], y[te])
    return d.to(device) if device is not None else d


def subset(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0):
    """A random ``fraction`` of (x, y) (at least 10 samples), and the indices left over."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = x.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).to(x.device)
    k = max(10, int(round(fraction * n)))
    return x[perm[:k]], y[perm[:k]], perm[k:]


__all__ = ["Digits", "load_digits", "subset"]
