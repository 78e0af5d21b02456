"""Euclidean projection onto the Birkhoff polytope (doubly stochastic matrices).

``P = max(X - alpha 1' - 1 beta', 0)`` where the dual variables ``alpha`` (rows) and
``beta`` (columns) make every row and column sum to one. They are found by
Sinkhorn-style alternating maximisation of the (concave, smooth) dual: with ``beta``
fixed the best ``alpha_i`` is the threshold of the simplex projection of row
``X_i - beta``, and the other way round for columns (Blondel et al. 2018, "Smooth and
sparse optimal transport", the quadratic regularisation). The iterations run without a
graph; one Newton step on the marginal equations with autograd on then attaches the
implicit derivatives, so the Jacobian of ``P`` w.r.t. ``X`` is the exact one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.constraints.projections import simplex_threshold

__all__ = ["project_birkhoff"]


def _marginal_gap(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    p = torch.relu(x - alpha.unsqueeze(-1) - beta.unsqueeze(-2))
    return torch.cat([p.sum(-1) - 1, p.sum(-2) - 1], dim=-1)


def project_birkhoff(x: Tensor, iterations: int = 500) -> Tensor:
    """Projection of square matrices ``x`` (``(..., n, n)``) onto the doubly stochastic ones.

    ``iterations`` alternating dual updates (each two sorts of the matrix; no host
    synchronisation), then a Newton step on the dual (a small ``2n`` least-squares solve:
    the dual is defined up to ``alpha + t, beta - t``). Differentiable w.r.t. ``x``.

    Example:
        >>> p = project_birkhoff(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
        >>> p
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("project_birkhoff: x must be a floating tensor of shape (..., n, n)")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"project_birkhoff: x must be square, got shape {tuple(x.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    n = x.shape[-1]
    with torch.no_grad():
        xd = x.detach()
        beta = torch.zeros(xd.shape[:-1], dtype=x.dtype, device=x.device)
        for _ in range(iterations):
            alpha = simplex_threshold(xd - beta.unsqueeze(-2)).squeeze(-1)
            beta = simplex_threshold((xd - alpha.unsqueeze(-1)).mT).squeeze(-1)
        support = (xd - alpha.unsqueeze(-1) - beta.unsqueeze(-2)) > 0
        m = support.to(x.dtype)
        # Jacobian of the marginal gap w.r.t. (alpha, beta): minus the support's
        # bipartite Laplacian-like matrix [[diag(M 1), M], [M', diag(M' 1)]]
        top = torch.cat([torch.diag_embed(m.sum(-1)), m], dim=-1)
        bottom = torch.cat([m.mT, torch.diag_embed(m.sum(-2))], dim=-1)
        jac_inv = torch.linalg.pinv(-torch.cat([top, bottom], dim=-2))
    dual = torch.cat([alpha, beta], dim=-1)
    step = (jac_inv @ _marginal_gap(x, alpha, beta).unsqueeze(-1)).squeeze(-1)
    dual = dual - step
    return torch.relu(x - dual[..., :n].unsqueeze(-1) - dual[..., n:].unsqueeze(-2))
