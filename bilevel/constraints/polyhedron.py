"""Projection onto a polyhedron ``{Aw = b, Gw <= h}`` through the QP layer."""

from __future__ import annotations

from torch import Tensor

__all__ = ["project_polyhedron"]


def project_polyhedron(
    w: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    G: Tensor | None = None,
    h: Tensor | None = None,
) -> Tensor:
    """``argmin_x ||x - w||^2 / 2  s.t.  Ax = b, Gx <= h`` by :func:`bilevel.qp`.

    ``w`` of shape ``(n,)`` or ``(B, n)``; the constraints as in :func:`bilevel.qp`.
    Differentiable w.r.t. ``w`` and every constraint tensor (KKT with the active set).

    Example:
        >>> import torch
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64); h = torch.tensor([1.0], dtype=torch.float64)
        >>> project_polyhedron(torch.tensor([1.0, 1.0], dtype=torch.float64), G=G, h=h)
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    import torch

    from bilevel.qp import qp

    if not isinstance(w, Tensor) or w.ndim not in (1, 2):
        raise ValueError("project_polyhedron: w must be a tensor of shape (n,) or (B, n)")
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    out = qp(eye, -w, A, b, G, h)
    assert isinstance(out, Tensor)
    return out
