"""A tree of tensors seen as one flat vector, and objective values with gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.solvers.base import _NO_PATH, Objective, _check_tree, _scalar


class _Flat:
    """A tree of floating tensors seen as one 1-D vector (for quasi-Newton algebra).

    Leaves of different floating dtypes are promoted to a common dtype and cast back.
    """

    def __init__(self, tree: Tree, name: str = "init") -> None:
        leaves, self.spec = _check_tree(tree, name)
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.numels = [leaf.numel() for leaf in leaves]
        self.device = leaves[0].device
        dtype = leaves[0].dtype
        for leaf in leaves[1:]:
            dtype = torch.promote_types(dtype, leaf.dtype)
        self.dtype = dtype
        self.size = sum(self.numels)

    def ravel(self, tree: Tree) -> Tensor:
        leaves, spec = tree_flatten(tree)
        if spec != self.spec:
            raise ValueError(f"tree structure changed: expected {self.spec}, got {spec}")
        for leaf, shape in zip(leaves, self.shapes):
            if not isinstance(leaf, Tensor) or leaf.shape != shape:
                got = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(f"expected a tensor of shape {tuple(shape)}, got {got}")
        return torch.cat([leaf.reshape(-1).to(self.dtype) for leaf in leaves])

    def unravel(self, flat: Tensor) -> Tree:
        out, offset = [], 0
        for shape, dtype, n in zip(self.shapes, self.dtypes, self.numels):
            out.append(flat[offset : offset + n].reshape(shape).to(dtype))
            offset += n
        return tree_unflatten(out, self.spec)

    def output(self, flat: Tensor) -> Tree:
        """Detached leaves that own their memory (never views of solver buffers)."""
        return tree_unflatten(
            [leaf.detach().clone() for leaf in tree_flatten(self.unravel(flat))[0]], self.spec
        )


def _flat_value_and_grad(objective: Objective, flat: _Flat, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        f = _scalar(objective(flat.unravel(xl)))
        if not f.requires_grad:
            raise ValueError(_NO_PATH)
        (g,) = torch.autograd.grad(f, xl, allow_unused=True)
    if g is None:
        raise ValueError(_NO_PATH)
    return f.detach(), g.detach()


def _tree_value_and_grad(
    objective: Objective, leaves: Sequence[Tensor], spec: Any
) -> tuple[Tensor, list[Tensor]]:
    with torch.enable_grad():
        xs = [leaf.detach().requires_grad_(True) for leaf in leaves]
        f = _scalar(objective(tree_unflatten(xs, spec)))
        if not f.requires_grad:
            raise ValueError(_NO_PATH)
        grads = torch.autograd.grad(f, xs, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(_NO_PATH)
    out = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(xs, grads)]
    return f.detach(), out


def _norm(leaves: Sequence[Tensor]) -> Tensor:
    """Euclidean norm over all leaves, in their widest dtype (no float64 upcast: MPS lacks it)."""
    norms = [torch.linalg.vector_norm(leaf) for leaf in leaves]
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)
