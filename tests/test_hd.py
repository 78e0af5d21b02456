"""Hypergradient descent (Baydin et al. 2018): SGD-HD and Adam-HD, functional and torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch

from bilevel.optim import SGDHD, AdamHD, adam_hd, sgd_hd

DT = torch.float64
# torch.func's first use scripts helpers and warns about torch.jit.script: not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def quadratic(seed=0, n=4, cond=4.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = q @ torch.diag(torch.linspace(1.0, cond, n, dtype=DT)) @ q.T
    b = torch.randn(n, generator=g, dtype=DT)
    w0 = torch.randn(n, generator=g, dtype=DT)
    return A, b, w0


def run(opt, A, b, w0, steps, hparams=None):
    params = {"w": w0.clone()}
    state = opt.init(params, hparams)
    lrs, ws = [], []
    for _ in range(steps):
        params, state = opt.step(params, {"w": A @ params["w"] - b}, state, hparams)
        lrs.append(state["lr"])
        ws.append(params["w"])
    return lrs, ws


# -- formulas by hand -------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sgd_hd_matches_hand_computation(momentum):
    A, b, w0 = quadratic()
    alpha, beta = 0.05, 0.01
    lrs, ws = run(sgd_hd(lr=alpha, hypergrad_lr=beta, momentum=momentum), A, b, w0, 3)
    w, lr, d_prev, buf = w0, alpha, torch.zeros_like(w0), None
    for t in range(3):
        g = A @ w - b
        lr = lr + beta * torch.dot(g, d_prev)  # d_prev = 0 at the first step
        buf = g if buf is None else momentum * buf + g
        d = buf if momentum else g
        w = w - lr * d
        d_prev = d
        torch.testing.assert_close(lrs[t], torch.as_tensor(lr, dtype=DT), rtol=1e-14, atol=0)
        torch.testing.assert_close(ws[t], w, rtol=1e-14, atol=1e-15)


def test_adam_hd_matches_hand_computation():
    A, b, w0 = quadratic(seed=1)
    alpha, beta, b1, b2, eps = 0.05, 0.001, 0.9, 0.999, 1e-8
    lrs, ws = run(adam_hd(lr=alpha, hypergrad_lr=beta), A, b, w0, 3)
    w, lr = w0, alpha
    m = v = u_prev = torch.zeros_like(w0)
    for t in range(1, 4):
        g = A @ w - b
        lr = lr + beta * torch.dot(g, u_prev)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        w = w - lr * u
        u_prev = u
        torch.testing.assert_close(lrs[t - 1], torch.as_tensor(lr, dtype=DT), rtol=1e-13, atol=0)
        torch.testing.assert_close(ws[t - 1], w, rtol=1e-13, atol=1e-15)


# -- the learning rate moves the right way ----------------------------------------------------


@pytest.mark.parametrize("make", [sgd_hd, adam_hd], ids=["sgd_hd", "adam_hd"])
def test_small_learning_rate_grows(make):
    A, b, w0 = quadratic(cond=2.0)
    lrs, _ = run(make(lr=1e-3, hypergrad_lr=1e-3), A, b, w0, 10)
    # Successive gradients agree: every step raises the learning rate.
    assert all(later > earlier for earlier, later in zip(lrs, lrs[1:]))


def test_too_large_learning_rate_shrinks_and_converges():
    A, b, w0 = quadratic(cond=2.0)  # L = 2: lr = 0.95 overshoots (oscillates), 2/L = 1 diverges
    w_star = torch.linalg.solve(A, b)
    lrs, ws = run(sgd_hd(lr=0.95, hypergrad_lr=0.05), A, b, w0, 40)
    assert lrs[1] < lrs[0]
    assert lrs[-1] < 0.8
    plain, _ = run(sgd_hd(lr=0.95, hypergrad_lr=0.0), A, b, w0, 40)
    assert all(x == 0.95 for x in plain)
    _, plain_ws = run(sgd_hd(lr=0.95, hypergrad_lr=0.0), A, b, w0, 40)
    assert (ws[-1] - w_star).norm() < (plain_ws[-1] - w_star).norm()


# -- torch.optim classes agree with the functional versions ---------------------------------


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(5, 7)
        self.l2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)


CLASS_CASES = [
    (SGDHD, sgd_hd, {"lr": 0.05, "hypergrad_lr": 1e-3}),
    (
        SGDHD,
        sgd_hd,
        {"lr": 0.05, "hypergrad_lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    (
        SGDHD,
        sgd_hd,
        {"lr": 0.05, "hypergrad_lr": 1e-3, "momentum": 0.9, "dampening": 0.2, "maximize": False},
    ),
    (AdamHD, adam_hd, {"lr": 0.01, "hypergrad_lr": 1e-4}),
    (
        AdamHD,
        adam_hd,
        {
            "lr": 0.01,
            "hypergrad_lr": 1e-4,
            "betas": (0.8, 0.99),
            "weight_decay": 0.01,
            "amsgrad": True,
        },
    ),
]


@pytest.mark.parametrize(
    "cls,factory,kwargs",
    CLASS_CASES,
    ids=[f"{c.__name__}-{'-'.join(k)}" for c, _, k in CLASS_CASES],
)
def test_torch_optimizer_class_agrees_with_functional(cls, factory, kwargs):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = _data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = cls(model.parameters(), **kwargs)
    fopt = factory(**kwargs)
    state = fopt.init(params)

    def loss_of(p):
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    for step in range(20):
        opt.zero_grad()
        loss_of(dict(model.named_parameters())).backward()
        opt.step()
        ps = {k: v.requires_grad_() for k, v in params.items()}
        grads = dict(zip(ps, torch.autograd.grad(loss_of(ps), list(ps.values()))))
        with torch.no_grad():
            params, state = fopt.step({k: v.detach() for k, v in ps.items()}, grads, state)
        torch.testing.assert_close(opt.param_groups[0]["lr"], state["lr"], rtol=1e-13, atol=0)
        for k, v in model.named_parameters():
            torch.testing.assert_close(
                v.detach(), params[k], rtol=1e-12, atol=1e-14, msg=f"{k} at {step}"
            )
    assert opt.param_groups[0]["lr"] != kwargs["lr"]  # it adapted


def test_torch_class_groups_closure_state_dict_and_skipped_params():
    torch.manual_seed(1)
    model = MLP().double()
    frozen = torch.nn.Parameter(torch.ones(2, dtype=DT))  # never gets a gradient
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt = SGDHD(
        [
            {"params": model.l1.parameters(), "lr": 0.1},
            {"params": [*model.l2.parameters(), frozen]},
        ],
        lr=0.05,
        hypergrad_lr=1e-2,
        momentum=0.5,
    )
    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]
    lr0, lr1 = (g["lr"].item() for g in opt.param_groups)
    assert lr0 != 0.1 and lr1 != 0.05 and lr0 != lr1
    assert torch.equal(frozen, torch.ones(2, dtype=DT)) and frozen not in opt.state

    # Saving and restoring the state continues exactly as without interruption.
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure)
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    for _ in range(3):
        opt.step(closure)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


def test_torch_class_with_lr_scheduler():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamHD([w], lr=0.1, hypergrad_lr=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(opt.param_groups[0]["lr"], torch.tensor(0.025))


# -- the functional versions are differentiable -------------------------------------------------


@pytest.mark.parametrize("make", [sgd_hd, adam_hd], ids=["sgd_hd", "adam_hd"])
def test_functional_hd_hypergradients_match_finite_differences(make):
    A, b, w0 = quadratic(seed=2)
    c = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=DT)

    def outer(lr, beta):
        _, ws = run(
            make(momentum=0.5) if make is sgd_hd else make(),
            A,
            b,
            w0,
            6,
            {"lr": lr, "hypergrad_lr": beta},
        )
        return (ws[-1] - c).square().sum()

    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    beta = torch.tensor(1e-3, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad(outer(lr, beta), (lr, beta))
    with torch.no_grad():
        for i, (x, g) in enumerate(zip((lr, beta), grads)):
            h = 1e-6 * x.abs()
            plus = [lr.detach(), beta.detach()]
            minus = [lr.detach(), beta.detach()]
            plus[i] = plus[i] + h
            minus[i] = minus[i] - h
            fd = (outer(*plus) - outer(*minus)) / (2 * h)
            assert ((fd - g).abs() / g.abs()) < 1e-6, (i, fd, g)


def test_hd_validation():
    params = {"w": torch.ones(2, dtype=DT)}
    with pytest.raises(TypeError, match="'lr' must be a number or a 0-d tensor"):
        sgd_hd(lr={"w": 0.1}).validate(params)
    with pytest.raises(TypeError, match="'hypergrad_lr' must be a number or a 0-d tensor"):
        adam_hd(hypergrad_lr=torch.ones(3, dtype=DT)).validate(params, steps=3)
    with pytest.raises(TypeError, match="unknown setting"):
        sgd_hd().replace(hypergrad=0.1)
