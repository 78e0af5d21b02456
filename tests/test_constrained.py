"""Constrained inner problems: projections and projected-gradient fixed points vs finite differences."""

from __future__ import annotations

import pytest
import torch

from bilevel import linalg, solvers
from bilevel.constraints import (
    project_box,
    project_nonnegative,
    project_simplex,
    projected_argmin,
    projected_gradient,
)

D = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- projections


def test_project_box_and_nonnegative():
    w = torch.tensor([-2.0, 0.5, 3.0])
    torch.testing.assert_close(project_nonnegative(w), torch.tensor([0.0, 0.5, 3.0]))
    torch.testing.assert_close(project_box(w, -1.0, 1.0), torch.tensor([-1.0, 0.5, 1.0]))
    torch.testing.assert_close(project_box(w, None, 1.0), torch.tensor([-2.0, 0.5, 1.0]))
    lo = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    hi = torch.tensor(2.0, requires_grad=True)
    out = project_box(w, lo, hi)
    torch.testing.assert_close(out.detach(), torch.tensor([-1.0, 0.5, 2.0]))
    out.sum().backward()  # each active bound receives the gradient of its coordinate
    torch.testing.assert_close(lo.grad, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(hi.grad, torch.tensor(1.0))
    with pytest.raises(TypeError, match="lower"):
        project_box(w, "a", 1.0)


def test_project_simplex_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 6, generator=g) * 2
    X = project_simplex(W)
    assert bool((X >= 0).all())
    torch.testing.assert_close(X.sum(-1), torch.ones(50))
    # KKT: x = max(w - tau, 0) with one tau per row, and w_i <= tau off the support
    tau = (W - X)[X > 0].reshape(-1)
    for i in range(50):
        on = X[i] > 0
        t = (W[i] - X[i])[on]
        torch.testing.assert_close(t, t[0].expand_as(t))
        assert bool((W[i][~on] <= t[0] + 1e-12).all())
    assert tau.numel() > 0
    torch.testing.assert_close(project_simplex(W, radius=3.0).sum(-1), torch.full((50,), 3.0))
    torch.testing.assert_close(torch.func.vmap(project_simplex)(W), X)


def test_project_simplex_jacobian_matches_finite_differences():
    w = torch.tensor([0.9, 0.4, -0.3, 0.2, -1.0])
    J = torch.func.jacrev(project_simplex)(w)
    Jf = torch.func.jacfwd(project_simplex)(w)
    eps = 1e-6
    fd = torch.stack(
        [
            (project_simplex(w + eps * e) - project_simplex(w - eps * e)) / (2 * eps)
            for e in torch.eye(5)
        ],
        1,
    )
    torch.testing.assert_close(J, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(Jf, fd, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- constrained argmin


def _nnls_problem(n=25, p=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, generator=g)
    b = torch.randn(n, generator=g)
    L = 2 * float(torch.linalg.eigvalsh(A.T @ A).max()) + 2.0

    def loss(w, h):
        return ((A @ w - h["b"]) ** 2).sum() + h["l2"] * (w**2).sum()

    return loss, A, b, L


def _fd(fn, x, eps=1e-6):
    flat = x.detach().reshape(-1)
    out = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        out[i] = (fn((flat + e).reshape(x.shape)) - fn((flat - e).reshape(x.shape))) / (2 * eps)
    return out.reshape(x.shape)


NNLS_SOLVERS = {
    "projected_gradient": lambda L: projected_gradient(
        project_nonnegative, 1.0 / L, tol=1e-12, maxiter=100000
    ),
    "scipy_bounds": lambda L: solvers.scipy_minimize(bounds=(0.0, None), tol=1e-12),
    "anderson": lambda L: solvers.anderson(tol=1e-12, maxiter=5000),
}


def _nnls_exact(A, bv, l2):
    """Reference: scipy's active-set NNLS on the augmented system [A; sqrt(l2) I] w ~ [b; 0]."""
    from scipy.optimize import nnls

    p = A.shape[1]
    Aa = torch.cat([A, float(l2) ** 0.5 * torch.eye(p)]).numpy()
    ba = torch.cat([bv, torch.zeros(p)]).numpy()
    return torch.from_numpy(nnls(Aa, ba)[0])


@pytest.mark.parametrize("name", list(NNLS_SOLVERS))
def test_nonnegative_least_squares_matches_finite_differences(name):
    loss, A, b, L = _nnls_problem()
    c = torch.linspace(-1.0, 1.0, 8)
    b_h = b.clone().requires_grad_(True)
    l2 = torch.tensor(0.5, requires_grad=True)
    w = projected_argmin(
        loss,
        torch.zeros(8),
        {"b": b_h, "l2": l2},
        projection=project_nonnegative,
        step_size=1.0 / L,
        solver=NNLS_SOLVERS[name](L),
        linear_solver=linalg.gmres(tol=1e-12),
    )
    torch.testing.assert_close(w.detach(), _nnls_exact(A, b, 0.5), rtol=1e-8, atol=1e-10)
    active = int((w.detach() == 0).sum())
    assert 0 < active < 8  # both free and active coordinates
    g_b, g_l2 = torch.autograd.grad((w * c).sum(), [b_h, l2])

    def outer(bv, lv):
        return (_nnls_exact(A, bv, lv) * c).sum()

    fd_b = _fd(lambda bv: outer(bv, 0.5), b)
    fd_l2 = _fd(lambda lv: outer(b, lv), torch.tensor(0.5))
    assert (g_b - fd_b).norm() / fd_b.norm() < 1e-5
    assert abs(float(g_l2 - fd_l2)) / abs(float(fd_l2)) < 1e-5


def test_box_constrained_qp_with_learnable_bounds():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(6, 6, generator=g)
    Q = M @ M.T / 6 + 0.5 * torch.eye(6)
    L = float(torch.linalg.eigvalsh(Q).max())
    c = (torch.randn(6, generator=g) * 2).requires_grad_(True)
    hi = torch.full((6,), 0.8, requires_grad=True)

    def loss(w, h):
        return 0.5 * w @ Q @ w - h["c"] @ w

    def box(w, h):
        return project_box(w, -0.5, h["hi"])

    hp = {"c": c, "hi": hi}
    pg = projected_gradient(
        lambda w: project_box(w, -0.5, hi.detach()), 1.0 / L, tol=1e-13, maxiter=100000
    )
    w = projected_argmin(
        loss,
        torch.zeros(6),
        hp,
        projection=box,
        step_size=1.0 / L,
        solver=pg,
        linear_solver=linalg.gmres(tol=1e-12),
    )
    wd = w.detach()
    assert bool(((wd == -0.5) | (wd == 0.8)).any()) and bool(((wd > -0.5) & (wd < 0.8)).any())
    weights = torch.linspace(1.0, 2.0, 6)
    g_c, g_hi = torch.autograd.grad((w * weights).sum(), [c, hi])

    def outer(cv, hv):
        s = projected_gradient(
            lambda w: project_box(w, -0.5, hv), 1.0 / L, tol=1e-13, maxiter=100000
        )
        w_, _ = s(lambda w: loss(w, {"c": cv, "hi": hv}), torch.zeros(6))
        return (w_ * weights).sum()

    # central differences along two directions per hyperparameter (each re-solves the QP)
    eps = 1e-6
    for _ in range(2):
        u = torch.randn(6, generator=g)
        v = torch.randn(6, generator=g)
        fd_c = (
            outer(c.detach() + eps * u, hi.detach()) - outer(c.detach() - eps * u, hi.detach())
        ) / (2 * eps)
        fd_hi = (
            outer(c.detach(), hi.detach() + eps * v) - outer(c.detach(), hi.detach() - eps * v)
        ) / (2 * eps)
        assert abs(float(g_c @ u - fd_c)) <= 1e-5 * abs(float(fd_c))
        assert abs(float(g_hi @ v - fd_hi)) <= 1e-5 * abs(float(fd_hi))
        assert abs(float(fd_hi)) > 1e-3  # an upper bound is active and moves the solution


def test_simplex_argmin_is_the_projection_and_differentiates_like_it():
    h = torch.tensor([0.9, 0.4, -0.3, 0.2, -1.0], requires_grad=True)

    def loss(w, h):
        return 0.5 * ((w - h) ** 2).sum()

    w = projected_argmin(
        loss,
        torch.full((5,), 0.2),
        h,
        projection=project_simplex,
        step_size=0.5,
        solver=projected_gradient(project_simplex, 0.5, tol=1e-13),
    )
    torch.testing.assert_close(w.detach(), project_simplex(h.detach()))
    J = torch.func.jacrev(
        lambda hh: projected_argmin(
            loss, project_simplex(hh), hh, projection=project_simplex, step_size=0.5
        )
    )(h.detach())
    torch.testing.assert_close(
        J, torch.func.jacrev(project_simplex)(h.detach()), rtol=1e-8, atol=1e-10
    )


def test_projected_argmin_under_vmap_equals_separate_calls():
    loss, A, b, L = _nnls_problem(p=4)
    bs = b + torch.linspace(-1, 1, 3)[:, None]

    def solve(bv):
        return projected_argmin(
            loss,
            torch.zeros(4),
            {"b": bv, "l2": 0.5},
            projection=project_nonnegative,
            step_size=1.0 / L,
            solver=solvers.anderson(tol=1e-12, maxiter=5000),
        )

    out = torch.func.vmap(solve)(bs)
    grads = torch.func.vmap(torch.func.grad(lambda bv: solve(bv).sum()))(bs)
    for i in range(3):
        bi = bs[i].clone().requires_grad_(True)
        wi = solve(bi)
        torch.testing.assert_close(out[i], wi.detach(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            grads[i], torch.autograd.grad(wi.sum(), bi)[0], rtol=1e-7, atol=1e-9
        )


def test_projected_gradient_solver_reports_and_validates():
    s = projected_gradient(project_nonnegative, 0.5, tol=1e-12)
    w, info = s(lambda w: ((w - torch.tensor([1.0, -1.0])) ** 2).sum(), torch.zeros(2))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0]))
    assert info.converged and info.grad_norm <= 1e-12
    _, info = projected_gradient(project_nonnegative, 1e-4, tol=1e-12, maxiter=5)(
        lambda w: ((w - 1.0) ** 2).sum(), torch.zeros(2)
    )
    assert not info.converged and "maxiter" in info.message
    with pytest.raises(ValueError, match="step_size"):
        projected_gradient(project_nonnegative, -1.0)
    with pytest.raises(ValueError, match="step_size"):
        projected_argmin(
            lambda w, h: (w**2).sum(),
            torch.zeros(2),
            torch.tensor(1.0),
            projection=project_nonnegative,
            step_size=0.0,
        )
    with pytest.raises(ValueError, match="scalar"):
        projected_argmin(
            lambda w, h: w**2,
            torch.zeros(2),
            torch.tensor(1.0),
            projection=project_nonnegative,
            step_size=0.1,
        )
