"""The plain backward's inlined exact solve (bilevel/implicit/_exact.py) and dense's Cholesky
route: equal to the general path (bitwise where both run the same factorisation, 1e-12
against the twice-differentiable path), the same info records, and every case it does not
take (not a minimum, singular, mixed dtypes, a subclassed solver) left to the general path
with its warnings and errors."""

import math
import warnings

import pytest
import torch

import bilevel
import bilevel.implicit.user_problem as user_problem
from bilevel import linalg
from bilevel.implicit._products import _plain_grad
from bilevel.linalg.dense import CHOLESKY, Dense
from bilevel.solvers import NotMinimumError, NotMinimumWarning

D = torch.float64


class _Counting:
    """Wraps user_problem.exact_vjp: how often the inlined solve returned a solution."""

    def __init__(self, monkeypatch):
        self.taken = 0
        self.declined = 0
        real = user_problem.exact_vjp

        def wrapped(*args):
            out = real(*args)
            if out is None:
                self.declined += 1
            else:
                self.taken += 1
            return out

        monkeypatch.setattr(user_problem, "exact_vjp", wrapped)


def _grad(make, h, create_graph=False):
    (g,) = torch.autograd.grad(make(h), h, create_graph=create_graph)
    return g.detach()


@pytest.mark.parametrize("p", [1, 3, 30])
@pytest.mark.parametrize("solver", ["auto", "dense", "dense damped"])
def test_the_inlined_solve_equals_the_general_paths(monkeypatch, p, solver, ridge):
    inner, outer, w_star = ridge(max(12, 2 * p), p)
    lin = {
        "auto": lambda: None,
        "dense": linalg.dense,
        "dense damped": lambda: linalg.dense(damping=0.25),
    }[solver]

    class OwnDense(Dense):  # a subclass: never inlined, so the general plain path runs
        pass

    own = lambda: OwnDense(damping=0.25 if solver == "dense damped" else 0.0)  # noqa: E731
    h = torch.tensor(-1.0, dtype=D, requires_grad=True)
    w0 = w_star(h.detach())

    def make(linear_solver):
        return lambda hh: outer(bilevel.argmin(inner, w0, hh, linear_solver=linear_solver()))

    count = _Counting(monkeypatch)
    fast = _grad(make(lin), h)
    assert count.taken == 1
    general_plain = _grad(make(own), h)
    assert count.taken == 1  # the subclass went the general way
    # the same matrix and the same Cholesky solve: bitwise the general plain path
    assert torch.equal(fast, general_plain)
    twice_differentiable = _grad(make(lin), h, create_graph=True)
    torch.testing.assert_close(fast, twice_differentiable, rtol=1e-12, atol=0)
    if solver == "dense damped":
        return
    # the closed form's hypergradient
    closed = _grad(lambda hh: outer(w_star(hh)), h)
    torch.testing.assert_close(fast, closed, rtol=1e-10, atol=0)


def test_the_inlined_solve_files_the_dense_record(ridge):
    inner, outer, w_star = ridge(12, 3)
    h = torch.tensor(-1.0, dtype=D, requires_grad=True)
    diag = bilevel.ImplicitDiagnostics()
    w = bilevel.argmin(inner, w_star(h.detach()), h, diagnostics=diag)
    outer(w).backward()
    ((kind, info),) = diag.backward
    assert kind == "vjp" and info.method == "dense" and info.converged
    assert info.iterations == 3 and info.residual_norm < 1e-14
    assert info.message == "auto: dense Cholesky for n=3 <= 64"
    assert bilevel.implicit.last_backward_info() is info
    lin = linalg.dense()
    w = bilevel.argmin(inner, w_star(h.detach()), h, linear_solver=lin)
    outer(w).backward()
    assert lin.last_info.message == CHOLESKY and lin.last_info.method == "dense"


def test_trees_and_data_take_the_inlined_solve(monkeypatch):
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(20, 5, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)

    def inner(w, h, data):
        A, b = data
        pred = A[:, :2] @ w["a"] + A[:, 2:] @ w["b"].reshape(-1)
        return ((pred - b) ** 2).mean() + h["l2"] * (w["a"].pow(2).sum() + w["b"].pow(2).sum())

    h = {"l2": torch.tensor(0.3, dtype=D, requires_grad=True), "fixed": 2.0}
    w0 = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(3, 1, dtype=D)}
    w = bilevel.argmin(inner, w0, h, (X, y), solver=bilevel.solvers.lbfgs(tol=1e-13))
    sol = {k: v.detach() for k, v in w.items()}

    def hyper(create_graph):
        Xr = X.clone().requires_grad_()
        w = bilevel.argmin(inner, sol, h, (Xr, y))
        value = (w["a"] ** 2).sum() + (w["b"] ** 3).sum()
        return [
            t.detach() for t in torch.autograd.grad(value, [h["l2"], Xr], create_graph=create_graph)
        ]

    count = _Counting(monkeypatch)
    fast = hyper(False)
    assert count.taken == 1
    general = hyper(True)
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_maximum_is_declined_and_warned_as_before(monkeypatch):
    def loss(w, h):  # w = 0 is a maximum
        return -(w**2).sum() * h.exp()

    h = torch.tensor(0.0, dtype=D, requires_grad=True)
    count = _Counting(monkeypatch)
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h)
    with pytest.warns(NotMinimumWarning, match="smallest eigenvalue"):
        (w**2).sum().backward()
    assert count.declined == 1 and count.taken == 0
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h, strict=True)
    with pytest.raises(NotMinimumError):
        (w**2).sum().backward()


def test_a_singular_hessian_is_declined_as_before(monkeypatch):
    X = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=D)  # rank 1

    def loss(w, h):
        return ((X @ w - h) ** 2).sum()

    h = torch.tensor(1.0, dtype=D, requires_grad=True)
    w0 = torch.tensor([0.1, 0.1], dtype=D)
    count = _Counting(monkeypatch)
    w = bilevel.argmin(loss, w0, h, linear_solver=linalg.dense())
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        w.sum().backward()
    assert count.declined == 1
    diag = bilevel.ImplicitDiagnostics()
    w = bilevel.argmin(loss, w0, h, diagnostics=diag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.sum().backward()
    assert "found the operator singular" in diag.last_backward.message


def test_mixed_dtypes_go_the_general_way(monkeypatch):
    def loss(w, h):
        return ((w["a"].double() - h) ** 2).sum() + ((w["b"].double() + h) ** 2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w0 = {"a": torch.full((2,), 0.5, dtype=D), "b": torch.full((1,), -0.5, dtype=torch.float32)}
    count = _Counting(monkeypatch)
    w = bilevel.argmin(loss, w0, h)
    (g,) = torch.autograd.grad(w["a"].sum() + w["b"].double().sum(), h)
    assert count.taken == 0 and count.declined == 1
    assert math.isclose(float(g), 1.0, rel_tol=1e-6)


def test_the_given_solution_is_copied():
    w0 = torch.ones(3, dtype=D)
    h = torch.tensor(1.0, dtype=D, requires_grad=True)
    w = bilevel.argmin(lambda w, h: ((w - h) ** 2).sum(), w0, h)
    assert w.data_ptr() != w0.data_ptr()
    with torch.no_grad():
        w.add_(1.0)
    assert torch.equal(w0, torch.ones(3, dtype=D))


def test_dense_solves_a_definite_operator_by_cholesky_only_when_it_is():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)

    def spd(v):
        return A @ v

    spd.definite = True  # type: ignore[attr-defined]
    x, info = linalg.dense()(spd, b)
    assert info.message == CHOLESKY and info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-14, atol=0)
    _, info = linalg.auto()(spd, b)
    assert info.message == "auto: dense Cholesky for n=2 <= 64"
    # no promise: LU as before
    _, info = linalg.dense()(lambda v: A @ v, b)
    assert info.message == ""
    # promised but indefinite: the LU route, with the eigenvalues
    B = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=D)

    def indefinite(v):
        return B @ v

    indefinite.definite = True  # type: ignore[attr-defined]
    x, info = linalg.dense()(indefinite, b)
    assert info.message == "" and info.indefinite() and info.min_curvature < 0
    torch.testing.assert_close(x, torch.linalg.solve(B, b), rtol=1e-14, atol=0)
    # promised, positive semi-definite and singular: LU refuses, as before
    S = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=D)

    def singular(v):
        return S @ v

    singular.definite = True  # type: ignore[attr-defined]
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        linalg.dense()(singular, b)


@pytest.mark.parametrize("batched", [False, True])
def test_plain_grad_equals_autograd_grad(batched):
    x = torch.randn(4, dtype=D, requires_grad=True)
    unused = torch.randn(2, dtype=D, requires_grad=True)
    with torch.enable_grad():
        y = torch.sin(x) * x.sum()
        v = torch.randn(3, 4, dtype=D) if batched else torch.randn(4, dtype=D)
        got = _plain_grad([y], [x, unused], [v], retain_graph=True, batched=batched)
        want = torch.autograd.grad(
            y, [x, unused], v, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
    assert got[1] is None and want[1] is None
    assert torch.equal(got[0], want[0])
