"""Jacobian-vector products by forward mode, with reverse-over-reverse as the fallback
when an op has no forward-mode formula; vector-Jacobian products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import (
    _add_batch_dim,
    _remove_batch_dim,
    _vmap_decrement_nesting,
    _vmap_increment_nesting,
)

from bilevel._engine import engine_run_backward
from bilevel._tree import tree_flatten, tree_unflatten
from bilevel.forward_ad import is_forward_ad_gap, jvp_by_double_vjp, warn_fallback


class _ForwardModeSwitch:
    """Shared flag: use forward-mode AD for this problem's products (until it fails once)."""

    def __init__(self, forward: bool = True, name: str = "implicit layer") -> None:
        self.ok = forward
        self.name = name


def _jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Any],
    switch: _ForwardModeSwitch,
) -> Any:
    """``J_fn(primals) @ tangents`` by forward mode, or from reverse mode alone when an op
    lacks a (working) forward-mode formula: then once per problem a warning, and reverse
    mode for the problem's remaining products."""
    # forward AD refuses tensors whose elements share memory (expanded batch dims)
    primals = [_dense(p) for p in primals]
    tangents = [_dense(t) for t in tangents]
    first_err: BaseException | None = None
    if switch.ok:
        try:
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
        except (RuntimeError, NotImplementedError) as err:
            if not is_forward_ad_gap(err):
                raise
            switch.ok = False
            first_err = err
    try:
        result = jvp_by_double_vjp(fn, primals, tangents)[1]
    except Exception as err:
        if first_err is not None:
            raise err from first_err
        raise
    if first_err is not None:
        warn_fallback(f"{switch.name} (hvp='forward')", first_err, stacklevel=4)
    return result


def _vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    res = torch.func.vjp(fn, *primals)
    return res[0], res[1]


def _plain_grad(
    outputs: Sequence[Any],
    inputs: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    retain_graph: bool,
    create_graph: bool = False,
    batched: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, allow_unused=True, ...)`` for the plain
    backward's own graphs, whose cotangents are shaped right by construction: the engine
    is called without the public function's argument handling (measured about 50 us per
    call with cold caches, a tenth of a 3-unknown hypergradient's budget). Tensor
    subclasses and ``__torch_function__`` modes take the public function."""
    if engine_run_backward is None or torch._C._has_torch_function((*outputs, *inputs, *grads)):
        return torch.autograd.grad(
            outputs,
            inputs,
            grads,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
    outs, ins = tuple(outputs), tuple(inputs)

    def run(gs: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        return engine_run_backward(
            outs, tuple(gs), retain_graph, create_graph, ins, True, accumulate_grad=False
        )

    if not batched:
        return run(grads)
    # the cotangents batched by functorch's vmap (what torch.func.vmap does, without its
    # tree walks and wrappers), not by autograd.grad(is_grads_batched=True)'s legacy
    # batching: that one runs each mat-vec of the graph as a bmm of the matrix expanded
    # per cotangent (measured 1.4x the time at 30 unknowns, 18x at 300), where functorch's
    # rules run one matrix product
    size = grads[0].shape[0]
    level = _vmap_increment_nesting(size, "error")
    try:
        out = run([_add_batch_dim(x, 0, level) for x in grads])
        return tuple(None if o is None else _remove_batch_dim(o, level, size, 0) for o in out)
    finally:
        _vmap_decrement_nesting()


def _dense(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [x if not isinstance(x, Tensor) or x.is_contiguous() else x.contiguous() for x in leaves],
        spec,
    )


class _Products:
    """``v -> (dF/dw)^T v`` with ``matmat``: the products of a stack of vectors at once
    (leaves with a leading batch dimension), which :func:`bilevel.linalg.dense` uses to
    form the matrix in one pass; ``definite``: the operator should be symmetric positive
    definite (the Hessian at a minimum), so dense checks it."""

    def __init__(
        self,
        matvec: Callable[[Sequence[Tensor]], list[Tensor]],
        matmat: Callable[[Sequence[Tensor]], list[Tensor]],
        definite: bool = False,
    ) -> None:
        self.matvec = matvec
        self.matmat = matmat
        self.definite = definite

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        return self.matvec(v)
