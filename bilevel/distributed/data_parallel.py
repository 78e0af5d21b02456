"""Data-parallel inner problems: the inner loss summed over shards through the
differentiable collectives, so every derivative an engine takes is the global one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten
from bilevel.distributed.collectives import all_reduce_sum
from bilevel.distributed.differentiable import global_sum, replicated


def _first_tensor(tree: Any) -> Tensor | None:
    for x in tree_flatten(tree)[0]:
        if isinstance(x, Tensor):
            return x
    return None


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
    :func:`bilevel.argmin`, a solver) does the same work on every rank. In a
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
    """:func:`bilevel.argmin` of a loss whose data is sharded across ranks.

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
        solution_or_init, hparams, solver, linear_solver, kwargs: as in
            :func:`bilevel.argmin` (``diagnostics=``, ``stationarity_tol=``...).
        data: this rank's shard (e.g. from :func:`shard`); every rank needs a non-empty one.
        reduction: ``"sum"`` or ``"mean"`` (see above).
        num_examples: the local number of examples for ``"mean"``; default: the leading
            dimension of the first tensor in ``data``.
        regularizer: ``regularizer(w, hparams) -> scalar``, the data-independent part of
            the inner loss, counted once (see :func:`data_parallel_loss`).

    Example:
        >>> from bilevel.distributed import shard
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
