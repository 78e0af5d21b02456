"""Euclidean projections onto convex sets, with the Jacobians implicit differentiation needs.

Each is written with ``clamp``/``where``/``sort``/``gather`` (or, for the iterative ones,
a solve without a graph followed by one Newton step on the optimality condition whose
derivatives are the implicit ones), so autograd returns the generalized Jacobian of
the projection: identity on free coordinates, zero on active bounds, the projector onto
the tangent space of an active face. Radii, bounds, normals and offsets given as tensors
are differentiable hyperparameters. Sets act on the last dimension; leading dimensions
are a batch.

* ``{w >= 0}``, box, simplex, l1 / l2 / linf ball;
* hyperplane ``{a'w = b}``, halfspace ``{a'w <= b}``, affine set ``{Aw = b}``;
* box section ``{lo <= w <= hi, a'w = c}`` (bisection on the dual).

The Birkhoff polytope and polyhedra live in :mod:`bilevel.constraints.birkhoff` and
:mod:`bilevel.constraints.polyhedron`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "project_affine_set",
    "project_box",
    "project_box_section",
    "project_halfspace",
    "project_hyperplane",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_nonnegative",
    "project_simplex",
    "simplex_threshold",
]


def _tensor(w: Tensor, name: str) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: w must be a floating tensor, got {type(w).__name__}")
    if w.ndim == 0:
        raise ValueError(f"{name} needs at least one dimension (the set is along the last one)")


def _as(value: float | Tensor, w: Tensor, name: str) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.as_tensor(value, dtype=w.dtype, device=w.device)


def project_nonnegative(w: Tensor) -> Tensor:
    """Euclidean projection onto ``{w >= 0}`` (elementwise).

    Example:
        >>> project_nonnegative(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    return torch.clamp(w, min=0)


def project_box(
    w: Tensor, lower: float | Tensor | None = None, upper: float | Tensor | None = None
) -> Tensor:
    """Euclidean projection onto the box ``{lower <= w <= upper}`` (elementwise).

    ``lower``/``upper`` are numbers or tensors broadcastable to ``w`` (``None``: no
    bound on that side). Tensor bounds can be hyperparameters: the projection is
    differentiable w.r.t. them (gradient 1 where the bound is active).

    Example:
        >>> project_box(torch.tensor([-2.0, 0.5, 3.0]), -1.0, 1.0)
        tensor([-1.0000,  0.5000,  1.0000])
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    if lower is None and upper is None:
        return w
    for name, b in (("lower", lower), ("upper", upper)):
        if b is not None and not isinstance(b, (Tensor, int, float)):
            raise TypeError(f"{name} must be a number, a tensor or None, got {type(b).__name__}")
    if not isinstance(lower, Tensor) and not isinstance(upper, Tensor):
        return torch.clamp(w, min=lower, max=upper)
    # where() rather than maximum()/minimum(): those split the gradient in half at ties
    out = w
    if lower is not None:
        lo = torch.as_tensor(lower, dtype=w.dtype, device=w.device)
        out = torch.where(out < lo, lo, out)
    if upper is not None:
        hi = torch.as_tensor(upper, dtype=w.dtype, device=w.device)
        out = torch.where(out > hi, hi, out)
    return out


def project_simplex(w: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Euclidean projection of each row (last dimension) onto ``{x >= 0, sum(x) = radius}``.

    Sort-based (Held et al. 1974; Duchi et al. 2008): ``x = max(w - tau, 0)`` with the
    threshold ``tau`` found from the sorted values. No host synchronisation, any
    leading batch dimensions; vmappable.

    Example:
        >>> project_simplex(torch.tensor([0.5, 0.2, -1.0]))
        tensor([0.6500, 0.3500, 0.0000])
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    if w.ndim == 0:
        raise ValueError(
            "project_simplex needs at least one dimension (the simplex is along the last one)"
        )
    return torch.clamp(w - simplex_threshold(w, radius), min=0)


def simplex_threshold(w: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """The ``tau`` (shape ``(..., 1)``) with ``sum(max(w - tau, 0)) = radius`` along the last dim.

    Differentiable: ``tau`` is the mean of ``w`` over the support minus ``radius / |support|``.

    Example:
        >>> simplex_threshold(torch.tensor([0.5, 0.2, -1.0]))
        tensor([-0.1500])
    """
    n = w.shape[-1]
    u, _ = torch.sort(w, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - radius
    k = torch.arange(1, n + 1, dtype=w.dtype, device=w.device)
    support = (u - css / k) > 0
    # rho = size of the support (>= 1 always: the largest entry is in it)
    rho = support.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.gather(css, -1, rho - 1) / rho.to(w.dtype)


def project_l1_ball(w: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{||w||_1 <= radius}`` (last dim): ``sign(w) P_simplex(|w|)`` outside it.

    Example:
        >>> project_l1_ball(torch.tensor([2.0, -1.0]), 1.0)
        tensor([1., -0.])
    """
    _tensor(w, "project_l1_ball")
    r = _as(radius, w, "radius")
    inside = w.abs().sum(dim=-1, keepdim=True) <= r
    return torch.where(inside, w, torch.sign(w) * project_simplex(w.abs(), r))


def project_l2_ball(w: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{||w||_2 <= radius}`` (last dim): ``w * radius / ||w||`` outside it.

    Example:
        >>> project_l2_ball(torch.tensor([3.0, 4.0]), 1.0)
        tensor([0.6000, 0.8000])
    """
    _tensor(w, "project_l2_ball")
    r = _as(radius, w, "radius")
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    outside = norm > r
    return torch.where(outside, w * (r / torch.where(outside, norm, torch.ones_like(norm))), w)


def project_linf_ball(w: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{max |w_i| <= radius}``: clipping to ``[-radius, radius]``.

    Example:
        >>> project_linf_ball(torch.tensor([3.0, -0.5, -2.0]), 1.0)
        tensor([ 1.0000, -0.5000, -1.0000])
    """
    _tensor(w, "project_linf_ball")
    r = _as(radius, w, "radius")
    return project_box(w, -r, r)


def _normal(a: Tensor, w: Tensor, name: str) -> Tensor:
    if not isinstance(a, Tensor) or a.shape[-1:] != w.shape[-1:]:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"{name}: a must be a tensor with last dim {w.shape[-1]}, got {shape}")
    return a.to(w.dtype)


def project_hyperplane(w: Tensor, a: Tensor, b: float | Tensor) -> Tensor:
    """Projection onto ``{a'w = b}``: ``w - (a'w - b) a / ||a||^2``.

    Example:
        >>> project_hyperplane(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.0)
        tensor([0., 1.])
    """
    _tensor(w, "project_hyperplane")
    a = _normal(a, w, "project_hyperplane")
    gap = (a * w).sum(-1, keepdim=True) - _as(b, w, "b").unsqueeze(-1)
    return w - gap / (a * a).sum(-1, keepdim=True) * a


def project_halfspace(w: Tensor, a: Tensor, b: float | Tensor) -> Tensor:
    """Projection onto ``{a'w <= b}``: ``w - max(a'w - b, 0) a / ||a||^2``.

    Example:
        >>> project_halfspace(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0)
        tensor([1., 1.])
    """
    _tensor(w, "project_halfspace")
    a = _normal(a, w, "project_halfspace")
    gap = (a * w).sum(-1, keepdim=True) - _as(b, w, "b").unsqueeze(-1)
    return w - torch.relu(gap) / (a * a).sum(-1, keepdim=True) * a


def project_affine_set(w: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """Projection onto ``{A w = b}`` (``A`` of full row rank): ``w - A'(AA')^{-1}(Aw - b)``.

    ``A`` of shape ``(..., m, n)``, ``b`` of shape ``(..., m)``.

    Example:
        >>> A = torch.tensor([[1.0, 1.0]]); b = torch.tensor([1.0])
        >>> project_affine_set(torch.tensor([1.0, 1.0]), A, b)
        tensor([0.5000, 0.5000])
    """
    _tensor(w, "project_affine_set")
    if not isinstance(A, Tensor) or A.ndim < 2 or A.shape[-1] != w.shape[-1]:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"project_affine_set: A must be (..., m, {w.shape[-1]}), got {shape}")
    if not isinstance(b, Tensor) or b.shape[-1:] != A.shape[-2:-1]:
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"project_affine_set: b must be (..., {A.shape[-2]}), got {shape}")
    A, b = A.to(w.dtype), b.to(w.dtype)
    gap = (A @ w.unsqueeze(-1)).squeeze(-1) - b
    lam = torch.linalg.solve(A @ A.mT, gap.unsqueeze(-1))
    return w - (A.mT @ lam).squeeze(-1)


def project_box_section(
    w: Tensor,
    lower: float | Tensor,
    upper: float | Tensor,
    a: Tensor,
    c: float | Tensor,
    iterations: int = 100,
) -> Tensor:
    """Projection onto ``{lower <= x <= upper, a'x = c}`` (finite bounds, ``a != 0`` somewhere).

    ``x = clip(w - tau a, lower, upper)`` with ``tau`` the root of ``a'x(tau) = c``, found by
    ``iterations`` bisection steps without a graph (no host synchronisation), then one
    Newton step on that root's equation with autograd on: its derivatives are those of
    the implicit function theorem, so the projection's Jacobian is exact (w.r.t. ``w``,
    the bounds, ``a`` and ``c``). An infeasible ``c`` gives the point of the box closest
    to the hyperplane.

    Example:
        >>> project_box_section(torch.tensor([0.9, 0.8, -0.5]), 0.0, 0.6, torch.ones(3), 1.0)
        tensor([0.5500, 0.4500, 0.0000])
    """
    _tensor(w, "project_box_section")
    a = _normal(a, w, "project_box_section")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    lo, hi = _as(lower, w, "lower"), _as(upper, w, "upper")
    cc = _as(c, w, "c").unsqueeze(-1)

    def gap(tau: Tensor, w: Tensor, lo: Tensor, hi: Tensor, a: Tensor, cc: Tensor) -> Tensor:
        return (a * project_box(w - tau * a, lo, hi)).sum(-1, keepdim=True) - cc

    with torch.no_grad():
        wd, lod, hid, ad, cd = (t.detach() for t in (w, lo, hi, a, cc))
        nz = ad != 0
        far = torch.maximum((wd - lod).abs(), (wd - hid).abs()) / torch.where(
            nz, ad.abs(), torch.ones_like(ad)
        )
        span = torch.where(nz, far, torch.zeros_like(far)).amax(-1, keepdim=True) + 1
        left, right = -span, span  # gap(left) >= 0 >= gap(right): gap decreases in tau
        for _ in range(iterations):
            mid = 0.5 * (left + right)
            pos = gap(mid, wd, lod, hid, ad, cd) > 0
            left, right = torch.where(pos, mid, left), torch.where(pos, right, mid)
        tau0 = 0.5 * (left + right)
        x0 = wd - tau0 * ad
        free = (x0 > lod) & (x0 < hid)
        slope = -(ad * ad * free).sum(-1, keepdim=True)  # d gap / d tau
        slope = torch.where(slope < 0, slope, -torch.ones_like(slope))
    tau = tau0 - gap(tau0, w, lo, hi, a, cc) / slope
    return project_box(w - tau * a, lo, hi)
