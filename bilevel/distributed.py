"""Hypergradients and meta-gradients on several processes, GPUs or nodes (``torch.distributed``).

Launch the same script on every process with ``torchrun`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) and call
:func:`init_from_env` once; everything here also runs unchanged in a single process
without a process group, where every collective is the identity.

Two ways to split the work:

* **Task-parallel** (:func:`meta_gradient`): a global meta-batch of tasks is split into
  contiguous blocks (:func:`shard`); each rank computes the outer losses of its tasks,
  whatever engine adapts them (any :func:`bilevel.unroll` mode, the implicit engine), takes
  one backward pass over their sum, and one flattened ``all_reduce`` adds the gradients and
  the losses of all ranks. Dividing by the *global* number of tasks makes the result the
  single-process mean over the global batch, also when the batch does not divide evenly.
* **Data-parallel** (:func:`data_parallel_loss`, :func:`data_parallel_argmin`): the inner
  problem's data is sharded and the inner loss is the sum (or the example-weighted mean) of
  the local losses. Two differentiable collectives, :func:`replicated` and
  :func:`global_sum`, make every derivative of that loss global: the inner gradient, the
  Hessian-vector products inside the linear solver (reverse-over-reverse or
  forward-over-reverse) and the mixed second derivatives of the backward pass are all-reduced,
  so every rank sees the same operator, runs the same solver iterations and ends with the
  same hypergradient.

Why explicit collectives and not ``DistributedDataParallel``: DDP all-reduces gradients
from hooks its reducer arms for ``loss.backward()``. Hypergradients are built with
``torch.autograd.grad(..., create_graph=True)``, double backward and forward-mode
products, and DDP supports none of them: ``autograd.grad`` does not fire its hooks, so the
gradients are silently not synchronised (pytorch#47562); ``backward(create_graph=True)``
through a DDP model raised (pytorch#63812), and even where it runs, the all-reduce is
invisible to autograd, so nothing can be differentiated through it and gradients of
gradients are never synchronised (pytorch#63929). DDP would also reduce in the wrong place:
after a backward, not inside the objective that the inner solver and the linear solver
see. Here each collective sits exactly where the mathematics puts a sum over ranks, inside
autograd, with rules for backward, forward mode and ``vmap``.

The differentiable collectives follow the usual pair of conjugate operators:

* ``replicated(x)``: forward the identity (``x`` is the same on every rank), backward a
  sum over ranks (each rank holds part of the gradient);
* ``global_sum(x)``: forward a sum over ranks (each rank holds a part), backward the
  identity (the downstream computation is the same on every rank).

Each is the transpose of the other, so derivatives of any order stay consistent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten

__all__ = [
    "MetaGradient",
    "all_gather_cat",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "broadcast_object",
    "data_parallel_argmin",
    "data_parallel_loss",
    "device",
    "fail_fast",
    "global_sum",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "meta_gradient",
    "rank",
    "replicated",
    "shard",
    "shard_bounds",
    "shutdown",
    "world_size",
]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0

# --------------------------------------------------------------------------- process group


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised.

    Example:
        >>> is_distributed()          # a plain Python process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without a process group).

    Example:
        >>> rank()
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """The number of processes in the default group (1 without a process group).

    Example:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def local_rank() -> int:
    """The rank within this node (``LOCAL_RANK`` set by ``torchrun``; 0 otherwise).

    Example:
        >>> isinstance(local_rank(), int)
        True
    """
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got {value!r}") from None


def is_main() -> bool:
    """True on rank 0: the process that writes files, logs and shows progress.

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


def device() -> torch.device:
    """The device this process should compute on: ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU.

    Example:
        >>> device().type in ("cpu", "cuda")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _timeout(value: float | datetime.timedelta | None) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif value is None:
        raw = os.environ.get("BILEVEL_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(
                f"BILEVEL_DIST_TIMEOUT must be a number of seconds, got {raw!r}"
            ) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"timeout must be seconds (a number) or a timedelta, got {type(value).__name__}"
        )
    if not seconds > 0:
        raise ValueError(f"timeout must be positive, got {seconds} seconds")
    return datetime.timedelta(seconds=seconds)


def init_from_env(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
) -> tuple[int, int]:
    """Initialise the default process group from the ``torchrun`` environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK``).
    Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, this is a no-op returning ``(0, 1)``:
    the same script runs as a plain single process. Calling it again returns the existing
    group's ``(rank, world_size)``.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` to pick from the device: NCCL when CUDA
            is available (and then ``torch.cuda.set_device(LOCAL_RANK)``), gloo on the CPU.
        timeout: how long a collective may wait for the other ranks before raising, in
            seconds or as a ``timedelta``; default ``BILEVEL_DIST_TIMEOUT`` from the
            environment, else 600 s. A rank that dies makes the others fail at their next
            collective instead of hanging forever.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> init_from_env()           # not launched by torchrun: nothing to do
        (0, 1)
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"backend must be 'gloo', 'nccl', 'mpi', 'ucc' or None, got {backend!r}")
    td = _timeout(timeout)
    if not dist.is_available():
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 0, 1
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if n <= 1:
        return 0, 1
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={n} but {', '.join(missing)} is not set: launch with torchrun "
            "(torchrun --nproc_per_node=N ...) or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    r = int(os.environ["RANK"])
    if not 0 <= r < n:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={n}), got {r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend, init_method="env://", rank=r, world_size=n, timeout=td)
    return r, n


def shutdown() -> None:
    """Destroy the default process group if there is one (call at the end of a script).

    Example:
        >>> shutdown()                # no group: nothing to do
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in a single process).

    Example:
        >>> barrier()
    """
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def fail_fast(
    exit_code: int = 1, *, expected: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Make an exception on one rank end every rank promptly instead of hanging.

    In a distributed run, an exception escaping the block prints its traceback with the
    rank and exits the process at once (``os._exit``), which closes its connections: the
    other ranks' pending or next collective fails (and their own ``fail_fast`` exits them),
    so the whole job ends with an error rather than waiting for the collective timeout.
    In a single process the exception propagates normally.

    Args:
        exit_code: the exit status of a failed rank.
        expected: exception types that propagate normally, for conditions every rank
            meets at the same point (a step limit, a usage error decided on rank 0 and
            shared); ``SystemExit`` with status 0 always propagates.

    Example:
        >>> with fail_fast():
        ...     x = 1 + 1
    """
    try:
        yield
    except SystemExit as err:
        if not is_distributed() or err.code in (0, None) or isinstance(err, expected):
            raise
        _die(err, err.code if isinstance(err.code, int) else exit_code)
    except BaseException as err:  # noqa: BLE001 - every failure must end the rank
        if not is_distributed() or isinstance(err, expected):
            raise
        _die(err, exit_code)


def _die(err: BaseException, exit_code: int) -> None:
    try:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        sys.stderr.write(
            f"[rank {rank()}/{world_size()}] failed; exiting so that the other ranks stop\n"
        )
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(exit_code)


# --------------------------------------------------------------------------- sharding


def _check_rank_world(r: int | None, n: int | None) -> tuple[int, int]:
    r = rank() if r is None else r
    n = world_size() if n is None else n
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


# --------------------------------------------------------------------------- collectives


def _all_reduce_leaves(leaves: Sequence[Tensor], op: Any = None) -> list[Tensor]:
    """Out-of-place all-reduce of tensors: one flattened collective per (device, dtype)."""
    op = dist.ReduceOp.SUM if op is None else op
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    out: list[Tensor] = list(leaves)
    for idx in groups.values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=op)
        offset = 0
        for i in idx:
            n = leaves[i].numel()
            out[i] = flat[offset : offset + n].view(leaves[i].shape)
            offset += n
    return out


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
    reduced = _all_reduce_leaves([leaves[i] for i in idx])
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
    reduced = _all_reduce_leaves([leaves[i] for i in idx])
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
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in idx:
        groups.setdefault((leaves[i].device, leaves[i].dtype), []).append(i)
    for group in groups.values():
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for i in group:
            n = leaves[i].numel()
            leaves[i] = flat[offset : offset + n].view(leaves[i].shape)
            offset += n
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


# --------------------------------------------------------------------------- differentiable


def _fill(
    tensors: Sequence[Tensor | None], like: Sequence[tuple[torch.Size, torch.dtype, torch.device]]
) -> list[Tensor]:
    return [
        torch.zeros(s, dtype=d, device=dev) if t is None else t
        for t, (s, d, dev) in zip(tensors, like)
    ]


class _GlobalSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (conjugate of :class:`_Replicate`)."""

    @staticmethod
    def forward(*xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(_all_reduce_leaves(list(xs)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Any) -> None:
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _Replicate.apply(*_fill(grads, ctx.like))

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _GlobalSum.apply(*_fill(tangents, ctx.like))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *xs: Tensor) -> tuple[Any, Any]:
        # elementwise over ranks: the batch dimension is part of the tensor
        return _GlobalSum.apply(*xs), tuple(in_dims)


class _Replicate(torch.autograd.Function):
    """Forward: identity on a value held by every rank. Backward: sum over ranks."""

    @staticmethod
    def forward(*xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        # a copy, not the input itself: outputs aliasing inputs complicate forward-mode AD
        return tuple(x.clone() for x in xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Any) -> None:
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _GlobalSum.apply(*_fill(grads, ctx.like))

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _Replicate.apply(*_fill(tangents, ctx.like))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *xs: Tensor) -> tuple[Any, Any]:
        return _Replicate.apply(*xs), tuple(in_dims)


def _apply_to_float_leaves(fn: Any, tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
    if not idx or not is_distributed():
        return tree
    out = fn.apply(*[leaves[i] for i in idx])
    for i, x in zip(idx, out):
        leaves[i] = x
    return tree_unflatten(leaves, spec)


def global_sum(tree: Tree) -> Tree:
    """Differentiable sum over ranks of per-rank parts (e.g. local losses).

    Forward: an all-reduce. Backward: the identity, because what follows is computed
    identically on every rank; forward mode and ``vmap`` are supported, and derivatives
    of any order (its transpose is :func:`replicated`). Floating-point leaves only;
    other leaves are returned unchanged. Identity in a single process.

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> loss = global_sum((w ** 2).sum())     # the sum of every rank's local loss
        >>> loss.backward(); w.grad
        tensor([2., 2., 2.])
    """
    return _apply_to_float_leaves(_GlobalSum, tree)


def replicated(tree: Tree) -> Tree:
    """Mark values held identically by every rank (parameters, hyperparameters).

    Forward: the identity. Backward: the gradients of the ranks' local uses are summed
    over ranks, so the gradient w.r.t. a replicated value is the global one on every
    rank. Forward mode, ``vmap`` and higher derivatives are supported. Identity in a
    single process.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> (replicated(w) * 3).sum().backward(); w.grad
        tensor([3., 3.])
    """
    return _apply_to_float_leaves(_Replicate, tree)


# --------------------------------------------------------------------------- task-parallel


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


def _first_tensor(tree: Any) -> Tensor | None:
    for x in tree_flatten(tree)[0]:
        if isinstance(x, Tensor):
            return x
    return None


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
        payload = _all_reduce_leaves(payload)
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


# --------------------------------------------------------------------------- data-parallel


def _local_size(data: Any) -> int:
    t = _first_tensor(data)
    if t is None or t.dim() == 0:
        raise ValueError(
            "reduction='mean' needs the number of local examples: pass num_examples=..., or "
            "data whose first tensor has a leading example dimension"
        )
    return int(t.shape[0])


def data_parallel_loss(
    inner_loss: Callable[..., Tensor],
    weight: float | Tensor = 1.0,
    regularizer: Callable[[Any, Any], Tensor] | None = None,
) -> Callable[[Any, Any, Any], Tensor]:
    """Turn a loss on this rank's shard into the global loss
    ``sum_ranks weight_r * loss_r + regularizer``.

    The returned ``loss(params, hparams, data)`` passes ``params`` and ``hparams``
    through :func:`replicated` and the weighted local loss through :func:`global_sum`;
    the regularizer is computed once (identically on every rank), not summed over ranks.
    Its value is the global loss on every rank and all its derivatives (gradients,
    Hessian-vector products, mixed derivatives w.r.t. hyperparameters, by reverse or
    forward mode) are the global ones, so any engine given it (:func:`bilevel.unroll`,
    :func:`bilevel.implicit.argmin`, a solver) does the same work on every rank. In a
    single process it is ``weight * inner_loss``.

    Args:
        inner_loss: ``inner_loss(params, hparams, data) -> scalar`` on the local shard.
        weight: this rank's weight, e.g. ``n_local / n_global`` when each local loss is a
            mean over its examples (see :func:`data_parallel_argmin`, ``reduction="mean"``).
        regularizer: ``regularizer(params, hparams) -> scalar``, a term of the global loss
            that does not depend on the data (an L2 penalty). Keep such terms out of
            ``inner_loss``: there they would be counted once per rank.

    Example:
        >>> loss = data_parallel_loss(lambda w, h, d: ((d - w) ** 2).sum(),
        ...                           regularizer=lambda w, h: h * (w ** 2).sum())
        >>> float(loss(torch.zeros(2), 1.0, torch.ones(3, 2)))
        6.0
    """
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"regularizer must be callable or None, got {type(regularizer).__name__}")

    def loss(params: Any, hparams: Any, data: Any) -> Tensor:
        p, h = replicated((params, hparams))
        value = inner_loss(p, h, data)
        if not isinstance(value, Tensor):
            raise TypeError(f"inner_loss must return a tensor, got {type(value).__name__}")
        if isinstance(weight, Tensor) or weight != 1.0:
            value = value * weight
        value = global_sum(value)
        if regularizer is not None:
            value = value + regularizer(params, hparams)
        return value

    return loss


def data_parallel_argmin(
    inner_loss: Callable[..., Tensor],
    solution_or_init: Tree,
    hparams: Any,
    data: Any,
    *,
    reduction: str = "sum",
    num_examples: int | None = None,
    regularizer: Callable[[Any, Any], Tensor] | None = None,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    **kwargs: Any,
) -> Tree:
    """:func:`bilevel.implicit.argmin` of a loss whose data is sharded across ranks.

    The inner problem is ``argmin_w sum_r inner_loss(w, hparams, data_r) + regularizer(w,
    hparams)`` (``reduction="sum"``), or the same with the example-weighted mean
    ``sum_r n_r loss_r / sum_r n_r`` of per-shard mean losses (``reduction="mean"``). The inner solver sees the global
    objective (value and gradient all-reduced), the backward's linear solver the global
    Hessian (each Hessian-vector product all-reduced), and the mixed derivatives w.r.t.
    ``hparams`` are summed over ranks. Every rank therefore runs the same solver and
    linear-solver iterations and returns the same solution and hypergradient, equal to the
    single-process one on all the data. With one process it is plain ``argmin``.

    ``solution_or_init`` and ``hparams`` must be identical on every rank; the outer loss
    should be too (compute it on shared validation data, or ``global_sum`` its shards).

    Args:
        inner_loss: ``inner_loss(w, hparams, data) -> scalar`` on the local shard.
        solution_or_init, hparams, solver, linear_solver, **kwargs: as in
            :func:`bilevel.implicit.argmin` (``diagnostics=``, ``stationarity_tol=``...).
        data: this rank's shard (e.g. from :func:`shard`); every rank needs a non-empty one.
        reduction: ``"sum"`` or ``"mean"`` (see above).
        num_examples: the local number of examples for ``"mean"``; default: the leading
            dimension of the first tensor in ``data``.
        regularizer: ``regularizer(w, hparams) -> scalar``, the data-independent part of
            the inner loss, counted once (see :func:`data_parallel_loss`).

    Example:
        >>> from bilevel.solvers import lbfgs
        >>> X = torch.randn(8, 3, dtype=torch.float64); y = torch.randn(8, dtype=torch.float64)
        >>> l2 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> loss = lambda w, h, d: ((d["x"] @ w - d["y"]) ** 2).mean()
        >>> w = data_parallel_argmin(loss, torch.zeros(3, dtype=torch.float64), l2,
        ...                          shard({"x": X, "y": y}), reduction="mean",
        ...                          regularizer=lambda w, h: h * (w ** 2).sum(), solver=lbfgs(tol=1e-10))
        >>> w.sum().backward(); l2.grad.shape   # the same on every rank
        torch.Size([])
    """
    from bilevel import implicit

    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 0):
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    weight: float | Tensor = 1.0
    if reduction == "mean":
        n_local = _local_size(data) if num_examples is None else num_examples
        ref = _first_tensor(solution_or_init)
        dtype = ref.dtype if ref is not None else torch.float64
        dev = ref.device if ref is not None else torch.device("cpu")
        n = all_reduce_sum(torch.tensor(float(n_local), dtype=dtype, device=dev))
        n_global = float(n)  # once, before the solve
        if n_global <= 0:
            raise ValueError("reduction='mean' with no example on any rank")
        weight = n_local / n_global
    loss = data_parallel_loss(inner_loss, weight, regularizer)
    return implicit.argmin(
        loss, solution_or_init, hparams, data, solver=solver, linear_solver=linear_solver, **kwargs
    )
