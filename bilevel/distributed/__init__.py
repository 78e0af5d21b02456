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

The package's modules: ``process`` (process group, rank, device), ``failure``
(:func:`fail_fast`), ``sharding``, ``collectives`` (not differentiable), ``differentiable``
(:func:`replicated`, :func:`global_sum`), ``task_parallel`` (:func:`meta_gradient`) and
``data_parallel``.
"""

from bilevel.distributed.collectives import (
    all_gather_cat,
    all_reduce_mean,
    all_reduce_sum,
    broadcast,
    broadcast_object,
)
from bilevel.distributed.data_parallel import data_parallel_argmin, data_parallel_loss
from bilevel.distributed.differentiable import global_sum, replicated
from bilevel.distributed.failure import fail_fast
from bilevel.distributed.process import (
    DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S,
)
from bilevel.distributed.process import (
    barrier,
    device,
    init_from_env,
    is_distributed,
    is_main,
    local_rank,
    rank,
    shutdown,
    world_size,
)
from bilevel.distributed.sharding import shard, shard_bounds
from bilevel.distributed.task_parallel import MetaGradient, meta_gradient

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
