"""Data sets that ship with scikit-learn, split and standardized with explicit generators."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Split:
    """Train / validation / test tensors (features standardized with train statistics)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def to(self, device: torch.device, dtype: torch.dtype) -> Split:
        def f(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

        return Split(
            f(self.x_train),
            f(self.y_train),
            f(self.x_val),
            f(self.y_val),
            f(self.x_test),
            f(self.y_test),
            self.num_classes,
        )


def load_sklearn(name: str) -> tuple[Tensor, Tensor]:
    """``digits`` or ``breast_cancer`` from scikit-learn's bundled files (no download)."""
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(loaders)}")
    bunch = loaders[name]()
    return torch.as_tensor(bunch.data, dtype=torch.float64), torch.as_tensor(
        bunch.target, dtype=torch.long
    )


def split(
    x: Tensor,
    y: Tensor,
    n_train: int,
    n_val: int,
    generator: torch.Generator,
    n_test: int | None = None,
) -> Split:
    """A random split (fixed by ``generator``); features standardized with train mean / std.

    Example:
        >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 2
        >>> s = split(x, y, 10, 5, torch.Generator().manual_seed(0))
        >>> s.x_train.shape, s.x_test.shape, abs(float(s.x_train.mean())) < 1e-12
        (torch.Size([10, 3]), torch.Size([5, 3]), True)
    """
    n = x.shape[0]
    if n_train + n_val >= n:
        raise ValueError(f"n_train + n_val = {n_train + n_val} must be below the {n} examples")
    perm = torch.randperm(n, generator=generator)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    te = (
        perm[n_train + n_val :]
        if n_test is None
        else perm[n_train + n_val : n_train + n_val + n_test]
    )
    mean = x[tr].mean(0)
    std = x[tr].std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))

    def z(i: Tensor) -> Tensor:
        return (x[i] - mean) / std

    return Split(z(tr), y[tr], z(va), y[va], z(te), y[te], int(y.max()) + 1)
