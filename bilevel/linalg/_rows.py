"""A Krylov solve under ``torch.func.vmap`` run on the stacks under its batched tensors.

Under ``vmap`` every vector operation of a solver's loop and every one of its per-problem
scalars is a batched tensor: each operation pays the batching rule's dispatch on top of
its kernel (a 0-d update about 14 us against 6 us for the same ``(B,)`` operation
unwrapped, 25 problems on one CPU thread). :class:`_Rows` unwraps the right-hand side to
``(B, numel)`` blocks (problems in dimension 0), gives the loop row-wise inner products
as ``(B, 1)`` columns (so that its scalars, and its updates with them, broadcast row by
row), and wraps the operator so that its products still see the batched tensors of the
``vmap`` level. The loop's arithmetic is the batched one's: the same elementwise products
and row sums, the same masks.

Used by :func:`bilevel.linalg.cg` and :func:`bilevel.linalg.minres` for a cold solve
without a preconditioner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.linalg._vec import Vec, _dot

_fz = torch._C._functorch


@dataclass(frozen=True)
class _Rows:
    """The stacks of one ``vmap`` level: ``B`` problems, each leaf a ``(B, numel)`` block.

    A solver's loop runs on the blocks with its per-problem scalars of shape ``(B, 1)``,
    so that its vector updates broadcast row by row as written; only its inner products
    change (:meth:`dot`, row sums kept as a column).
    """

    level: int
    batch_size: int
    shapes: tuple[torch.Size, ...]  # the leaves' shapes as the caller sees them

    def unbatch(self, v: Sequence[Tensor]) -> Vec:
        """The ``(B, numel)`` blocks under ``v``'s batched tensors (a leaf not batched at
        this level is the same for every problem: expanded)."""
        out = []
        for t in v:
            if _fz.is_batchedtensor(t) and _fz.maybe_get_level(t) == self.level:
                t = _fz.get_unwrapped(t).movedim(_fz.maybe_get_bdim(t), 0)
            else:
                t = t.unsqueeze(0).expand(self.batch_size, *t.shape)
            out.append(t.reshape(self.batch_size, -1))
        return out

    def batch(self, v: Sequence[Tensor]) -> Vec:
        """Blocks as batched tensors of this level, shaped as the caller's leaves."""
        B = self.batch_size
        return [_fz._add_batch_dim(t.reshape(B, *s), 0, self.level) for t, s in zip(v, self.shapes)]

    def scalars(self, v: Sequence[Tensor]) -> Vec:
        """Per-problem ``(B, 1)`` scalars (or one 0-d value for all) as 0-d batched tensors
        of this level."""
        B = self.batch_size
        return [_fz._add_batch_dim(t.expand(B, 1).reshape(B), 0, self.level) for t in v]

    def operator(self, A: Callable[[Vec], Vec]) -> Callable[[Vec], Vec]:
        """``A`` on blocks: its products see this level's batched tensors."""

        def product(v: Vec) -> Vec:
            return self.unbatch(A(self.batch(v)))

        return product

    def dot(self, a: Vec, b: Vec) -> Tensor:
        """The problems' inner products ``(B, 1)``: row sums, added leaf by leaf."""
        total = (a[0] * b[0]).sum(-1, keepdim=True)
        for x, y in zip(a[1:], b[1:]):
            total = total + (x * y).sum(-1, keepdim=True)
        return total


def on_stacks(
    A: Callable[[Vec], Vec], b: Vec, x0: Vec | None, M: object
) -> tuple[_Rows | None, Callable[[Vec], Vec], Vec, Callable[[Vec, Vec], Tensor]]:
    """What a Krylov loop runs on: under ``vmap``, for a cold solve (``x0`` None) without
    a preconditioner (``M`` None), the stacks (their view, the operator on blocks, the
    blocks of ``b``, row-wise inner products); otherwise ``None``, ``A``, ``b`` and
    :func:`bilevel.linalg._vec._dot`."""
    rows = rows_of(b) if M is None and x0 is None else None
    if rows is None:
        return None, A, b, _dot
    return rows, rows.operator(A), rows.unbatch(b), rows.dot


def rows_of(b: Sequence[Tensor]) -> _Rows | None:
    """The stacks' view of ``b`` when every leaf is batched at the same (innermost)
    ``vmap`` level; None otherwise (a plain solve, or leaves of several levels)."""
    if not b or not all(_fz.is_batchedtensor(t) for t in b):
        return None
    levels = {_fz.maybe_get_level(t) for t in b}
    if len(levels) != 1:
        return None
    t = b[0]
    batch_size = _fz.get_unwrapped(t).shape[_fz.maybe_get_bdim(t)]
    return _Rows(levels.pop(), batch_size, tuple(leaf.shape for leaf in b))
