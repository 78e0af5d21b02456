"""Sharding: each rank's contiguous block of a dataset or a batch of tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from bilevel.distributed.process import rank as process_rank
from bilevel.distributed.process import world_size as process_world_size


def _check_rank_world(r: int | None, n: int | None) -> tuple[int, int]:
    r = process_rank() if r is None else r
    n = process_world_size() if n is None else n
    for value, name in ((r, "rank"), (n, "world_size")):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"world_size must be >= 1, got {n}")
    if not 0 <= r < n:
        raise ValueError(f"rank must be in [0, world_size={n}), got {r}")
    return r, n


def shard_bounds(n: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous block of ``n`` items.

    Blocks are in rank order and their sizes differ by at most one (the first
    ``n % world_size`` ranks get one more), so every rank computes the same split.

    Example:
        >>> [shard_bounds(10, r, 4) for r in range(4)]
        [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    r, w = _check_rank_world(rank, world_size)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items_or_tensor: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's contiguous block of a dataset or task batch (see :func:`shard_bounds`).

    Args:
        items_or_tensor: a tensor (split along dimension 0), a sequence (list, tuple,
            range: sliced as a sequence of items), or a dict of tensors / sequences with
            the same leading length (each value split the same way, e.g.
            ``{"x": X, "y": y}``). A tuple ``(X, y)`` is a sequence of two items: to split
            columns, pass a dict or shard each tensor.
        rank, world_size: default: this process's.

    Example:
        >>> import torch
        >>> shard(list(range(7)), rank=1, world_size=2)
        [4, 5, 6]
        >>> shard({"x": torch.arange(5), "y": torch.arange(5) * 10}, rank=0, world_size=2)
        {'x': tensor([0, 1, 2]), 'y': tensor([ 0, 10, 20])}
    """
    r, w = _check_rank_world(rank, world_size)
    if isinstance(items_or_tensor, Mapping):
        lengths = {k: _length(v, f"items_or_tensor[{k!r}]") for k, v in items_or_tensor.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"the values of items_or_tensor must have the same leading length, got {lengths}"
            )
        return {k: shard(v, r, w) for k, v in items_or_tensor.items()}
    start, stop = shard_bounds(_length(items_or_tensor, "items_or_tensor"), r, w)
    return items_or_tensor[start:stop]


def _length(x: Any, name: str) -> int:
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} must have a leading dimension to split, got a 0-d tensor")
        return int(x.shape[0])
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a tensor, a sequence or a dict of them, got {type(x).__name__}"
        )
    return len(x)
