"""Small pytree helpers over nested dicts / lists / tuples of tensors.

Everything in bilevel passes parameters and hyperparameters as pytrees (usually
``dict[str, Tensor]``); these helpers are the arithmetic the linear solvers,
optimizers and engines share. They never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch import Tensor

Tree = Any

tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_map = _pytree.tree_map
tree_leaves = _pytree.tree_leaves


def tree_map2(fn: Callable[[Tensor, Tensor], Tensor], a: Tree, b: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to two trees of the same structure."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        raise ValueError(f"tree structures differ: {spec_a} vs {spec_b}")
    return tree_unflatten([fn(x, y) for x, y in zip(leaves_a, leaves_b)], spec_a)


def tree_add(a: Tree, b: Tree, alpha: float | Tensor = 1.0) -> Tree:
    """``a + alpha * b`` leaf-wise."""
    return tree_map2(lambda x, y: x + alpha * y, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    return tree_map2(lambda x, y: x - y, a, b)


def tree_scale(a: Tree, scale: float | Tensor) -> Tree:
    return tree_map(lambda x: x * scale, a)


def tree_zeros_like(a: Tree) -> Tree:
    return tree_map(torch.zeros_like, a)


def tree_dot(a: Tree, b: Tree) -> Tensor:
    """Sum over leaves of the (real) inner products; a 0-d tensor on the leaves' device."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        raise ValueError(f"tree structures differ: {spec_a} vs {spec_b}")
    total = None
    for x, y in zip(leaves_a, leaves_b):
        d = (x * y).sum()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("empty tree")
    return total


def tree_norm(a: Tree) -> Tensor:
    """Euclidean norm of all leaves together (0-d tensor)."""
    return tree_dot(a, a).sqrt()


def tree_detach(a: Tree) -> Tree:
    return tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, a)


def tree_structure_equal(a: Tree, b: Tree) -> bool:
    return tree_flatten(a)[1] == tree_flatten(b)[1]


def tree_ravel(a: Tree) -> Tensor:
    """Concatenate all leaves into one 1-D tensor (the dense special case only)."""
    return torch.cat([x.reshape(-1) for x in tree_leaves(a)])


def tree_unravel(flat: Tensor, like: Tree) -> Tree:
    """Inverse of :func:`tree_ravel` for a tree shaped like ``like``."""
    leaves, spec = tree_flatten(like)
    out, offset = [], 0
    for x in leaves:
        n = x.numel()
        out.append(flat[offset : offset + n].reshape(x.shape))
        offset += n
    return tree_unflatten(out, spec)
