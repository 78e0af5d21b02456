"""The plain backward of implicit layers (one first-order graph, no nested Function): equal
to the general, twice-differentiable path, with the matrix of dense solves formed from one
batched backward, and the forward's graph reused safely."""

import math

import pytest
import torch

import bilevel
from bilevel import linalg

D = torch.float64


def _data(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)


def _hypergrad(make_w, h, create_graph):
    """d (w . w) / dh: the plain path (create_graph=False) or the general one (True)."""
    w = make_w(h)
    leaves = list(w.values()) if isinstance(w, dict) else [w]
    outer = sum((x**2).sum() for x in leaves)
    (g,) = torch.autograd.grad(outer, h, create_graph=create_graph)
    return g.detach()


LINEAR_SOLVERS = {
    "auto": lambda: None,
    "dense": lambda: linalg.dense(),
    "cg": lambda: linalg.cg(tol=1e-14),
    "minres": lambda: linalg.minres(tol=1e-14),
}


@pytest.mark.parametrize("name", sorted(LINEAR_SOLVERS))
def test_argmin_plain_backward_equals_the_general_path(name):
    X, y = _data(15, 5)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h.exp() * (w**2).sum() + 0.1 * (w**4).sum()

    def make_w(h):
        return bilevel.argmin(
            loss,
            torch.zeros(5, dtype=D),
            h,
            solver=bilevel.solvers.lbfgs(tol=1e-13),
            linear_solver=LINEAR_SOLVERS[name](),
        )

    h = torch.tensor(-0.5, dtype=D, requires_grad=True)
    plain, general = _hypergrad(make_w, h, False), _hypergrad(make_w, h, True)
    torch.testing.assert_close(plain, general, rtol=1e-10, atol=0)


def test_the_dense_matrix_of_a_tree_solution_is_laid_out_right():
    # a dict of two leaves of different shapes: the batched basis must map to each leaf
    g = torch.Generator().manual_seed(3)
    M = torch.randn(10, 10, generator=g, dtype=D)
    A = M @ M.T + 10 * torch.eye(10, dtype=D)
    c = torch.randn(10, generator=g, dtype=D)

    def flat(w):
        return torch.cat([w["a"].reshape(-1), w["b"]])

    def loss(w, h):
        v = flat(w)
        return 0.5 * v @ A @ v - h * (c @ v)

    for lin in (None, linalg.dense(), linalg.cg(tol=1e-14)):
        h = torch.tensor(2.0, dtype=D, requires_grad=True)
        v_star = torch.linalg.solve(A, 2.0 * c)
        w_star = {"a": v_star[:6].reshape(2, 3), "b": v_star[6:]}
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.argmin(loss, w_star, h, linear_solver=lin, diagnostics=diag)
        (gh,) = torch.autograd.grad((flat(w) ** 2).sum(), h)
        # w*(h) = h A^-1 c, so d|w*|^2/dh = 2 h |A^-1 c|^2
        expected = 2 * 2.0 * (torch.linalg.solve(A, c) ** 2).sum()
        torch.testing.assert_close(gh, expected, rtol=1e-11, atol=0)
        assert diag.last_backward.method == (
            "cg" if lin is not None and lin.name == "cg" else "dense"
        )


def test_dense_beyond_the_batched_limit_is_still_exact():
    X, y = _data(90, 70, seed=4)

    def loss(w, h):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * h * (w**2).sum()

    h = torch.tensor(0.7, dtype=D, requires_grad=True)
    A = X.T @ X + 0.7 * torch.eye(70, dtype=D)
    w_star = torch.linalg.solve(A, X.T @ y)
    w = bilevel.argmin(loss, w_star, h, linear_solver=linalg.dense())
    (gh,) = torch.autograd.grad((w**2).sum(), h)
    expected = -2 * w_star @ torch.linalg.solve(A, w_star)
    torch.testing.assert_close(gh, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("lin", ["auto", "gmres", "dense"])
def test_root_and_fixed_point_plain_backward_equal_the_general_path(lin):
    g = torch.Generator().manual_seed(5)
    B = 0.3 * torch.randn(4, 4, generator=g, dtype=D)  # a contraction, not symmetric
    c = torch.randn(4, generator=g, dtype=D)

    def solver():
        return {"auto": None, "gmres": linalg.gmres(tol=1e-14), "dense": linalg.dense()}[lin]

    def make_fp(h):
        return bilevel.fixed_point(
            lambda w, h: torch.tanh(B @ w) + h * c,
            torch.zeros(4, dtype=D),
            h,
            solver=bilevel.solvers.fixed_point_iteration(tol=1e-14, maxiter=2000),
            linear_solver=solver(),
        )

    def make_root(h):  # the solution given (iterated here), the root's Jacobian I - J
        w = torch.zeros(4, dtype=D)
        for _ in range(200):
            w = torch.tanh(B @ w) + h.detach() * c
        return bilevel.root(
            lambda w, h: w - torch.tanh(B @ w) - h * c, w, h, linear_solver=solver()
        )

    for make in (make_fp, make_root):
        h = torch.tensor(0.8, dtype=D, requires_grad=True)
        plain, general = _hypergrad(make, h, False), _hypergrad(make, h, True)
        torch.testing.assert_close(plain, general, rtol=1e-10, atol=0)


def test_the_forward_graph_serves_repeated_backward_passes():
    X, y = _data(10, 3, seed=6)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=D), X.T @ y)
    w = bilevel.argmin(loss, w_star, h)
    outer = (w**2).sum()
    (first,) = torch.autograd.grad(outer, h, retain_graph=True)
    (second,) = torch.autograd.grad(outer, h)
    assert torch.equal(first, second)
    expected = -2 * w_star @ torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=D), w_star)
    torch.testing.assert_close(first, expected, rtol=1e-11, atol=0)


def test_a_non_scalar_loss_still_fails_at_the_call():
    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        bilevel.argmin(lambda w, h: h * w**2, torch.ones(3, dtype=D), h)
    with torch.no_grad():
        with pytest.raises(ValueError, match="scalar"):
            bilevel.argmin(lambda w, h: h * w**2, torch.ones(3, dtype=D), h)


def test_the_plain_path_keeps_the_honest_warnings():
    # a maximum of w^4 - w^2 + h w^2 at w = 0 (h < 1): cg meets negative curvature
    def loss(w, h):
        return (w**4 - w**2 + h * w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w = bilevel.argmin(loss, torch.zeros(2, dtype=D), h, linear_solver=linalg.cg(tol=1e-12))
    with pytest.warns(bilevel.solvers.NotMinimumWarning, match="not a minimum"):
        torch.autograd.grad(w.sum() + (w**2).sum(), h)
    w = bilevel.argmin(
        loss, torch.zeros(2, dtype=D), h, linear_solver=linalg.cg(tol=1e-12), strict=True
    )
    with pytest.raises(bilevel.solvers.NotMinimumError):
        torch.autograd.grad(w.sum() + (w**2).sum(), h)


def test_the_default_dense_solve_finds_a_maximum():
    # the Hessian at w = 0 is 2 (h - 1) I = -I: the LU solve succeeds, Cholesky does not
    def loss(w, h):
        return (w**4 - w**2 + h * w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    diag = bilevel.ImplicitDiagnostics()
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h, diagnostics=diag)
    with pytest.warns(bilevel.solvers.NotMinimumWarning, match="smallest eigenvalue is -1"):
        torch.autograd.grad((w**2).sum() + w.sum(), h)
    info = diag.last_backward
    assert info.method == "dense" and info.indefinite()
    assert info.min_curvature == pytest.approx(-1.0) and info.max_curvature == pytest.approx(-1.0)
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h, strict=True)
    with pytest.raises(bilevel.solvers.NotMinimumError, match="eigenvalue"):
        torch.autograd.grad((w**2).sum() + w.sum(), h)


def test_the_default_dense_solve_of_a_minimum_is_silent(recwarn):
    X, y = _data(10, 3, seed=7)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=D), X.T @ y)
    diag = bilevel.ImplicitDiagnostics()
    w = bilevel.argmin(loss, w_star, h, diagnostics=diag)
    torch.autograd.grad((w**2).sum(), h)
    assert not recwarn.list
    assert not diag.last_backward.indefinite()


def test_dense_uses_an_operators_matmat_and_tests_definiteness():
    g = torch.Generator().manual_seed(8)
    M = torch.randn(5, 5, generator=g, dtype=D)
    S = M + M.T  # symmetric, indefinite
    b = torch.randn(5, generator=g, dtype=D)

    class Op:
        definite = True

        def __init__(self):
            self.stacks = 0

        def __call__(self, v):
            return S @ v

        def matmat(self, V):
            self.stacks += 1
            return V @ S.T

    op = Op()
    x, info = linalg.dense()(op, b)
    assert op.stacks == 1  # the matrix came from one batched call
    torch.testing.assert_close(x, torch.linalg.solve(S, b), rtol=1e-10, atol=1e-12)
    eig = torch.linalg.eigvalsh(S)
    assert info.indefinite()
    assert info.min_curvature == pytest.approx(float(eig[0]))
    assert info.max_curvature == pytest.approx(float(eig[-1]))
    # positive definite: silent, no curvature computed
    x, info = linalg.dense()(_PD(S), b)
    assert not info.indefinite() and math.isnan(info.min_curvature)


class _PD:
    definite = True

    def __init__(self, S):
        self.A = S @ S.T + torch.eye(S.shape[0], dtype=D)

    def __call__(self, v):
        return self.A @ v
