"""The course tutorial's examples (CS236781 Tutorial 5), run on bilevel's argmin layer.

1. Linear regression with learnable L1 (smoothed) and L2 weights: the argmin's
   hypergradients equal the tutorial's dense-Hessian + SVD least-squares method and
   finite differences, and the weights train.
2. The encoder / ridge-argmin predictor / decoder model on synthetic series trains, and
   its gradients with the matrix-free backward equal those of the dense method.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bilevel import linalg, solvers
from bilevel.implicit import argmin
from bilevel.nn import ArgMinLayer, RidgePredictor

D = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- 1. L1 + L2 regression


def _regression_data(seed=0, n=60, p=12):
    g = torch.Generator().manual_seed(seed)
    w_gt = torch.randn(p, generator=g) * (torch.rand(p, generator=g) > 0.5)
    X = torch.randn(n, p, generator=g)
    y = X @ w_gt + 0.5 * torch.randn(n, generator=g)
    Xv = torch.randn(n, p, generator=g)
    yv = Xv @ w_gt + 0.5 * torch.randn(n, generator=g)
    return X, y, Xv, yv


def _obj_fun(w, h, batch):
    """The tutorial's objective, with |w| smoothed so that the Hessian exists."""
    X, y = batch
    loss = torch.mean((X @ w - y) ** 2)
    reg1 = h["l1"] * torch.mean(torch.sqrt(w**2 + 1e-3))
    reg2 = h["l2"] * torch.mean(w**2)
    return torch.sum(loss + reg1 + reg2)


def _solve(h, X, y, linear_solver):
    return argmin(
        _obj_fun,
        torch.zeros(X.shape[1]),
        h,
        (X, y),
        solver=solvers.lbfgs(tol=1e-11),
        linear_solver=linear_solver,
    )


def test_l1_l2_regression_hypergradients_match_dense_and_finite_differences():
    X, y, Xv, yv = _regression_data()
    log_l = torch.tensor([[-1.0], [-2.0]], requires_grad=True)  # tutorial shapes: (1, 1) each

    def hyper(linear_solver):
        h = {"l1": log_l[0:1].exp(), "l2": log_l[1:2].exp()}
        w = _solve(h, X, y, linear_solver)
        return torch.autograd.grad(torch.mean((Xv @ w - yv) ** 2), log_l)[0]

    g_cg = hyper(linalg.cg(tol=1e-12))
    g_dense = hyper(linalg.dense(method="lstsq"))  # the tutorial's SVD least-squares solve
    g_minres = hyper(linalg.minres(tol=1e-12))
    torch.testing.assert_close(g_cg, g_dense, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(g_minres, g_dense, rtol=1e-7, atol=1e-10)

    def outer(ll):
        w = _solve({"l1": ll[0:1].exp(), "l2": ll[1:2].exp()}, X, y, None)
        return float(torch.mean((Xv @ w.detach() - yv) ** 2))

    eps = 1e-5
    for i in range(2):
        e = torch.zeros(2, 1)
        e[i] = eps
        fd = (outer(log_l.detach() + e) - outer(log_l.detach() - e)) / (2 * eps)
        assert abs(float(g_cg[i]) - fd) <= 1e-5 * abs(fd) + 1e-9


def test_l1_l2_weights_train():
    X, y, Xv, yv = _regression_data(seed=1, n=30, p=20)
    log_l = torch.tensor([[-3.0], [-3.0]], requires_grad=True)
    opt = torch.optim.Adam([log_l], lr=0.3)

    def val_loss():
        w = _solve({"l1": log_l[0:1].exp(), "l2": log_l[1:2].exp()}, X, y, linalg.cg(tol=1e-10))
        return torch.mean((Xv @ w - yv) ** 2)

    losses = []
    for _ in range(8):
        loss = val_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


# --------------------------------------------------------------------------- 2. encoder / argmin / decoder


class EncDec(nn.Module):
    """The tutorial's 1-D CNN (torch's ELU instead of its custom one)."""

    def __init__(self, channels, out_nl=True):
        super().__init__()
        layers = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [
                nn.Conv1d(cin, cout, kernel_size=5, padding=2),
                nn.ELU(alpha=0.5),
                nn.BatchNorm1d(cout),
            ]
        if not out_nl:
            layers = layers[:-1]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _predictor_objective(w, inputs, p):
    """The tutorial's PredictorArgMinLayer.obj_fun: mean squared postdiction error + L2."""
    x_post, y_post = inputs
    xw = torch.matmul(x_post, w.T)
    return torch.sum(torch.mean((xw - y_post) ** 2) + p["reg_lambda"] * torch.mean(w**2))


class PredictorArgMinLayer(nn.Module):
    """The tutorial's predictor on bilevel's ArgMinLayer (L-BFGS forward, implicit backward)."""

    def __init__(self, in_features, out_features, linear_solver=None):
        super().__init__()
        self.prediction_len = in_features - out_features
        self.argmin = ArgMinLayer(
            _predictor_objective,
            torch.zeros(out_features, self.prediction_len),
            {"reg_lambda": torch.tensor([1.0])},
            solver=solvers.lbfgs(tol=1e-10),
            linear_solver=linear_solver,
        )

    def forward(self, x):
        m = self.prediction_len
        w_opt = self.argmin(x[..., :m], x[..., m:])
        return torch.matmul(x[..., -m:], w_opt.T)


class EncPredictorDec(nn.Module):
    def __init__(
        self, in_features, postdiction_length, channels, predictor="argmin", linear_solver=None
    ):
        super().__init__()
        self.enc = EncDec(channels, out_nl=True)
        self.dec = EncDec(list(reversed(channels)), out_nl=False)
        if predictor == "argmin":
            self.pred = PredictorArgMinLayer(in_features, postdiction_length, linear_solver)
        else:
            self.pred = RidgePredictor(in_features, postdiction_length, l2=1.0)

    def forward(self, x):
        return self.dec(self.pred(self.enc(x)))


SEG_BASE, SEG_TARGET = 30, 10


def _series(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SEG_BASE + SEG_TARGET, dtype=D)
    freq = 0.1 + 0.3 * torch.rand(n, 1, generator=g)
    phase = 6.28 * torch.rand(n, 1, generator=g)
    x = torch.sin(freq * t + phase) + 0.05 * torch.randn(n, t.numel(), generator=g)
    x = x.unsqueeze(1)  # (n, 1, 40): one channel, like the tutorial
    return x[..., :SEG_BASE], x[..., SEG_BASE:]


@pytest.mark.parametrize("predictor", ["argmin", "ridge"])
def test_encoder_argmin_decoder_trains(predictor):
    torch.manual_seed(0)
    model = EncPredictorDec(SEG_BASE, SEG_TARGET, [1, 4, 8], predictor=predictor)
    X, Y = _series(64, seed=1)
    batches = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 64, 16)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = sum(float(loss_fn(model(x), y)) for x, y in batches) / len(batches)
        model.train()
        return out

    before = eval_loss()
    for _ in range(3):
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    lam = (
        model.pred.argmin.params["reg_lambda"] if predictor == "argmin" else model.pred.ridge.log_l2
    )
    assert lam.grad is not None and torch.isfinite(lam.grad).all()


def test_encoder_argmin_decoder_gradients_match_dense_method():
    X, Y = _series(16, seed=2)
    grads = {}
    for name, ls in (("cg", linalg.cg(tol=1e-12)), ("dense", linalg.dense(method="lstsq"))):
        torch.manual_seed(0)
        model = EncPredictorDec(SEG_BASE, SEG_TARGET, [1, 4, 8], linear_solver=ls)
        loss = nn.MSELoss()(model(X), Y)
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        assert model.pred.argmin.last_diagnostics.last_backward.method == name
    for a, b in zip(grads["cg"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
