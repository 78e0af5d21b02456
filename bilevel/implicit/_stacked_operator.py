"""Hessian-vector products of a stack of argmin problems on one first-order graph, for the
backward linear solves of the ``vmap`` rule.

The linear solvers run under ``torch.func.vmap`` so that every problem keeps its own
scalars and stopping decision. Their products would then be vmapped Hessian-vector
products, each a fresh forward, backward and double backward of every problem. Instead,
the gradient of the summed objectives is built once per solve with ``create_graph``
(problems are independent, so its rows are the problems' own gradients) and each product
is one backward pass through it, as in a single problem's solve
(:meth:`bilevel.implicit.user_problem._UserProblem.reused_operator`). The products enter
the vmapped solver through :class:`_StackedProduct`, an autograd Function whose ``vmap``
rule receives the whole stack.
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
        return tree_unflatten(list(_StackedProduct.apply(product, *leaves)), spec)

    return matvec
