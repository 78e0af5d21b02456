"""Small problems: no wasted operator applications, and an exact dense path chosen automatically."""

import pytest
import torch

import bilevel
from bilevel import linalg

D = torch.float64


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D)
    return M @ M.T + n * torch.eye(n, dtype=D)


@pytest.mark.parametrize("name", ["cg", "minres", "gmres"])
def test_three_unknowns_take_at_most_three_products(name):
    A = _spd(3)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    b = torch.ones(3, dtype=D)
    x, info = getattr(linalg, name)(tol=1e-12)(matvec, b)
    assert info.converged
    assert len(calls) <= 3, (name, len(calls))
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)


def test_an_explicit_check_every_is_kept():
    A = _spd(3)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    linalg.cg(tol=1e-12, check_every=10, maxiter=30)(matvec, torch.ones(3, dtype=D))
    assert len(calls) == 10  # masked iterations up to the first check, as asked


def test_auto_is_dense_for_few_unknowns_and_iterative_beyond():
    for n, method in ((5, "dense"), (80, "cg")):
        A = _spd(n)
        b = torch.ones(n, dtype=D)
        x, info = linalg.auto(linalg.cg(tol=1e-13))(lambda v, A=A: A @ v, b)
        assert info.method == method and "auto:" in info.message
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=0)


def test_auto_falls_back_when_the_matrix_is_singular():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=D))
    b = torch.tensor([1.0, 2.0, 0.0], dtype=D)
    x, info = linalg.auto(linalg.minres(tol=1e-12))(lambda v: A @ v, b)
    assert info.method == "minres" and "singular" in info.message
    torch.testing.assert_close(A @ x, b)


def test_exact_path_equals_the_iterative_path():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 4, generator=g, dtype=D), torch.randn(12, generator=g, dtype=D)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum() + 0.1 * (w**4).sum()

    grads = {}
    for name, lin in (("auto", None), ("cg", linalg.cg(tol=1e-13))):
        h = torch.tensor(0.5, dtype=D, requires_grad=True)
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.argmin(
            loss,
            torch.zeros(4, dtype=D),
            h,
            solver=bilevel.solvers.lbfgs(tol=1e-12),
            linear_solver=lin,
            diagnostics=diag,
        )
        (grads[name],) = torch.autograd.grad((w**2).sum(), h)
        assert diag.last_backward.method == ("dense" if name == "auto" else "cg")
    torch.testing.assert_close(grads["auto"], grads["cg"], rtol=1e-10, atol=0)


def test_warm_started_backward_equals_cold_and_saves_iterations():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(300, 120, generator=g, dtype=D), torch.randn(300, generator=g, dtype=D)

    def loss(w, h):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * h * (w**2).sum()

    def hypergrad(lam, warm):
        h = torch.tensor(lam, dtype=D, requires_grad=True)
        w_star = torch.linalg.solve(X.T @ X + lam * torch.eye(120, dtype=D), X.T @ y)
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.argmin(
            loss, w_star, h, linear_solver=linalg.cg(tol=1e-10), warm_start=warm, diagnostics=diag
        )
        (gh,) = torch.autograd.grad((w**2).sum(), h)
        return gh, diag.last_backward.iterations

    ws = bilevel.implicit.WarmStart()
    hypergrad(1.0, ws)
    warm, it_warm = hypergrad(1.001, ws)
    cold, it_cold = hypergrad(1.001, None)
    torch.testing.assert_close(warm, cold, rtol=1e-8, atol=0)
    assert it_warm < it_cold, (it_warm, it_cold)
    # under vmap nothing leaks into the state: those solves start cold
    ws.clear()

    def outer(lam):
        w = bilevel.argmin(loss, torch.zeros(120, dtype=D), lam, warm_start=ws)
        return (w**2).sum()

    grads = torch.func.vmap(torch.func.grad(outer))(torch.tensor([1.0, 2.0], dtype=D))
    assert grads.shape == (2,) and torch.isfinite(grads).all()
    assert ws.solutions == {}
