"""A stack of independent problems as one joint problem: the ``vmap`` rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_leaves, tree_unflatten
from bilevel.implicit.problem import _Problem
from bilevel.implicit.user_problem import _UserProblem


def _vmap_over(fn: Callable[..., Any], in_dims: tuple[Any, ...]) -> Callable[..., Any]:
    return torch.func.vmap(fn, in_dims=in_dims)


class _BatchedProblem(_Problem):
    """A stack of independent instances of ``base`` (the ``vmap`` rule): one joint problem.

    Solutions carry the batch in dimension 0; parameters carry it in dimension 0 or are
    shared (``None``). The joint optimality function is block diagonal, so the joint
    solve (one L-BFGS run on the summed objective, one CG on the block-diagonal system,
    ...) returns every instance's solution.
    """

    def __init__(self, base: _Problem, theta_dims: Sequence[int | None], batch_size: int) -> None:
        self.base = base
        self.dims = list(theta_dims)
        self.batch_size = batch_size
        self.kind = base.kind
        self._share(base)

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return list(_vmap_over(self.base.residual, (0, self.dims))(list(sol), list(theta)))

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        return list(
            _vmap_over(self.base.matvec, (0, self.dims, 0))(list(sol), list(theta), list(v))
        )

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        return list(
            _vmap_over(self.base.rmatvec, (0, self.dims, 0))(list(sol), list(theta), list(v))
        )

    def target(self, theta: Sequence[Tensor]) -> Any:
        base, dims, theta = self.base, self.dims, list(theta)
        if self.kind == "linear":
            # the plain operator: the reused-graph one cannot run under vmap
            plain = getattr(base, "plain_target", base.target)
            mv = _vmap_over(lambda v, th: plain(th)[0](v), (0, dims))
            c = _vmap_over(lambda th: list(plain(th)[1]), (dims,))(theta)
            return (lambda v: list(mv(list(v), theta))), list(c)
        if isinstance(base, _UserProblem) and base._target is None:
            return None
        spec = getattr(base, "sol_spec", None)
        if spec is None:
            return None

        def one(w_leaves: list[Tensor], th: list[Tensor]) -> Any:
            return base.target(th)(tree_unflatten(list(w_leaves), spec))

        joint = _vmap_over(one, (0, dims))
        if self.kind == "objective":
            return lambda W: joint(tree_leaves(W), theta).sum()
        return lambda W: tree_unflatten(tree_leaves(joint(tree_leaves(W), theta)), spec)

    @property
    def sol_spec(self) -> Any:
        return getattr(self.base, "sol_spec", None)

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        return self.base.run(target, init)

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        if self.kind != "opaque":
            return self.run(self.target(theta), init)
        # an arbitrary solver function cannot be batched: solve instance by instance
        outs = []
        for i in range(self.batch_size):
            th = [t[i] if d is not None else t for t, d in zip(theta, self.dims)]
            outs.append(self.base.solve([x[i] for x in init], th))
        return [torch.stack(col) for col in zip(*outs)]
