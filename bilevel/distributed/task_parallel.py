"""Task-parallel meta-gradients: each rank adapts its block of tasks, one all-reduce
adds the gradients."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.distributed.collectives import all_reduce_leaves
from bilevel.distributed.process import is_distributed
from bilevel.distributed.sharding import shard_bounds


@dataclasses.dataclass
class MetaGradient:
    """What :func:`meta_gradient` returns.

    Attributes:
        grads: the gradient of the mean outer loss over the global batch, a tree like
            ``params`` (``None`` at non-tensor leaves and tensors that do not require grad);
            identical on every rank.
        loss: the mean outer loss over the global batch (0-d, detached).
        num_tasks: the number of tasks in the global batch.
        local_tasks: ``(start, stop)`` of this rank's tasks in the global batch.
    """

    grads: Tree
    loss: Tensor
    num_tasks: int
    local_tasks: tuple[int, int]


def _batch_len(tasks: Any) -> int:
    lengths = {
        int(x.shape[0]) for x in tree_flatten(tasks)[0] if isinstance(x, Tensor) and x.dim() > 0
    }
    if len(lengths) != 1:
        raise ValueError(
            "with batched=True, tasks must be a tensor or a tree of tensors sharing a leading "
            f"(task) dimension, got leading lengths {sorted(lengths)}"
        )
    return lengths.pop()


def _slice_tree(tree: Any, start: int, stop: int) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [x[start:stop] if isinstance(x, Tensor) and x.dim() > 0 else x for x in leaves], spec
    )


def meta_gradient(
    task_loss_fn: Callable[[Any, Any], Tensor],
    tasks: Any,
    params: Tree,
    *,
    batched: bool = False,
    shard_tasks: bool = True,
    set_grad: bool = False,
) -> MetaGradient:
    """Task-parallel meta-gradient: the mean outer loss's gradient over a batch of tasks.

    The global batch is split into contiguous blocks across ranks (:func:`shard_bounds`);
    each rank evaluates ``task_loss_fn`` on its tasks, differentiates the sum of their
    losses w.r.t. ``params`` in one backward pass, and one flattened ``all_reduce`` sums
    the gradients and losses of all ranks. The result is divided by the global number of
    tasks, so it equals the single-process mean whatever the split (uneven batches, ranks
    without tasks). No process group: the plain single-process computation.

    ``task_loss_fn`` may use any engine: an :func:`bilevel.unroll` in any mode (MAML:
    ``params`` is the meta-initialisation), the implicit engine (iMAML, hyperparameters),
    with ``params`` any tree of tensors whose leaves require grad.

    Args:
        task_loss_fn: ``task_loss_fn(params, task) -> scalar`` outer loss of one task
            after its inner adaptation; with ``batched=True``,
            ``task_loss_fn(params, tasks) -> (n,)`` per-task losses of a block of tasks
            (e.g. a ``torch.func.vmap`` over tasks).
        tasks: the global batch: a sequence of tasks (list, tuple, tensor indexed along
            dimension 0); with ``batched=True``, a tensor or a tree of tensors with a
            leading task dimension. With ``shard_tasks=False``: this rank's own tasks.
        params: the tensors to differentiate (tree); identical on every rank.
        batched: see ``task_loss_fn``.
        shard_tasks: ``True``: ``tasks`` is the global batch, identical on every rank,
            and this rank takes its block. ``False``: each rank passes its own tasks and
            the global count is all-reduced (the mean is still weighted by task counts).
        set_grad: also accumulate the gradients into ``.grad`` of the leaf tensors of
            ``params`` (like ``backward()``), ready for a ``torch.optim`` step.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> tasks = [torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64)]
        >>> mg = meta_gradient(lambda p, t: ((p - t) ** 2).sum(), tasks, w)
        >>> mg.grads                  # mean over tasks of 2 (w - t)
        tensor([0., 0.], dtype=torch.float64)
        >>> float(mg.loss)
        2.0
    """
    if not callable(task_loss_fn):
        raise TypeError(f"task_loss_fn must be callable, got {type(task_loss_fn).__name__}")
    leaves, spec = tree_flatten(params)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
    if not idx:
        raise ValueError(
            "params must contain at least one tensor that requires grad (the meta-parameters "
            "or hyperparameters to differentiate)"
        )
    if batched:
        n_given = _batch_len(tasks)
    else:
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, (Sequence, Tensor)):
            raise TypeError(
                f"tasks must be a sequence of tasks (list, tuple, tensor), got {type(tasks).__name__}; "
                "for a tree of batched tensors pass batched=True"
            )
        n_given = len(tasks)
    if shard_tasks:
        start, stop = shard_bounds(n_given)
    else:
        start, stop = 0, n_given
    diff = [leaves[i] for i in idx]
    ref = diff[0]

    local_sum: Tensor | None = None
    if stop > start:
        if batched:
            losses = task_loss_fn(params, _slice_tree(tasks, start, stop))
            if not isinstance(losses, Tensor) or losses.shape != (stop - start,):
                got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(
                    f"with batched=True, task_loss_fn must return the {stop - start} per-task "
                    f"losses as a 1-D tensor, got {got}"
                )
            local_sum = losses.sum()
        else:
            for t in range(start, stop):
                loss = task_loss_fn(params, tasks[t])
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise ValueError(
                        f"task_loss_fn must return a scalar tensor, got {got} for task {t}"
                    )
                loss = loss.reshape(())
                local_sum = loss if local_sum is None else local_sum + loss
    if local_sum is not None:
        if not local_sum.requires_grad:
            raise ValueError(
                "the task losses do not depend on params through autograd (computed under "
                "no_grad, or from detached tensors?)"
            )
        grads = list(torch.autograd.grad(local_sum, diff, allow_unused=True))
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(diff, grads)]
        value = local_sum.detach().to(ref.dtype) if ref.is_floating_point() else local_sum.detach()
    else:
        # no task here: still take part in the collective with zeros
        grads = [torch.zeros_like(x) for x in diff]
        value = torch.zeros((), dtype=ref.dtype, device=ref.device)
    count = torch.tensor(float(stop - start), dtype=value.dtype, device=value.device)
    payload = [*grads, value.reshape(()), count]
    if is_distributed():
        payload = all_reduce_leaves(payload)
    n_total = n_given if shard_tasks else int(round(float(payload[-1])))
    if n_total == 0:
        raise ValueError("tasks is empty (no task on any rank)")
    grads = [g / n_total for g in payload[: len(diff)]]
    mean_loss = payload[len(diff)] / n_total
    out: list[Any] = [None] * len(leaves)
    for i, g in zip(idx, grads):
        out[i] = g
        if set_grad and leaves[i].is_leaf:
            x = leaves[i]
            x.grad = g.detach().clone() if x.grad is None else x.grad + g.detach()
    return MetaGradient(tree_unflatten(out, spec), mean_loss, n_total, (start, stop))
