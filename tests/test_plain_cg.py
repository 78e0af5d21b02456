"""The plain backward's inlined cg (bilevel/implicit/_plain_cg.py), cg's CPU loop decided
before the masked loop's state, the Hessian's batched backward by functorch's batching, and
dense's plain path beyond 64 unknowns: each equal to the general path (1e-12, float64), to
the closed form, with the same iterations, records and warnings."""

import math
import warnings

import pytest
import torch

import bilevel
import bilevel.implicit._plain_cg as plain_cg_module
import bilevel.implicit._transposed as transposed
import bilevel.implicit.user_problem as user_problem
from bilevel import linalg
from bilevel.implicit._products import _plain_grad
from bilevel.linalg.cg import CG
from bilevel.linalg.dense import Dense
from bilevel.solvers import NotMinimumWarning

D = torch.float64


class _OwnCG(CG):  # a subclass: never inlined, so the general plain path runs
    def __init__(self, tol=1e-10, maxiter=None, damping=0.0):
        super().__init__(tol, 0.0, maxiter, damping, None)


class _OwnDense(Dense):
    pass


class _Calls:
    """Counts the plain backward's engine calls (its products' too: the recorded one and the
    backward passes through it) and the inlined cg's solves."""

    def __init__(self, monkeypatch):
        self.grads = 0
        self.inlined = 0
        real_grad, real_cg = user_problem._plain_grad, user_problem.cg_vjp

        def grad(*args, **kwargs):
            self.grads += 1
            return real_grad(*args, **kwargs)

        def cg(*args, **kwargs):
            self.inlined += 1
            return real_cg(*args, **kwargs)

        monkeypatch.setattr(user_problem, "_plain_grad", grad)
        monkeypatch.setattr(transposed, "_plain_grad", grad)
        monkeypatch.setattr(user_problem, "cg_vjp", cg)


def _hypergrad(inner, outer, w0, h, solver, create_graph=False):
    w = bilevel.argmin(inner, w0, h, linear_solver=solver)
    (g,) = torch.autograd.grad(outer(w), h, create_graph=create_graph)
    return g.detach()


def _cg_options(damping):
    return dict(tol=1e-12, damping=damping)


@pytest.mark.parametrize("p", [1, 3, 30])
@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_inlined_cg_equals_the_general_path_and_the_closed_form(monkeypatch, p, damping, ridge):
    inner, outer, w_star = ridge(max(12, 3 * p), p)
    h = torch.tensor(-1.0, dtype=D, requires_grad=True)
    w0 = w_star(h.detach())
    calls = _Calls(monkeypatch)
    fast_solver = linalg.cg(**_cg_options(damping))
    fast = _hypergrad(inner, outer, w0, h, fast_solver)
    assert calls.inlined == 1
    general_solver = _OwnCG(**_cg_options(damping))
    general = _hypergrad(inner, outer, w0, h, general_solver)
    assert calls.inlined == 1  # the subclass took the general path
    # the same loop on the same products: the same iterates and stopping decision
    assert fast_solver.last_info.iterations == general_solver.last_info.iterations
    assert fast_solver.last_info.converged and general_solver.last_info.converged
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=0)
    twice = _hypergrad(inner, outer, w0, h, linalg.cg(**_cg_options(damping)), create_graph=True)
    torch.testing.assert_close(fast, twice, rtol=1e-10, atol=0)
    if damping == 0.0:
        closed = torch.autograd.grad(outer(w_star(h)), h)[0]
        torch.testing.assert_close(fast, closed, rtol=1e-9, atol=0)


@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_auto_above_its_dense_limit_runs_the_inlined_cg_of_its_iterative(
    monkeypatch, damping, ridge
):
    # 80 unknowns > max_dense = 64: auto's cg, on the plain path as cg itself (the transposed
    # products too); the record is auto's, with its note, the values cg's and the general path's
    inner, outer, w_star = ridge(200, 80)
    h = torch.tensor(-1.0, dtype=D, requires_grad=True)
    w0 = w_star(h.detach())
    calls = _Calls(monkeypatch)
    chosen = linalg.auto(linalg.cg(**_cg_options(damping)))
    fast = _hypergrad(inner, outer, w0, h, chosen)
    assert calls.inlined == 1
    info = chosen.last_info
    assert info.method == "cg" and info.converged
    assert "auto: cg for n=80 > max_dense=64" in info.message
    plain = linalg.cg(**_cg_options(damping))
    torch.testing.assert_close(fast, _hypergrad(inner, outer, w0, h, plain), rtol=0, atol=0)
    assert plain.last_info.iterations == info.iterations
    general = _OwnCG(**_cg_options(damping))
    torch.testing.assert_close(
        fast, _hypergrad(inner, outer, w0, h, linalg.auto(general)), rtol=1e-10, atol=0
    )
    assert calls.inlined == 2  # the cg subclass inside auto took the general path
    if damping == 0.0:
        closed = torch.autograd.grad(outer(w_star(h)), h)[0]
        torch.testing.assert_close(fast, closed, rtol=1e-9, atol=0)
    # a preconditioned or sparsely checked cg inside auto: the general path, as for cg itself
    _hypergrad(inner, outer, w0, h, linalg.auto(linalg.cg(tol=1e-12, check_every=5)))
    assert calls.inlined == 2


def test_three_unknowns_stop_after_at_most_three_products(monkeypatch, ridge):
    inner, outer, w_star = ridge(10, 3)
    h = torch.tensor(-2.0, dtype=D, requires_grad=True)
    calls = _Calls(monkeypatch)
    solver = linalg.cg(tol=1e-12)
    fast = _hypergrad(inner, outer, w_star(h.detach()), h, solver)
    # one call builds F's graph, one batched backward forms the 3 x 3 matrix whose products
    # cg takes, one gives the hypergradient
    assert calls.grads == 3
    assert solver.last_info.iterations <= 3 and solver.last_info.converged
    # where the batched backward fails, one backward per product: the same iterations
    monkeypatch.setattr(plain_cg_module, "operator_matrix", lambda *args: None)
    calls.grads = 0
    each = linalg.cg(tol=1e-12)
    slow = _hypergrad(inner, outer, w_star(h.detach()), h, each)
    assert calls.grads - 2 == each.last_info.iterations == solver.last_info.iterations
    torch.testing.assert_close(fast, slow, rtol=1e-13, atol=0)


def test_a_truncated_inlined_cg_truncates_and_warns(monkeypatch, ridge):
    inner, outer, w_star = ridge(60, 30)
    h = torch.tensor(-3.0, dtype=D, requires_grad=True)
    w0 = w_star(h.detach())
    calls = _Calls(monkeypatch)
    results = []
    for make in (linalg.cg, _OwnCG):
        solver = make(tol=1e-12, maxiter=2)
        with pytest.warns(RuntimeWarning, match="did not converge"):
            results.append(_hypergrad(inner, outer, w0, h, solver))
        assert solver.last_info.iterations == 2 and not solver.last_info.converged
        assert "maxiter=2" in solver.last_info.message
        if make is linalg.cg:  # truncated below 8: no matrix, F's graph + 2 products + 1
            assert calls.grads == 4
    assert calls.inlined == 1
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)
    exact = _hypergrad(inner, outer, w0, h, linalg.dense())
    assert not torch.allclose(results[0], exact, rtol=1e-6)  # truncated: not the solution


def test_inlined_cg_at_a_maximum_warns_as_the_general_path(monkeypatch):
    def inner(w, h):
        return -(w * w).sum() * h.exp() + (w * 0).sum()

    h = torch.tensor(0.0, dtype=D, requires_grad=True)
    w0 = torch.zeros(2, dtype=D)
    calls = _Calls(monkeypatch)
    for make in (linalg.cg, _OwnCG):
        solver = make()
        w = bilevel.argmin(inner, w0, h, linear_solver=solver)
        with pytest.warns(RuntimeWarning, match="did not converge"):
            with pytest.warns(NotMinimumWarning, match="not a minimum"):
                torch.autograd.grad((w * torch.tensor([1.0, 2.0], dtype=D)).sum(), h)
        assert solver.last_info.negative_curvature
    assert calls.inlined == 1


def test_dense_beyond_64_unknowns_takes_the_plain_path(monkeypatch, ridge):
    inner, outer, w_star = ridge(160, 80)
    h = torch.tensor(-1.0, dtype=D, requires_grad=True)
    w0 = w_star(h.detach())
    taken = []
    real = user_problem.exact_vjp
    monkeypatch.setattr(
        user_problem,
        "exact_vjp",
        lambda *a: taken.append(1) or real(*a),  # type: ignore[func-returns-value]
    )
    fast = _hypergrad(inner, outer, w0, h, linalg.dense())
    assert taken == [1]
    general = _hypergrad(inner, outer, w0, h, _OwnDense())
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=0)
    closed = torch.autograd.grad(outer(w_star(h)), h)[0]
    torch.testing.assert_close(fast, closed, rtol=1e-10, atol=0)


def test_batched_plain_grad_equals_autograd_grads_batched_one():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 4, generator=g, dtype=D)
    a = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(2, 3, generator=g, dtype=D, requires_grad=True)
    unused = torch.randn(3, dtype=D, requires_grad=True)
    with torch.enable_grad():
        loss = (A @ a).pow(2).sum() + (b.sin() * b).sum() + (A @ a).sum() * b.sum()
        F = torch.autograd.grad(loss, [a, b], create_graph=True)
    V = [torch.randn(7, *f.shape, generator=g, dtype=D) for f in F]
    ours = _plain_grad(F, [a, b, unused], V, retain_graph=True, batched=True)
    theirs = torch.autograd.grad(
        F, [a, b, unused], V, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    assert ours[2] is None and theirs[2] is None
    for x, y in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    # and each row is the product of its own cotangent
    for i in range(7):
        row = torch.autograd.grad(F, [a, b], [v[i] for v in V], retain_graph=True)
        for x, y in zip(ours[:2], row):
            torch.testing.assert_close(x[i], y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_cpu_loop_equals_the_masked_loop(dtype):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(20, 8, generator=g, dtype=torch.float64)
    A = (B.T @ B / 20 + 0.1 * torch.eye(8, dtype=torch.float64)).to(dtype)
    b = torch.randn(8, generator=g, dtype=torch.float64).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x1, info1 = linalg.cg(tol=1e-6, atol=1e-7)(lambda v: A @ v, b)  # CPU loop
        x2, info2 = linalg.cg(tol=1e-6, atol=1e-7, check_every=2)(lambda v: A @ v, b)  # masked
    # the masked loop may run one masked (no-op) iteration past convergence
    assert info1.iterations == info2.iterations
    assert info1.converged and info2.converged
    assert info1.threshold == info2.threshold
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x1, x2, rtol=rtol, atol=0)
    assert info1.residual_norm == pytest.approx(info2.residual_norm, rel=rtol)
    assert info1.min_curvature == pytest.approx(info2.min_curvature, rel=rtol)
    assert info1.max_curvature == pytest.approx(info2.max_curvature, rel=rtol)
    # a truncated solve: the same record of not converging
    _, t1 = linalg.cg(tol=1e-14, maxiter=3)(lambda v: A @ v, b)
    _, t2 = linalg.cg(tol=1e-14, maxiter=3, check_every=3)(lambda v: A @ v, b)
    assert (t1.iterations, t1.converged, t1.message) == (t2.iterations, t2.converged, t2.message)


class _Softplus(torch.autograd.Function):
    """softplus whose derivative, sigmoid, is differentiable once more but not twice (its
    own backward is once_differentiable): a double backward works, a third order does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _Sigmoid.apply(x)


class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return g * s * (1 - s)


def _logistic(softplus):
    """Binary logistic regression (100 x 70: above the route's MAX_DOUBLE; L2 weight
    exp(h)) with its minimiser by Newton."""
    n, p = 100, 70
    g = torch.Generator().manual_seed(3)
    X, Xv = torch.randn(n, p, generator=g, dtype=D), torch.randn(n, p, generator=g, dtype=D)
    y, yv = (torch.rand(n, generator=g, dtype=D) < 0.5).to(D), (torch.rand(n, generator=g) < 0.5)

    def inner(w, h):
        z = X @ w
        return (softplus(z) - y * z).mean() + 0.5 * h.exp() * (w * w).sum()

    def outer(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ w, yv.to(D))

    h = torch.tensor(-2.0, dtype=D, requires_grad=True)
    lam, w = math.exp(-2.0), torch.zeros(p, dtype=D)
    for _ in range(30):  # Newton with the gradient and Hessian written out
        s = torch.sigmoid(X @ w)
        grad = X.T @ (s - y) / n + lam * w
        H = X.T @ (X * (s * (1 - s))[:, None]) / n + lam * torch.eye(p, dtype=D)
        w = w - torch.linalg.solve(H, grad)
    return inner, outer, w, h


@pytest.mark.parametrize("third_order", [True, False])
def test_products_by_the_recorded_products_backward_equal_the_double_backward(
    monkeypatch, third_order
):
    """The Hessian products as the backward of one recorded product (a non-quadratic loss):
    the hypergradient and iterations of the double backward products, to 1e-12; where the
    loss has no third-order formula, the double backward after the first product."""
    softplus = torch.nn.functional.softplus if third_order else _Softplus.apply
    inner, outer, w_star, h = _logistic(softplus)
    routes = []
    real = transposed.transposed_products

    def spy(F, s, b, vjp):
        product = real(F, s, b, vjp)
        routes.append(product)
        return product

    monkeypatch.setattr(transposed, "transposed_products", spy)
    monkeypatch.setattr(transposed, "_VERDICTS", {})
    new_solver = linalg.cg(tol=1e-12)
    new = _hypergrad(inner, outer, w_star, h, new_solver)
    assert isinstance(routes[0], transposed._Transposed)
    assert routes[0].tried and routes[0].ok is third_order  # else the double backward took over
    assert transposed.MAX_DOUBLE < 70
    # a second call takes the verdict: no checked product (no second route without it)
    again = _hypergrad(inner, outer, w_star, h, linalg.cg(tol=1e-12))
    assert len(routes) == 2 and (routes[1] is not routes[0])
    assert isinstance(routes[1], transposed._Transposed) is third_order
    torch.testing.assert_close(again, new, rtol=1e-12, atol=0)
    monkeypatch.setattr(transposed, "transposed_products", lambda F, s, b, vjp: vjp)
    old_solver = linalg.cg(tol=1e-12)
    old = _hypergrad(inner, outer, w_star, h, old_solver)
    assert new_solver.last_info.iterations == old_solver.last_info.iterations > 3
    torch.testing.assert_close(new, old, rtol=1e-12, atol=0)
