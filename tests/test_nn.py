"""bilevel.nn: the generic argmin layer and the ridge-regression layers."""

from __future__ import annotations

import pytest
import torch

from bilevel import linalg, solvers
from bilevel.nn import ArgMinLayer, RidgeArgMin, RidgePredictor, RidgeRegression

D = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(old)


def _objective(v, inputs, p):
    """Two variable tensors of different shapes, two parameters, data from the inputs."""
    X, y = inputs
    fit = ((X @ v["a"] - y) ** 2).sum()
    reg = (p["log_s"].exp() * v["a"] ** 2).sum()
    mat = (
        ((v["B"] - p["t"] * X[:2, :2]) ** 2).sum()
        + 0.5 * (v["B"] ** 2).sum()
        + (v["B"].sum() * v["a"].sum()) * 0.1
    )
    return fit + reg + mat


def _layer(linear_solver=None, **kw):
    init = {"a": torch.zeros(3), "B": torch.zeros(2, 2)}
    params = {"log_s": torch.tensor([0.0, 0.5, -0.5]), "t": torch.tensor(1.5)}
    return ArgMinLayer(
        _objective, init, params, solver=solvers.lbfgs(tol=1e-12), linear_solver=linear_solver, **kw
    )


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 3, generator=g), torch.randn(10, generator=g)


def test_argmin_layer_gradients_reach_params_and_inputs():
    X, y = _data()
    grads = {}
    for name, ls in (("cg", linalg.cg()), ("dense", linalg.dense())):
        layer = _layer(ls)
        Xg = X.clone().requires_grad_(True)
        out = layer(Xg, y)
        assert out["a"].shape == (3,) and out["B"].shape == (2, 2)
        loss = (out["a"] * torch.arange(3.0)).sum() + out["B"].pow(2).sum()
        loss.backward()
        grads[name] = [layer.params["log_s"].grad, layer.params["t"].grad, Xg.grad]
        assert layer.last_diagnostics.forward.converged
        assert layer.last_diagnostics.last_backward.method == name
    for a, b in zip(grads["cg"], grads["dense"]):
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

    # finite differences that re-solve, for the parameter t and one input entry
    def value(t, X_):
        layer = _layer()
        with torch.no_grad():
            layer.params["t"].fill_(t)
        out = layer(X_, y)
        return float((out["a"] * torch.arange(3.0)).sum().detach() + out["B"].detach().pow(2).sum())

    eps = 1e-6
    fd_t = (value(1.5 + eps, X) - value(1.5 - eps, X)) / (2 * eps)
    E = torch.zeros_like(X)
    E[1, 2] = eps
    fd_x = (value(1.5, X + E) - value(1.5, X - E)) / (2 * eps)
    assert abs(float(grads["cg"][1]) - fd_t) < 1e-5 * max(1.0, abs(fd_t))
    assert abs(float(grads["cg"][2][1, 2]) - fd_x) < 1e-5 * max(1.0, abs(fd_x))


def test_argmin_layer_init_function_and_warm_start():
    X, y = _data(1)
    calls = []

    def init(inputs, params):
        calls.append(1)
        return {"a": torch.zeros(inputs[0].shape[1]), "B": torch.zeros(2, 2)}

    layer = ArgMinLayer(
        _objective,
        init,
        {"log_s": torch.zeros(3), "t": torch.tensor(1.0)},
        solver=solvers.lbfgs(tol=1e-12),
        warm_start=True,
    )
    first = layer(X, y)
    second = layer(X, y)  # starts at the previous solution: converges at once
    torch.testing.assert_close(first["a"].detach(), second["a"].detach(), rtol=1e-9, atol=1e-10)
    assert layer.last_diagnostics.forward.iterations <= 1
    assert len(calls) == 2
    with pytest.raises(TypeError, match="init"):
        ArgMinLayer(_objective, [1.0, 2.0])
    with pytest.raises(TypeError, match="objective"):
        ArgMinLayer("nope", torch.zeros(2))
    with pytest.raises(TypeError, match="params"):
        ArgMinLayer(_objective, torch.zeros(2), {"a": 1.0})


def _ridge_ref(X, Y, lam):
    p = X.shape[-1]
    reg = torch.diag_embed(lam.expand(p)) if lam.ndim else lam * torch.eye(p)
    return torch.linalg.solve(X.transpose(-2, -1) @ X + reg, X.transpose(-2, -1) @ Y)


@pytest.mark.parametrize("method", ["solve", "cg"])
@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
def test_ridge_layer_matches_closed_form_gradients(method, per_feature):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 12, 5, generator=g, requires_grad=True)
    Y = torch.randn(4, 12, 2, generator=g, requires_grad=True)
    l2 = torch.linspace(0.5, 2.0, 5) if per_feature else 0.7
    layer = RidgeRegression(l2=l2, method=method)
    W = layer(X, Y)
    assert W.shape == (4, 5, 2)
    target = torch.randn(4, 5, 2, generator=g)
    grads = torch.autograd.grad((W * target).sum(), [layer.log_l2, X, Y])
    log_l2 = layer.log_l2.detach().clone().requires_grad_(True)
    X2, Y2 = X.detach().clone().requires_grad_(True), Y.detach().clone().requires_grad_(True)
    W_ref = _ridge_ref(X2, Y2, log_l2.exp())
    torch.testing.assert_close(W.detach(), W_ref.detach(), rtol=1e-9, atol=1e-10)
    refs = torch.autograd.grad((W_ref * target).sum(), [log_l2, X2, Y2])
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert layer.last_diagnostics.last_backward.converged


def test_ridge_layer_vector_targets_alias_and_errors():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)
    layer = RidgeArgMin(l2=1.0, learnable=False)
    w = layer(X, y)
    assert w.shape == (3,)
    torch.testing.assert_close(w, _ridge_ref(X, y, torch.tensor(1.0)))
    assert not any(True for _ in layer.parameters())
    with pytest.raises(ValueError, match="rows"):
        layer(X, torch.randn(19))
    with pytest.raises(ValueError, match="l2"):
        RidgeRegression(l2=-1.0)
    with pytest.raises(ValueError, match="per-feature"):
        RidgeRegression(l2=torch.ones(4))(X, y)


@pytest.mark.parametrize("shared", [True, False])
def test_ridge_predictor_shapes_and_gradients(shared):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 30, generator=g, requires_grad=True)
    pred = RidgePredictor(in_features=30, target_len=10, l2=0.5, shared=shared)
    out = pred(x)
    assert out.shape == (3, 4, 10)
    out.pow(2).mean().backward()
    assert x.grad is not None and pred.ridge.log_l2.grad is not None
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="target_len"):
        RidgePredictor(10, 10)


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
def test_ridge_layer_default_backward_is_the_exact_block_solve(per_feature):
    # float64: the batched Cholesky backward equals autograd through the closed form to
    # rounding, and an explicit cg backward to its tolerance; the record says which ran
    g = torch.Generator().manual_seed(8)
    X = torch.randn(3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(3, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    l2 = torch.linspace(0.3, 1.5, 4, dtype=torch.float64) if per_feature else 0.4
    target = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    results = {}
    for name, solver in (("exact", None), ("cg", linalg.cg(tol=1e-13))):
        layer = RidgeRegression(l2=l2, linear_solver=solver).double()
        W = layer(X, Y)
        results[name] = torch.autograd.grad((W * target).sum(), [layer.log_l2, X, Y])
        info = layer.last_diagnostics.last_backward
        assert info.method == ("cholesky" if name == "exact" else "cg") and info.converged
    log_l2 = layer.log_l2.detach().clone().requires_grad_(True)
    X2, Y2 = X.detach().clone().requires_grad_(True), Y.detach().clone().requires_grad_(True)
    lam = log_l2.exp()
    reg = torch.diag_embed(lam) if per_feature else lam * torch.eye(4, dtype=torch.float64)
    W_ref = torch.linalg.solve(X2.transpose(-2, -1) @ X2 + reg, X2.transpose(-2, -1) @ Y2)
    refs = torch.autograd.grad((W_ref * target).sum(), [log_l2, X2, Y2])
    for a, b, c in zip(results["exact"], refs, results["cg"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-8, atol=1e-10)


def _ridge_batch(seed=8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(5, 3, 9, 4, generator=g)
    Y = torch.randn(5, 3, 9, 2, generator=g)
    T = torch.randn(5, 3, 4, 2, generator=g)
    return X, Y, T


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
def test_ridge_layer_exact_backward_under_vmap_equals_a_loop(per_feature):
    """vmap(grad) over the layer (a transform captures the forward's X: its Gram matrices are
    formed from the backward's own operator) and vmap(layer) + backward each equal a loop of
    single calls, and the record is a real check of every element (not skipped)."""
    X, Y, T = _ridge_batch()
    layer = RidgeRegression(l2=torch.linspace(0.3, 1.5, 4) if per_feature else 0.4)

    def loss(log_l2, X, Y, T):
        W = torch.func.functional_call(layer, {"log_l2": log_l2}, (X, Y))
        return (W * T).sum()

    log_l2 = layer.log_l2.detach()
    loop = torch.stack([torch.func.grad(loss)(log_l2, X[i], Y[i], T[i]) for i in range(5)])
    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(log_l2, X, Y, T)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-13)
    assert loop.abs().min() > 1e-3  # real gradients
    W = torch.func.vmap(layer)(X, Y)
    (W * T).sum().backward()
    torch.testing.assert_close(layer.log_l2.grad, loop.sum(0), rtol=1e-12, atol=1e-13)
    info = layer.last_diagnostics.last_backward
    assert info.method == "cholesky" and info.checked and info.converged
    assert 0 < info.residual_norm <= info.threshold


def test_ridge_layer_under_vmap_warns_for_an_ill_conditioned_element():
    """One nearly singular Gram matrix in the batch: the vmapped backward warns as the
    plain one does (the batch's check is per element, reduced on the device)."""
    X, Y, T = _ridge_batch(seed=1)
    X[1, :, :, 3] = X[1, :, :, 2] * (1 + 1e-9)  # element 1: two collinear features
    layer = RidgeRegression(l2=1e-12)
    for call in (lambda: layer(X, Y), lambda: torch.func.vmap(layer)(X, Y)):
        with pytest.warns(RuntimeWarning, match="ill-conditioned Gram"):
            (call() * T).sum().backward()
        assert not layer.last_diagnostics.last_backward.converged
