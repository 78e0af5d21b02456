"""Under ``vmap`` the backward linear solve of a stack of argmin problems whose unknowns are a
tree of several leaves runs on one joined vector per problem (one batched kernel per vector
operation instead of one per leaf); it must still equal the loop of single calls, and the
solves that see the tree (a preconditioner, a warm start, a user's solver) keep it."""

import warnings

import pytest
import torch

import bilevel
import bilevel.implicit.batched_problem as batched
from bilevel import linalg, solvers

D = torch.float64
B = 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # truncated solves warn, by design
        yield


def _tasks():
    g = torch.Generator().manual_seed(13)
    C = torch.randn(B, 6, 6, generator=g, dtype=D)
    A = C @ C.mT / 6 + torch.eye(6, dtype=D) * torch.linspace(0.2, 3.0, B, dtype=D)[:, None, None]
    b = torch.randn(B, 6, generator=g, dtype=D)
    h = torch.linspace(0.5, 1.5, B, dtype=D)
    return A, b, h


def _loss(w, h, data):
    """Two leaves joined in a quadratic with a quartic term (the inner solves differ)."""
    A, b = data
    x = torch.cat([w["u"], w["v"].reshape(-1)])
    return 0.5 * x @ A @ x - b @ x + 0.5 * h * (x @ x) + 0.05 * (x**4).sum()


def _layer(linear_solver):
    init = {"u": torch.zeros(2, dtype=D), "v": torch.zeros(2, 2, dtype=D)}
    inner = solvers.lbfgs(tol=1e-12, maxiter=300)

    def layer(A, b, h):
        w = bilevel.argmin(_loss, init, h, (A, b), solver=inner, linear_solver=linear_solver)
        return torch.cat([w["u"], w["v"].reshape(-1)])

    return layer


LINEAR = {
    "cg": lambda: linalg.cg(tol=1e-13),
    "cg_truncated": lambda: linalg.cg(tol=1e-13, maxiter=2),
    "minres": lambda: linalg.minres(tol=1e-13),
    "dense": lambda: linalg.dense(),
    "cg_jacobi": lambda: linalg.cg(tol=1e-13, preconditioner="jacobi"),
}


@pytest.mark.parametrize("name", list(LINEAR))
def test_the_joined_backward_equals_the_loop(name, monkeypatch):
    joined = []
    run_flat = batched._run_flat
    monkeypatch.setattr(batched, "_run_flat", lambda *a: joined.append(1) or run_flat(*a))
    A, b, h = _tasks()
    layer = _layer(LINEAR[name]())

    def outer(h):  # as iMAML's meta-gradient is computed
        return (torch.func.vmap(layer)(A, b, h) ** 2).sum()

    gv = torch.func.grad(outer)(h)
    # a preconditioner sees the tree's leaves: the solve keeps them
    assert bool(joined) == (name != "cg_jacobi")
    for i in range(B):
        hi = h[i].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad((layer(A[i], b[i], hi) ** 2).sum(), hi)
        torch.testing.assert_close(gv[i], gi, rtol=1e-10, atol=1e-13)


def test_a_warm_start_or_a_users_solver_keeps_the_tree(monkeypatch):
    seen = []

    def my_solver(matvec, rhs):
        seen.append(sorted(rhs) if isinstance(rhs, dict) else len(rhs))
        return linalg.cg(tol=1e-13)(matvec, rhs)

    A, b, h = _tasks()
    run_flat = batched._run_flat
    joined = []
    monkeypatch.setattr(batched, "_run_flat", lambda *a: joined.append(1) or run_flat(*a))
    hv = h.clone().requires_grad_(True)
    (torch.func.vmap(_layer(my_solver))(A, b, hv) ** 2).sum().backward()
    assert seen and not joined and seen[0] != 1  # the user's solver got both leaves
    layer = _layer(linalg.cg(tol=1e-13))
    ws = bilevel.WarmStart()
    init = {"u": torch.zeros(2, dtype=D), "v": torch.zeros(2, 2, dtype=D)}

    def warm(A, b, h):
        w = bilevel.argmin(_loss, init, h, (A, b), solver=solvers.lbfgs(tol=1e-12), warm_start=ws)
        return torch.cat([w["u"], w["v"].reshape(-1)])

    hv = h.clone().requires_grad_(True)
    (gv,) = torch.autograd.grad((torch.func.vmap(warm)(A, b, hv) ** 2).sum(), hv)
    assert not joined
    hv = h.clone().requires_grad_(True)
    (gc,) = torch.autograd.grad((torch.func.vmap(layer)(A, b, hv) ** 2).sum(), hv)
    assert joined
    torch.testing.assert_close(gv, gc, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["cg", "cg_truncated", "minres"])
def test_the_joined_products_take_the_stack_directly(name, monkeypatch):
    """The joined backward's Hessian products split and join the stack outside ``vmap``,
    without the autograd Function's dispatch: the meta-gradient is bit for bit the
    Function's."""
    import bilevel.implicit._stacked_operator as stacked

    A, b, h = _tasks()
    layer = _layer(LINEAR[name]())

    def outer(h):
        return (torch.func.vmap(layer)(A, b, h) ** 2).sum()

    calls = []
    apply = stacked._StackedProduct.apply
    monkeypatch.setattr(stacked._StackedProduct, "apply", lambda *a: calls.append(1) or apply(*a))
    direct = torch.func.grad(outer)(h)
    assert not calls
    unbatch = stacked._unbatch
    monkeypatch.setattr(stacked, "_unbatch", lambda leaves: None)
    through_function = torch.func.grad(outer)(h)
    assert calls
    assert torch.equal(direct, through_function)
    monkeypatch.setattr(stacked, "_unbatch", unbatch)
