"""bilevel.stateful against the installed ``higher`` (the oracle) on higher's documented API.

Every run builds the same model, optimizer and data twice (same seeds), runs the same
higher-style code once with ``higher`` and once with ``bilevel.stateful``, and compares the
fast weights, the meta-gradients (model parameters and learned settings) and the buffers.
Adam is run with ``eps=0``: higher adds ``eps`` before the bias correction, torch.optim (and
bilevel) after it; the difference itself is tested in ``test_stateful_torch.py``.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import stateful

higher = pytest.importorskip("higher")

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1
    ),
    "sgd_dampening_wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.7, dampening=0.3, weight_decay=0.01
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, eps=0.0),
    "adam_amsgrad_wd": lambda ps: torch.optim.Adam(
        ps, lr=0.02, betas=(0.8, 0.9), eps=0.0, amsgrad=True, weight_decay=0.05
    ),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "rmsprop_centered_momentum": lambda ps: torch.optim.RMSprop(
        ps, lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.01
    ),
    "adagrad": lambda ps: torch.optim.Adagrad(
        ps, lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1
    ),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.8, weight_decay=0.01),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.02, betas=(0.8, 0.9), weight_decay=0.01),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05, lambd=1e-2, alpha=0.5, t0=2),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.1)),
}


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 2)]
    return nn.Sequential(*layers).to(DT)


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    return x, torch.randn(n, 2, generator=g, dtype=DT)


def pretrain(model, opt, steps):
    """A few plain torch.optim steps, so the optimizer has state (momentum, moments)."""
    x, y = data(7)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()


def exact_steps(opt):
    """torch keeps step counts as float32 tensors and higher computes Adagrad's lr decay and
    Adam's bias corrections from them in float32 (1e-9 to 2e-7 off torch.optim in float64,
    measured); the oracle gets float64 step tensors, so its arithmetic is exact.
    ``test_stateful_torch.py`` compares against torch.optim itself."""
    for state in opt.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(DT)


def snapshot(model):
    return [(p, p.detach().clone(), p.requires_grad) for p in model.parameters()] + [
        (b, b.clone(), False) for b in model.buffers()
    ]


def assert_unchanged(model, snap):
    now = list(model.parameters()) + list(model.buffers())
    assert len(now) == len(snap)
    for t, (orig, value, rg) in zip(now, snap):
        assert t is orig
        assert torch.equal(t.detach(), value)
        if isinstance(orig, nn.Parameter):
            assert type(t) is nn.Parameter and t.requires_grad == rg
    copy.deepcopy(model)  # raises where a module holds a non-leaf tensor as a Parameter


def run(
    lib,
    opt_name,
    *,
    steps=3,
    copy_initial_weights=False,
    track=True,
    entry="ctx",
    learn=(),
    per_step=None,
    callback=None,
    pre=0,
    bn=False,
    model_fn=None,
    opt_fn=None,
    time=None,
    mode="train",
    x_grad=False,
):
    """The higher-style inner loop; returns everything to compare."""
    model = model_fn() if model_fn else mlp(bn=bn)
    opt = opt_fn(model) if opt_fn else OPTIMIZERS[opt_name](model.parameters())
    pretrain(model, opt, pre)
    if lib is higher:
        exact_steps(opt)
    model.train(mode == "train")
    snap = snapshot(model)
    x, y = data(1)
    x.requires_grad_(x_grad)
    xq, yq = data(2)
    hyper = {k: torch.tensor(v, dtype=DT, requires_grad=True) for k, v in learn}
    override = {k: [v] for k, v in hyper.items()} or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # higher warns about RMSprop
        if entry == "ctx":
            ctx = lib.innerloop_ctx(
                model,
                opt,
                copy_initial_weights=copy_initial_weights,
                override=override,
                track_higher_grads=track,
            )
            fmodel, diffopt = ctx.__enter__()
        else:
            fmodel = lib.monkeypatch(
                model, copy_initial_weights=copy_initial_weights, track_higher_grads=track
            )
            diffopt = lib.get_diff_optim(
                opt,
                model.parameters(),
                fmodel=fmodel,
                override=override,
                track_higher_grads=track,
            )
    for t in range(steps):
        kwargs = {}
        if per_step is not None:
            kwargs["override"] = per_step(t)
        if callback is not None:
            kwargs["grad_callback"] = callback
        diffopt.step(F.mse_loss(fmodel(x), y), **kwargs)
    outer = F.mse_loss(fmodel(xq), yq)
    at_time = None if time is None else [p.detach().clone() for p in fmodel.parameters(time=time)]
    wrt = [p for p in model.parameters() if p.requires_grad] + list(hyper.values())
    grads = []
    if outer.requires_grad and wrt:
        grads = torch.autograd.grad(outer, wrt, allow_unused=True)
    fast = [p.detach().clone() for p in fmodel.parameters()]
    buffers = (
        [b.clone() for b in fmodel.buffers()]
        if lib is stateful
        else [b.clone() for b in _higher_buffers(fmodel)]
    )
    return {
        "fast": fast,
        "grads": grads,
        "outer": outer.detach(),
        "buffers": buffers,
        "time": at_time,
        "model": model,
        "snap": snap,
    }


def _higher_buffers(fmodel):
    return [b for _, b in fmodel.named_buffers()]


# torch.optim.ASGD keeps eta and mu as float32 tensors (so its steps carry float32 rounding);
# bilevel reproduces torch.optim exactly (test_stateful_torch.py), higher computes them in
# float64: the two agree to float32 precision only.
TOL_FOR = {"asgd": {"rtol": 1e-6, "atol": 1e-8}}


def compare(a, b, tol=TOL):
    torch.testing.assert_close(a["outer"], b["outer"], **tol)
    for x, y in zip(a["fast"], b["fast"], strict=True):
        torch.testing.assert_close(x, y, **tol)
    assert len(a["grads"]) == len(b["grads"])
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, **tol)
    for x, y in zip(a["buffers"], b["buffers"], strict=True):
        torch.testing.assert_close(x, y, **tol)
    if a["time"] is not None:
        for x, y in zip(a["time"], b["time"], strict=True):
            torch.testing.assert_close(x, y, **tol)


def both(opt_name, **kw):
    ours = run(stateful, opt_name, **kw)
    ref = run(higher, opt_name, **kw)
    compare(ours, ref, TOL_FOR.get(opt_name, TOL))
    assert_unchanged(ours["model"], ours["snap"])
    return ours, ref


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_maml_meta_gradient_and_branching_from_trained_state(opt_name):
    ours, _ = both(opt_name, pre=2)
    assert any(g.abs().max() > 1e-6 for g in ours["grads"])


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "rmsprop", "adagrad"])
def test_monkeypatch_and_get_diff_optim_with_learned_lr(opt_name):
    ours, _ = both(opt_name, entry="monkeypatch", copy_initial_weights=True, learn=[("lr", 0.05)])
    assert ours["grads"][-1].abs() > 1e-8  # d outer / d lr


@pytest.mark.parametrize("copy_initial_weights", [True, False])
def test_copy_initial_weights_both_ways(copy_initial_weights):
    ours, _ = both("sgd_momentum", copy_initial_weights=copy_initial_weights, learn=[("lr", 0.1)])
    model_grads = ours["grads"][:-1]
    if copy_initial_weights:
        assert all(g is None for g in model_grads)
    else:
        assert all(g is not None and g.abs().max() > 0 for g in model_grads)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "rmsprop_centered_momentum"])
def test_track_higher_grads_false(opt_name):
    ours, _ = both(opt_name, track=False, pre=1)
    assert ours["grads"] == [] or all(g is None for g in ours["grads"])


def adam_two_groups_outer(lib, b1, b2, lrs):
    model = mlp()
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": 0.03},
        ],
        eps=0.0,
    )
    x, y = data(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lib.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for t in range(3):
                over = {"lr": [lrs[t], lrs[t] * 2], "betas": [(b1, 0.99), (0.9, b2)]}
                diffopt.step(F.mse_loss(fmodel(x), y), override=over)
            return F.mse_loss(fmodel(data(2)[0]), data(2)[1]), model


def test_per_step_and_per_group_override_of_adam():
    grads = []
    for lib in (stateful, higher):
        b1 = torch.tensor(0.85, dtype=DT, requires_grad=True)
        lrs = torch.tensor([0.02, 0.01, 0.005], dtype=DT, requires_grad=True)
        outer, model = adam_two_groups_outer(lib, b1, 0.95, lrs)
        grads.append(torch.autograd.grad(outer, [b1, lrs, *model.parameters()]))
    for a, b in zip(*grads):
        assert a.abs().max() > 1e-8
        torch.testing.assert_close(a, b, **TOL)


def test_adam_beta2_tensor_hypergradient_matches_finite_differences():
    # higher takes math.sqrt of 1 - beta2**k, which drops beta2's gradient through the bias
    # correction (it warns "Converting a tensor with requires_grad=True to a scalar"); here
    # beta2's hypergradient is exact: central differences of the whole inner loop agree
    lrs = torch.tensor([0.02, 0.01, 0.005], dtype=DT)
    b2 = torch.tensor(0.95, dtype=DT, requires_grad=True)
    outer, _ = adam_two_groups_outer(stateful, 0.85, b2, lrs)
    (got,) = torch.autograd.grad(outer, b2)
    h = 1e-6
    up = adam_two_groups_outer(stateful, 0.85, 0.95 + h, lrs)[0].detach()
    down = adam_two_groups_outer(stateful, 0.85, 0.95 - h, lrs)[0].detach()
    fd = (up - down) / (2 * h)
    assert got.abs() > 1e-6
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-10)
    b2h = torch.tensor(0.95, dtype=DT, requires_grad=True)
    (theirs,) = torch.autograd.grad(adam_two_groups_outer(higher, 0.85, b2h, lrs)[0], b2h)
    assert (theirs - fd).abs() > 1e-3 * fd.abs()  # higher's documented deviation


def test_per_group_override_hypergradients_match():
    def opt_fn(model):
        return torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
            lr=0.1,
            momentum=0.5,
        )

    grads = []
    for lib in (stateful, higher):
        model = mlp()
        opt = opt_fn(model)
        lr0 = torch.tensor(0.1, dtype=DT, requires_grad=True)
        lr1 = torch.tensor(0.02, dtype=DT, requires_grad=True)
        b1 = torch.tensor(0.7, dtype=DT, requires_grad=True)
        x, y = data(1)
        with lib.innerloop_ctx(model, opt, override={"lr": [lr0, lr1]}) as (fmodel, diffopt):
            for t in range(3):
                over = {"momentum": [b1, 0.5]} if t == 1 else None
                diffopt.step(F.mse_loss(fmodel(x), y), override=over)
            outer = F.mse_loss(fmodel(data(2)[0]), data(2)[1])
        grads.append(torch.autograd.grad(outer, [lr0, lr1, b1]))
    for a, b in zip(*grads):
        assert a.abs() > 1e-8
        torch.testing.assert_close(a, b, **TOL)


def test_grad_callback_clipping():
    def clip(grads):
        return [None if g is None else g.clamp(-0.05, 0.05) for g in grads]

    both("sgd_momentum", callback=clip, learn=[("lr", 0.1)])
    both("adam", callback=clip)


def bias_free_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False)).to(DT)


@pytest.mark.parametrize("time", [0, 1, 2, -1])
def test_parameters_at_time(time):
    # every weight of a bias-free MLP on inputs that require grad is saved by the graph (for
    # mm's backward), so every step's fast weights are alive until the backward pass
    ours, ref = both("sgd_momentum", time=time, model_fn=bias_free_mlp, x_grad=True)
    if time == 0:
        for a, p in zip(ours["time"], ours["model"].parameters()):
            torch.testing.assert_close(a, p.detach(), rtol=0, atol=0)


def shared_model():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    head = nn.Linear(4, 2)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), head).to(DT)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_shared_submodule(opt_name):
    ours, _ = both(opt_name, model_fn=shared_model, learn=[("lr", 0.05)])
    assert len(ours["fast"]) == 4  # the shared Linear's two tensors once, the head's two


def tied_model():
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4)
    dec.weight = enc.weight  # one Parameter in two different submodules
    return nn.Sequential(enc, nn.Tanh(), dec, nn.Tanh(), nn.Linear(4, 2)).to(DT)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_tied_parameters(opt_name):
    ours, _ = both(opt_name, model_fn=tied_model, learn=[("lr", 0.05)])
    assert len(ours["fast"]) == 4
    assert ours["model"][0].weight is ours["model"][2].weight


def test_frozen_parameters():
    def model_fn():
        model = mlp()
        model[0].bias.requires_grad_(False)
        return model

    ours, _ = both("sgd_momentum", model_fn=model_fn, pre=1)
    ours_fast, orig = ours["fast"][1], ours["model"][0].bias
    assert torch.equal(ours_fast, orig.detach())


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "rmsprop"])
def test_optimizer_over_a_subset(opt_name):
    ours, _ = both(opt_name, opt_fn=lambda m: OPTIMIZERS[opt_name](m[2].parameters()), pre=1)
    model = ours["model"]
    assert torch.equal(ours["fast"][0], model[0].weight.detach())
    assert not torch.equal(ours["fast"][2], model[2].weight.detach())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_train_and_eval(mode):
    ours, _ = both("sgd_momentum", bn=True, mode=mode, pre=1)
    model = ours["model"]
    running = [b for b in ours["buffers"] if b.dtype == DT]
    if mode == "train":  # fmodel's statistics moved, the model's did not
        assert not torch.equal(running[0], model[1].running_mean)
    else:
        assert torch.equal(running[0], model[1].running_mean)
