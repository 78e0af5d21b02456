"""bilevel.optim against torch.optim, step for step, over a grid of every option.

Each optimizer runs 20 steps on a problem with parameters that get no gradient at some
or all steps (``None``: unused, used late, used every other step, frozen), so per-
parameter step counts and skipped updates are exercised. Without a graph the numbers
must be bitwise those of torch.optim's default (for-loop) path on CPU, in float32 and
float64; with a graph (float64) within 1e-12. Hypergradients of every numeric setting
are checked against central finite differences.
"""

from __future__ import annotations

import random

import pytest
import torch

import bilevel.optim as bo

STEPS = 20

# option -> values; every value appears in at least one sampled configuration
GRID: dict[str, dict[str, list]] = {
    "SGD": {
        "lr": [0.05, 0.01],
        "momentum": [0.0, 0.9],
        "dampening": [0.0, 0.3],
        "weight_decay": [0.0, 0.1],
        "nesterov": [False, True],
        "maximize": [False, True],
    },
    "Adam": {
        "lr": [0.01, 0.003],
        "betas": [(0.9, 0.999), (0.8, 0.95)],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.0, 0.1],
        "amsgrad": [False, True],
        "maximize": [False, True],
        "decoupled_weight_decay": [False, True],
    },
    "AdamW": {
        "lr": [0.01, 0.003],
        "betas": [(0.9, 0.999), (0.8, 0.95)],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.01, 0.2],
        "amsgrad": [False, True],
        "maximize": [False, True],
    },
    "RMSprop": {
        "lr": [0.01, 0.003],
        "alpha": [0.99, 0.9],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.0, 0.1],
        "momentum": [0.0, 0.5],
        "centered": [False, True],
        "maximize": [False, True],
    },
    "Adagrad": {
        "lr": [0.05, 0.01],
        "lr_decay": [0.0, 0.1],
        "weight_decay": [0.0, 0.1],
        "initial_accumulator_value": [0.0, 0.5],
        "eps": [1e-10, 1e-3],
        "maximize": [False, True],
    },
    "Adadelta": {
        "lr": [1.0, 0.3],
        "rho": [0.9, 0.5],
        "eps": [1e-6, 1e-3],
        "weight_decay": [0.0, 0.1],
        "maximize": [False, True],
    },
    "Adamax": {
        "lr": [0.02, 0.005],
        "betas": [(0.9, 0.999), (0.8, 0.95)],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.0, 0.1],
        "maximize": [False, True],
    },
    "ASGD": {
        "lr": [0.05, 0.01],
        "lambd": [1e-4, 0.05],
        "alpha": [0.75, 0.5],
        "t0": [1e6, 3.0],
        "weight_decay": [0.0, 0.1],
        "maximize": [False, True],
    },
    "Rprop": {
        "lr": [0.01, 0.04],
        "etas": [(0.5, 1.2), (0.3, 1.5)],
        "step_sizes": [(1e-6, 50.0), (1e-3, 0.05)],
        "maximize": [False, True],
    },
    "RAdam": {
        "lr": [0.01, 0.003],
        "betas": [(0.9, 0.999), (0.8, 0.9)],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.0, 0.1],
        "decoupled_weight_decay": [False, True],
        "maximize": [False, True],
    },
    "NAdam": {
        "lr": [0.01, 0.003],
        "betas": [(0.9, 0.999), (0.8, 0.95)],
        "eps": [1e-8, 1e-3],
        "weight_decay": [0.0, 0.1],
        "momentum_decay": [4e-3, 0.1],
        "decoupled_weight_decay": [False, True],
        "maximize": [False, True],
    },
}
FACTORY = {
    "SGD": bo.sgd,
    "Adam": bo.adam,
    "AdamW": bo.adamw,
    "RMSprop": bo.rmsprop,
    "Adagrad": bo.adagrad,
    "Adadelta": bo.adadelta,
    "Adamax": bo.adamax,
    "ASGD": bo.asgd,
    "Rprop": bo.rprop,
    "RAdam": bo.radam,
    "NAdam": bo.nadam,
}
PER_OPTIMIZER = 5  # sampled configurations per optimizer


def _fix(name: str, cfg: dict) -> dict:
    if name == "SGD" and cfg["nesterov"]:  # torch: nesterov needs momentum and no dampening
        if cfg["dampening"]:
            cfg["nesterov"] = False
        else:
            cfg["momentum"] = 0.9
    return cfg


def _sample(name: str) -> list[dict]:
    """Configurations covering every value of every option (fixed seed)."""
    options = GRID[name]
    rng = random.Random(f"bilevel-{name}")
    configs = []
    for i in range(PER_OPTIMIZER):
        if i < 2:  # all first values, all second values: every value at least once
            cfg = {k: v[i % len(v)] for k, v in options.items()}
            if name == "SGD" and i == 1:
                cfg["dampening"] = 0.0  # nesterov=True needs it (dampening=0.3 in config 2)
        elif name == "SGD" and i == 2:
            cfg = {k: rng.choice(v) for k, v in options.items()}
            cfg["dampening"] = 0.3
        else:
            cfg = {k: rng.choice(v) for k, v in options.items()}
        configs.append(_fix(name, cfg))
    return configs


CASES = [(name, cfg) for name in GRID for cfg in _sample(name)]
IDS = [f"{name}-{i % PER_OPTIMIZER}" for i, (name, _) in enumerate(CASES)]


def test_grid_covers_every_value():
    for name, options in GRID.items():
        configs = [cfg for n, cfg in CASES if n == name]
        for option, values in options.items():
            seen = [cfg[option] for cfg in configs]
            assert all(v in seen for v in values), (name, option)


@pytest.fixture
def default_float64():
    # torch.optim rounds ASGD's eta/mu and NAdam's mu_product to the default dtype's scalar
    # type and bilevel mirrors it for numbers; tensors keep the parameters' dtype. With a
    # float64 default both are float64, so every kind gives the same numbers.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- the problem ------------------------------------------------------------------------


def _problem(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype),
        "b": torch.randn(3, generator=g, dtype=torch.float64).to(dtype),
        "late": torch.randn(3, generator=g, dtype=torch.float64).to(dtype),  # used from step 5
        "sometimes": torch.randn(3, generator=g, dtype=torch.float64).to(dtype),  # even steps
        "unused": torch.ones(3, dtype=dtype),  # never in the loss
        "frozen": torch.randn(3, generator=g, dtype=torch.float64).to(dtype),  # no grad
    }
    x = torch.randn(8, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64).to(dtype)
    return params, x, y


def _loss(p, x, y, step: int):
    out = torch.tanh(x @ p["w"] + p["b"]) * p["frozen"]
    if step >= 5:
        out = out + p["late"]
    if step % 2 == 0:
        out = out * p["sometimes"].sigmoid()
    return ((out - y) ** 2).mean()


def _grads(p, x, y, step: int, create_graph: bool):
    """Gradients of the parameters that require grad; ``None`` where the loss ignores one."""
    names = [n for n, v in p.items() if v.requires_grad]
    with torch.enable_grad():
        gs = torch.autograd.grad(
            _loss(p, x, y, step),
            [p[n] for n in names],
            allow_unused=True,
            create_graph=create_graph,
        )
    out = dict.fromkeys(p)
    out.update(zip(names, gs))
    return out


def _leaves(params, trainable: bool):
    return {n: v.clone().requires_grad_(trainable and n != "frozen") for n, v in params.items()}


def _torch_run(name, cfg, dtype):
    params, x, y = _problem(dtype)
    tp = _leaves(params, True)
    opt = getattr(torch.optim, name)([v for n, v in tp.items() if n != "frozen"], **cfg)
    history = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for n, g in _grads(tp, x, y, step, False).items():
            tp[n].grad = g
        opt.step()
        history.append({n: v.detach().clone() for n, v in tp.items()})
    return history


def _as_tensors(cfg, dtype):
    """The numeric settings as 0-d tensors that require grad (in hparams), flags apart.

    A number 0 stays a number: it switches a feature off (torch.optim's ``momentum=0``);
    a tensor never does (no device sync), and a 0-d tensor momentum of 0 with dampening
    is the limit momentum -> 0, ``(1 - dampening) * g`` after the first step, not ``g``.
    """
    flags = {k: v for k, v in cfg.items() if isinstance(v, bool) or v == 0}

    def t(v):
        return torch.tensor(v, dtype=dtype, requires_grad=True)

    hparams = {
        k: tuple(t(x) for x in v) if isinstance(v, tuple) else t(v)
        for k, v in cfg.items()
        if k not in flags
    }
    return flags, hparams


def _ours_run(name, cfg, dtype, graph: bool, tensors: bool = False):
    params, x, y = _problem(dtype)
    p = _leaves(params, graph)
    if not graph:  # requires_grad marks what is trained (a frozen tensor has no gradient)
        p = {n: v if n == "frozen" else v.requires_grad_() for n, v in p.items()}
    settings, hparams = _as_tensors(cfg, dtype) if tensors else (cfg, {})
    opt = FACTORY[name](**settings)
    state = opt.init(p, hparams)
    history = []
    for step in range(STEPS):
        grads = _grads(p, x, y, step, graph)
        if graph:
            p, state = opt.step(p, grads, state, hparams)
        else:
            with torch.no_grad():
                p, state = opt.step(p, grads, state)
            p = {n: v if n == "frozen" else v.detach().requires_grad_() for n, v in p.items()}
        history.append({n: v.detach().clone() for n, v in p.items()})
    return history, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_no_graph_steps_are_bitwise_torch_optim(name, cfg, dtype):
    ref = _torch_run(name, cfg, dtype)
    ours, state = _ours_run(name, cfg, dtype, graph=False)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for n in a:
            assert torch.equal(a[n], b[n]), (step, n, (a[n] - b[n]).abs().max().item())
    # skipped parameters: untouched, and their state did not advance
    assert torch.equal(ours[-1]["unused"], torch.ones(3, dtype=dtype))
    assert state["param_steps"] == {
        "w": STEPS,
        "b": STEPS,
        "late": STEPS - 5,
        "sometimes": STEPS // 2,
        "unused": 0,
        "frozen": 0,
    }
    assert state["step"] == STEPS


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_steps_with_a_graph_match_torch_optim(name, cfg):
    ref = _torch_run(name, cfg, torch.float64)
    ours, _ = _ours_run(name, cfg, torch.float64, graph=True)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-12, msg=f"{step} {n}")


@pytest.mark.parametrize("name,cfg", CASES, ids=IDS)
def test_tensor_settings_match_torch_optim_numbers(name, cfg, default_float64):
    """Every numeric setting a 0-d tensor that requires grad (the code paths that keep the
    graph to the hyperparameters) against torch.optim with the numbers."""
    ref = _torch_run(name, cfg, torch.float64)
    ours, _ = _ours_run(name, cfg, torch.float64, graph=True, tensors=True)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-12, msg=f"{step} {n}")


# -- hypergradients of every numeric setting against central finite differences -----------

HG_STEPS = 8  # RAdam rectifies from step 7 with beta2 = 0.9
HG_BASE = {  # a configuration where every numeric setting changes the result
    "SGD": {"lr": 0.1, "momentum": 0.6, "dampening": 0.2, "weight_decay": 0.05},
    "Adam": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.05},
    "AdamW": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True},
    "RMSprop": {
        "lr": 0.02,
        "alpha": 0.9,
        "eps": 1e-3,
        "weight_decay": 0.05,
        "momentum": 0.5,
        "centered": True,
    },
    "Adagrad": {
        "lr": 0.1,
        "lr_decay": 0.1,
        "weight_decay": 0.05,
        "initial_accumulator_value": 0.3,
        "eps": 1e-3,
    },
    "Adadelta": {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.05},
    "Adamax": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.05},
    "ASGD": {"lr": 0.1, "lambd": 0.05, "alpha": 0.6, "t0": 2.5, "weight_decay": 0.05},
    "Rprop": {"lr": 0.03, "etas": (0.4, 1.3), "step_sizes": (0.015, 0.04)},
    "RAdam": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.05},
    "NAdam": {
        "lr": 0.05,
        "betas": (0.8, 0.9),
        "eps": 1e-3,
        "weight_decay": 0.05,
        "momentum_decay": 0.1,
    },
}
PAIRS = ("betas", "etas", "step_sizes")
HG_CASES = []
for _name, _cfg in HG_BASE.items():
    for _k, _v in _cfg.items():
        if isinstance(_v, bool):
            continue
        if _k in PAIRS:
            HG_CASES += [(_name, f"{_k}[0]"), (_name, f"{_k}[1]")]
        else:
            HG_CASES.append((_name, _k))


def _outer(name, setting, h):
    """Validation loss after ``HG_STEPS`` steps, as a function of one setting's value."""
    params, x, y = _problem(torch.float64, seed=1)
    p = {n: v.clone().requires_grad_(n != "frozen") for n, v in params.items()}
    cfg = dict(HG_BASE[name])
    flags = {k: v for k, v in cfg.items() if isinstance(v, bool)}
    hparams = {k: v for k, v in cfg.items() if not isinstance(v, bool)}
    if "[" in setting:
        key, i = setting[:-3], int(setting[-2])
        pair = list(hparams[key])
        pair[i] = h
        hparams[key] = tuple(pair)
    else:
        hparams[setting] = h
    opt = FACTORY[name](**flags)
    state = opt.init(p, hparams)
    for step in range(HG_STEPS):
        p, state = opt.step(p, _grads(p, x, y, step, True), state, hparams)
    out = _loss(p, x + 0.5, y, 0) + (p["late"] ** 2).sum()
    if name == "ASGD":  # lambd's and t0's effect on the averaged iterate
        out = out + sum((a**2).sum() for a in state["ax"].values())
    return out


@pytest.mark.parametrize("name,setting", HG_CASES, ids=[f"{n}-{s}" for n, s in HG_CASES])
def test_hypergradient_of_every_setting_matches_finite_differences(name, setting):
    cfg = HG_BASE[name]
    base = cfg[setting[:-3]][int(setting[-2])] if "[" in setting else cfg[setting]
    h = torch.tensor(base, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_outer(name, setting, h), h)
    eps = 1e-6 * max(abs(base), 1e-3)
    hi = _outer(name, setting, torch.tensor(base + eps, dtype=torch.float64)).detach()
    lo = _outer(name, setting, torch.tensor(base - eps, dtype=torch.float64)).detach()
    fd = (hi - lo) / (2 * eps)
    assert fd.abs() > 1e-9, "the setting has no effect: the check would be vacuous"
    assert abs(grad - fd) <= 1e-6 * max(1.0, abs(fd.item())), (grad.item(), fd.item())


# -- every kind of hyperparameter value, for the new optimizers -----------------------------

KIND_SETTINGS = [
    ("Adadelta", "rho"),
    ("Adamax", "lr"),
    ("ASGD", "lambd"),
    ("Rprop", "lr"),
    ("RAdam", "eps"),
    ("NAdam", "momentum_decay"),
]


@pytest.mark.parametrize("name,setting", KIND_SETTINGS)
def test_every_kind_of_value_gives_the_same_steps(name, setting, default_float64):
    params, x, y = _problem(torch.float64)
    value = HG_BASE[name][setting]
    t = torch.tensor(value, dtype=torch.float64)
    kinds = {
        "number": value,
        "tensor": t,
        "schedule": bo.schedule(t.repeat(STEPS)),
        "function": lambda step: t,
        "per_tensor": dict.fromkeys(params, value),
        "per_element": {n: bo.per_element(torch.full_like(v, value)) for n, v in params.items()},
    }
    flags = {k: v for k, v in HG_BASE[name].items() if k != setting}
    results = {}
    for kind, v in kinds.items():
        p = {n: q.clone().requires_grad_(n != "frozen") for n, q in params.items()}
        opt = FACTORY[name](**flags)
        state = opt.init(p, {setting: v})
        for step in range(8):
            p, state = opt.step(p, _grads(p, x, y, step, True), state, {setting: v})
        results[kind] = torch.cat([q.detach().flatten() for q in p.values()])
    for kind, r in results.items():
        torch.testing.assert_close(r, results["number"], rtol=1e-13, atol=1e-15, msg=kind)


# -- settings torch.optim rejects are rejected when the optimizer is built -------------------

BAD_VALUES = {
    "lr": [-0.1],
    "momentum": [-0.5],
    "dampening": [-0.5],
    "weight_decay": [-0.1],
    "eps": [-1e-8],
    "alpha": [-0.1, 2.0],
    "lambd": [-0.1],
    "t0": [-1.0],
    "lr_decay": [-0.1],
    "initial_accumulator_value": [-0.1],
    "rho": [-0.1, 1.1],
    "momentum_decay": [-0.1],
    "betas": [(-0.1, 0.9), (1.0, 0.9), (0.9, 1.0), (0.9, -0.1)],
    "etas": [(0.0, 1.2), (1.0, 1.2), (0.5, 1.0), (0.5, 0.9)],
    "step_sizes": [(-1.0, 50.0)],
}
RANGE_CASES = [
    (name, setting, bad)
    for name, options in GRID.items()
    for setting in options
    for bad in BAD_VALUES.get(setting, [])
]


def _torch_rejects(name, setting, value):
    try:
        getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **{setting: value})
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("name,setting,value", RANGE_CASES)
def test_values_are_rejected_at_construction_exactly_where_torch_rejects_them(name, setting, value):
    if not _torch_rejects(name, setting, value):
        FACTORY[name](**{setting: value})  # accepted by both
        return
    with pytest.raises(ValueError, match=setting):
        FACTORY[name](**{setting: value})
    if setting not in PAIRS:  # and the per-parameter form too
        with pytest.raises(ValueError, match=setting):
            FACTORY[name](**{setting: {"w": value}})


def test_some_values_are_rejected():
    rejected = [c for c in RANGE_CASES if _torch_rejects(*c)]
    assert len(rejected) >= 40  # the differential test above is not vacuous


@pytest.mark.parametrize("name", list(GRID))
def test_torch_defaults_and_ranges(name):
    opt = FACTORY[name]()
    torch_defaults = getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)]).defaults
    for k, v in opt.defaults.items():
        assert torch_defaults[k] == v, (name, k)
    for label, bounds in opt.ranges.items():
        assert label.split("[")[0] in opt.defaults
        assert isinstance(bounds, bo.Range)


def test_sgdhd_rejects_what_sgd_rejects():
    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        bo.SGDHD(w, lr=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        bo.SGDHD(w, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="nesterov"):
        bo.SGDHD(w, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        bo.AdamHD(w, betas=(1.0, 0.9))


def test_setting_given_twice_raises():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    opt = bo.sgd(lr=0.1)
    with pytest.raises(ValueError, match="'lr' is given both"):
        opt.init(params, {"lr": torch.tensor(0.2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="'lr' is given both"):
        opt.step(params, params, opt.init(params), {"lr": torch.tensor(0.2, dtype=torch.float64)})


def test_ambiguous_1d_tensor_asks_for_the_explicit_form():
    params = {"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    grads = {n: torch.ones_like(v) for n, v in params.items()}
    lr = torch.tensor([0.1, 0.2], dtype=torch.float64)
    opt = bo.sgd()
    for hp in ({"lr": lr}, {"lr": {"w": 0.1, "b": lr}}):
        with pytest.raises(ValueError, match="schedule.*per_element"):
            opt.step(params, grads, opt.init(params), hp)
    # schedule: step t uses lr[t]; per_element: b's entries use lr's
    p, s = opt.step(params, grads, opt.init(params), {"lr": bo.schedule(lr)})
    p, s = opt.step(p, grads, s, {"lr": bo.schedule(lr)})
    assert torch.allclose(p["b"], torch.full((2,), -0.3, dtype=torch.float64))
    hp = {"lr": {"w": 0.1, "b": bo.per_element(lr)}}
    p, s = opt.step(params, grads, opt.init(params), hp)
    assert torch.allclose(p["b"], -lr)
    # under unroll's validation with known steps, a too-short schedule says so
    with pytest.raises(ValueError, match="length 2 but 5 steps"):
        opt.validate(params, {"lr": lr}, steps=5)


def test_all_none_gradients_change_nothing_but_the_call_count():
    params = {"w": torch.ones(2, dtype=torch.float64)}
    for name in GRID:
        opt = FACTORY[name]()
        state = opt.init(params)
        p, s = opt.step(params, {"w": None}, state)
        assert p["w"] is params["w"]
        assert s["param_steps"] == {"w": 0} and s["step"] == 1
        for key, value in state.items():
            if key not in ("step", "param_steps"):
                assert value == s[key] or all(
                    torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                    for a, b in zip(value.values(), s[key].values())
                ), (name, key)


def test_stateful_steps_only_trainable_parameters_the_optimizer_holds():
    from bilevel import stateful

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model.double()
    model[2].bias.requires_grad_(False)  # frozen
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with stateful.innerloop_ctx(model, head) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        fast = dict(fmodel.named_parameters())
    # torch.optim itself, on a copy
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    ref.double().load_state_dict(model.state_dict())
    ref[2].bias.requires_grad_(False)
    opt = torch.optim.SGD(ref[2].parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(fast[n].detach(), p.detach(), rtol=1e-12, atol=1e-12, msg=n)
    for n in ("0.weight", "0.bias", "2.bias"):
        assert torch.equal(fast[n].detach(), before[n]), n


def test_stateful_translates_the_new_optimizers():
    from bilevel import stateful

    model = torch.nn.Linear(3, 1).double()
    for name, cfg in [(n, c) for n, c in CASES if n not in ("SGD", "Adam", "AdamW")][
        ::PER_OPTIMIZER
    ]:
        opt = getattr(torch.optim, name)(model.parameters(), **cfg)
        diffopt = stateful.get_diff_optim(opt, model.parameters())
        group = diffopt.param_groups[0]
        assert type(diffopt._optimizer(group)) is type(FACTORY[name]())
        for k, v in cfg.items():
            assert group[k] == v, (name, k)


# -- bilevel.unroll: parameters without a gradient, in every mode ----------------------------

MODES = [
    ("reverse", {}),
    ("truncated", {"truncate": 3}),
    ("checkpoint", {"segments": 2}),
    ("forward", {}),
    ("first_order", {}),
]


@pytest.mark.parametrize("mode,kw", MODES, ids=[m for m, _ in MODES])
def test_unroll_leaves_an_unused_parameter_alone(mode, kw):
    """The issue's case: sgd(lr=0.1, weight_decay=0.1, momentum=0.9), 5 steps."""
    import bilevel

    def loss(p, h):
        return ((p["used"] - 2.0) ** 2).sum()

    dt = torch.float64
    params = {"used": torch.ones(3, dtype=dt), "unused": torch.ones(3, dtype=dt)}
    lr = torch.tensor(0.1, dtype=dt, requires_grad=True)
    opt = bo.sgd(weight_decay=0.1, momentum=0.9)
    r = bilevel.unroll(loss, params, {"lr": lr}, opt, 5, mode=mode, **kw)
    assert torch.equal(r.params["unused"], torch.ones(3, dtype=dt))
    assert r.state["param_steps"] == {"used": 5, "unused": 0}
    # torch.optim on the same problem
    used = torch.ones(3, dtype=dt, requires_grad=True)
    unused = torch.ones(3, dtype=dt, requires_grad=True)
    ref = torch.optim.SGD([used, unused], lr=0.1, weight_decay=0.1, momentum=0.9)
    for _ in range(5):
        ref.zero_grad()
        loss({"used": used}, None).backward()
        ref.step()
    torch.testing.assert_close(r.params["used"].detach(), used.detach(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode,kw", MODES, ids=[m for m, _ in MODES])
def test_unroll_with_a_late_parameter_matches_torch_and_finite_differences(mode, kw):
    """Adam's per-parameter bias corrections: ``late`` joins the loss at step 3."""
    import bilevel

    dt = torch.float64
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 2, generator=g, dtype=dt), torch.randn(6, generator=g, dtype=dt)

    def loss(p, h, batch):
        t, xb, yb = batch
        out = xb @ p["w"] + (p["late"] if t >= 3 else 0.0)
        return ((out - yb) ** 2).mean()

    steps = 6
    data = [(t, x, y) for t in range(steps)]
    init = {"w": torch.zeros(2, dtype=dt), "late": torch.zeros((), dtype=dt)}

    def run(lr):
        r = bilevel.unroll(loss, init, {"lr": lr}, bo.adam(), steps, data=data, mode=mode, **kw)
        return r, (r.params["w"] ** 2).sum() + r.params["late"] ** 2

    lr = torch.tensor(0.05, dtype=dt, requires_grad=True)
    r, out = run(lr)
    assert r.state["param_steps"] == {"w": steps, "late": steps - 3}
    w = torch.zeros(2, dtype=dt, requires_grad=True)
    late = torch.zeros((), dtype=dt, requires_grad=True)
    ref = torch.optim.Adam([w, late], lr=0.05)
    for t in range(steps):
        ref.zero_grad()
        loss({"w": w, "late": late}, None, data[t]).backward()
        ref.step()
    torch.testing.assert_close(r.params["w"].detach(), w.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.params["late"].detach(), late.detach(), rtol=1e-12, atol=1e-14)
    if mode in ("truncated", "first_order"):
        return  # biased by design: only the exact modes meet finite differences
    (grad,) = torch.autograd.grad(out, lr)
    eps = 1e-6
    hi, lo = (run(torch.tensor(0.05 + d, dtype=dt, requires_grad=True))[1] for d in (eps, -eps))
    fd = (hi - lo).detach() / (2 * eps)
    assert abs(grad - fd) <= 1e-6 * max(1.0, abs(fd.item()))


def test_unroll_under_vmap_leaves_an_unused_parameter_alone():
    import bilevel

    def loss(p, h, batch):
        return ((p["used"] - batch) ** 2).sum()

    def adapt(target):
        params = {"used": torch.ones(3), "unused": torch.ones(3)}
        opt = bo.sgd(lr=0.1, weight_decay=0.1, momentum=0.9)
        return bilevel.unroll(loss, params, {}, opt, 5, data=target).params

    targets = torch.randn(4, 3)
    out = torch.func.vmap(adapt)(targets)
    assert torch.equal(out["unused"], torch.ones(4, 3))
    for i in range(4):
        torch.testing.assert_close(out["used"][i], adapt(targets[i])["used"])


def test_sgd_nesterov_combinations_rejected_when_built_like_torch():
    w = [torch.zeros(2, requires_grad=True)]
    for kwargs in ({"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}):
        with pytest.raises(ValueError):
            torch.optim.SGD(w, nesterov=True, **kwargs)
        with pytest.raises(ValueError, match="nesterov"):
            bo.sgd(nesterov=True, **kwargs)
    bo.sgd(nesterov=True)  # momentum may still come from hparams: checked at the first step
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="nesterov"):
        bo.sgd(nesterov=True).step(params, params, bo.sgd(nesterov=True).init(params))


@pytest.mark.parametrize("name", list(GRID))
def test_every_optimizer_gives_one_hypergradient_in_every_exact_mode(name):
    """State of every kind (Python-number eta/mu_product, per-parameter counts, a parameter
    used late) through checkpoint recomputation and forward-mode tangents."""
    import bilevel

    dt = torch.float64
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, generator=g, dtype=dt), torch.randn(6, generator=g, dtype=dt)

    def loss(p, h, batch):
        t = batch
        return ((x @ p["w"] + (p["late"] if t >= 2 else 0.0) - y) ** 2).mean()

    settings = {k: v for k, v in HG_BASE[name].items() if k != "lr"}
    init = {"w": torch.zeros(2, dtype=dt), "late": torch.zeros((), dtype=dt)}
    results = []
    for mode, kw in (("reverse", {}), ("checkpoint", {"segments": 2}), ("forward", {})):
        lr = torch.tensor(HG_BASE[name]["lr"], dtype=dt, requires_grad=True)
        opt = FACTORY[name](**settings)
        r = bilevel.unroll(loss, init, {"lr": lr}, opt, 5, data=list(range(5)), mode=mode, **kw)
        out = (r.params["w"] ** 2).sum() + r.params["late"] ** 2
        results.append((out.detach(), torch.autograd.grad(out, lr)[0]))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-10, atol=1e-13)
    assert results[0][1].abs() > 0


@pytest.mark.parametrize("name", ["ASGD", "NAdam"])
def test_number_or_tensor_state_scalars_keep_their_kind(name):
    """eta / mu_product are numbers or tensors from init on, as the settings are."""
    params = {"w": torch.ones(2, dtype=torch.float64)}
    grads = {"w": torch.ones(2, dtype=torch.float64)}
    key = "eta" if name == "ASGD" else "mu_product"
    setting = "lr" if name == "ASGD" else "momentum_decay"
    value = HG_BASE[name][setting]
    for hp, is_tensor in (
        ({setting: value}, False),
        ({setting: lambda t: value}, False),
        ({setting: torch.tensor(value, dtype=torch.float64)}, True),
        ({setting: lambda t: torch.tensor(value, dtype=torch.float64)}, True),
    ):
        opt = FACTORY[name]()
        state = opt.init(params, hp)
        for _ in range(2):
            assert isinstance(state[key]["w"], torch.Tensor) == is_tensor
            params, state = opt.step(params, grads, state, hp)
