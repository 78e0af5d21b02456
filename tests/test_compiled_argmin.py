"""argmin(..., compiled=True): the compiled exact backward equals the eager one (< 1e-10,
float64) and central finite differences of a closed form, reuses its graph in a training
loop, keeps the honest warnings, and falls back (warning) where it cannot compile."""

import pytest
import torch
import torch._dynamo

import bilevel
from bilevel import linalg
from bilevel.implicit import CompileFallbackWarning
from bilevel.implicit import compiled as compiled_module

D = torch.float64


def _data(seed, n=12, p=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)


def _split_loss(w, h, data):
    # a tree solution (two leaves of different shapes), hparams with a constant number,
    # data given: every part of the compiled function's unflattening is exercised
    X, y = data
    coef = torch.cat([w["a"], w["b"].reshape(-1)])
    fit = ((X @ coef - y) ** 2).sum()
    return fit + h["l2"] * (coef**2).sum() + h["c"] * (coef**4).sum() + 0 * h["unused"]


def _closed_form(X, y, l2):
    return torch.linalg.solve(X.T @ X + l2 * torch.eye(X.shape[1], dtype=D), X.T @ y)


def _hypergrad(X, y, l2, compiled, create_graph=False):
    coef = _closed_form(X.detach(), y, float(l2))  # the solution: c = 0 below
    start = {"a": coef[:1].clone(), "b": coef[1:].reshape(2, 1).clone()}
    h = {"l2": l2, "c": 0.0, "unused": torch.tensor(1.0, dtype=D, requires_grad=True)}
    diag = bilevel.ImplicitDiagnostics()
    w = bilevel.argmin(_split_loss, start, h, (X, y), compiled=compiled, diagnostics=diag)
    outer = (w["a"] ** 2).sum() + (w["b"] ** 3).sum()
    grads = torch.autograd.grad(outer, [l2, X], create_graph=create_graph)
    return [g.detach() for g in grads], diag.last_backward


@pytest.mark.slow
def test_compiled_equals_eager_and_finite_differences_and_reuses_its_graph():
    compiled_module._CACHE.clear()
    X, y = _data(0)
    l2 = torch.tensor(0.7, dtype=D, requires_grad=True)
    got, info = _hypergrad(X.requires_grad_(), y, l2, compiled=True)
    want, eager_info = _hypergrad(X, y, l2, compiled=False)
    assert "compiled" in info.message and "compiled" not in eager_info.message
    assert info.method == "dense" and info.converged and info.iterations == 3
    for a, b in zip(got, want):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # central differences of the closed form in l2
    eps = 1e-6

    def outer_at(v):
        coef = _closed_form(X.detach(), y, v)
        return float((coef[:1] ** 2).sum() + (coef[1:] ** 3).sum())

    fd = (outer_at(0.7 + eps) - outer_at(0.7 - eps)) / (2 * eps)
    assert abs(float(got[0]) - fd) <= 1e-7 * max(1.0, abs(fd))
    # a training loop: new tensors of the same shapes each step, no new graph
    (fn,) = [v for v in compiled_module._CACHE.values() if not isinstance(v, str)]
    for seed in (1, 2):
        Xs, ys = _data(seed)
        got_s, _ = _hypergrad(Xs.requires_grad_(), ys, l2, compiled=True)
        want_s, _ = _hypergrad(Xs, ys, l2, compiled=False)
        torch.testing.assert_close(got_s[0], want_s[0], rtol=1e-10, atol=0)
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn._own_code)
    assert len(entries) == 1
    # double backward takes the general path, still equal
    (g2, _), info2 = _hypergrad(X, y, l2, compiled=True, create_graph=True)
    assert "compiled" not in info2.message
    torch.testing.assert_close(g2, want[0], rtol=1e-10, atol=0)


@pytest.mark.slow
def test_compiled_leaves_a_maximum_to_the_eager_path_which_warns():
    compiled_module._CACHE.clear()

    def loss(w, h):
        return (w**4 - w**2 + h * w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h, compiled=True)
    with pytest.warns(bilevel.solvers.NotMinimumWarning, match="smallest eigenvalue is -1"):
        (got,) = torch.autograd.grad((w**2).sum() + w.sum(), h)
    info = bilevel.implicit.last_backward_info()
    assert "compiled" not in info.message and info.indefinite()
    with pytest.warns(bilevel.solvers.NotMinimumWarning):
        w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h)
        (want,) = torch.autograd.grad((w**2).sum() + w.sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # at a minimum of the same loss (w = 0 for h > 1) the compiled path runs
    h = torch.tensor(1.5, dtype=D, requires_grad=True)
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h, compiled=True)
    (got,) = torch.autograd.grad((w**2).sum() + w.sum(), h)
    assert "compiled" in bilevel.implicit.last_backward_info().message
    w = bilevel.argmin(loss, torch.zeros(3, dtype=D), h)
    (want,) = torch.autograd.grad((w**2).sum() + w.sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.slow
def test_recompiling_past_the_limit_falls_back_with_a_warning(monkeypatch):
    compiled_module._CACHE.clear()
    monkeypatch.setattr(compiled_module, "_MAX_GRAPHS", 1)
    l2 = torch.tensor(0.7, dtype=D, requires_grad=True)

    def loss(w, h, data):
        X, y = data
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    def run(X, y, compiled):
        w_star = _closed_form(X, y, 0.7)
        w = bilevel.argmin(loss, w_star, l2, (X, y), compiled=compiled)
        return torch.autograd.grad((w**2).sum(), l2)[0]

    X, y = _data(3)
    run(X, y, True)
    X2, y2 = _data(4, n=20)  # the loss reads data of another shape: dynamo recompiles
    with pytest.warns(CompileFallbackWarning, match="recompiled 1 times"):
        got = run(X2, y2, True)
    torch.testing.assert_close(got, run(X2, y2, False), rtol=1e-10, atol=0)


def test_a_loss_that_cannot_be_compiled_falls_back_with_a_warning():
    compiled_module._CACHE.clear()
    X, y = _data(5)

    def loss(w, h):
        torch._dynamo.graph_break()  # eagerly a no-op; no single graph for torch.compile
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X + torch.eye(3, dtype=D), X.T @ y)
    w = bilevel.argmin(loss, w_star, h, compiled=True)
    with pytest.warns(CompileFallbackWarning, match="not compiled from now on"):
        (got,) = torch.autograd.grad((w**2).sum(), h)
    w = bilevel.argmin(loss, w_star, h)
    (want,) = torch.autograd.grad((w**2).sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert "compiled" not in bilevel.implicit.last_backward_info().message


def test_compiled_with_an_iterative_solver_warns_and_runs_eagerly():
    X, y = _data(6)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    h = torch.tensor(0.5, dtype=D, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=D), X.T @ y)
    w = bilevel.argmin(loss, w_star, h, linear_solver=linalg.cg(tol=1e-13), compiled=True)
    with pytest.warns(CompileFallbackWarning, match="only the exact dense backward"):
        (got,) = torch.autograd.grad((w**2).sum(), h)
    expected = -2 * w_star @ torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=D), w_star)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_torch_func_transforms_take_the_general_path():
    X, y = _data(7)

    def loss(w, h):
        return ((X @ w - y) ** 2).sum() + h * (w**2).sum()

    def outer(h, compiled):
        w_star = torch.linalg.solve(X.T @ X + h.detach() * torch.eye(3, dtype=D), X.T @ y)
        w = bilevel.argmin(loss, w_star, h, compiled=compiled)
        return (w**2).sum()

    h = torch.tensor(0.5, dtype=D)
    got = torch.func.grad(lambda v: outer(v, True))(h)
    want = torch.func.grad(lambda v: outer(v, False))(h)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert "compiled" not in bilevel.implicit.last_backward_info().message


def test_compiled_must_be_a_bool():
    with pytest.raises(TypeError, match="compiled must be True or False"):
        bilevel.argmin(
            lambda w, h: (w**2).sum(), torch.ones(2, dtype=D), torch.ones(()), compiled=1
        )
