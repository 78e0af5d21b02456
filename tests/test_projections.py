"""bilevel.constraints projections: closed forms, feasibility, optimality, FD Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from bilevel import constraints as C

DT = torch.float64
g = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def is_projection(P, x, feasible_points, tol=1e-8):
    """Variational inequality of a projection onto a convex set: (x - Px)'(y - Px) <= 0."""
    px = P(x)
    for y in feasible_points:
        assert float(((x - px) * (y - px)).sum()) <= tol


def test_l1_l2_linf_balls():
    x = rand(6, scale=2.0)
    for P, norm in (
        (C.project_l1_ball, lambda v: v.abs().sum()),
        (C.project_l2_ball, lambda v: v.norm()),
        (C.project_linf_ball, lambda v: v.abs().max()),
    ):
        px = P(x, 1.0)
        assert float(norm(px)) <= 1 + 1e-12
        pts = [P(rand(6, scale=3.0), 1.0) for _ in range(30)]
        is_projection(lambda v, P=P: P(v, 1.0), x, pts)
        inside = 0.1 * x / norm(x)
        assert torch.equal(P(inside, 1.0), inside)


def test_hyperplane_halfspace_affine():
    a, x = rand(5), rand(5)
    ph = C.project_hyperplane(x, a, 0.7)
    assert abs(float(a @ ph) - 0.7) < 1e-12
    assert torch.allclose(C.project_halfspace(x, a, float(a @ x) + 1), x)
    assert abs(float(a @ C.project_halfspace(x, a, float(a @ x) - 1)) - (float(a @ x) - 1)) < 1e-12
    A, b = rand(2, 5), rand(2)
    pa = C.project_affine_set(x, A, b)
    assert (A @ pa - b).abs().max() < 1e-12
    # the move is orthogonal to the null space of A
    null = torch.linalg.svd(A).Vh[2:]
    assert (null @ (x - pa)).abs().max() < 1e-12


def test_box_section_against_qp():
    x, a = rand(6, scale=2.0), rand(6).abs() + 0.1
    px = C.project_box_section(x, -0.5, 0.8, a, 0.3)
    ref = C.project_polyhedron(
        x,
        A=a[None],
        b=torch.tensor([0.3], dtype=DT),
        G=torch.cat([torch.eye(6, dtype=DT), -torch.eye(6, dtype=DT)]),
        h=torch.cat([torch.full((6,), 0.8, dtype=DT), torch.full((6,), 0.5, dtype=DT)]),
    )
    assert (px - ref).abs().max() < 1e-7


def test_birkhoff_against_qp():
    x = rand(4, 4)
    px = C.project_birkhoff(x)
    n = 4
    rows = torch.kron(torch.eye(n, dtype=DT), torch.ones(1, n, dtype=DT))
    cols = torch.kron(torch.ones(1, n, dtype=DT), torch.eye(n, dtype=DT))
    A = torch.cat([rows, cols])[:-1]  # one marginal equation is redundant
    ref = C.project_polyhedron(
        x.reshape(-1),
        A=A,
        b=torch.ones(2 * n - 1, dtype=DT),
        G=-torch.eye(n * n, dtype=DT),
        h=torch.zeros(n * n, dtype=DT),
    )
    assert (px.reshape(-1) - ref).abs().max() < 1e-6  # the interior point's accuracy at zeros
    assert (px.sum(0) - 1).abs().max() < 1e-12 and (px.sum(1) - 1).abs().max() < 1e-12


JACOBIAN_CASES = {
    "nonnegative": (lambda x: C.project_nonnegative(x), 6),
    "box": (lambda x: C.project_box(x, -0.5, torch.full((6,), 0.5, dtype=DT)), 6),
    "simplex": (lambda x: C.project_simplex(x), 6),
    "l1_ball": (lambda x: C.project_l1_ball(x, 1.0), 6),
    "l2_ball": (lambda x: C.project_l2_ball(x, 1.0), 6),
    "linf_ball": (lambda x: C.project_linf_ball(x, 0.5), 6),
    "hyperplane": (lambda x: C.project_hyperplane(x[:5], x[5:10], x[10]), 11),
    "halfspace": (lambda x: C.project_halfspace(x[:5], x[5:10], x[10] - 3.0), 11),
    "affine_set": (lambda x: C.project_affine_set(x[:4], x[4:12].reshape(2, 4), x[12:14]), 14),
    "box_section": (
        lambda x: C.project_box_section(x[:6], -0.5, 0.8, x[6:12].abs() + 0.1, x[12] * 0.1),
        13,
    ),
    "birkhoff": (lambda x: C.project_birkhoff(x.reshape(3, 3)), 9),
    "polyhedron": (
        lambda x: C.project_polyhedron(x[:4], G=x[4:12].reshape(2, 4), h=x[12:14] - 1.0),
        14,
    ),
}


@pytest.mark.parametrize("name", list(JACOBIAN_CASES))
def test_projection_jacobians_match_finite_differences(name):
    P, n = JACOBIAN_CASES[name]
    x = rand(n, scale=1.5).requires_grad_()
    out = P(x)
    assert torch.isfinite(out).all()
    tol = 1e-5 if name in ("polyhedron",) else 1e-7
    assert gradcheck(P, (x,), eps=1e-6, atol=tol, rtol=1e-5)
