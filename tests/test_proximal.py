"""proximal_argmin and proximal_gradient: against scikit-learn, finite differences, vmap."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.solvers import Composite, NotStationaryWarning, proximal_gradient

DT = torch.float64
SOLVER = proximal_gradient(tol=1e-13, maxiter=100000)


def regression(n=40, p=12, seed=0, n_val=30):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, p, generator=g, dtype=DT)
    w = torch.zeros(p, dtype=DT)
    w[:4] = torch.tensor([2.0, -1.5, 1.0, 0.5], dtype=DT)
    y = X @ w + 0.5 * torch.randn(n + n_val, generator=g, dtype=DT)
    return X[:n], y[:n], X[n:], y[n:]


def smooth(w, h, data):
    X, y = data
    return 0.5 * ((X @ w - y) ** 2).mean()


def val_loss(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean()


def sklearn_val(alpha, X, y, Xv, yv):
    from sklearn.linear_model import Lasso

    model = Lasso(alpha=alpha, fit_intercept=False, tol=1e-15, max_iter=10**6)
    model.fit(X.numpy(), y.numpy())
    w = torch.from_numpy(model.coef_).to(DT)
    return float(val_loss(w, Xv, yv)), w


def test_lasso_solution_matches_sklearn():
    pytest.importorskip("sklearn")
    X, y, Xv, yv = regression()
    w = bilevel.proximal_argmin(
        smooth,
        torch.zeros(12, dtype=DT),
        {},
        (X, y),
        prox=bilevel.prox.lasso,
        prox_hparams=0.1,
        solver=SOLVER,
    )
    _, ref = sklearn_val(0.1, X, y, Xv, yv)
    assert (w - ref).abs().max() < 1e-9
    assert 0 < int((w != 0).sum()) < 12  # a sparse solution: the support matters below


@pytest.mark.parametrize("restricted", [True, False])
def test_lasso_hypergradient_matches_finite_differences_of_sklearn(restricted):
    pytest.importorskip("sklearn")
    X, y, Xv, yv = regression(seed=1)
    log_alpha = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    w = bilevel.proximal_argmin(
        smooth,
        torch.zeros(12, dtype=DT),
        {},
        (X, y),
        prox=bilevel.prox.lasso,
        prox_hparams=log_alpha.exp(),
        solver=SOLVER,
        support_restricted=restricted,
        linear_solver=bilevel.linalg.gmres(tol=1e-13),
    )
    val_loss(w, Xv, yv).backward()
    eps = 1e-5
    plus, _ = sklearn_val(float(torch.exp(log_alpha.detach() + eps)), X, y, Xv, yv)
    minus, _ = sklearn_val(float(torch.exp(log_alpha.detach() - eps)), X, y, Xv, yv)
    fd = (plus - minus) / (2 * eps)
    assert abs(float(log_alpha.grad) - fd) < 1e-7 * (1 + abs(fd))


def test_support_restricted_equals_full_backward_and_data_gradients():
    X, y, Xv, yv = regression(seed=2)
    grads = []
    for restricted in (True, False):
        Xd = X.clone().requires_grad_()
        l1 = torch.tensor(0.05, dtype=DT, requires_grad=True)
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.proximal_argmin(
            smooth,
            torch.zeros(12, dtype=DT),
            {},
            (Xd, y),
            prox=bilevel.prox.lasso,
            prox_hparams=l1,
            solver=SOLVER,
            support_restricted=restricted,
            linear_solver=bilevel.linalg.gmres(tol=1e-13),
            diagnostics=diag,
        )
        val_loss(w, Xv, yv).backward()
        grads.append((l1.grad, Xd.grad, diag.last_backward.iterations))
    (a1, aX, it_r), (b1, bX, it_f) = grads
    assert abs(float(a1 - b1)) < 1e-9 and (aX - bX).abs().max() < 1e-9
    assert it_r <= it_f  # the restricted Krylov space is smaller


def test_elastic_net_per_feature_l2_against_finite_differences():
    X, y, Xv, yv = regression(seed=3)
    log_l2 = torch.full((12,), -1.0, dtype=DT, requires_grad=True)
    l1 = torch.tensor(0.05, dtype=DT)

    def solve(l2):
        return bilevel.proximal_argmin(
            smooth,
            torch.zeros(12, dtype=DT),
            {},
            (X, y),
            prox=bilevel.prox.elastic_net,
            prox_hparams={"l1": l1, "l2": l2},
            solver=SOLVER,
            linear_solver=bilevel.linalg.gmres(tol=1e-13),
        )

    val_loss(solve(log_l2.exp()), Xv, yv).backward()
    d = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(4))
    eps = 1e-5
    with torch.no_grad():
        fp = val_loss(solve((log_l2 + eps * d).exp()), Xv, yv)
        fm = val_loss(solve((log_l2 - eps * d).exp()), Xv, yv)
    fd = float((fp - fm) / (2 * eps))
    assert abs(float(log_l2.grad @ d) - fd) < 1e-7 * (1 + abs(fd))


def test_elastic_net_matches_sklearn():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import ElasticNet

    X, y, _, _ = regression(seed=5)
    alpha, rho = 0.2, 0.6
    ref = ElasticNet(alpha=alpha, l1_ratio=rho, fit_intercept=False, tol=1e-15, max_iter=10**6)
    ref.fit(X.numpy(), y.numpy())
    w = bilevel.proximal_argmin(
        smooth,
        torch.zeros(12, dtype=DT),
        {},
        (X, y),
        prox=bilevel.prox.elastic_net,
        prox_hparams={"l1": alpha * rho, "l2": alpha * (1 - rho)},
        solver=SOLVER,
    )
    assert (w - torch.from_numpy(ref.coef_)).abs().max() < 1e-9


def test_group_lasso_hypergradient_against_finite_differences():
    X, y, Xv, yv = regression(seed=6)

    def f(w, h, data):
        return smooth(w.reshape(-1), h, data)

    def solve(l2):
        return bilevel.proximal_argmin(
            f,
            torch.zeros(4, 3, dtype=DT),
            {},
            (X, y),
            prox=bilevel.prox.group_lasso,
            prox_hparams=l2,
            solver=SOLVER,
            linear_solver=bilevel.linalg.gmres(tol=1e-13),
        )

    l2 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w = solve(l2)
    assert 0 < int((w.abs().sum(-1) > 0).sum()) < 4  # some groups are zero
    val_loss(w.reshape(-1), Xv, yv).backward()
    eps = 1e-6
    with torch.no_grad():
        fd = (
            val_loss(solve(l2 + eps).reshape(-1), Xv, yv)
            - val_loss(solve(l2 - eps).reshape(-1), Xv, yv)
        ) / (2 * eps)
    assert abs(float(l2.grad - fd)) < 1e-6 * (1 + abs(float(fd)))


def test_vmap_batch_equals_loop():
    problems = [regression(seed=10 + i) for i in range(3)]
    Xs = torch.stack([p[0] for p in problems])
    ys = torch.stack([p[1] for p in problems])
    l1s = torch.tensor([0.02, 0.1, 0.3], dtype=DT, requires_grad=True)

    def one(X, y, l1):
        return bilevel.proximal_argmin(
            smooth,
            torch.zeros(12, dtype=DT),
            {},
            (X, y),
            prox=bilevel.prox.lasso,
            prox_hparams=l1,
            solver=SOLVER,
        )

    batched = torch.func.vmap(one)(Xs, ys, l1s)
    batched.sum().backward()
    g_batched = l1s.grad.clone()
    for i in range(3):
        l1 = l1s[i].detach().clone().requires_grad_()
        w = one(Xs[i], ys[i], l1)
        assert (w - batched[i]).abs().max() < 1e-12
        w.sum().backward()
        assert abs(float(l1.grad - g_batched[i])) < 1e-10


def test_forward_mode_matches_backward():
    X, y, _, _ = regression(seed=7)
    l1 = torch.tensor(0.05, dtype=DT)

    def solve(l1):
        return bilevel.proximal_argmin(
            smooth,
            torch.zeros(12, dtype=DT),
            {},
            (X, y),
            prox=bilevel.prox.lasso,
            prox_hparams=l1,
            solver=SOLVER,
            linear_solver=bilevel.linalg.gmres(tol=1e-13),
        )

    fwd = torch.func.jacfwd(solve)(l1)
    rev = torch.autograd.functional.jacobian(solve, l1)
    assert (fwd - rev).abs().max() < 1e-9
    assert (fwd[solve(l1) == 0] == 0).all()


def test_solver_per_problem_steps_and_warnings():
    # two problems with curvatures 1 and 1000: each gets its own step size
    a = torch.tensor([[1.0], [1000.0]], dtype=DT)
    target = Composite(
        lambda W: 0.5 * (a * (W - 1) ** 2).sum(-1),
        lambda W, step: bilevel.prox.lasso(W, 0.1, step.unsqueeze(-1)),
        batch=2,
    )
    W, info = proximal_gradient(tol=1e-12)(target, torch.zeros(2, 1, dtype=DT))
    assert info.converged
    assert (W.squeeze(-1) - (1 - 0.1 / a.squeeze(-1))).abs().max() < 1e-12
    steps = info.extra["step_size"]
    assert steps[0] > 100 * steps[1]
    with pytest.raises(TypeError, match="Composite"):
        proximal_gradient()(lambda w: w.sum(), torch.zeros(2))
    X, y, _, _ = regression(seed=8)
    with pytest.warns(NotStationaryWarning, match="did not converge"):
        bilevel.proximal_argmin(
            smooth,
            torch.zeros(12, dtype=DT),
            {},
            (X, y),
            prox=bilevel.prox.lasso,
            prox_hparams=0.01,
            solver=proximal_gradient(maxiter=3, check_every=1),
        )


def test_custom_fixed_point_under_vmap_and_double_backward():
    def step(w, h):
        return 0.5 * torch.tanh(w) + h

    @bilevel.custom_fixed_point(step, linear_solver=bilevel.linalg.gmres(tol=1e-13))
    def solve(init, h):
        w = init
        for _ in range(200):
            w = step(w, h)
        return w

    h = torch.tensor([0.3, -0.7], dtype=DT, requires_grad=True)
    w = solve(torch.zeros(2, dtype=DT), h)
    (g,) = torch.autograd.grad(w.sum(), h, create_graph=True)
    ref = 1 / (1 - 0.5 / torch.cosh(w.detach()) ** 2)  # dw/dh = 1 / (1 - 0.5 sech^2 w)
    assert (g - ref).abs().max() < 1e-10
    (gg,) = torch.autograd.grad(g.sum(), h)
    eps = 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp = torch.autograd.grad(solve(torch.zeros(2, dtype=DT), h + eps).sum(), h)[0]
        gm = torch.autograd.grad(solve(torch.zeros(2, dtype=DT), h - eps).sum(), h)[0]
    assert (gg - (gp - gm) / (2 * eps)).abs().max() < 1e-6
    batched = torch.func.vmap(lambda hh: solve(torch.zeros(2, dtype=DT), hh))(
        torch.stack([h.detach(), 2 * h.detach()])
    )
    assert (batched[0] - w.detach()).abs().max() < 1e-12


@pytest.mark.slow
def test_l1_logistic_regression_matches_liblinear():
    # a non-quadratic smooth part: the backtracking (no step size given) does the work
    sk = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression

    data = sk.load_breast_cancer()
    X = torch.tensor(data.data, dtype=DT)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's notice about `penalty`
        ref = LogisticRegression(
            penalty="l1",
            C=0.1,
            solver="liblinear",
            fit_intercept=False,
            tol=1e-12,
            max_iter=100000,
        ).fit(X.numpy(), data.target)

    def loss(w, h, d):
        return torch.nn.functional.binary_cross_entropy_with_logits(d[0] @ w, d[1])

    w = bilevel.proximal_argmin(
        loss,
        torch.zeros(30, dtype=DT),
        {},
        (X, y),
        prox=bilevel.prox.lasso,
        prox_hparams=10.0 / X.shape[0],
        solver=proximal_gradient(tol=1e-10, maxiter=200000),
    )
    assert (w - torch.from_numpy(ref.coef_[0])).abs().max() < 1e-5
    assert torch.equal(w != 0, torch.from_numpy(ref.coef_[0] != 0))
