"""``QPLayer``: a QP as a network layer (OptNet)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bilevel.qp.primal_dual import InteriorPoint
from bilevel.qp.solve import qp

__all__ = ["QPLayer"]


class QPLayer(nn.Module):
    """``forward(Q, p, A, b, G, h) = argmin 1/2 x'Qx + p'x  s.t.  Ax = b, Gx <= h``.

    A stateless layer around :func:`bilevel.qp`: any input may come from the network
    (gradients reach all of them), be a buffer or a parameter of an enclosing module.
    Pass ``None`` for a missing constraint pair.

    Args:
        solver: a ``bilevel.qp.interior_point(...)`` configuration.
        return_duals: also return the multipliers ``(y, z)``.

    Example:
        >>> import torch
        >>> layer = QPLayer()
        >>> Q = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
        >>> p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        >>> A = torch.ones(1, 3, dtype=torch.float64); b = torch.ones(1, dtype=torch.float64)
        >>> G = -torch.eye(3, dtype=torch.float64); h = torch.zeros(3, dtype=torch.float64)
        >>> x = layer(Q, p, A, b, G, h)        # projections of -p onto the simplex
        >>> x.shape, bool(torch.allclose(x.sum(-1), torch.ones(4, dtype=torch.float64)))
        (torch.Size([4, 3]), True)
    """

    def __init__(self, solver: InteriorPoint | None = None, return_duals: bool = False) -> None:
        super().__init__()
        self.solver = solver
        self.return_duals = return_duals

    def forward(
        self,
        Q: Tensor,
        p: Tensor,
        A: Tensor | None = None,
        b: Tensor | None = None,
        G: Tensor | None = None,
        h: Tensor | None = None,
        solution: Any = None,
    ) -> Any:
        """The solution ``x`` (and the multipliers with ``return_duals``); see :func:`bilevel.qp`."""
        return qp(
            Q, p, A, b, G, h, solver=self.solver, solution=solution, return_duals=self.return_duals
        )
