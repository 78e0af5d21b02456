"""Collectives on trees of tensors (not differentiable): sum, mean, broadcast, gather.

Each groups the leaves by (device, dtype) and runs one flattened collective per group.
In a single process every one is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.distributed.process import is_distributed, rank, world_size


def _flat_collective(leaves: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> list[Tensor]:
    """Out-of-place ``collective`` (in place on its argument) on tensors: one flattened
    call per (device, dtype) group; each output is a view of its group's result."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    out: list[Tensor] = list(leaves)
    for idx in groups.values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
        collective(flat)
        offset = 0
        for i in idx:
            n = leaves[i].numel()
            out[i] = flat[offset : offset + n].view(leaves[i].shape)
            offset += n
    return out


def all_reduce_leaves(leaves: Sequence[Tensor], op: Any = None) -> list[Tensor]:
    """Out-of-place all-reduce of tensors: one flattened collective per (device, dtype)."""
    op = dist.ReduceOp.SUM if op is None else op
    return _flat_collective(leaves, lambda flat: dist.all_reduce(flat, op=op))


def _tensor_leaves(tree: Any, name: str) -> tuple[list[Any], Any, list[int]]:
    leaves, spec = tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    if not idx and leaves:
        raise TypeError(
            f"{name} must contain tensors, got only {[type(x).__name__ for x in leaves]}"
        )
    return leaves, spec, idx


def all_reduce_sum(tree: Tree) -> Tree:
    """Sum of a tensor or a tree of tensors over all ranks (not differentiable).

    One flattened collective per (device, dtype) group of leaves. Returns new tensors
    (in a single process: the input tree itself). Non-tensor leaves are kept.

    Example:
        >>> all_reduce_sum({"a": torch.ones(2), "b": torch.zeros(())})
        {'a': tensor([1., 1.]), 'b': tensor(0.)}
    """
    leaves, spec, idx = _tensor_leaves(tree, "tree")
    if not is_distributed() or not idx:
        return tree
    reduced = all_reduce_leaves([leaves[i] for i in idx])
    for i, x in zip(idx, reduced):
        leaves[i] = x
    return tree_unflatten(leaves, spec)


def all_reduce_mean(tree: Tree) -> Tree:
    """Mean of a tensor or a tree of floating-point tensors over all ranks (not differentiable).

    Example:
        >>> all_reduce_mean(torch.tensor([2.0, 4.0]))
        tensor([2., 4.])
    """
    leaves, spec, idx = _tensor_leaves(tree, "tree")
    for i in idx:
        if not (leaves[i].is_floating_point() or leaves[i].is_complex()):
            raise TypeError(
                f"all_reduce_mean needs floating-point tensors, got dtype {leaves[i].dtype}"
            )
    if not is_distributed() or not idx:
        return tree
    n = world_size()
    reduced = all_reduce_leaves([leaves[i] for i in idx])
    for i, x in zip(idx, reduced):
        leaves[i] = x / n
    return tree_unflatten(leaves, spec)


def broadcast(tree: Tree, src: int = 0) -> Tree:
    """Rank ``src``'s values of a tensor or tree of tensors, on every rank (new tensors).

    Use it to start every rank from the same random initialisation.

    Example:
        >>> broadcast(torch.arange(3.0))
        tensor([0., 1., 2.])
    """
    leaves, spec, idx = _tensor_leaves(tree, "tree")
    if not is_distributed() or not idx:
        return tree
    sent = _flat_collective([leaves[i] for i in idx], lambda flat: dist.broadcast(flat, src=src))
    for i, x in zip(idx, sent):
        leaves[i] = x
    return tree_unflatten(leaves, spec)


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0, in rank order (not
    differentiable); the leading sizes may differ (e.g. per-example results of
    :func:`shard` blocks, gathered back in the original order).

    Example:
        >>> all_gather_cat(torch.arange(3))
        tensor([0, 1, 2])
    """
    if not isinstance(tensor, Tensor) or tensor.dim() == 0:
        raise TypeError("tensor must be a tensor with a leading dimension to concatenate along")
    if not is_distributed():
        return tensor
    n = world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes_t = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes_t, size)
    sizes = [int(s) for s in torch.cat(sizes_t).tolist()]  # one read, before the data exchange
    padded = tensor.detach().new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    bufs = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:k] for b, k in zip(bufs, sizes)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable Python object, on every rank (e.g. a decision taken on
    rank 0 from files only it reads). In a single process: ``obj``.

    Example:
        >>> broadcast_object({"resume": True})
        {'resume': True}
    """
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
