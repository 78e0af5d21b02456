"""Every implicit layer says when its solve is not what the implicit function theorem assumes."""

import math
import warnings

import pytest
import torch

import bilevel
from bilevel import constraints, linalg, solvers
from bilevel.solvers import (
    NotMinimumError,
    NotMinimumWarning,
    NotStationaryError,
    NotStationaryWarning,
    SolverInfo,
)

D = torch.float64


def _unconverged(fn, init):
    """A root solver that gives up at once and says so."""
    return init.clone(), SolverInfo("give_up", 1, False, 0.5, math.nan, "stopped early")


def test_root_warns_and_raises_when_its_solver_did_not_converge():
    h = torch.tensor(4.0, dtype=D, requires_grad=True)
    start = torch.tensor(2.5, dtype=D)
    with pytest.warns(
        NotStationaryWarning, match=r"root: the inner solver did not converge: residual 5\.000e-01"
    ):
        bilevel.root(lambda w, h: w**2 - h, start, h, solver=_unconverged)
    with pytest.raises(NotStationaryError, match="root"):
        bilevel.root(lambda w, h: w**2 - h, start, h, solver=_unconverged, strict=True)


def test_fixed_point_warns_and_raises_when_truncated():
    h = torch.tensor(1.0, dtype=D, requires_grad=True)
    solver = solvers.fixed_point_iteration(tol=1e-12, maxiter=3, check_every=1)
    map_fn = lambda w, h: 0.99 * w + h  # noqa: E731  - fixed point 100 h, slow contraction
    with pytest.warns(NotStationaryWarning, match="fixed_point: the inner solver did not converge"):
        w = bilevel.fixed_point(map_fn, torch.zeros((), dtype=D), h, solver=solver)
    assert float(w.detach()) < 5  # the truncated answer (far from 100) is what was flagged
    with pytest.raises(NotStationaryError, match="fixed_point"):
        bilevel.fixed_point(map_fn, torch.zeros((), dtype=D), h, solver=solver, strict=True)


def test_fixed_point_converged_is_silent():
    h = torch.tensor(1.0, dtype=D, requires_grad=True)
    solver = solvers.anderson(tol=1e-12, maxiter=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = bilevel.fixed_point(
            lambda w, h: 0.5 * w + h, torch.zeros((), dtype=D), h, solver=solver
        )
    torch.testing.assert_close(w.detach(), torch.tensor(2.0, dtype=D))


def _ridge_optimality(w, h, X, y):
    return X.T @ (X @ w - y) + h * w


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)


def test_custom_root_uses_the_info_its_solver_returns():
    X, y = _data()
    h = torch.tensor(1.0, dtype=D, requires_grad=True)

    @bilevel.custom_root(_ridge_optimality, symmetric=True)
    def weak(init, h, X, y):
        return init, SolverInfo("weak", 2, False, 3.0, math.nan, "maxiter reached")

    with pytest.warns(NotStationaryWarning, match="weak: the inner solver did not converge"):
        weak(torch.zeros(3, dtype=D), h, X, y)

    @bilevel.custom_root(_ridge_optimality, symmetric=True, strict=True)
    def weak_strict(init, h, X, y):
        return init, SolverInfo("weak", 2, False, 3.0, math.nan, "maxiter reached")

    with pytest.raises(NotStationaryError):
        weak_strict(torch.zeros(3, dtype=D), h, X, y)


def test_custom_root_stationarity_tol_checks_the_residual():
    X, y = _data()
    h = torch.tensor(1.0, dtype=D, requires_grad=True)

    def exact(init, h, X, y):
        return torch.linalg.solve(X.T @ X + h * torch.eye(3, dtype=D), X.T @ y)

    good = bilevel.custom_root(_ridge_optimality, symmetric=True, stationarity_tol=1e-9)(exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good(torch.zeros(3, dtype=D), h, X, y)
    bad = bilevel.custom_root(_ridge_optimality, symmetric=True, stationarity_tol=1e-9)(
        lambda init, h, X, y: 0.5 * exact(init, h, X, y)
    )
    with pytest.warns(NotStationaryWarning, match=r"\|\|F\|\| .* > stationarity_tol"):
        bad(torch.zeros(3, dtype=D), h, X, y)


def test_projected_argmin_with_a_truncated_fixed_point_solver():
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D)
    h = torch.tensor([1.0, -1.0], dtype=D, requires_grad=True)
    loss = lambda w, h: 0.5 * w @ A @ w - h @ w  # noqa: E731
    kw = dict(projection=constraints.project_nonnegative, step_size=0.05)
    weak = solvers.fixed_point_iteration(tol=1e-12, maxiter=2, check_every=1)
    with pytest.warns(NotStationaryWarning, match="did not converge"):
        constraints.projected_argmin(loss, torch.zeros(2, dtype=D), h, solver=weak, **kw)
    with pytest.raises(NotStationaryError):
        constraints.projected_argmin(
            loss, torch.zeros(2, dtype=D), h, solver=weak, strict=True, **kw
        )


def test_argmin_layer_strict_raises_on_a_truncated_solve():
    # an anisotropic quadratic: one L-BFGS iteration (a steepest-descent line search) cannot
    # reach its minimum from any start, so the solve is truncated whatever x is (an isotropic
    # one is solved exactly by the first line search's interpolation for some x)
    scale = torch.tensor([1.0, 10.0, 100.0], dtype=D)
    layer = bilevel.nn.ArgMinLayer(
        lambda w, x, p: (scale * (w - x) ** 2).sum() + p["l2"] * (w**2).sum(),
        torch.zeros(3, dtype=D),
        {"l2": torch.tensor(0.1, dtype=D)},
        solver=solvers.lbfgs(tol=1e-14, maxiter=1),
        strict=True,
    )
    x = torch.randn(3, generator=torch.Generator().manual_seed(1), dtype=D)
    with pytest.raises(NotStationaryError):
        layer(x)


def _double_well(w, h):
    return (w**4 - w**2 + h * w**2).sum()


@pytest.mark.parametrize("name", ["minres", "cg"])
def test_argmin_at_a_maximum_warns_naming_the_curvature(name):
    h = torch.tensor(0.5, dtype=D, requires_grad=True)  # Hessian at 0: 2 (h - 1) = -1
    solver = getattr(linalg, name)()
    w = bilevel.argmin(_double_well, torch.zeros(2, dtype=D), h, linear_solver=solver)
    with pytest.warns(NotMinimumWarning, match=r"not a minimum.*-1\.000e\+00"):
        w.sum().backward()
    w = bilevel.argmin(_double_well, torch.zeros(2, dtype=D), h, linear_solver=solver, strict=True)
    with pytest.raises(NotMinimumError, match=name):
        w.sum().backward()


def test_argmin_at_a_minimum_is_silent_with_minres():
    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w_min = torch.full((2,), math.sqrt((1 - 0.5) / 2), dtype=D)  # 4 w^3 = 2 (1 - h) w
    w = bilevel.argmin(_double_well, w_min, h, linear_solver=linalg.minres())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.sum().backward()
    # d w / d h = -2 w / (12 w^2 - 2 (1 - h)) per element
    expected = 2 * (-2 * w_min[0] / (12 * w_min[0] ** 2 - 2 * (1 - 0.5)))
    torch.testing.assert_close(h.grad, expected)


def test_minres_reports_the_lanczos_curvature():
    A = torch.diag(torch.tensor([3.0, -2.0, 1.0], dtype=D))
    _, info = linalg.minres()(lambda v: A @ v, torch.ones(3, dtype=D))
    assert info.converged and info.indefinite()
    assert info.min_curvature < 0 < info.max_curvature <= 3.0  # a pivot of T_k is negative
    _, info = linalg.minres()(lambda v: A.abs() @ v, torch.ones(3, dtype=D))
    assert info.converged and not info.indefinite()
    assert 1.0 <= info.min_curvature <= info.max_curvature <= 3.0


# --------------------------------------------------------------------------- Neumann for fixed points


def _linear_map_case(rho):
    """w = A w + B h with a non-symmetric A of spectral radius rho; w* = (I - A)^-1 B h."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=D))
    T = torch.triu(torch.randn(4, 4, generator=g, dtype=D), 1) * 0.3
    A = Q @ (torch.diag(torch.tensor([rho, -0.5 * rho, 0.3 * rho, 0.1], dtype=D)) + T) @ Q.T
    B = torch.randn(4, 2, generator=g, dtype=D)
    h = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    w_star = torch.linalg.solve(torch.eye(4, dtype=D) - A, B @ h.detach())
    grad_ref = torch.linalg.solve(torch.eye(4, dtype=D) - A, B).sum(0)  # d sum(w*) / d h
    return A, B, h, w_star, grad_ref


def test_fixed_point_neumann_is_the_series_of_the_jacobian():
    A, B, h, w_star, grad_ref = _linear_map_case(0.8)
    w = bilevel.fixed_point(
        lambda w, h: A @ w + B @ h, w_star, h, linear_solver=linalg.neumann(maxiter=500)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.sum().backward()
    torch.testing.assert_close(h.grad, grad_ref, rtol=1e-9, atol=1e-12)
    info = bilevel.implicit.last_backward_info()
    assert info.method == "neumann" and info.converged


def test_fixed_point_neumann_truncated_warns_with_its_residual():
    A, B, h, w_star, grad_ref = _linear_map_case(0.95)
    w = bilevel.fixed_point(
        lambda w, h: A @ w + B @ h, w_star, h, linear_solver=linalg.neumann(maxiter=5)
    )
    with pytest.warns(RuntimeWarning, match=r"fixed_point: the backward linear solve .*residual"):
        w.sum().backward()


def test_fixed_point_neumann_divergent_warns_the_map_is_not_a_contraction():
    A, B, h, w_star, grad_ref = _linear_map_case(1.6)  # I - A is invertible, the series is not
    w = bilevel.fixed_point(
        lambda w, h: A @ w + B @ h, w_star, h, linear_solver=linalg.neumann(maxiter=300)
    )
    with pytest.warns(RuntimeWarning, match="diverges.*not a contraction"):
        w.sum().backward()
    # gmres has no such limit
    h.grad = None
    w = bilevel.fixed_point(lambda w, h: A @ w + B @ h, w_star, h)
    w.sum().backward()
    torch.testing.assert_close(h.grad, grad_ref, rtol=1e-9, atol=1e-12)
