"""L-BFGS curvature pairs with the inverse of the compact form's triangle kept up to date.

The compact form of the L-BFGS matrix (Byrd, Nocedal & Schnabel 1994) needs
``R^-1`` for ``R`` the upper triangle of ``S^T Y`` in time order; the eager solvers solve
with ``R`` at every direction (:func:`bilevel.solvers._lbfgs_batch._compact_solve`). In a
compiled loop those two triangular solves are calls outside the generated code, and the
reordering of the ring into time order is a dozen gathers. Both go away with ``R^-1``
itself as state, in slot coordinates (``R^-1`` of the time-ordered pairs, rows and columns
relabelled by slot, so every product below is the time-ordered one):

* dropping the oldest pair (a full ring overwrites it) leaves the inverse of the trailing
  block of a triangular matrix, which is the trailing block of its inverse: zero the slot's
  row and column;
* appending the pair ``(s, y)`` as the newest adds the column ``r = S^T y`` (old slots) and
  the diagonal ``rho = s^T y``: the new column of the inverse is ``-R^-1 r / rho`` and its
  diagonal ``1 / rho`` (the column-by-column inversion of a triangle).

Everything is elementwise products and sums over fixed-shape ``(1, m, ...)`` tensors with
masks, so the direction is a few small fused loops. It equals the eager direction up to
rounding (inverting, then multiplying, rounds differently from substitution).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class _Pairs(NamedTuple):
    """One problem's ring of ``m`` curvature pairs (leading dimension 1)."""

    S: Tensor  # (1, m, n)
    Y: Tensor  # (1, m, n)
    YY: Tensor  # (1, m, m): y_i^T y_j by slot
    Rinv: Tensor  # (1, m, m): R^-1 by slot; zero rows and columns at empty slots
    sy: Tensor  # (1, m): s_i^T y_i by slot (the diagonal D)
    gamma: Tensor  # (1,): s^T y / y^T y of the newest pair; 1 with none
    valid: Tensor  # (1, m) bool: the slot holds a pair
    pos: Tensor  # (1,) long: the slot written next (the oldest when the ring is full)

    @staticmethod
    def empty(m: int, like: Tensor) -> _Pairs:
        S = torch.zeros(1, m, like.shape[1], dtype=like.dtype, device=like.device)
        M = torch.zeros(1, m, m, dtype=like.dtype, device=like.device)
        v = torch.zeros(1, m, dtype=like.dtype, device=like.device)
        pos = torch.zeros(1, dtype=torch.long, device=like.device)
        valid = torch.zeros(1, m, dtype=torch.bool, device=like.device)
        # separate tensors: a compiled loop's carried state may not alias
        return _Pairs(S, S.clone(), M, M.clone(), v, torch.ones_like(v[:, 0]), valid, pos)

    def held_any(self) -> Tensor:
        return self.valid.any(1)

    def push(self, mask: Tensor, s: Tensor, y: Tensor) -> _Pairs:
        """Store ``(s, y)`` (1, n) as the newest pair where ``mask`` (1,)."""
        m = self.valid.shape[1]
        at = (torch.arange(m, device=s.device) == self.pos.unsqueeze(1)) & mask.unsqueeze(1)
        old = self.valid & ~at
        S = torch.where(at.unsqueeze(2), s.unsqueeze(1), self.S)
        Y = torch.where(at.unsqueeze(2), y.unsqueeze(1), self.Y)
        y_Y = (Y * y.unsqueeze(1)).sum(-1)
        YY = torch.where(at.unsqueeze(2), y_Y.unsqueeze(1), self.YY)  # the slot's row
        YY = torch.where(at.unsqueeze(1), y_Y.unsqueeze(2), YY)  # and its column
        rho = (s * y).sum(-1)
        r = torch.where(old, (self.S * y.unsqueeze(1)).sum(-1), 0)  # s_i^T y for the old pairs
        cross = at.unsqueeze(1) | at.unsqueeze(2)
        Rinv = torch.where(cross, 0, self.Rinv)  # the dropped (or empty) slot: gone
        column = -(Rinv * r.unsqueeze(1)).sum(-1) / rho.unsqueeze(1) + at / rho.unsqueeze(1)
        Rinv = torch.where(at.unsqueeze(1), torch.where(old | at, column, 0).unsqueeze(2), Rinv)
        return _Pairs(
            S,
            Y,
            YY,
            Rinv,
            torch.where(at, rho.unsqueeze(1), self.sy),
            torch.where(mask, rho / (y * y).sum(-1), self.gamma),
            self.valid | at,
            torch.where(mask, (self.pos + 1) % m, self.pos),
        )

    def clear(self, mask: Tensor) -> _Pairs:
        """Forget every pair where ``mask`` (the ring restarts at slot 0)."""
        return self._replace(
            Rinv=torch.where(mask.reshape(-1, 1, 1), 0, self.Rinv),
            gamma=torch.where(mask, 1, self.gamma),
            valid=self.valid & ~mask.unsqueeze(1),
            pos=torch.where(mask, 0, self.pos),
        )

    def direction(self, g: Tensor) -> Tensor:
        """``-H g = -(gamma g + S q - gamma Y p)`` with ``p = R^-1 S^T g`` and
        ``q = R^-T ((D + gamma Y^T Y) p - gamma Y^T g)``; ``-g`` with no pairs."""
        zero = torch.zeros_like(self.sy)
        a = torch.where(self.valid, (self.S * g.unsqueeze(1)).sum(-1), zero)
        b = torch.where(self.valid, (self.Y * g.unsqueeze(1)).sum(-1), zero)
        p = (self.Rinv * a.unsqueeze(1)).sum(-1)  # zero at empty slots
        YY = torch.where(self.valid.unsqueeze(1) & self.valid.unsqueeze(2), self.YY, 0)
        gamma = self.gamma.unsqueeze(1)
        rhs = self.sy * p + gamma * (YY * p.unsqueeze(1)).sum(-1) - gamma * b
        q = (self.Rinv * rhs.unsqueeze(2)).sum(1)
        Sq = (q.unsqueeze(2) * self.S).sum(1)
        Yp = (p.unsqueeze(2) * self.Y).sum(1)
        return -(gamma * g + Sq - gamma * Yp)
