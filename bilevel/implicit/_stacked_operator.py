"""Hessian-vector products of a stack of argmin problems on one first-order graph, for the
backward linear solves of the ``vmap`` rule.

The linear solvers run under ``torch.func.vmap`` so that every problem keeps its own
scalars and stopping decision. Their products would then be vmapped Hessian-vector
products, each a fresh forward, backward and double backward of every problem. Instead,
the gradient of the summed objectives is built once per solve with ``create_graph``
(problems are independent, so its rows are the problems' own gradients) and each product
is one backward pass through it, as in a single problem's solve
(:meth:`bilevel.implicit.user_problem._UserProblem.reused_operator`). The products take
the stacks under ``vmap``'s batched tensors directly (and, for a solve on one joined vector
per problem, split and join it on the whole stack); where a vector is not batched at one
level they enter through :class:`_StackedProduct`, an autograd Function whose ``vmap`` rule
receives the whole stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten

Product = Callable[[Sequence[Tensor]], list[Tensor]]


class _StackedProduct(torch.autograd.Function):
    """``product(v)`` on stacked tensors; under ``vmap`` its rule hands it the whole stack."""

    generate_vmap_rule = False

    @staticmethod
    def forward(product: Product, *v: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(product(list(v)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        return None  # used without gradient tracking (inside a linear solve)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], product: Product, *v: Tensor) -> tuple[Any, Any]:
        B = info.batch_size
        stacked = [
            x.unsqueeze(0).expand(B, *x.shape) if d is None else x.movedim(d, 0)
            for x, d in zip(v, in_dims[1:])
        ]
        out = tuple(product([x.contiguous() for x in stacked]))
        return out, tuple(0 for _ in out)


def _wrapped(tensors: Sequence[Tensor]) -> bool:
    fz = torch._C._functorch
    return any(fz.is_functorch_wrapped_tensor(t) for t in tensors)


def stacked_hvp(
    objective_of: Callable[[Sequence[Tensor]], Callable[[list[Tensor]], Tensor]],
    sol: Sequence[Tensor],
    theta: Sequence[Tensor],
    theta_dims: Sequence[int | None],
) -> Callable[[Any], Any] | None:
    """``v -> H v`` for each problem of the stack, to call inside ``vmap`` over the problems.

    ``objective_of(theta_i)(sol_i)`` is one problem's scalar objective; ``sol`` carries the
    problems in dimension 0, ``theta`` in ``theta_dims``. None when the graph cannot be
    reused (tensors of an enclosing functorch transform, an objective linear in a leaf).
    """
    if _wrapped(list(sol) + list(theta)):
        return None
    with torch.enable_grad():
        s = [x.detach().requires_grad_() for x in sol]
        th = [t.detach() for t in theta]

        def one(si: list[Tensor], ti: list[Tensor]) -> Tensor:
            return objective_of(ti)(si).reshape(())

        values = torch.func.vmap(one, in_dims=(0, list(theta_dims)))(s, th)
        grads = torch.autograd.grad(values.sum(), s, create_graph=True, allow_unused=True)
    if any(g is None or not g.requires_grad for g in grads):
        return None

    def product(v: Sequence[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            out = torch.autograd.grad(grads, s, list(v), retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x) if o is None else o.detach() for x, o in zip(s, out)]

    def matvec(v: Any) -> Any:
        leaves, spec = tree_flatten(v)
        stack = _unbatch(leaves)
        if stack is None:
            return tree_unflatten(list(_StackedProduct.apply(product, *leaves)), spec)
        level, stacked = stack
        return tree_unflatten([_batch(t, level) for t in product(stacked)], spec)

    sizes = [x[0].numel() for x in s]

    def flat_matvec(v: Tensor) -> Tensor | None:
        """The product of the leaves joined into one vector per problem (``v`` under the
        ``vmap`` over the problems), split and joined on the whole stack; None where ``v``
        is not batched at one level (the caller then splits it itself)."""
        stack = _unbatch([v])
        if stack is None:
            return None
        level, (V,) = stack
        # contiguous leaves, as the rule's: the products' kernels then round as they did
        parts = [part.reshape(x.shape).contiguous() for part, x in zip(torch.split(V, sizes, 1), s)]
        out = torch.cat([t.reshape(len(V), -1) for t in product(parts)], 1)
        return _batch(out, level)

    matvec.flat = flat_matvec  # type: ignore[attr-defined]
    return matvec


def _unbatch(leaves: Sequence[Tensor]) -> tuple[int, list[Tensor]] | None:
    """The stacks under ``vmap``'s batched tensors (the problems in dimension 0) and their
    level, when every leaf is batched at one level; else None.

    What :class:`_StackedProduct`'s ``vmap`` rule receives, without the autograd Function's
    dispatch under ``vmap`` (its Python-level handling cost about 0.3 ms per product:
    23 products of iMAML's backward CG per meta-gradient).
    """
    fz = torch._C._functorch
    if not all(fz.is_batchedtensor(t) for t in leaves):
        return None
    levels = {fz.maybe_get_level(t) for t in leaves}
    if len(levels) != 1:
        return None
    out = [fz.get_unwrapped(t).movedim(fz.maybe_get_bdim(t), 0).contiguous() for t in leaves]
    return levels.pop(), out


def _batch(t: Tensor, level: int) -> Tensor:
    """The stack ``t`` (problems in dimension 0) as a batched tensor of ``vmap``'s ``level``."""
    return torch._C._functorch._add_batch_dim(t, 0, level)
