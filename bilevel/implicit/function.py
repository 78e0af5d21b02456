"""The ``torch.autograd.Function`` of every implicit solution: the forward runs the solver,
``backward`` and ``jvp`` apply the implicit function theorem, and ``vmap`` solves each
problem of a batch on its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.implicit._leaves import _zeros_like_leaves
from bilevel.implicit.batched_problem import _BatchedProblem
from bilevel.implicit.linear_problem import _LinearProblem
from bilevel.implicit.problem import _Problem
from bilevel.implicit.warm_start import is_wrapped


def _linear_of(problem: _Problem, transpose: bool) -> _Problem:
    """The linear system of a backward (``transpose``) or jvp pass through ``problem``.

    For a batch (the vmap rule) it is the batch of each instance's own system, so that
    every problem's linear solve keeps its own scalars and stopping decision.
    """
    if isinstance(problem, _BatchedProblem):
        base = _linear_of(problem.base, transpose)
        dims = [*problem.dims, *([0] * (2 * problem.n_sol))]  # [*theta, *sol, *rhs]
        return _BatchedProblem(base, dims, problem.batch_size)
    return _LinearProblem(problem, transpose)


class _Implicit(torch.autograd.Function):
    """Solution of ``problem`` from ``init`` with parameters ``theta``; IFT derivatives."""

    generate_vmap_rule = False

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        """``torch.autograd.Function.apply`` without its per-call ``inspect.signature``
        binding (measured 15-25 us of a 3-unknown hypergradient): ``forward`` takes
        positional arguments only and has no defaults, so there is nothing to bind.
        Under functorch transforms the stock path runs."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        args = torch._functorch.utils.unwrap_dead_wrappers(args)
        return super(torch.autograd.Function, cls).apply(*args)  # type: ignore[misc]

    @staticmethod
    def forward(problem: _Problem, n_sol: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        if problem.given and not torch.is_grad_enabled():  # (apply disables grad mode)
            return tuple(t.clone() for t in tensors[:n_sol])  # the solution given: a copy
        init = [t.detach() for t in tensors[:n_sol]]
        theta = [t.detach() for t in tensors[n_sol:]]
        with torch.no_grad():
            sol = problem.solve(init, theta)
        return tuple(sol)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        problem, n_sol, *tensors = inputs
        theta = tensors[n_sol:]
        ctx.problem = problem
        ctx.n_sol = n_sol
        ctx.n_theta = len(theta)
        ctx.save_for_backward(*theta, *output)
        ctx.save_for_forward(*theta, *output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        n_sol, n_theta = ctx.n_sol, ctx.n_theta
        saved = ctx.saved_tensors
        theta, sol = list(saved[:n_theta]), list(saved[n_theta:])
        needs = ctx.needs_input_grad[2 + n_sol :]
        which = [i for i, (t, n) in enumerate(zip(theta, needs)) if n and t.is_floating_point()]
        out: list[Tensor | None] = [None] * (2 + n_sol + n_theta)
        if not which:
            return tuple(out)
        g = [torch.zeros_like(s) if x is None else x for x, s in zip(grads, sol)]
        if not torch.is_grad_enabled() and not is_wrapped([*theta, *sol, *g]):
            # no double backward asked (create_graph=False), no functorch transform: one
            # first-order graph serves the linear solve's products and the final vjp
            plain = problem.plain_vjp(sol, theta, g, which)
            if plain is not None:
                for i, gt in zip(which, plain):
                    out[2 + n_sol + i] = gt
                return tuple(out)
        # u solves (dF/dw)^T u = -g; it is itself an implicit solution, so differentiable
        lin = _linear_of(problem, transpose=True)
        u = _Implicit.apply(lin, n_sol, *_zeros_like_leaves(sol), *theta, *sol, *g)
        gtheta = problem.vjp_theta(sol, theta, list(u), which)
        for i, gt in zip(which, gtheta):
            out[2 + n_sol + i] = gt
        return tuple(out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        n_sol, n_theta = ctx.n_sol, ctx.n_theta
        saved = ctx.saved_tensors
        theta, sol = list(saved[:n_theta]), list(saved[n_theta:])
        dtheta = list(tangents[2 + n_sol :])
        dtheta = [
            t if (t is not None and th.is_floating_point()) else None
            for t, th in zip(dtheta, theta)
        ]
        if all(t is None for t in dtheta):
            return tuple(_zeros_like_leaves(sol))
        c = problem.jvp_theta(sol, theta, dtheta)
        lin = _linear_of(problem, transpose=False)
        x = _Implicit.apply(lin, n_sol, *_zeros_like_leaves(sol), *theta, *sol, *c)
        return tuple(x)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], problem: _Problem, n_sol: int, *tensors: Tensor
    ) -> tuple[Any, Any]:
        B = info.batch_size
        dims = in_dims[2:]
        init = []
        for t, d in zip(tensors[:n_sol], dims[:n_sol]):
            init.append(t.unsqueeze(0).expand(B, *t.shape) if d is None else t.movedim(d, 0))
        theta, tdims = [], []
        for t, d in zip(tensors[n_sol:], dims[n_sol:]):
            theta.append(t if d is None else t.movedim(d, 0))
            tdims.append(None if d is None else 0)
        batched = _BatchedProblem(problem, tdims, B)
        out = _Implicit.apply(batched, n_sol, *init, *theta)
        return tuple(out), tuple(0 for _ in out)
