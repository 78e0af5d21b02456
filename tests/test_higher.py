"""Against ``higher`` (the archived peer) on the same problems, and the ported MAML snippet."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel
from bilevel import stateful

higher = pytest.importorskip("higher")

DT = torch.float64


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (48,), generator=g)
    xv = torch.randn(32, 6, generator=g, dtype=DT)
    yv = torch.randint(0, 3, (32,), generator=g)
    return model, x, y, xv, yv


CASES = {
    "sgd_momentum": (
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lambda: bilevel.optim.sgd(momentum=0.9),
        0.1,
    ),
    # higher's Adam adds eps to sqrt(v) before the bias correction (the pre-1.x torch formula),
    # torch.optim and bilevel after it; with eps=0 the two formulas coincide exactly
    "adam": (
        lambda params: torch.optim.Adam(params, lr=0.01, eps=0.0),
        lambda: bilevel.optim.adam(eps=0.0),
        0.01,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lr_hypergradient_equals_higher(case):
    torch_opt, our_opt, lr0 = CASES[case]
    model, x, y, xv, yv = setup()
    T = 20

    lr_h = torch.tensor(lr0, dtype=DT, requires_grad=True)
    opt = torch_opt(model.parameters())
    with higher.innerloop_ctx(model, opt, override={"lr": [lr_h]}) as (fmodel, diffopt):
        for _ in range(T):
            diffopt.step(F.cross_entropy(fmodel(x), y))
        F.cross_entropy(fmodel(xv), yv).backward()

    lr_b = torch.tensor(lr0, dtype=DT, requires_grad=True)

    def inner(params, hparams, batch):
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    params = {k: v.detach() for k, v in model.named_parameters()}
    result = bilevel.unroll(inner, params, {"lr": lr_b}, our_opt(), T, (x, y))
    F.cross_entropy(functional_call(model, result.params, (xv,)), yv).backward()

    assert lr_h.grad.abs() > 1e-6
    torch.testing.assert_close(lr_b.grad, lr_h.grad, rtol=1e-10, atol=1e-14)


def maml_meta_gradient(lib, model, tasks, inner_steps=3):
    """A higher-style MAML snippet; `lib` is `higher` or `bilevel.stateful`."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.zero_grad()
    for x_spt, y_spt, x_qry, y_qry in tasks:
        with lib.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(inner_steps):
                diffopt.step(F.mse_loss(fnet(x_spt), y_spt))
            F.mse_loss(fnet(x_qry), y_qry).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_stateful_api_runs_higher_maml_snippet_with_changed_imports():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
    model = model.to(DT)
    g = torch.Generator().manual_seed(2)
    tasks = []
    for _ in range(4):
        amp, phase = 0.1 + 4.9 * torch.rand(1, generator=g, dtype=DT), torch.rand(1, generator=g)
        xs = 10 * torch.rand(20, 1, generator=g, dtype=DT) - 5
        ys = amp * torch.sin(xs + phase.to(DT))
        tasks.append((xs[:10], ys[:10], xs[10:], ys[10:]))
    expected = maml_meta_gradient(higher, model, tasks)
    got = maml_meta_gradient(stateful, model, tasks)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_stateful_per_step_override_and_first_order():
    model, x, y, xv, yv = setup(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    lrs = torch.tensor([0.1, 0.05, 0.02], dtype=DT, requires_grad=True)
    with stateful.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for t in range(3):
            diffopt.step(F.cross_entropy(fmodel(x), y), override={"lr": lrs[t]})
        F.cross_entropy(fmodel(xv), yv).backward()

    def inner(params, hparams, batch):
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    lrs2 = lrs.detach().clone().requires_grad_()
    params = {k: v.detach() for k, v in model.named_parameters()}
    # a schedule as long as the 3-class output bias: it says it is a schedule
    hparams = {"lr": bilevel.optim.schedule(lrs2)}
    result = bilevel.unroll(inner, params, hparams, bilevel.optim.sgd(momentum=0.5), 3, (x, y))
    F.cross_entropy(functional_call(model, result.params, (xv,)), yv).backward()
    torch.testing.assert_close(lrs.grad, lrs2.grad, rtol=1e-10, atol=1e-14)
    # the module's own parameters are untouched and got no gradient (copied initial weights)
    assert all(p.grad is None for p in model.parameters())

    with stateful.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        new = diffopt.step(F.cross_entropy(fmodel(x), y))
    assert all(p.grad_fn is None for p in new)
