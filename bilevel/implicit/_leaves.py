"""Flat lists of tensor leaves: shape checks, and the split of hyperparameters and data
into differentiable tensors and constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten

LEAF_SPEC = tree_flatten(0.0)[1]  # the structure of a single leaf (a tensor)
_PAIR_SPEC = tree_flatten((0.0, None))[1]  # (hparams, data) with one tensor and no data


def _zeros_like_leaves(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) for x in leaves]


def _add_leaves(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    return [x + y for x, y in zip(a, b)]


def _check_like(got: Any, like: Sequence[Tensor], spec: Any, what: str) -> list[Tensor]:
    """Flatten ``got`` and check it has the structure and shapes of the solution."""
    leaves, got_spec = tree_flatten(got)
    if got_spec != spec:
        raise ValueError(
            f"{what} must have the structure of the solution/init: got {got_spec}, expected {spec}"
        )
    for x, ref in zip(leaves, like):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must contain tensors, found {type(x).__name__}")
        if x.shape != ref.shape:
            raise ValueError(
                f"{what} must have the shapes of the solution/init: got a leaf of shape "
                f"{tuple(x.shape)}, expected {tuple(ref.shape)}"
            )
    return leaves


class _Packer:
    """Splits a tree of hyperparameters and data into tensors (differentiable) and constants."""

    def __init__(self, tree: Any) -> None:
        if type(tree) is tuple and tree[1] is None and isinstance(tree[0], Tensor):
            # (a tensor, no data): the common case, without a tree walk
            self.spec, self.tensor_idx = _PAIR_SPEC, [0]
            self.constants: list[Any] = [None, None]
            self.tensors: list[Tensor] = [tree[0]]
            return
        leaves, self.spec = tree_flatten(tree)
        self.tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        self.constants = [None if isinstance(x, Tensor) else x for x in leaves]
        self.tensors = [leaves[i] for i in self.tensor_idx]

    def unpack(self, tensors: Sequence[Tensor]) -> Any:
        if self.spec is _PAIR_SPEC:
            return tensors[0], None
        leaves = list(self.constants)
        for i, t in zip(self.tensor_idx, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


def _scalar_loss(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must return a tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"{where} must return a scalar (0-d tensor), got a tensor of shape {tuple(value.shape)}; "
            "reduce it, e.g. with .sum() or .mean()"
        )
    return value if value.dim() == 0 else value.reshape(())
