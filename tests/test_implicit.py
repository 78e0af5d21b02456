"""The implicit engine: argmin / root / fixed_point / custom_root against closed forms,
finite differences that re-solve the inner problem, unrolled optimization, and torch.func."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilevel
from bilevel import linalg, solvers
from bilevel.implicit import (
    ImplicitDiagnostics,
    argmin,
    custom_root,
    fixed_point,
    hypergrad,
    last_backward_info,
    root,
)

D = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- ridge


def _ridge_data(n=30, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    y = torch.randn(n, generator=g)
    Xv = torch.randn(n, p, generator=g)
    yv = torch.randn(n, generator=g)
    return X, y, Xv, yv


def _ridge_closed(X, y, lam):
    p = X.shape[1]
    return torch.linalg.solve(X.T @ X + torch.diag(lam.expand(p)), X.T @ y)


def _ridge_loss(X, y):
    return lambda w, h: ((X @ w - y) ** 2).sum() + (h["l2"] * w**2).sum()


LINEAR_SOLVERS = {
    "dense": lambda: linalg.dense(),
    "cg": lambda: linalg.cg(tol=1e-12),
    "minres": lambda: linalg.minres(tol=1e-12),
    "gmres": lambda: linalg.gmres(tol=1e-12),
}


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
@pytest.mark.parametrize("name", list(LINEAR_SOLVERS))
def test_ridge_matches_closed_form(name, per_feature):
    X, y, Xv, yv = _ridge_data()
    p = X.shape[1]
    log_l2 = torch.linspace(-1.0, 1.0, p) if per_feature else torch.tensor(0.3)
    log_l2.requires_grad_(True)

    def outer(w):
        return ((Xv @ w - yv) ** 2).mean()

    lam = log_l2.exp()  # a non-leaf hyperparameter: autograd chains to log_l2
    w = argmin(
        _ridge_loss(X, y),
        _ridge_closed(X, y, lam.detach()),
        {"l2": lam},
        linear_solver=LINEAR_SOLVERS[name](),
    )
    (g,) = torch.autograd.grad(outer(w), log_l2)
    ref_log = log_l2.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(outer(_ridge_closed(X, y, ref_log.exp())), ref_log)
    assert g.shape == log_l2.shape
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_ridge_neumann_within_documented_rate():
    X, y, Xv, yv = _ridge_data()
    lam = torch.tensor(2.0, requires_grad=True)
    H = 2 * (X.T @ X + lam.detach() * torch.eye(X.shape[1]))
    ev = torch.linalg.eigvalsh(H)
    alpha = 1.0 / float(ev.max())
    rate = float((1 - alpha * ev).abs().max())
    w_star = _ridge_closed(X, y, lam.detach())
    (g_ref,) = torch.autograd.grad(((Xv @ _ridge_closed(X, y, lam) - yv) ** 2).mean(), lam)
    for K in (10, 400):
        w = argmin(
            _ridge_loss(X, y),
            w_star,
            {"l2": lam},
            linear_solver=linalg.neumann(alpha=alpha, maxiter=K),
        )
        if K == 10:  # a truncated series is an approximate hypergradient: it says so
            with pytest.warns(RuntimeWarning, match=r"neumann: NOT converged after 10 .*residual"):
                (g,) = torch.autograd.grad(((Xv @ w - yv) ** 2).mean(), lam)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                (g,) = torch.autograd.grad(((Xv @ w - yv) ** 2).mean(), lam)
        # ||x_K - x*|| <= kappa rate^K ||x*||: the solve error, carried linearly to the hypergradient
        kappa = float(ev.max() / ev.min())
        bound = kappa * rate**K * 10 * abs(float(g_ref)) + 1e-9
        assert abs(float(g - g_ref)) <= bound
        if K == 400:
            assert abs(float(g - g_ref)) <= 1e-8 * abs(float(g_ref))


# --------------------------------------------------------------------------- logistic regression


def _logreg_data(n=40, p=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    w_true = torch.randn(p, generator=g)
    y = (torch.sigmoid(X @ w_true) > torch.rand(n, generator=g)).to(D)
    Xv = torch.randn(n, p, generator=g)
    yv = (torch.sigmoid(Xv @ w_true) > torch.rand(n, generator=g)).to(D)
    return X, y, Xv, yv


def _logreg_inner(w, h, batch):
    X, y = batch
    return (
        torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y, reduction="sum")
        + 0.5 * (h["l2"] * w**2).sum()
    )


def _logreg_outer(w, Xv, yv):
    return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ w, yv)


def _accurate_solve(l2, X, y):
    solver = solvers.newton_cg(tol=1e-13, maxiter=100)
    w, info = solver(lambda w: _logreg_inner(w, {"l2": l2}, (X, y)), torch.zeros(X.shape[1]))
    assert info.converged
    return w


INNER_SOLVERS = {
    "gradient_descent": lambda: solvers.gradient_descent(
        bilevel.optim.sgd(lr=0.05), tol=1e-11, maxiter=20000
    ),
    "lbfgs": lambda: solvers.lbfgs(tol=1e-11),
    "newton_cg": lambda: solvers.newton_cg(tol=1e-11),
    "scipy_minimize": lambda: solvers.scipy_minimize(tol=1e-11),
}


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
@pytest.mark.parametrize("name", list(INNER_SOLVERS))
def test_logistic_matches_finite_differences(name, per_feature):
    X, y, Xv, yv = _logreg_data()
    p = X.shape[1]
    log_l2 = (torch.linspace(-0.5, 0.5, p) if per_feature else torch.tensor(0.2)).requires_grad_(
        True
    )
    w = argmin(
        _logreg_inner,
        torch.zeros(p),
        {"l2": log_l2.exp()},
        (X, y),
        solver=INNER_SOLVERS[name](),
        linear_solver=linalg.cg(tol=1e-12),
    )
    (g,) = torch.autograd.grad(_logreg_outer(w, Xv, yv), log_l2)

    eps = 1e-5
    base = log_l2.detach().reshape(-1)
    fd = torch.zeros_like(base)
    for i in range(base.numel()):
        e = torch.zeros_like(base)
        e[i] = eps
        vals = []
        for sgn in (1, -1):
            l2 = (base + sgn * e).reshape(log_l2.shape).exp()
            vals.append(_logreg_outer(_accurate_solve(l2, X, y), Xv, yv))
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    rel = (g.reshape(-1) - fd).norm() / fd.norm()
    assert rel < 1e-5, (g, fd)


# --------------------------------------------------------------------------- cross-engine


def _quad_problem(p=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(p, p, generator=g)
    A = M @ M.T / p + torch.eye(p)
    b = torch.randn(p, generator=g)

    def inner(w, h):
        return 0.5 * w @ A @ w - b @ w + 0.5 * h["l2"] * (w**2).sum() + (h["shift"] * w).sum()

    L = float(torch.linalg.eigvalsh(A).max()) + 2.0
    return inner, A, b, L


def test_fixed_point_of_gradient_step_equals_argmin():
    inner, A, b, L = _quad_problem()
    hp = {
        "l2": torch.tensor(0.7, requires_grad=True),
        "shift": torch.linspace(-1, 1, 5).requires_grad_(True),
    }
    w_star, _ = solvers.lbfgs(tol=1e-13)(lambda w: inner(w, hp), torch.zeros(5))
    eta = 1.0 / L

    def step(w, h):
        return w - eta * torch.func.grad(inner)(w, h)

    target = torch.arange(5.0)
    wa = argmin(inner, w_star, hp)
    wf = fixed_point(step, w_star, hp)
    ga = torch.autograd.grad((wa * target).sum(), [hp["l2"], hp["shift"]])
    gf = torch.autograd.grad((wf * target).sum(), [hp["l2"], hp["shift"]])
    for x, z in zip(ga, gf):
        torch.testing.assert_close(x, z, rtol=1e-9, atol=1e-12)


def test_implicit_equals_limit_of_unrolled_gradient_descent():
    inner, A, b, L = _quad_problem()
    l2 = torch.tensor(0.7, requires_grad=True)
    shift = torch.linspace(-1, 1, 5).requires_grad_(True)
    target = torch.arange(5.0)

    def inner_d(params, hparams):
        return inner(params["w"], hparams)

    res = bilevel.unroll(
        inner_d,
        {"w": torch.zeros(5)},
        {"l2": l2, "shift": shift, "lr": 1.0 / L},
        bilevel.optim.sgd(),
        steps=600,
        mode="reverse",
    )
    g_unroll = torch.autograd.grad((res.params["w"] * target).sum(), [l2, shift])
    w_star, _ = solvers.lbfgs(tol=1e-13)(
        lambda w: inner(w, {"l2": l2.detach(), "shift": shift.detach()}), torch.zeros(5)
    )
    w = argmin(inner, w_star, {"l2": l2, "shift": shift})
    g_impl = torch.autograd.grad((w * target).sum(), [l2, shift])
    for x, z in zip(g_impl, g_unroll):
        torch.testing.assert_close(x, z, rtol=1e-7, atol=1e-9)


def test_root_and_custom_root_match_argmin_with_dict_solution_and_data():
    X, y, _, _ = _ridge_data(p=4)

    def loss(w, h, batch):
        Xb, yb = batch
        return (
            ((Xb @ w["a"] + w["b"] - yb) ** 2).sum()
            + (h["l2"] * w["a"] ** 2).sum()
            + h["c"] * w["b"] ** 2
        )

    l2 = torch.tensor([0.5, 1.0, 1.5, 2.0], requires_grad=True)
    init = {"a": torch.zeros(4), "b": torch.zeros(())}
    hp = {"l2": l2, "c": 0.3}  # a number leaf is a constant
    wa = argmin(loss, init, hp, (X, y), solver=solvers.lbfgs(tol=1e-12))
    assert set(wa) == {"a", "b"} and wa["b"].shape == ()
    ga = torch.autograd.grad(wa["a"].sum() + 3 * wa["b"], l2)[0]

    grad_fn = torch.func.grad(loss)
    wr = root(grad_fn, {k: v.detach() for k, v in wa.items()}, hp, (X, y), symmetric=True)
    gr = torch.autograd.grad(wr["a"].sum() + 3 * wr["b"], l2)[0]
    torch.testing.assert_close(gr, ga, rtol=1e-8, atol=1e-11)

    @custom_root(lambda w, h, X, y: grad_fn(w, h, (X, y)))
    def solve(init, h, X, y):
        return {k: v.detach().clone() for k, v in wa.items()}

    wc = solve(init, hp, X, y)
    gc = torch.autograd.grad(wc["a"].sum() + 3 * wc["b"], l2)[0]
    torch.testing.assert_close(gc, ga, rtol=1e-8, atol=1e-11)


def test_gradients_reach_data_tensors():
    X, y, Xv, yv = _ridge_data(p=3)
    X = X.clone().requires_grad_(True)
    lam = torch.tensor(0.8)
    w = argmin(
        lambda w, h, d: ((d[0] @ w - d[1]) ** 2).sum() + h * (w**2).sum(),
        _ridge_closed(X.detach(), y, lam),
        lam,
        (X, y),
    )
    (gX,) = torch.autograd.grad(((Xv @ w - yv) ** 2).sum(), X)
    X2 = X.detach().clone().requires_grad_(True)
    (gX_ref,) = torch.autograd.grad(((Xv @ _ridge_closed(X2, y, lam) - yv) ** 2).sum(), X2)
    torch.testing.assert_close(gX, gX_ref, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- torch.func


def _solve_ridge_fn(X, y, solver=None):
    def f(log_l2):
        lam = log_l2.exp()
        init = torch.zeros(X.shape[-1]) if solver is not None else _ridge_closed(X, y, lam.detach())
        return argmin(
            _ridge_loss(X, y), init, {"l2": lam}, solver=solver, linear_solver=linalg.cg(tol=1e-12)
        )

    return f


def test_vmap_over_batch_of_problems_equals_separate_calls():
    g = torch.Generator().manual_seed(5)
    B, n, p = 8, 12, 3
    Xs, ys = torch.randn(B, n, p, generator=g), torch.randn(B, n, generator=g)
    log_l2 = torch.linspace(-1, 1, B)

    def task(X, y, ll):
        w = argmin(
            lambda w, h, d: ((d[0] @ w - d[1]) ** 2).sum() + h["l2"] * (w**2).sum(),
            torch.zeros(p),
            {"l2": ll.exp()},
            (X, y),
            solver=solvers.lbfgs(tol=1e-12),
        )
        return w

    def task_loss(X, y, ll):
        return (task(X, y, ll) ** 2).sum()

    batched = torch.func.vmap(task)(Xs, ys, log_l2)
    grads = torch.func.vmap(torch.func.grad(task_loss, argnums=(0, 2)))(Xs, ys, log_l2)
    for i in range(B):
        ll = log_l2[i].clone().requires_grad_(True)
        Xi = Xs[i].clone().requires_grad_(True)
        wi = task(Xi, ys[i], ll)
        torch.testing.assert_close(batched[i], wi.detach(), rtol=1e-9, atol=1e-10)
        gX, gl = torch.autograd.grad((wi**2).sum(), [Xi, ll])
        torch.testing.assert_close(grads[0][i], gX, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(grads[1][i], gl, rtol=1e-8, atol=1e-10)
    # a hyperparameter shared by every task gets the sum of the tasks' hypergradients
    shared = torch.tensor(0.1, requires_grad=True)
    total = torch.func.vmap(lambda X, y: task_loss(X, y, shared), randomness="same")(Xs, ys).sum()
    (gs,) = torch.autograd.grad(total, shared)
    expected = sum(
        torch.autograd.grad(task_loss(Xs[i], ys[i], shared), shared)[0] for i in range(B)
    )
    torch.testing.assert_close(gs, expected, rtol=1e-8, atol=1e-10)


def test_double_backward_matches_finite_differences_of_hypergradient():
    X, y, Xv, yv = _logreg_data()
    p = X.shape[1]

    def hypergradient(log_l2, create_graph):
        w = argmin(
            _logreg_inner,
            _accurate_solve(log_l2.detach().exp(), X, y),
            {"l2": log_l2.exp()},
            (X, y),
        )
        return torch.autograd.grad(_logreg_outer(w, Xv, yv), log_l2, create_graph=create_graph)[0]

    log_l2 = torch.linspace(-0.5, 0.5, p).requires_grad_(True)
    g = hypergradient(log_l2, True)
    v = torch.linspace(1.0, 2.0, p)
    (hv,) = torch.autograd.grad((g * v).sum(), log_l2)  # Hessian-vector product of the outer loss
    eps = 1e-5
    gp = hypergradient((log_l2.detach() + eps * v).requires_grad_(True), False)
    gm = hypergradient((log_l2.detach() - eps * v).requires_grad_(True), False)
    fd = (gp - gm) / (2 * eps)
    assert (hv - fd).norm() / fd.norm() < 1e-5


def test_jvp_jacfwd_jacrev_hessian_match_finite_differences():
    X, y, _, _ = _ridge_data(p=4)
    f = _solve_ridge_fn(X, y)
    ll = torch.tensor([0.1, -0.2, 0.3, 0.0])
    d = torch.tensor([1.0, 0.5, -0.5, 2.0])
    eps = 1e-6
    fd = (_ridge_closed(X, y, (ll + eps * d).exp()) - _ridge_closed(X, y, (ll - eps * d).exp())) / (
        2 * eps
    )
    _, tangent = torch.func.jvp(f, (ll,), (d,))
    torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-9)
    J_ref = torch.func.jacrev(lambda t: _ridge_closed(X, y, t.exp()))(ll)
    torch.testing.assert_close(torch.func.jacfwd(f)(ll), J_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.func.jacrev(f)(ll), J_ref, rtol=1e-8, atol=1e-10)
    # forward-mode AD through the public autograd API too
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(fwAD.make_dual(ll, d))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fd, rtol=1e-7, atol=1e-9)
    # Hessians of a scalar of the solution: forward-over-reverse and reverse-over-reverse
    H_ref = torch.func.hessian(lambda t: _ridge_closed(X, y, t.exp()).pow(2).sum())(ll)
    torch.testing.assert_close(
        torch.func.hessian(lambda t: f(t).pow(2).sum())(ll), H_ref, rtol=1e-7, atol=1e-9
    )
    H_rr = torch.func.jacrev(torch.func.jacrev(lambda t: f(t).pow(2).sum()))(ll)
    torch.testing.assert_close(H_rr, H_ref, rtol=1e-7, atol=1e-9)


class _NoForwardSquare(torch.autograd.Function):
    """x ** 2 with a backward but no jvp rule (forces the reverse-over-reverse fallback)."""

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_hessian_vector_products_fall_back_to_reverse_over_reverse():
    X, y, Xv, yv = _ridge_data(p=3)

    def loss(w, h):
        return _NoForwardSquare.apply(X @ w - y).sum() + h * (w**2).sum()

    with pytest.raises(NotImplementedError, match="jvp"):  # the premise: no forward-mode rule
        torch.func.jvp(lambda w: loss(w, 1.0), (torch.zeros(3),), (torch.ones(3),))
    lam = torch.tensor(0.5, requires_grad=True)
    w = argmin(loss, _ridge_closed(X, y, lam.detach()), lam)
    (g,) = torch.autograd.grad(((Xv @ w - yv) ** 2).sum(), lam)
    lam2 = lam.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(((Xv @ _ridge_closed(X, y, lam2) - yv) ** 2).sum(), lam2)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_custom_root_vmap_and_double_backward():
    g = torch.Generator().manual_seed(7)
    Xs, ys = torch.randn(4, 10, 3, generator=g), torch.randn(4, 10, generator=g)
    calls = []

    @custom_root(lambda w, h, X, y: X.T @ (X @ w - y) + h * w, symmetric=True)
    def ridge(init, h, X, y):
        calls.append(1)
        return torch.linalg.solve(X.T @ X + h * torch.eye(3), X.T @ y)

    def closed(h, X, y):
        return torch.linalg.solve(X.T @ X + h * torch.eye(3), X.T @ y)

    h = torch.tensor(0.9)
    out = torch.func.vmap(lambda X, y: ridge(torch.zeros(3), h, X, y))(Xs, ys)
    torch.testing.assert_close(out, torch.stack([closed(h, Xs[i], ys[i]) for i in range(4)]))
    assert len(calls) == 4  # an opaque solver runs once per batch element
    hh = h.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(
        ridge(torch.zeros(3), hh, Xs[0], ys[0]).pow(2).sum(), hh, create_graph=True
    )
    (g2,) = torch.autograd.grad(g1, hh)
    hr = h.clone().requires_grad_(True)
    (r1,) = torch.autograd.grad(closed(hr, Xs[0], ys[0]).pow(2).sum(), hr, create_graph=True)
    (r2,) = torch.autograd.grad(r1, hr)
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2, rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------- diagnostics


def test_diagnostics_after_backward():
    X, y, Xv, yv = _ridge_data(p=3)
    lam = torch.tensor(0.5, requires_grad=True)
    diag = ImplicitDiagnostics()
    w = argmin(
        _ridge_loss(X, y),
        torch.zeros(3),
        {"l2": lam},
        solver=solvers.lbfgs(tol=1e-12),
        linear_solver=linalg.minres(tol=1e-12),
        diagnostics=diag,
    )
    assert diag.forward is not None and diag.forward.converged and diag.backward == []
    ((Xv @ w - yv) ** 2).sum().backward()
    info = diag.last_backward
    assert info.method == "minres" and info.converged and info.iterations >= 1
    assert diag.backward[-1][0] == "vjp"
    assert last_backward_info() is not None
    _ = torch.func.jvp(_solve_ridge_fn(X, y), (torch.tensor(0.0),), (torch.tensor(1.0),))
    assert last_backward_info().method == "cg"


def test_non_converged_backward_solve_warns_with_residual():
    X, y, Xv, yv = _ridge_data(p=6)
    lam = torch.tensor(0.01, requires_grad=True)
    w = argmin(
        _ridge_loss(X, y),
        _ridge_closed(X, y, lam.detach()),
        {"l2": lam},
        linear_solver=linalg.cg(tol=1e-14, maxiter=1),
    )
    with pytest.warns(RuntimeWarning, match=r"did not converge.*residual.*maxiter"):
        ((Xv @ w - yv) ** 2).sum().backward()


# --------------------------------------------------------------------------- bad input


def test_bad_structure_of_solver_output():
    lam = torch.tensor(1.0, requires_grad=True)

    def bad_solver(objective, init):
        return {"w": init}, None

    with pytest.raises(ValueError, match="structure"):
        argmin(lambda w, h: ((w - h) ** 2).sum(), torch.zeros(2), lam, solver=bad_solver)

    def bad_shape(objective, init):
        return torch.zeros(3), None

    with pytest.raises(ValueError, match=r"shape.*\(3,\).*\(2,\)"):
        argmin(lambda w, h: ((w - h) ** 2).sum(), torch.zeros(2), lam, solver=bad_shape)
    with pytest.raises(ValueError, match="structure"):
        root(lambda w, h: {"a": w["a"]}, {"a": torch.zeros(2), "b": torch.zeros(1)}, lam)


def test_non_scalar_inner_loss_names_shape():
    with pytest.raises(ValueError, match=r"scalar.*\(4,\)"):
        argmin(lambda w, h: (w - h) ** 2, torch.zeros(4), torch.tensor(1.0))


def test_bad_hparams_and_solution_types():
    with pytest.raises(TypeError, match="hparams"):
        argmin(lambda w, h: (w**2).sum(), torch.zeros(2), [torch.tensor(1.0)])
    with pytest.raises(TypeError, match="solution_or_init"):
        argmin(lambda w, h: (w**2).sum(), [1.0, 2.0], torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        argmin(lambda w, h: (w**2).sum(), torch.zeros(2, dtype=torch.long), torch.tensor(1.0))


def test_hypergrad_of_hparams_without_grad_is_a_clear_error():
    lam = torch.tensor(1.0)  # does not require grad
    w = argmin(
        lambda w, h: ((w - 1) ** 2).sum() + h["l2"] * (w**2).sum(),
        torch.full((2,), 0.5),
        {"l2": lam},
    )
    assert not w.requires_grad
    with pytest.raises(ValueError, match=r"hparams\['l2'\] do not require grad"):
        hypergrad(w.sum(), {"l2": lam})
    lam2 = torch.tensor(1.0, requires_grad=True)
    w = argmin(
        lambda w, h: ((w - 1) ** 2).sum() + h["l2"] * (w**2).sum(),
        torch.full((2,), 0.5),
        {"l2": lam2, "n": 3},
    )
    g = hypergrad(w.sum(), {"l2": lam2, "n": 3})
    assert g["n"] is None
    torch.testing.assert_close(g["l2"], torch.tensor(-0.5))


def test_singular_operator_with_dense_is_a_clear_error():
    lam = torch.tensor(1.0, requires_grad=True)
    # the loss is flat in w[1]: the Hessian is singular
    w = argmin(
        lambda w, h: (w[0] - h) ** 2,
        torch.stack([lam.detach(), torch.tensor(0.0)]),
        lam,
        linear_solver=linalg.dense(),
    )
    with pytest.raises(RuntimeError, match="singular"):
        w.sum().backward()


def test_negative_curvature_with_cg_suggests_minres():
    lam = torch.tensor(1.0, requires_grad=True)
    # a saddle point: H = diag(2, -2)
    w = argmin(
        lambda w, h: (w[0] - h) ** 2 - (w[1] - h) ** 2,
        torch.stack([lam, lam]).detach(),
        lam,
        linear_solver=linalg.cg(),
    )
    with pytest.warns(RuntimeWarning, match="minres"):
        w.sum().backward()
    # minres handles the symmetric indefinite Hessian exactly: d w / d h = (1, 1)
    lam.grad = None
    w = argmin(
        lambda w, h: (w[0] - h) ** 2 - (w[1] - h) ** 2,
        torch.stack([lam, lam]).detach(),
        lam,
        linear_solver=linalg.minres(),
    )
    w.sum().backward()
    torch.testing.assert_close(lam.grad, torch.tensor(2.0))


def test_non_converged_inner_solve_warns_with_gradient_norm():
    lam = torch.tensor(1.0, requires_grad=True)
    loss = lambda w, h: ((w - 3.0) ** 2).sum() + h * (w**2).sum()  # noqa: E731
    weak = solvers.gradient_descent(bilevel.optim.sgd(lr=0.01), tol=1e-12, maxiter=3, check_every=1)
    with pytest.warns(RuntimeWarning, match=r"gradient norm \d"):
        argmin(loss, torch.zeros(2), lam, solver=weak)
    with pytest.raises(RuntimeError, match="gradient norm"):
        argmin(loss, torch.zeros(2), lam, solver=weak, strict=True)
    with pytest.warns(RuntimeWarning, match=r"gradient norm .* > tol"):
        argmin(loss, torch.zeros(2), lam, stationarity_tol=1e-6)  # a given, wrong solution


def test_symmetric_only_linear_solver_for_non_symmetric_problem():
    h = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="gmres"):
        fixed_point(
            lambda w, h: 0.5 * w + h, 2 * h.detach(), h, linear_solver=linalg.cg(), symmetric=False
        )
    with pytest.warns(UserWarning, match="symmetric"):
        fixed_point(lambda w, h: 0.5 * w + h, 2 * h.detach(), h, linear_solver=linalg.cg())


def test_solution_does_not_depend_on_init_gradient():
    lam = torch.tensor(1.0, requires_grad=True)
    init = torch.zeros(2, requires_grad=True)
    w = argmin(
        lambda w, h: ((w - 1) ** 2).sum() + h * (w**2).sum(),
        init,
        lam,
        solver=solvers.lbfgs(tol=1e-12),
    )
    w.sum().backward()
    assert init.grad is None
    torch.testing.assert_close(lam.grad, torch.tensor(-0.5))
    assert math.isfinite(float(lam.grad))


def test_reverse_hessian_vector_products_option():
    X, y, Xv, yv = _ridge_data(p=4)
    lam = torch.tensor(0.6, requires_grad=True)
    grads = []
    for hvp in ("forward", "reverse"):
        w = argmin(_ridge_loss(X, y), _ridge_closed(X, y, lam.detach()), {"l2": lam}, hvp=hvp)
        grads.append(torch.autograd.grad(((Xv @ w - yv) ** 2).sum(), lam)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="hvp"):
        argmin(_ridge_loss(X, y), torch.zeros(4), {"l2": lam}, hvp="sideways")
