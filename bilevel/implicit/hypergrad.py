"""Gradients of an outer value w.r.t. a tree of hyperparameters: :func:`hypergrad`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_leaves, tree_unflatten
from bilevel.implicit.layer import _check_hparams


def hypergrad(
    outer_value: Tensor,
    hparams: Any,
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> Any:
    """Gradient of a scalar ``outer_value`` w.r.t. every tensor in ``hparams``, as a tree.

    Numbers in ``hparams`` are constants and get ``None``. A tensor that does not
    require grad is an error that names it (a hypergradient nobody can compute).

    Example:
        >>> from bilevel import argmin
        >>> l2 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = argmin(lambda w, h: ((w - 1) ** 2).sum() + h["l2"] * (w ** 2).sum(),
        ...            torch.full((2,), 0.5, dtype=torch.float64), {"l2": l2, "c": 3})
        >>> g = hypergrad(w.sum(), {"l2": l2, "c": 3})
        >>> float(g["l2"]), g["c"]
        (-0.5, None)
    """
    if not isinstance(outer_value, Tensor) or outer_value.numel() != 1:
        shape = (
            tuple(outer_value.shape)
            if isinstance(outer_value, Tensor)
            else type(outer_value).__name__
        )
        raise ValueError(f"outer_value must be a scalar tensor, got {shape}")
    _check_hparams(hparams)
    leaves, spec = tree_flatten(hparams)
    paths = _leaf_paths(hparams)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    frozen = [paths[i] for i in idx if not leaves[i].requires_grad]
    if frozen:
        raise ValueError(
            f"hyperparameter(s) {', '.join(frozen)} do not require grad, so they have no "
            "hypergradient: create them with requires_grad=True (or derive them from a leaf "
            "that does, e.g. log_l2.exp()), or pass them as Python numbers to mark them constant"
        )
    if not outer_value.requires_grad:
        raise ValueError(
            "outer_value does not depend on any hyperparameter through autograd (it does not "
            "require grad); was it computed under torch.no_grad(), or from a detached solution?"
        )
    grads = torch.autograd.grad(
        outer_value.reshape(()),
        [leaves[i] for i in idx],
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    out: list[Any] = [None] * len(leaves)
    for i, g in zip(idx, grads):
        out[i] = torch.zeros_like(leaves[i]) if g is None else g
    return tree_unflatten(out, spec)


def _leaf_paths(tree: Any) -> list[str]:
    """Readable names of the leaves, e.g. ``hparams['l2']``, in flatten order."""
    try:
        from torch.utils._pytree import keystr, tree_flatten_with_path

        flat, _ = tree_flatten_with_path(tree)
        return [f"hparams{keystr(path)}" for path, _ in flat]
    except ImportError:  # pragma: no cover - old torch
        return [f"hparams leaf {i}" for i in range(len(tree_leaves(tree)))]
