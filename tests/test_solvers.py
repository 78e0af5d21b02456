"""Tests of bilevel.solvers: inner solvers for the implicit engine's forward pass."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

import bilevel.optim
from bilevel import linalg, solvers

DT = torch.float64


# ----------------------------------------------------------------------------- problems


@pytest.fixture(scope="module")
def logreg():
    g = torch.Generator().manual_seed(0)
    n, p = 60, 5
    X = torch.randn(n, p, generator=g, dtype=DT)
    w_true = torch.randn(p, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ w_true)).to(DT)
    lam = 0.1

    def objective(params):
        logits = X @ params["w"] + params["b"]
        return F.binary_cross_entropy_with_logits(logits, y) + 0.5 * lam * (params["w"] ** 2).sum()

    init = {"w": torch.zeros(p, dtype=DT), "b": torch.zeros((), dtype=DT)}
    return objective, init


def quadratic(p=6, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(p, p, generator=g, dtype=DT)
    A = M @ M.T / p + 0.5 * torch.eye(p, dtype=DT)
    b = torch.randn(p, generator=g, dtype=DT)
    return A.to(dtype), b.to(dtype)


def minimizers():
    return {
        "gradient_descent": solvers.gradient_descent(
            bilevel.optim.sgd(lr=1.0, momentum=0.9), tol=1e-9, maxiter=5000
        ),
        "lbfgs": solvers.lbfgs(tol=1e-10),
        "lbfgs_backtracking": solvers.lbfgs(tol=1e-10, line_search="backtracking"),
        "newton_cg": solvers.newton_cg(tol=1e-10),
        "scipy_lbfgsb": solvers.scipy_minimize(tol=1e-10),
        "scipy_trust_ncg": solvers.scipy_minimize(method="trust-ncg", tol=1e-10, hvp="reverse"),
    }


# ----------------------------------------------------------------------------- minimisation


def test_logistic_regression_all_solvers_agree(logreg):
    objective, init = logreg
    results = {}
    for name, solver in minimizers().items():
        sol, info = solver(objective, init)
        assert info.converged, f"{name}: {info}"
        assert info.grad_norm <= solver.tol, name
        # the reported norm is the true one at the returned point
        assert solvers.stationarity(objective, sol) == pytest.approx(
            info.grad_norm, rel=1e-6, abs=1e-14
        )
        assert solvers.stationarity(objective, sol) <= solver.tol
        assert solver.last_info is info
        assert set(sol) == {"w", "b"} and sol["b"].shape == ()
        results[name] = torch.cat([sol["w"], sol["b"].reshape(1)])
    ref = results["lbfgs"]
    for name, vec in results.items():
        torch.testing.assert_close(vec, ref, atol=1e-7, rtol=0, msg=name)


@pytest.mark.parametrize("name", list(minimizers()))
def test_quadratic_closed_form(name):
    A, b = quadratic()
    solver = minimizers()[name]
    sol, info = solver(lambda w: 0.5 * w @ A @ w - b @ w, torch.zeros(6, dtype=DT))
    assert info.converged, str(info)
    tol = 1e-8 if name == "gradient_descent" else 1e-9
    torch.testing.assert_close(sol, torch.linalg.solve(A, b), atol=tol, rtol=0)


def test_lbfgs_reaches_near_machine_precision(logreg):
    objective, init = logreg
    sol, info = solvers.lbfgs(tol=1e-12)(objective, init)
    assert info.converged and solvers.stationarity(objective, sol) <= 1e-12


@pytest.mark.parametrize("offset", [0.0, 1e10])
def test_line_searches_past_rounding_of_objective(offset):
    # With a large constant in f, f(x + t d) - f(x) drowns in rounding long before the
    # gradient is small; the line searches must then decide on slopes.
    A, b = quadratic(p=20)
    for solver in (
        solvers.lbfgs(tol=1e-10),
        solvers.lbfgs(tol=1e-10, line_search="backtracking"),
        solvers.newton_cg(tol=1e-10),
    ):
        sol, info = solver(lambda w: offset + 0.5 * w @ A @ w - b @ w, torch.zeros(20, dtype=DT))
        assert info.converged, str(info)
        torch.testing.assert_close(sol, torch.linalg.solve(A, b), atol=1e-9, rtol=0)


def test_lbfgs_ill_conditioned_quadratic():
    # condition number 1e3 over 50 distinct eigenvalues: hundreds of iterations
    p = 50
    d = torch.logspace(0, 3, p, dtype=DT)
    b = torch.ones(p, dtype=DT)
    sol, info = solvers.lbfgs(tol=1e-8, maxiter=2000)(
        lambda w: 0.5 * (d * w * w).sum() - b @ w, torch.zeros(p, dtype=DT)
    )
    assert info.converged, str(info)
    torch.testing.assert_close(sol, b / d, atol=1e-8, rtol=0)


def test_rosenbrock():
    def rosen(w):
        return (100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2).sum()

    # n = 3: the only stationary point is the global minimum (n = 4..7 have a second one)
    init = torch.tensor([-1.2, 1.0, -0.5], dtype=DT)
    for solver in (solvers.lbfgs(tol=1e-10), solvers.newton_cg(tol=1e-10, maxiter=200)):
        sol, info = solver(rosen, init)
        assert info.converged, str(info)
        torch.testing.assert_close(sol, torch.ones(3, dtype=DT), atol=1e-8, rtol=0)


def test_newton_cg_uses_given_linear_solver_and_counts_hvps(logreg):
    objective, init = logreg
    sol, info = solvers.newton_cg(tol=1e-10, linear_solver=linalg.cg(tol=1e-12))(objective, init)
    assert info.converged
    assert info.extra["hvp"] == "reverse" and info.extra["hvp_evaluations"] > 0
    sol2, _ = solvers.lbfgs(tol=1e-10)(objective, init)
    torch.testing.assert_close(sol["w"], sol2["w"], atol=1e-8, rtol=0)


class _CubeNoForward(torch.autograd.Function):
    """x**3 with only a reverse rule (and the legacy API): no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


def test_newton_cg_falls_back_to_reverse_over_reverse():
    target = torch.tensor([1.0, 2.0, 3.0], dtype=DT)

    def objective(w):  # minimum at w**3 = target
        return (0.25 * _CubeNoForward.apply(w) * w - target * w).sum()

    init = torch.ones(3, dtype=DT)
    sol, info = solvers.newton_cg(tol=1e-10, hvp="auto")(objective, init)
    assert info.converged, str(info)
    assert info.extra["hvp"] == "reverse"
    assert "forward-over-reverse failed" in info.extra["hvp_fallback_reason"]
    torch.testing.assert_close(sol, target ** (1 / 3), atol=1e-9, rtol=0)
    with pytest.raises((RuntimeError, NotImplementedError)):
        solvers.newton_cg(tol=1e-10, hvp="forward")(objective, init)


def test_newton_cg_nonconvex_negative_curvature():
    # starts at a saddle region: CG meets negative curvature, the solver still descends
    def objective(w):
        return (w**4 / 4 - w**2 / 2).sum() + 0.1 * w.sum()

    sol, info = solvers.newton_cg(tol=1e-10, maxiter=100)(
        objective, torch.full((3,), 0.01, dtype=DT)
    )
    assert info.converged, str(info)
    assert solvers.stationarity(objective, sol) <= 1e-10
    # a minimum, not the local maximum near 0
    assert bool((sol.abs() > 0.5).all())


def test_gradient_descent_tensor_init_and_default_optimizer():
    A, b = quadratic(p=4)
    A = A / torch.linalg.eigvalsh(A).max()  # lr=0.1 converges
    solver = solvers.gradient_descent(tol=1e-8, maxiter=5000, check_every=7)
    sol, info = solver(lambda w: 0.5 * w @ A @ w - b @ w, torch.zeros(4, dtype=DT))
    assert info.converged and info.iterations % 7 == 0
    torch.testing.assert_close(sol, torch.linalg.solve(A, b), atol=1e-6, rtol=0)


def test_gradient_descent_reports_divergence():
    solver = solvers.gradient_descent(bilevel.optim.sgd(lr=10.0), tol=1e-8, maxiter=10000)
    sol, info = solver(lambda w: (w**2).sum(), torch.ones(2, dtype=DT))
    assert not info.converged and "diverged" in info.message
    assert info.iterations < 10000


# ----------------------------------------------------------------------------- scipy bridge


def test_scipy_nonnegative_least_squares():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 8, generator=g, dtype=DT)
    b = torch.randn(20, generator=g, dtype=DT)
    expected, _ = scipy.optimize.nnls(A.numpy(), b.numpy())
    assert (expected == 0).any() and (expected > 0).any()  # some bounds active, some not

    def objective(w):
        return 0.5 * ((A @ w - b) ** 2).sum()

    solver = solvers.scipy_minimize(bounds=(0.0, None), tol=1e-10)
    sol, info = solver(objective, torch.zeros(8, dtype=DT))
    assert info.converged, str(info)
    np.testing.assert_allclose(sol.numpy(), expected, atol=1e-9)
    assert bool((sol >= 0).all())
    assert solvers.stationarity(objective, sol, bounds=(0.0, None)) <= 1e-10
    assert solvers.stationarity(objective, sol) > 1e-3  # the plain gradient is not zero


def test_scipy_box_per_element_tree_bounds():
    c = {"a": torch.tensor([2.0, -3.0, 0.5], dtype=DT), "b": torch.tensor([[4.0, -4.0]], dtype=DT)}
    scale = {
        "a": torch.tensor([1.0, 2.0, 3.0], dtype=DT),
        "b": torch.tensor([[0.5, 5.0]], dtype=DT),
    }

    def objective(w):
        return sum((scale[k] * (w[k] - c[k]) ** 2).sum() for k in w)

    lower = {"a": torch.tensor([-1.0, -1.0, -1.0], dtype=DT), "b": -1.0}
    upper = {"a": torch.tensor([1.0, 1.0, 1.0], dtype=DT)}  # "b" unbounded above
    init = {"a": torch.zeros(3, dtype=DT), "b": torch.zeros(1, 2, dtype=DT)}
    sol, info = solvers.scipy_minimize(bounds=(lower, upper))(objective, init)
    assert info.converged, str(info)
    torch.testing.assert_close(
        sol["a"], torch.tensor([1.0, -1.0, 0.5], dtype=DT), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(sol["b"], torch.tensor([[4.0, -1.0]], dtype=DT), atol=1e-9, rtol=0)


def test_scipy_float32_roundtrip():
    # A float32 objective stops scipy's L-BFGS-B early: below gradient norm ~2e-4 here the
    # decrease of f rounds to zero in float32 and scipy reports success (factr). The polish
    # step must then reach tol, although float32 rounds the active bounds 0.2 -> 0.200000003,
    # outside the float64 box; the answer must match the float64 solve to float32 accuracy.
    A, b = quadratic(p=5, dtype=torch.float32)
    init = torch.zeros(5, dtype=torch.float32)
    sol, info = solvers.scipy_minimize(tol=1e-4, bounds=(-0.2, 0.2))(
        lambda w: 0.5 * w @ A @ w - b @ w, init
    )
    assert sol.dtype == torch.float32 and sol.device == init.device
    assert info.converged, str(info)
    assert bool((sol.abs() <= 0.2).all())  # the box in float32
    A64, b64 = A.double(), b.double()
    ref, ref_info = solvers.scipy_minimize(tol=1e-12, bounds=(-0.2, 0.2))(
        lambda w: 0.5 * w @ A64 @ w - b64 @ w, init.double()
    )
    assert ref_info.converged
    assert (ref.abs() >= 0.2 - 1e-12).sum() >= 2  # active bounds: the case that broke
    torch.testing.assert_close(sol.double(), ref, rtol=0, atol=2e-4)


def test_scipy_bad_bounds():
    init = {"w": torch.zeros(3, dtype=DT)}
    f = lambda w: (w["w"] ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="lower > upper"):
        solvers.scipy_minimize(bounds=(1.0, 0.0))(f, init)
    with pytest.raises(ValueError, match="not in the params"):
        solvers.scipy_minimize(bounds=({"v": 0.0}, None))(f, init)
    with pytest.raises(ValueError, match="broadcast"):
        solvers.scipy_minimize(bounds=({"w": torch.zeros(4)}, None))(f, init)
    with pytest.raises(TypeError, match="lower, upper"):
        solvers.scipy_minimize(bounds=0.0)(f, init)
    with pytest.raises(ValueError, match="does not take bounds"):
        solvers.scipy_minimize(method="BFGS", bounds=(0.0, 1.0))


# ----------------------------------------------------------------------------- non-convergence


@pytest.mark.parametrize(
    "solver",
    [
        solvers.gradient_descent(tol=1e-12, maxiter=3),
        solvers.lbfgs(tol=1e-12, maxiter=2),
        solvers.newton_cg(tol=1e-14, maxiter=1),
        solvers.scipy_minimize(tol=1e-12, options={"maxiter": 1}, polish=False),
    ],
    ids=["gd", "lbfgs", "newton_cg", "scipy"],
)
def test_maxiter_too_small_is_reported(logreg, solver):
    objective, init = logreg
    sol, info = solver(objective, init)
    assert not info.converged
    assert info.message
    assert info.grad_norm > solver.tol
    assert "NOT converged" in str(info)
    with pytest.warns(RuntimeWarning, match=r"gradient norm \d\.\d+e[-+]\d+ > tol"):
        norm = solvers.check_stationarity(objective, sol, tol=solver.tol)
    assert norm == pytest.approx(info.grad_norm, rel=1e-6)
    with pytest.raises(solvers.NotStationaryError, match="not stationary"):
        solvers.check_stationarity(objective, sol, tol=solver.tol, strict=True)


def test_check_stationarity_silent_at_optimum(logreg):
    objective, init = logreg
    sol, _ = solvers.lbfgs(tol=1e-10)(objective, init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert solvers.check_stationarity(objective, sol, tol=1e-9, strict=True) <= 1e-10


# ----------------------------------------------------------------------------- fixed points


def _contraction(n=30, seed=2, rho=0.95):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.linspace(-rho, rho, n, dtype=DT)
    A = Q @ torch.diag(eig) @ Q.T
    c = torch.randn(n, generator=g, dtype=DT)
    return A, c, torch.linalg.solve(torch.eye(n, dtype=DT) - A, c)


def test_fixed_point_iteration_and_anderson_closed_form():
    A, c, w_star = _contraction()
    results = {}
    for name, solver in {
        "fpi": solvers.fixed_point_iteration(tol=1e-10, maxiter=5000, check_every=1),
        "anderson": solvers.anderson(tol=1e-10, maxiter=500, memory=10),
    }.items():
        sol, info = solver(lambda w: A @ w + c, torch.zeros_like(c))
        assert info.converged, str(info)
        assert info.grad_norm <= 1e-10
        assert solvers.fixed_point_residual(lambda w: A @ w + c, sol) <= 1e-10
        torch.testing.assert_close(sol, w_star, atol=1e-8, rtol=0)
        results[name] = info
    # linear map, spectrum spread over [-0.95, 0.95]: 450 plain iterations, about 95 with memory 10
    assert results["anderson"].iterations < results["fpi"].iterations / 3


def test_fixed_point_solvers_on_trees_nonlinear():
    # w = 0.5 cos(w) + c (a contraction), on a dict of mixed shapes
    c = {"u": torch.tensor([0.3, -1.0], dtype=DT), "v": torch.tensor([[2.0]], dtype=DT)}

    def T(w):
        return {k: 0.5 * torch.cos(w[k]) + c[k] for k in w}

    init = {"u": torch.zeros(2, dtype=DT), "v": torch.zeros(1, 1, dtype=DT)}
    sol_f, info_f = solvers.fixed_point_iteration(tol=1e-12)(T, init)
    sol_a, info_a = solvers.anderson(tol=1e-12, memory=3)(T, init)
    assert info_f.converged and info_a.converged
    assert info_a.iterations < info_f.iterations
    for k in init:
        torch.testing.assert_close(sol_a[k], sol_f[k], atol=1e-11, rtol=0)
        torch.testing.assert_close(T(sol_a)[k], sol_a[k], atol=1e-11, rtol=0)


def test_fixed_point_of_gradient_step_equals_argmin(logreg):
    objective, init = logreg

    def step(w):
        with torch.enable_grad():
            wl = {k: v.detach().requires_grad_(True) for k, v in w.items()}
            grads = torch.autograd.grad(objective(wl), list(wl.values()))
        return {k: w[k] - 2.0 * g for k, g in zip(w, grads)}

    sol_a, info = solvers.anderson(tol=1e-12, maxiter=500)(step, init)
    sol_l, _ = solvers.lbfgs(tol=1e-11)(objective, init)
    assert info.converged, str(info)
    torch.testing.assert_close(sol_a["w"], sol_l["w"], atol=1e-9, rtol=0)


def test_fixed_point_nonconvergence_and_bad_map():
    sol, info = solvers.fixed_point_iteration(tol=1e-12, maxiter=20)(
        lambda w: 0.99 * w + 1.0, torch.zeros(2, dtype=DT)
    )
    assert not info.converged and "maxiter" in info.message and info.iterations == 20
    assert info.grad_norm > 1e-12
    # a translation has no fixed point (Anderson would solve an expansive linear map)
    _, info = solvers.anderson(maxiter=50)(lambda w: w + 1.0, torch.ones(2, dtype=DT))
    assert not info.converged and info.iterations == 50
    assert info.grad_norm == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="shape"):
        solvers.fixed_point_iteration()(lambda w: w[:1], torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match="structure"):
        solvers.anderson()(lambda w: {"x": w}, torch.zeros(2, dtype=DT))


# ----------------------------------------------------------------------------- hygiene


def all_solvers():
    A, c, _ = _contraction(n=4)
    return [(s, "min") for s in minimizers().values()] + [
        (solvers.fixed_point_iteration(), "fp"),
        (solvers.anderson(), "fp"),
    ]


def test_init_untouched_outputs_detached_and_fresh():
    hp = torch.tensor(0.3, dtype=DT, requires_grad=True)  # a captured hyperparameter

    def objective(w):
        return ((w["a"] - 1.0) ** 2).sum() + hp * (w["b"] ** 2).sum()

    def T(w):
        return {"a": 0.5 * w["a"] + 0.5, "b": hp * w["b"]}

    init = {"a": torch.randn(3, dtype=DT, requires_grad=True), "b": torch.ones(2, dtype=DT)}
    before = {k: v.detach().clone() for k, v in init.items()}
    for solver, kind in all_solvers():
        fn = objective if kind == "min" else T
        sol, info = solver(fn, init)
        assert info.converged, str(info)
        for k in init:
            torch.testing.assert_close(init[k].detach(), before[k], atol=0, rtol=0)
            assert not sol[k].requires_grad and sol[k].grad_fn is None
            assert sol[k].data_ptr() != init[k].data_ptr()
            assert sol[k].dtype == init[k].dtype and sol[k].shape == init[k].shape
    assert hp.grad is None and init["a"].grad is None


def test_dtype_preserved_float32_and_mixed():
    init = {"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(2, dtype=DT)}

    def objective(w):
        return ((w["a"] - 2.0) ** 2).sum() + ((w["b"] + 1.0) ** 2).sum()

    for solver in (
        solvers.lbfgs(tol=1e-5),
        solvers.newton_cg(tol=1e-5),
        solvers.scipy_minimize(tol=1e-5),
    ):
        sol, info = solver(objective, init)
        assert info.converged, str(info)
        assert sol["a"].dtype == torch.float32 and sol["b"].dtype == DT
        torch.testing.assert_close(sol["a"], torch.full((3,), 2.0), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_preserved_cuda():
    init = {"w": torch.zeros(4, device="cuda", dtype=DT)}

    def objective(w):
        return ((w["w"] - 1.0) ** 2).sum()

    for solver, kind in all_solvers():
        fn = objective if kind == "min" else (lambda w: {"w": 0.5 * w["w"] + 0.5})
        sol, info = solver(fn, init)
        assert info.converged and sol["w"].device == init["w"].device


# ----------------------------------------------------------------------------- bad input


def test_bad_objective_and_init():
    x = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        solvers.lbfgs()(lambda w: w**2, x)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        solvers.gradient_descent()(lambda w: w**2, x)
    with pytest.raises(TypeError, match="0-d tensor"):
        solvers.newton_cg()(lambda w: 1.0, x)
    with pytest.raises(ValueError, match="does not depend"):
        solvers.lbfgs()(lambda w: torch.tensor(1.0), x)
    with pytest.raises(TypeError, match="floating-point"):
        solvers.lbfgs()(lambda w: w.sum(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor or a tree"):
        solvers.lbfgs()(lambda w: w.sum(), {"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="tensor or a tree"):
        solvers.anderson()(lambda w: w, "abc")
    with pytest.raises(ValueError, match="empty"):
        solvers.lbfgs()(lambda w: 0, {})
    with pytest.raises(TypeError, match="callable"):
        solvers.lbfgs()(3, x)


@pytest.mark.parametrize(
    "factory,kwargs,exc",
    [
        (solvers.lbfgs, {"tol": -1.0}, ValueError),
        (solvers.lbfgs, {"tol": math.nan}, ValueError),
        (solvers.lbfgs, {"tol": "1e-3"}, TypeError),
        (solvers.lbfgs, {"maxiter": 0}, ValueError),
        (solvers.lbfgs, {"maxiter": 2.5}, TypeError),
        (solvers.lbfgs, {"line_search": "wolfe"}, ValueError),
        (solvers.gradient_descent, {"check_every": 0}, ValueError),
        (solvers.gradient_descent, {"optimizer": torch.optim.SGD}, TypeError),
        (solvers.newton_cg, {"maxiter": -1}, ValueError),
        (solvers.newton_cg, {"hvp": "both"}, ValueError),
        (solvers.scipy_minimize, {"tol": -1e-3}, ValueError),
        (solvers.fixed_point_iteration, {"maxiter": True}, TypeError),
        (solvers.anderson, {"memory": 0}, ValueError),
        (solvers.anderson, {"mixing": 1.5}, ValueError),
    ],
)
def test_bad_settings(factory, kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=name):
        factory(**kwargs)


def test_info_str_and_repr(logreg):
    objective, init = logreg
    solver = solvers.lbfgs(tol=1e-9)
    _, info = solver(objective, init)
    text = str(info)
    assert text.startswith("lbfgs: converged in") and "gradient norm" in text and "tol" in text
    assert info.time > 0 and info.evaluations >= info.iterations
    assert repr(solver).startswith("lbfgs(") and "tol=1e-09" in repr(solver)
    _, info = solvers.anderson()(lambda w: 0.5 * w, torch.ones(2, dtype=DT))
    assert "residual" in str(info) and "objective" not in str(info)
