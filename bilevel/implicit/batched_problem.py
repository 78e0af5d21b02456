"""A stack of independent problems, each solved on its own: the ``vmap`` rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.implicit.problem import _Problem


def _vmap_over(fn: Callable[..., Any], in_dims: tuple[Any, ...]) -> Callable[..., Any]:
    return torch.func.vmap(fn, in_dims=in_dims)


class _BatchedProblem(_Problem):
    """A stack of independent instances of ``base`` (the ``vmap`` rule).

    Solutions carry the batch in dimension 0; parameters carry it in dimension 0 or are
    shared (``None``). ``vmap(f)`` means ``f`` on each element, so every instance is
    solved on its own: the linear solves of backward and jvp passes run vectorised under
    ``torch.func.vmap``, each problem with its own step sizes, masks and stopping decision
    (the loop ends when every problem is done); inner solvers, whose line searches and
    stopping tests branch on values, run once per instance. Either way element ``i``'s
    answer does not depend on the other elements.
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

    @property
    def sol_spec(self) -> Any:
        return getattr(self.base, "sol_spec", None)

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        if self.kind == "linear":
            base = self.base
            out = _vmap_over(base.solve_plain, (0, self.dims))(list(init), list(theta))
            return list(out)
        outs = []
        for i in range(self.batch_size):
            th = [t[i] if d is not None else t for t, d in zip(theta, self.dims)]
            outs.append(self.base.solve([x[i] for x in init], th))
        return [torch.stack(col) for col in zip(*outs)]

    def solve_plain(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return self.solve(init, theta)
