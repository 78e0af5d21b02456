"""bilevel.stateful against torch.optim: the differentiable steps are torch.optim's steps.

A parameter the loss does not use (gradient ``None``) is not updated and its state does not
advance; one used only every other step gets its own step count (Adam's bias correction);
frozen parameters and parameters outside the optimizer stay put; state copied from a partly
trained torch optimizer continues exactly where torch.optim would.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import stateful

higher = pytest.importorskip("higher")

DT = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-13}

CONFIGS = {
    "SGD": [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.7, "dampening": 0.3, "maximize": True},
    ],
    "Adam": [
        {"lr": 0.01},
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "eps": 1e-3},
        {"lr": 0.01, "betas": (0.8, 0.9), "maximize": True},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    "AdamW": [{"lr": 0.01}, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.3}],
    "RMSprop": [
        {"lr": 0.01},
        {"lr": 0.01, "centered": True, "momentum": 0.5},
        {"lr": 0.01, "alpha": 0.9, "weight_decay": 0.1, "maximize": True},
    ],
    "Adagrad": [
        {"lr": 0.1},
        {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2, "weight_decay": 0.1},
        {"lr": 0.1, "maximize": True, "eps": 1e-3},
    ],
    "Adadelta": [{"lr": 1.0}, {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1, "maximize": True}],
    "Adamax": [{"lr": 0.01}, {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1}],
    "ASGD": [{"lr": 0.05}, {"lr": 0.05, "lambd": 1e-2, "alpha": 0.5, "t0": 2, "weight_decay": 0.1}],
    "Rprop": [{"lr": 0.01}, {"lr": 0.01, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05)}],
    "RAdam": [{"lr": 0.01}, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}],
    "NAdam": [
        {"lr": 0.01},
        {"lr": 0.01, "momentum_decay": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
}
CASES = [(name, i) for name, configs in CONFIGS.items() for i in range(len(configs))]


class Net(nn.Module):
    """``extra`` is used at even steps only, ``unused`` never, ``frozen`` does not train."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(3, 5)
        self.lin2 = nn.Linear(5, 2)
        self.extra = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.unused = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.full((2,), 0.3), requires_grad=False)

    def forward(self, x, t):
        h = torch.tanh(self.lin1(x))
        if t % 2 == 0:
            h = h * self.extra
        return self.lin2(h) + self.frozen


def build(name, config, pre):
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = getattr(torch.optim, name)(model.parameters(), **config)
    g = torch.Generator().manual_seed(5)
    for t in range(pre):
        x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
        opt.zero_grad()
        F.mse_loss(model(x, t), y).backward()
        opt.step()
    opt.zero_grad()
    return model, opt


def batches(n):
    g = torch.Generator().manual_seed(9)
    return [
        (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT))
        for _ in range(n)
    ]


def torch_reference(name, config, pre, steps):
    model, opt = build(name, config, pre)
    for t, (x, y) in enumerate(batches(steps)):
        opt.zero_grad()
        F.mse_loss(model(x, t), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("pre", [0, 3])
@pytest.mark.parametrize("name,index", CASES)
def test_steps_equal_torch_optim(name, index, pre, track):
    config, steps = CONFIGS[name][index], 5
    expected, ref_opt = torch_reference(name, config, pre, steps)
    model, opt = build(name, config, pre)
    before = [p.detach().clone() for p in model.parameters()]
    with stateful.innerloop_ctx(model, opt, track_higher_grads=track) as (fmodel, diffopt):
        for t, (x, y) in enumerate(batches(steps)):
            diffopt.step(F.mse_loss(fmodel(x, t), y))
        got = [p.detach() for p in fmodel.parameters()]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    names = [n for n, _ in model.named_parameters()]
    unused, frozen = names.index("unused"), names.index("frozen")
    assert torch.equal(got[unused], before[unused]) and torch.equal(got[frozen], before[frozen])
    # the state of a parameter without gradient did not advance; per-parameter step counts
    ours_state = diffopt.state[0]
    unused_state = ours_state.get(unused)
    assert not unused_state or unused_state["step"] == 0  # Adagrad's torch state starts at 0
    extra = names.index("extra")
    ref_state = ref_opt.state[ref_opt.param_groups[0]["params"][extra]]
    if "step" in ref_state:
        assert ours_state[extra]["step"] == int(ref_state["step"])
        lin1 = names.index("lin1.weight")
        assert ours_state[extra]["step"] != ours_state[lin1]["step"]
    # the user's model and optimizer are untouched
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_only_the_optimizers_parameters_are_stepped(name):
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = getattr(torch.optim, name)(model.lin2.parameters(), lr=0.1)
    ref = Net().to(DT)
    ref.load_state_dict(model.state_dict())
    ref_opt = getattr(torch.optim, name)(ref.lin2.parameters(), lr=0.1)
    with stateful.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for t, (x, y) in enumerate(batches(3)):
            diffopt.step(F.mse_loss(fmodel(x, t), y))
            ref_opt.zero_grad()
            F.mse_loss(ref(x, t), y).backward()
            ref_opt.step()
        for a, b in zip(fmodel.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL)
        assert torch.equal(fmodel.lin1.weight, model.lin1.weight.detach())


def test_adam_eps_follows_torch_optim_not_higher():
    # higher: p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)   (eps before the correction)
    # torch:  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)   (eps after it)
    config = {"lr": 0.01, "eps": 1e-2}
    expected, _ = torch_reference("Adam", config, 0, 3)
    results = {}
    for lib in (stateful, higher):
        model, opt = build("Adam", config, 0)
        with lib.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for t, (x, y) in enumerate(batches(3)):
                diffopt.step(F.mse_loss(fmodel(x, t), y))
            results[lib.__name__] = [p.detach() for p in fmodel.parameters()]
    for a, b in zip(results["bilevel.stateful"], expected):
        torch.testing.assert_close(a, b, **TOL)
    gap = max((a - b).abs().max() for a, b in zip(results["higher"], expected))
    assert gap > 1e-5


def test_flags_cannot_be_tensors():
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    override = stateful.optim.get_trainable_opt_params(opt)
    assert "nesterov" not in override and "maximize" not in override
    x, y = batches(1)[0]
    with stateful.innerloop_ctx(model, opt, override={"nesterov": [torch.tensor(1.0)]}) as (
        fmodel,
        diffopt,
    ):
        with pytest.raises(TypeError, match="nesterov"):
            diffopt.step(F.mse_loss(fmodel(x, 0), y))


def test_trainable_opt_params_round_trip():
    torch.manual_seed(0)
    model = Net().to(DT)
    opt = torch.optim.Adam(
        [{"params": model.lin1.parameters(), "lr": 0.01}, {"params": model.lin2.parameters()}],
        lr=0.02,
    )
    override = stateful.optim.get_trainable_opt_params(opt)
    assert [float(v.detach()) for v in override["lr"]] == pytest.approx([0.01, 0.02])
    assert all(v.requires_grad for v in override["lr"])
    assert len(override["betas"]) == 2 and isinstance(override["betas"][0], tuple)
    x, y = batches(1)[0]
    with stateful.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x, 1), y))
        F.mse_loss(fmodel(x, 1), y).backward()
    assert override["lr"][0].grad is not None and override["lr"][0].grad.abs() > 0
    with torch.no_grad():
        override["lr"][1].fill_(0.5)
    stateful.optim.apply_trainable_opt_params(opt, override)
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="param groups"):
        stateful.optim.apply_trainable_opt_params(opt, {"lr": [0.1, 0.2, 0.3]})


def test_unsupported_optimizer_names_the_fix():
    model = Net()
    with pytest.raises(ValueError, match="register_optim"):
        with stateful.innerloop_ctx(model, torch.optim.LBFGS(model.parameters())):
            pass
