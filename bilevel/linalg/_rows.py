"""A Krylov solve under ``torch.func.vmap`` run on the stacks under its batched tensors.

Under ``vmap`` every vector operation of a solver's loop and every one of its per-problem
scalars is a batched tensor: each operation pays the batching rule's dispatch on top of
its kernel (a 0-d update about 14 us against 6 us for the same ``(B,)`` operation
unwrapped, 25 problems on one CPU thread). :class:`_Rows` unwraps the right-hand side to
its stacks (problems in dimension 0), gives the loop row-wise inner products (``(B,)``
scalars) and updates, and wraps the operator so that its products still see the batched
tensors of the ``vmap`` level. The loop's arithmetic is the batched one's: the same
elementwise products and row sums, the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.linalg._vec import Vec

_fz = torch._C._functorch


@dataclass(frozen=True)
class _Rows:
    """The stacks of one ``vmap`` level: ``B`` problems in dimension 0 of every leaf."""

    level: int
    batch_size: int

    def unbatch(self, v: Sequence[Tensor]) -> Vec:
        """The stacks under ``v``'s batched tensors (a leaf not batched at this level is
        the same for every problem: expanded)."""
        out = []
        for t in v:
            if _fz.is_batchedtensor(t) and _fz.maybe_get_level(t) == self.level:
                out.append(_fz.get_unwrapped(t).movedim(_fz.maybe_get_bdim(t), 0))
            else:
                out.append(t.unsqueeze(0).expand(self.batch_size, *t.shape))
        return out

    def batch(self, v: Sequence[Tensor]) -> Vec:
        """Stacks as batched tensors of this level (what the caller's ``vmap`` returns)."""
        return [_fz._add_batch_dim(t, 0, self.level) for t in v]

    def operator(self, A: Callable[[Vec], Vec]) -> Callable[[Vec], Vec]:
        """``A`` on stacks: its products see this level's batched tensors."""

        def product(v: Vec) -> Vec:
            return self.unbatch(A(self.batch(v)))

        return product

    def dot(self, a: Vec, b: Vec) -> Tensor:
        """The problems' inner products ``(B,)``: each leaf's row sums, added leaf by leaf."""
        total = None
        for x, y in zip(a, b):
            d = (x * y).sum(tuple(range(1, x.dim()))) if x.dim() > 1 else x * y
            total = d if total is None else total + d
        assert total is not None
        return total

    def axpy(self, alpha: Tensor, x: Vec, y: Vec, out: Vec | None = None) -> Vec:
        """``y + alpha x`` row by row (``alpha`` of shape ``(B,)``), into ``out`` when given."""
        scaled: dict[int, Tensor] = {}  # alpha shaped for each leaf rank, made once
        results = []
        for i, (xi, yi) in enumerate(zip(x, y)):
            a = scaled.get(xi.dim())
            if a is None:
                a = scaled[xi.dim()] = alpha.reshape(-1, *([1] * (xi.dim() - 1)))
            if out is None:
                results.append(torch.addcmul(yi, xi, a))
            else:
                results.append(torch.addcmul(yi, xi, a, out=out[i]))
        return results


def rows_of(b: Sequence[Tensor]) -> _Rows | None:
    """The stacks' view of ``b`` when every leaf is batched at the same (innermost)
    ``vmap`` level; None otherwise (a plain solve, or leaves of several levels)."""
    if not b or not all(_fz.is_batchedtensor(t) for t in b):
        return None
    levels = {_fz.maybe_get_level(t) for t in b}
    if len(levels) != 1:
        return None
    t = b[0]
    level = levels.pop()
    return _Rows(level, _fz.get_unwrapped(t).shape[_fz.maybe_get_bdim(t)])
