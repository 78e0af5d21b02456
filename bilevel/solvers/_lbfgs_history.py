"""The curvature pairs of a stack of L-BFGS problems and the compact form of the L-BFGS
matrix (Byrd, Nocedal & Schnabel 1994) that turns them into directions.

:class:`_History` keeps the pairs of ``B`` problems as rows of device tensors, with each
problem's ring bookkeeping (write position, pair count) on the host. The small part of the
compact form (:func:`_compact_solve`) and the combination with the pairs
(:func:`_compact_step`, :func:`_compact_combine`) are shared with a single call's ring
(:mod:`bilevel.solvers._lbfgs_single`), so that both round the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.solvers._host_search import _to_device
from bilevel.solvers.line_search import _rows


class _History:
    """Curvature pairs per problem: ``m`` slots each, written in turn at the problem's own
    position ``pos``; ``count`` pairs held (a clear restarts at slot 0, so the filled slots
    and their time order follow from the two). ``Z`` holds ``S`` and ``Y`` (``Z[:, 0]``,
    ``Z[:, 1]``) and ``M`` holds ``S^T Y`` and ``Y^T Y``, as a single call's ring does, so
    one product serves both; every entry is a row sum of elementwise products (a row's
    bits do not depend on the stack). Device tensors updated in place (the solver owns
    them); ``pos`` and ``count`` are host arrays, so the ring's bookkeeping costs no kernel.
    """

    def __init__(self, B: int, m: int, n: int, like: Tensor) -> None:
        self.Z = torch.zeros(B, 2, m, n, dtype=like.dtype, device=like.device)
        # s_i^T y_j and y_i^T y_j of the slots, updated at each push
        self.M = torch.zeros(B, 2, m, m, dtype=like.dtype, device=like.device)
        # the elementwise products of the history's row sums are written here: a fresh
        # temporary of Z's size at every pass cost page faults that took longer than the
        # products themselves (measured 0.8 ms against 0.2 ms for 25 rows x 1761 unknowns)
        self.work = torch.empty(self.Z.numel(), dtype=like.dtype, device=like.device)
        self.pos = np.zeros(B, dtype=np.int64)  # next slot to write
        self.count = np.zeros(B, dtype=np.int64)  # pairs held
        self.m, self.B, self.device = m, B, like.device
        # the stack's rows held here (None: all); finished problems are dropped, so that late
        # passes make the history's memory-bound products over the live rows only
        self.members: Tensor | None = None
        self.member_list = list(range(B))

    def _pick(self, t: Tensor) -> Tensor:
        """The rows of a stack-sized tensor that this history holds."""
        return t if self.members is None else t.index_select(0, self.members)

    def _mine(self, a: Any) -> Any:
        """The rows of a stack-sized host array that this history holds."""
        return a if self.members is None else a[self.member_list]

    def _sum_of_products(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        """``(a * b).sum(dim)``, the products in the work buffer (the same bits: the fresh
        temporary would be contiguous of the same shape)."""
        # both have the same number of dimensions (torch.broadcast_shapes costs 30 us)
        shape = [max(i, j) for i, j in zip(a.shape, b.shape)]
        products = self.work[: math.prod(shape)].view(shape)
        return torch.mul(a, b, out=products).sum(dim)

    def used(self) -> int:
        """The most pairs any problem holds (the slots the products must cover)."""
        return int(self.count.max())

    def keep(self, live: Any) -> None:
        """Drop the problems that stopped, when they are a quarter of the rows held or more."""
        kept = [i for i, row in enumerate(self.member_list) if live[row]]
        if not kept or 4 * len(kept) > 3 * len(self.member_list):
            return
        index = torch.tensor(kept, device=self.device)
        self.Z, self.M = self.Z.index_select(0, index), self.M.index_select(0, index)
        self.pos, self.count = self.pos[kept], self.count[kept]
        self.member_list = [self.member_list[i] for i in kept]
        self.members = torch.tensor(self.member_list, device=self.device)

    def held_any(self) -> Any:
        """``(B,)`` host booleans: the problem holds a pair (rows not held hold none)."""
        held = np.zeros(self.B, dtype=bool)
        held[self.member_list] = self.count > 0
        return held

    def push(self, mask: Any, sy: Tensor, used: int) -> None:
        """Store the pairs ``sy = [s; y]`` (``(B, 2, n)``) where ``mask`` (stack-sized host
        booleans); ``used`` bounds every pair count."""
        mask = self._mine(mask)
        if not mask.any():
            return
        sy = self._pick(sy)
        pushed = np.flatnonzero(mask)
        every = len(pushed) == len(mask)
        rows = _to_device(pushed, self.device)
        pos = _to_device(self.pos[pushed], self.device)

        def part(t: Tensor) -> Tensor:
            return t if every else t.index_select(0, rows)

        self.Z[rows, :, pos] = part(sy)
        # filled slots are always 0 .. count - 1 (a clear restarts at 0), so the new slot is
        # below used + 1; the products of every held row are made and the pushed rows'
        # written, or, where few rows push, those rows' only (a row's bits do not depend on
        # the rest; the products are memory-bound)
        u = min(self.m, used + 1)
        few = 2 * len(pushed) <= len(mask)
        Z = self.Z[:, :, :u]
        s, y = sy[:, 0], sy[:, 1]
        if few:
            Z, s, y = Z.index_select(0, rows), part(s), part(y)
        Zy = self._sum_of_products(Z, y[:, None, None, :], -1)  # S^T y, Y^T y: column pos
        sY = self._sum_of_products(Z[:, 1], s.unsqueeze(1), -1)  # s^T Y: row pos of S^T Y
        if not few:
            Zy, sY = part(Zy), part(sY)
        self.M[rows, :, pos, :u] = torch.stack([sY, Zy[:, 1]], 1)
        self.M[rows, :, :u, pos] = Zy
        self.pos[pushed] = (self.pos[pushed] + 1) % self.m
        self.count[pushed] = np.minimum(self.count[pushed] + 1, self.m)

    def clear(self, mask: Any) -> None:
        """Forget the pairs where ``mask`` (stack-sized host booleans): their slots are
        zeroed, so that a slot past a problem's count always holds zeros."""
        mask = self._mine(mask) & (self.count > 0)
        if not mask.any():
            return
        rows = torch.tensor(np.flatnonzero(mask), device=self.device)
        self.Z.index_fill_(0, rows, 0)
        self.M.index_fill_(0, rows, 0)
        self.count = np.where(mask, 0, self.count)
        self.pos = np.where(mask, 0, self.pos)

    def direction(self, g: Tensor, which: Any) -> Tensor:
        """``-H g`` from the compact form of the L-BFGS matrix (Byrd, Nocedal & Schnabel 1994),
        ``H = gamma I + S R^-T (D + gamma Y^T Y) R^-1 S^T - gamma (S R^-T Y^T + Y R^-1 S^T)``
        with ``R`` the upper triangle of ``S^T Y`` in time order: a fixed number of batched
        products and two small triangular solves whatever the history length. Only the
        rows ``which`` (stack-sized host booleans) are wanted: the others may get anything.

        A problem holding ``c`` pairs that never went round its ring filled slots
        ``0 .. c - 1`` in time order (a clear zeroes the slots past ``c``), so the products
        over the first ``used`` slots need no mask and its compact form is the first ``c``
        rows and columns; only a full ring whose oldest slot is not slot 0 is reordered
        (gathered) first. Rows holding the same count are solved together.
        """
        mine = self._mine(which)
        if not mine.any() or self.count[mine].max() == 0:
            return -g
        rest, g = g, self._pick(g)
        u, B = self.used(), len(self.count)
        Z, MM = self.Z[:, :, :u], self.M[:, :, :u, :u]
        need = np.flatnonzero(mine & (self.count > 0))
        if 2 * len(need) <= B:
            # few rows start a search in this pass: only theirs are made (the products
            # over every held row are memory-bound; a row's bits do not depend on the rest)
            c = int(self.count[need].max())
            index = _to_device(need, g.device)
            part = self._directions(
                g.index_select(0, index),
                Z[:, :, :c].index_select(0, index),
                MM[:, :, :c, :c].index_select(0, index),
                self.count[need],
                self.pos[need],
                np.ones(len(need), dtype=bool),
            )
            d = (-g).index_copy(0, index, part)
        else:
            d = self._directions(g, Z, MM, self.count, self.pos, mine)
        # rows not held: stopped problems, whose direction is not used
        return d if self.members is None else (-rest).index_copy(0, self.members, d)

    def _directions(
        self, g: Tensor, Z: Tensor, MM: Tensor, count: Any, pos: Any, mine: Any
    ) -> Tensor:
        """:meth:`direction` on rows ``g`` with their slots ``Z`` and products ``MM`` (the
        first ``u`` slots), pair counts ``count`` and write positions ``pos`` (host)."""
        B, u = len(count), Z.shape[2]
        ab = self._sum_of_products(Z, g[:, None, None, :], -1)  # S^T g and Y^T g, slot order
        turned = (count == self.m) & (pos != 0) & mine
        order = None
        if turned.any():  # a ring went round: time order differs from slot order
            j = np.arange(u)
            order = _to_device(np.where(turned[:, None], (pos[:, None] + j) % u, j), g.device)
            ab = ab.gather(2, order[:, None].expand(B, 2, u))
            MM = MM.gather(2, order[:, None, :, None].expand(B, 2, u, u))
            MM = MM.gather(3, order[:, None, None, :].expand(B, 2, u, u))
        d = -g
        # the rows holding c pairs take the single call's algebra over exactly c slots (a
        # system padded with identity rows would round otherwise in its triangular solves,
        # and a sum over slots padded with zeros in its order: the sum over slots adds in
        # blocks from 8 slots on); a count held by few rows is solved on those rows only
        # (their copy costs less than the memory-bound combinations over every row)
        for c in sorted(set(count[mine].tolist()) - {0}):
            held = count == c
            picked = np.flatnonzero(held)
            back = order if c == u else None  # only full rings are reordered
            if 2 * len(picked) <= B:
                index = _to_device(picked, g.device)
                d_c = self._count_direction(
                    c,
                    g.index_select(0, index),
                    Z[:, :, :c].index_select(0, index),
                    MM[:, :, :c, :c].index_select(0, index),
                    ab[:, :, :c].index_select(0, index),
                    None if back is None else back.index_select(0, index),
                )
                d = d.index_copy(0, index, d_c)
                continue
            d_c = self._count_direction(c, g, Z, MM, ab, back)
            d = d_c if held.all() else _rows(_to_device(held, g.device), d_c, d)
        return d

    def _count_direction(
        self, c: int, g: Tensor, Z: Tensor, MM: Tensor, ab: Tensor, order: Tensor | None
    ) -> Tensor:
        """``-H g`` of rows holding ``c`` pairs from their products in time order (``order``:
        the slot of each time, where a ring went round; ``None``: slot order)."""
        SY, YY = MM[:, 0, :c, :c], MM[:, 1, :c, :c]
        last = MM[:, :, c - 1, c - 1]
        gamma = last[:, 0] / last[:, 1]
        # + 0.0 as a single call's (turns a -0 into +0)
        p, q = _compact_solve(torch.triu(SY) + 0.0, SY, YY, ab[:, 0, :c], ab[:, 1, :c], gamma)
        if order is not None:  # back to slot order
            q = torch.zeros_like(q).scatter(1, order, q)
            p = torch.zeros_like(p).scatter(1, order, p)
        # _compact_step's combinations, the products in the work buffer
        Sq = self._sum_of_products(q.unsqueeze(2), Z[:, 0, :c], 1)
        Yp = self._sum_of_products(p.unsqueeze(2), Z[:, 1, :c], 1)
        return _compact_combine(g, gamma, Sq, Yp)


def _compact_solve(
    R: Tensor, SY: Tensor, YY: Tensor, a: Tensor, b: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """The small part of the compact form in time order: ``p = R^-1 S^T g`` and
    ``q = R^-T ((D + gamma Y^T Y) p - gamma Y^T g)`` (``D`` the diagonal of ``S^T Y``).
    Shared by a stack and a single problem, so both round the same.
    """
    sy = torch.diagonal(SY, dim1=1, dim2=2)
    # R^-1 through the reversal J (R p = a is (J R J)(J p) = J a, J R J lower): both solves
    # are then lower triangular solves of a column-major view. The batched upper solve
    # rounded a matrix by where it sits in the batch (measured on CPU, float32 and float64:
    # with an odd c >= 9, 1-11 rows of a batch of 16-25 differed in their last bits from the
    # same system solved alone), which made a row's direction depend on its batch-mates;
    # the lower solve did not (6120 rows, c = 1..20, batches of 2-25: none differed).
    lower = R.mT.flip(-1, -2).contiguous().mT  # J R J
    p = torch.linalg.solve_triangular(lower, a.flip(1).unsqueeze(2), upper=False).flip(1)
    YYp = (YY * p.mT).sum(-1, keepdim=True)
    rhs = (sy * p.squeeze(2)).unsqueeze(2) + gamma.reshape(-1, 1, 1) * YYp
    rhs = rhs - gamma.reshape(-1, 1, 1) * b.unsqueeze(2)
    q = torch.linalg.solve_triangular(R.mT, rhs, upper=False)
    return p.squeeze(2), q.squeeze(2)


def _compact_step(g: Tensor, gamma: Tensor, S: Tensor, Y: Tensor, q: Tensor, p: Tensor) -> Tensor:
    """``-H g = -(gamma g + S q - gamma Y p)`` with ``q, p`` in slot order."""
    return _compact_combine(g, gamma, (q.unsqueeze(2) * S).sum(1), (p.unsqueeze(2) * Y).sum(1))


def _compact_combine(g: Tensor, gamma: Tensor, Sq: Tensor, Yp: Tensor) -> Tensor:
    """``-(gamma g + S q - gamma Y p)`` from the combinations ``S q`` and ``Y p``."""
    Hg = gamma.unsqueeze(1) * g + Sq
    Hg = Hg - gamma.unsqueeze(1) * Yp
    return -Hg
