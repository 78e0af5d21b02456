"""bilevel.optim: torch.optim equivalence, hypergradients vs finite differences, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._pytree import tree_flatten

from bilevel.optim import adagrad, adam, adamw, per_element, rmsprop, sgd

DT = torch.float64
# torch.func's first use scripts helpers and warns about torch.jit.script: not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
T_HG = 6  # inner steps of the differentiable unrolls

# -- a small problem: MLP 5-7-3, squared error ------------------------------------------


class Problem:
    def __init__(self, seed: int = 0, zero_column: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=DT) * scale

        self.params = {
            "w1": r(7, 5, scale=0.5),
            "b1": r(7, scale=0.1),
            "w2": r(3, 7, scale=0.5),
            "b2": r(3, scale=0.1),
        }
        self.x, self.y = r(16, 5), r(16, 3)
        self.xv, self.yv = r(16, 5), r(16, 3)
        if zero_column:
            # An input feature that is always 0 and starts with 0 weights: those gradient
            # entries (and Adam's second moments there) are exactly 0 at every step.
            self.x[:, 0] = 0
            self.params["w1"][:, 0] = 0

    @staticmethod
    def model(p, x):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def loss(self, p):
        return ((self.model(p, self.x) - self.y) ** 2).mean()

    def val_loss(self, p):
        return ((self.model(p, self.xv) - self.yv) ** 2).mean()

    def grads(self, p, create_graph=False):
        if not create_graph:
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
        with torch.enable_grad():
            gs = torch.autograd.grad(self.loss(p), list(p.values()), create_graph=create_graph)
        return dict(zip(p, gs))


PROBLEM = Problem()


def unroll(opt, hparams, problem=PROBLEM, steps=T_HG, create_graph=True):
    params = {k: v.clone().requires_grad_(create_graph) for k, v in problem.params.items()}
    state = opt.init(params, hparams)
    for _ in range(steps):
        grads = problem.grads(params, create_graph=create_graph)
        params, state = opt.step(params, grads, state, hparams)
    return problem.val_loss(params)


# -- 1. step-for-step equivalence with torch.optim ----------------------------------------

TORCH_CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.1}),
    ("sgd", {"lr": 0.1, "maximize": True}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05, "nesterov": True}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("adam", {"lr": 0.01, "amsgrad": True}),
    ("adam", {"lr": 0.01, "maximize": True}),
    ("adam", {"lr": 0.01, "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"lr": 0.01, "maximize": True}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "centered": True}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5}),
    ("rmsprop", {"lr": 0.01, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.01, "maximize": True}),
    ("adagrad", {"lr": 0.1}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.1}),
    ("adagrad", {"lr": 0.1, "weight_decay": 0.1}),
    ("adagrad", {"lr": 0.1, "initial_accumulator_value": 0.5}),
    (
        "adagrad",
        {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "initial_accumulator_value": 0.2},
    ),
    ("adagrad", {"lr": 0.1, "maximize": True}),
]
FACTORIES = {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop, "adagrad": adagrad}
TORCH_CLASSES = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(
    "name,kwargs", TORCH_CASES, ids=[f"{n}-{'-'.join(k)}" for n, k in TORCH_CASES]
)
def test_matches_torch_optim(name, kwargs, foreach):
    problem = Problem(seed=1)
    ref = {k: v.clone().requires_grad_() for k, v in problem.params.items()}
    torch_opt = TORCH_CLASSES[name](list(ref.values()), **kwargs)
    opt = FACTORIES[name](**kwargs, foreach=foreach)
    params = {k: v.clone() for k, v in problem.params.items()}
    state = opt.init(params)
    for step in range(20):
        torch_opt.zero_grad()
        problem.loss(ref).backward()
        torch_opt.step()
        with torch.no_grad():
            params, state = opt.step(params, problem.grads(params), state)
        assert state["step"] == step + 1
        for k in params:
            torch.testing.assert_close(
                params[k], ref[k].detach(), rtol=1e-12, atol=1e-12, msg=f"{k} at step {step}"
            )


# -- 2. every kind of hyperparameter value gives the same numbers --------------------------


def elementwise(v):
    """Per-element values; a 1-D one could also be a schedule, so it says which."""
    return per_element(v) if v.ndim == 1 else v


def kinds_of(value, problem, steps):
    """The same constant hyperparameter written as every supported kind."""
    p = problem.params
    t = torch.tensor(value, dtype=DT)
    return {
        "number": value,
        "tensor": t,
        "per_tensor": {n: t.clone() for n in p},
        "per_tensor_numbers": {n: value for n in p},
        "per_element": {n: elementwise(torch.full_like(v, value)) for n, v in p.items()},
        "schedule": t.repeat(steps),
        "function": lambda step: value,
        "per_tensor_schedule": {n: t.repeat(steps) for n in p},
        "per_element_schedule": {
            n: torch.full((steps, *v.shape), value, dtype=DT) for n, v in p.items()
        },
        "mixed": {n: (value if i % 2 else t) for i, n in enumerate(p)},
    }


KIND_CASES = [
    (sgd, "lr", 0.1, {"momentum": 0.5, "dampening": 0.1, "weight_decay": 0.01}),
    (sgd, "momentum", 0.5, {"lr": 0.1, "nesterov": True}),
    (adam, "betas0", 0.8, {"lr": 0.01, "weight_decay": 0.01}),
    (adam, "eps", 1e-3, {"lr": 0.01, "amsgrad": True}),
    (adamw, "weight_decay", 0.1, {"lr": 0.01}),
    (rmsprop, "alpha", 0.9, {"lr": 0.01, "centered": True, "momentum": 0.5}),
    (adagrad, "initial_accumulator_value", 0.3, {"lr": 0.1, "lr_decay": 0.1}),
]


def _put(hparams_or_settings, setting, value):
    if setting == "betas0":
        hparams_or_settings["betas"] = (value, 0.95)
    elif setting == "betas1":
        hparams_or_settings["betas"] = (0.8, value)
    else:
        hparams_or_settings[setting] = value


@pytest.mark.parametrize("factory,setting,value,others", KIND_CASES, ids=[c[1] for c in KIND_CASES])
def test_every_kind_of_value_gives_the_same_trajectory(factory, setting, value, others):
    steps = 5
    reference = None
    for foreach in (True, False):
        for kind, v in kinds_of(value, PROBLEM, steps).items():
            hparams = {}
            _put(hparams, setting, v)
            with torch.no_grad():
                out = unroll(
                    factory(**others, foreach=foreach), hparams, steps=steps, create_graph=False
                )
            if reference is None:
                reference = out
            torch.testing.assert_close(out, reference, rtol=1e-14, atol=0, msg=f"{kind} {foreach}")


def test_schedules_and_mappings_pick_the_right_values():
    """Varying values: step t of a schedule / the entry of a parameter is what is used."""
    steps = 4  # not 3 or 7: a (T,) value for a bias of that shape would read as per-element
    g = torch.Generator().manual_seed(7)
    p = PROBLEM.params
    table = {n: torch.rand(steps, generator=g, dtype=DT) * 0.1 for n in p}  # lr per (step, tensor)
    elem = {n: torch.rand(v.shape, generator=g, dtype=DT) * 0.1 for n, v in p.items()}
    cases = {
        "schedule": (lambda t, n: table["w1"][t], table["w1"]),
        "function": (lambda t, n: table["w1"][t], lambda t: table["w1"][t]),
        "per_tensor": (lambda t, n: table[n][0], {n: table[n][0] for n in p}),
        "per_tensor_numbers": (lambda t, n: table[n][0].item(), {n: table[n][0].item() for n in p}),
        "per_tensor_schedule": (lambda t, n: table[n][t], table),
        "per_element": (lambda t, n: elem[n], {n: elementwise(v) for n, v in elem.items()}),
        "per_element_schedule": (
            lambda t, n: elem[n] * (t + 1),
            {n: torch.stack([elem[n] * (t + 1) for t in range(steps)]) for n in p},
        ),
        "mapping_of_functions": (
            lambda t, n: table[n][t],
            {n: (lambda t, n=n: table[n][t]) for n in p},
        ),
    }
    for kind, (expected_lr, value) in cases.items():
        for foreach in (True, False):
            opt = sgd(lr=value, foreach=foreach)
            params = dict(p)
            state = opt.init(params)
            manual = dict(p)
            for t in range(steps):
                params, state = opt.step(params, PROBLEM.grads(params), state)
                grads = PROBLEM.grads(manual)
                manual = {n: manual[n] - expected_lr(t, n) * grads[n] for n in manual}
                for n in p:
                    torch.testing.assert_close(
                        params[n], manual[n], rtol=1e-14, atol=1e-15, msg=kind
                    )


def test_adam_schedule_equals_changing_hparams_between_steps():
    betas1 = torch.tensor([0.5, 0.7, 0.9, 0.8], dtype=DT)
    lrs = torch.tensor([0.01, 0.02, 0.015, 0.03], dtype=DT)
    a = adam(lr=lrs, betas=(betas1, 0.99))
    b = adam()
    pa, sa = dict(PROBLEM.params), a.init(PROBLEM.params)
    pb, sb = dict(PROBLEM.params), b.init(PROBLEM.params)
    for t in range(4):
        pa, sa = a.step(pa, PROBLEM.grads(pa), sa)
        pb, sb = b.step(
            pb, PROBLEM.grads(pb), sb, {"lr": lrs[t].item(), "betas": (betas1[t].item(), 0.99)}
        )
        for n in pa:
            torch.testing.assert_close(pa[n], pb[n], rtol=1e-14, atol=1e-15)


# -- 3. hypergradients vs central finite differences ----------------------------------------

BASE = {
    "sgd": (sgd, {"lr": 0.1, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.01}),
    "sgd_nesterov": (sgd, {"lr": 0.1, "momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    "adam": (adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.01}),
    "adam_amsgrad": (adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-8, "amsgrad": True}),
    "adamw": (adamw, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}),
    "rmsprop": (
        rmsprop,
        {
            "lr": 0.01,
            "alpha": 0.9,
            "eps": 1e-8,
            "momentum": 0.5,
            "weight_decay": 0.01,
            "centered": True,
        },
    ),
    "rmsprop_plain": (rmsprop, {"lr": 0.01, "alpha": 0.9}),
    "adagrad": (
        adagrad,
        {
            "lr": 0.1,
            "lr_decay": 0.1,
            "weight_decay": 0.01,
            "initial_accumulator_value": 0.1,
            "eps": 1e-10,
        },
    ),
}
# Per-setting value of the hyperparameter under test (eps large enough for its derivative
# to be measurable by finite differences).
TEST_VALUE = {"eps": 0.05, "initial_accumulator_value": 0.2}

ALL_KINDS = ["scalar", "per_tensor", "per_element", "schedule", "function"]
HG_CASES = (
    [("sgd", "lr", k) for k in ALL_KINDS + ["per_tensor_schedule", "per_element_schedule"]]
    + [
        ("sgd", s, k)
        for s in ("momentum", "dampening", "weight_decay")
        for k in ("scalar", "per_element", "schedule")
    ]
    + [("sgd_nesterov", s, k) for s in ("lr", "momentum") for k in ("scalar", "per_tensor")]
    + [("adam", "lr", k) for k in ALL_KINDS]
    + [
        ("adam", s, k)
        for s in ("betas0", "betas1", "eps", "weight_decay")
        for k in ("scalar", "per_tensor", "schedule")
    ]
    + [("adam_amsgrad", s, k) for s in ("lr", "betas1") for k in ("scalar", "per_element")]
    + [
        ("adamw", s, k)
        for s in ("lr", "betas0", "weight_decay")
        for k in ("scalar", "per_element", "function")
    ]
    + [("rmsprop", "lr", k) for k in ALL_KINDS]
    + [
        ("rmsprop", s, k)
        for s in ("alpha", "eps", "momentum", "weight_decay")
        for k in ("scalar", "per_tensor", "schedule")
    ]
    + [("rmsprop_plain", s, k) for s in ("lr", "alpha") for k in ("scalar", "per_element")]
    + [("adagrad", "lr", k) for k in ALL_KINDS]
    + [
        ("adagrad", s, k)
        for s in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps")
        for k in ("scalar", "per_element", "function")
    ]
)


def _base_value(config, setting):
    if setting in TEST_VALUE:
        return TEST_VALUE[setting]
    if setting.startswith("betas"):
        return config["betas"][int(setting[-1])]
    return config[setting]


def _theta(kind, base, problem, steps, seed, spread=0.1):
    """A leaf tensor of hyperparameters around ``base`` and the value built from it."""
    g = torch.Generator().manual_seed(seed)
    p = problem.params
    shape = {
        "scalar": (),
        "function": (),
        "per_tensor": (len(p),),
        "per_element": (sum(v.numel() for v in p.values()),),
        "schedule": (steps,),
        "per_tensor_schedule": (steps, len(p)),
        "per_element_schedule": (steps, sum(v.numel() for v in p.values())),
    }[kind]
    noise = (torch.rand(shape, generator=g, dtype=DT) * 2 - 1) * spread
    return (base * (1 + noise)).requires_grad_()


def _build(kind, theta, problem):
    p = problem.params
    names = list(p)
    if kind in ("scalar", "schedule"):
        return theta
    if kind == "function":
        return lambda step: theta * 0.9**step
    if kind == "per_tensor":
        return {n: theta[i] for i, n in enumerate(names)}
    if kind == "per_tensor_schedule":
        return {n: theta[:, i] for i, n in enumerate(names)}
    out, offset = {}, 0
    for n, v in p.items():
        k = v.numel()
        if kind == "per_element":
            out[n] = elementwise(theta[offset : offset + k].view(v.shape))
        else:  # per_element_schedule
            out[n] = theta[:, offset : offset + k].reshape(theta.shape[0], *v.shape)
        offset += k
    return out


def hypergrad_vs_fd(
    make_opt, setting, kind, base, problem=PROBLEM, steps=T_HG, fd_rel=1e-6, seed=0
):
    # betas must stay below 1
    theta = _theta(kind, base, problem, steps, seed, 0.02 if setting.startswith("betas") else 0.1)

    def outer(th, create_graph):
        hparams = {}
        _put(hparams, setting, _build(kind, th, problem))
        return unroll(make_opt(), hparams, problem, steps, create_graph=create_graph)

    (analytic,) = torch.autograd.grad(outer(theta, True), theta)
    assert torch.isfinite(analytic).all()
    direction = torch.randn(
        theta.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT
    )
    h = 1e-6 * abs(base)
    with torch.no_grad():
        th = theta.detach()
        fd = (outer(th + h * direction, False) - outer(th - h * direction, False)) / (2 * h)
    an = (analytic * direction).sum()
    rel = (fd - an).abs() / an.abs().clamp_min(1e-12)
    assert rel < fd_rel, (
        f"{setting} ({kind}): autograd {an.item():.10e} vs FD {fd.item():.10e}, rel {rel.item():.2e}"
    )
    return an


@pytest.mark.parametrize("config,setting,kind", HG_CASES, ids=["-".join(c) for c in HG_CASES])
def test_hypergradient_matches_finite_differences(config, setting, kind):
    factory, settings = BASE[config]
    target = "betas" if setting.startswith("betas") else setting
    others = {k: v for k, v in settings.items() if k != target}
    base = _base_value(settings, setting)
    hypergrad_vs_fd(lambda: factory(**others), setting, kind, base)


@pytest.mark.parametrize(
    "config", ["adam", "adam_amsgrad", "adamw", "rmsprop", "rmsprop_plain", "adagrad"]
)
def test_hypergradient_finite_where_gradients_are_exactly_zero(config):
    """sqrt(v) at v == 0 must not turn hypergradients into NaN (torch's values are finite)."""
    problem = Problem(seed=3, zero_column=True)
    factory, settings = BASE[config]
    settings = {**settings, "initial_accumulator_value": 0.0} if config == "adagrad" else settings
    # The zero column is there: its gradient entries are exactly 0 at the start.
    assert (problem.grads(problem.params)["w1"][:, 0] == 0).all()
    for setting in ("lr", "eps"):
        others = {k: v for k, v in settings.items() if k != setting}
        base = TEST_VALUE.get(setting, settings.get(setting, 1e-8))
        hypergrad_vs_fd(lambda o=others: factory(**o), setting, "scalar", base, problem)
    # A plain reverse pass through the default eps also stays finite.
    lr = torch.tensor(settings["lr"], dtype=DT, requires_grad=True)
    out = unroll(factory(**{k: v for k, v in settings.items() if k != "lr"}), {"lr": lr}, problem)
    (g,) = torch.autograd.grad(out, lr)
    assert torch.isfinite(g)


@pytest.mark.parametrize("config", list(BASE))
def test_foreach_and_loop_give_the_same_hypergradients(config):
    factory, settings = BASE[config]
    flags = {k: v for k, v in settings.items() if isinstance(v, bool)}
    results = []
    for foreach in (True, False):
        leaves = {}
        hparams = {}
        for k, v in settings.items():
            if isinstance(v, bool):
                continue
            if k == "betas":
                leaves[k] = [torch.tensor(b, dtype=DT, requires_grad=True) for b in v]
                hparams[k] = tuple(leaves[k])
            else:
                leaves[k] = [torch.tensor(v, dtype=DT, requires_grad=True)]
                # per-element for lr: exercises the list paths of the kernels
                hparams[k] = (
                    {
                        n: elementwise(leaves[k][0] * torch.ones_like(p))
                        for n, p in PROBLEM.params.items()
                    }
                    if k == "lr"
                    else leaves[k][0]
                )
        out = unroll(factory(**flags, foreach=foreach), hparams)
        flat = [x for xs in leaves.values() for x in xs]
        results.append(torch.autograd.grad(out, flat))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_hypergradient_from_constructor_tensor_and_hparams_agree():
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    b1 = torch.tensor(0.8, dtype=DT, requires_grad=True)
    out1 = unroll(adam(lr=lr, betas=(b1, 0.95)), {})
    g1 = torch.autograd.grad(out1, (lr, b1))
    out2 = unroll(adam(), {"lr": lr, "betas": (b1, 0.95)})
    g2 = torch.autograd.grad(out2, (lr, b1))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_non_leaf_hyperparameters_chain_to_leaves():
    log_lr = torch.tensor(math.log(0.1), dtype=DT, requires_grad=True)
    out = unroll(sgd(momentum=0.5), {"lr": log_lr.exp()})
    (g,) = torch.autograd.grad(out, log_lr)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    (g_lr,) = torch.autograd.grad(unroll(sgd(momentum=0.5), {"lr": lr}), lr)
    torch.testing.assert_close(g, g_lr * 0.1, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_forward_mode_jvp_equals_reverse(name):
    """torch.func.jvp through the unroll (forward-over-reverse) equals back-propagation."""
    factory, settings = BASE[name if name != "sgd" else "sgd_nesterov"]
    others = {k: v for k, v in settings.items() if k != "lr"}
    problem = Problem(seed=5, zero_column=True)
    lr0 = torch.tensor(settings["lr"], dtype=DT)

    def f(lr):
        params = {k: v.clone() for k, v in problem.params.items()}
        opt = factory(**others)
        state = opt.init(params)
        for _ in range(T_HG):
            grads = torch.func.grad(problem.loss)(params)
            params, state = opt.step(params, grads, state, {"lr": lr})
        return problem.val_loss(params)

    _, tangent = torch.func.jvp(f, (lr0,), (torch.ones((), dtype=DT),))
    lr = lr0.clone().requires_grad_()
    (rev,) = torch.autograd.grad(unroll(factory(**others), {"lr": lr}, problem), lr)
    torch.testing.assert_close(tangent, rev, rtol=1e-10, atol=0)


# -- 4. transforms, structure, purity ------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_step_under_vmap_matches_per_sample_steps(name):
    factory, settings = BASE[name]
    opt = factory(**settings)
    batch = 3
    ps = [Problem(seed=10 + i) for i in range(batch)]
    stacked = {k: torch.stack([p.params[k] for p in ps]) for k in PROBLEM.params}
    grads = {k: torch.stack([p.grads(p.params)[k] for p in ps]) for k in PROBLEM.params}

    def two_steps(params, grads):
        state = opt.init(params)
        params, state = opt.step(params, grads, state)
        return opt.step(params, grads, state)[0]

    batched = torch.func.vmap(two_steps)(stacked, grads)
    for i, p in enumerate(ps):
        single = two_steps(p.params, p.grads(p.params))
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("config", list(BASE))
def test_state_structure_is_fixed_and_steps_are_pure(config):
    factory, settings = BASE[config]
    opt = factory(**settings)
    params = {k: v.clone().requires_grad_() for k, v in PROBLEM.params.items()}
    hparams = {}
    state = opt.init(params, hparams)
    spec0 = tree_flatten(state)[1]
    for _ in range(3):
        grads = PROBLEM.grads(params, create_graph=True)
        leaves = [x for x in tree_flatten((params, grads, state))[0] if isinstance(x, torch.Tensor)]
        before = [(x.clone(), x._version) for x in leaves]
        step_before = state["step"]
        new_params, new_state = opt.step(params, grads, state, hparams)
        for x, (copy, version) in zip(leaves, before):
            assert x._version == version
            assert torch.equal(x, copy)
        assert state["step"] == step_before
        assert isinstance(new_state["step"], int)
        assert tree_flatten(new_state)[1] == spec0
        params, state = new_params, new_state


def test_python_zero_means_no_buffer_but_a_tensor_zero_keeps_it():
    params = {"w": torch.ones(3, dtype=DT)}
    assert sgd(momentum=0).init(params)["momentum_buffer"] is None
    assert (
        sgd().init(params, {"momentum": torch.tensor(0.0, dtype=DT)})["momentum_buffer"] is not None
    )
    assert rmsprop().init(params)["momentum_buffer"] is None
    assert rmsprop().init(params)["grad_avg"] is None
    assert adam().init(params)["max_exp_avg_sq"] is None
    # A tensor momentum of 0 gives the same numbers as no momentum.
    g = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=DT)}
    a, sa = params, sgd(lr=0.1).init(params)
    b, sb = params, sgd(lr=0.1).init(params, {"momentum": torch.tensor(0.0, dtype=DT)})
    for _ in range(3):
        a, sa = sgd(lr=0.1).step(a, g, sa)
        b, sb = sgd(lr=0.1).step(b, g, sb, {"momentum": torch.tensor(0.0, dtype=DT)})
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)


def test_buffer_created_at_first_step_when_init_did_not_see_hparams():
    params = {"w": torch.ones(2, dtype=DT)}
    opt = sgd(lr=0.1)
    hparams = {"momentum": 0.9}
    state = opt.init(params)  # momentum unknown here
    assert state["momentum_buffer"] is None
    g = {"w": torch.ones(2, dtype=DT)}
    params, state = opt.step(params, g, state, hparams)
    params, state = opt.step(params, g, state, hparams)
    torch.testing.assert_close(params["w"], torch.full((2,), 1 - 0.1 - 0.1 * 1.9, dtype=DT))
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.step(params, g, {"step": 1, "momentum_buffer": None}, hparams)


def test_replace_and_settings():
    opt = adam(lr=0.1, amsgrad=True, foreach=False)
    new = opt.replace(lr=torch.tensor(0.2, dtype=DT))
    assert isinstance(new.settings["lr"], torch.Tensor) and opt.settings["lr"] == 0.1
    assert new.settings["amsgrad"] is True and new.foreach is False
    assert "lr=0.1" in repr(opt)


# -- 5. validation --------------------------------------------------------------------------


def _validate(opt, hparams=None, steps=5, params=None):
    opt.validate(params or PROBLEM.params, hparams or {}, steps)


def test_error_schedule_shorter_than_steps():
    with pytest.raises(ValueError, match="'lr'.*length 3.*5 steps"):
        _validate(sgd(), {"lr": torch.ones(3, dtype=DT)})
    with pytest.raises(ValueError, match=r"'momentum'\['w1'\].*length 3"):
        _validate(sgd(), {"momentum": {n: torch.ones(3, dtype=DT) for n in PROBLEM.params}})
    with pytest.raises(ValueError, match=r"'betas\[1\]'.*length 2"):
        _validate(adam(betas=(0.9, torch.ones(2, dtype=DT))))
    with pytest.raises(ValueError, match="'lr'.*function of the step.*IndexError"):
        sched = torch.ones(3, dtype=DT)
        _validate(rmsprop(lr=lambda t: sched[t]))
    # Without validate, running past the schedule names the setting too.
    opt = sgd(lr=torch.full((1,), 0.1, dtype=DT))
    params = PROBLEM.params
    state = opt.init(params)
    params, state = opt.step(params, PROBLEM.grads(params), state)
    with pytest.raises(ValueError, match="'lr' is a schedule of length 1 but step 1"):
        opt.step(params, PROBLEM.grads(params), state)


def test_error_dtype_and_device():
    with pytest.raises(ValueError, match="'lr' has dtype torch.float32.*torch.float64"):
        _validate(sgd(lr=torch.tensor(0.1)))
    with pytest.raises(ValueError, match=r"'eps'\['b2'\] has dtype torch.float32"):
        _validate(
            adam(),
            {
                "eps": {
                    n: torch.tensor(1e-8, dtype=DT if n != "b2" else torch.float32)
                    for n in PROBLEM.params
                }
            },
        )
    with pytest.raises(ValueError, match="'weight_decay' is on meta"):
        _validate(adagrad(weight_decay=torch.tensor(0.1, dtype=DT, device="meta")))
    # The first step validates too.
    with pytest.raises(ValueError, match="'alpha' has dtype"):
        opt = rmsprop(alpha=torch.tensor(0.9))
        opt.step(PROBLEM.params, PROBLEM.grads(PROBLEM.params), opt.init(PROBLEM.params))


def test_error_mapping_keys():
    partial = {"w1": 0.1, "b1": 0.1, "w2": 0.1}
    with pytest.raises(
        ValueError, match=r"'lr' is given per parameter tensor but misses parameter\(s\) \['b2'\]"
    ):
        _validate(sgd(), {"lr": partial})
    with pytest.raises(ValueError, match=r"'lr'.*misses.*'b2'"):
        opt = adam(lr=partial)
        opt.step(PROBLEM.params, PROBLEM.grads(PROBLEM.params), opt.init(PROBLEM.params))
    with pytest.raises(ValueError, match=r"'momentum'.*unknown parameter\(s\) \['w3'\]"):
        _validate(sgd(momentum={**partial, "b2": 0.1, "w3": 0.1}))
    with pytest.raises(ValueError, match=r"'lr'\['w1'\] has shape \(2, 2\)"):
        _validate(sgd(lr={**partial, "b2": 0.1, "w1": torch.ones(2, 2, dtype=DT)}))
    with pytest.raises(ValueError, match="'lr' has shape"):
        _validate(sgd(lr=torch.ones(7, 5, dtype=DT)))


def test_error_unknown_setting_and_bad_values():
    with pytest.raises(TypeError, match="lrr"):
        sgd(lrr=0.1)
    with pytest.raises(TypeError, match="'lrr'"):
        adam().replace(lrr=0.1)
    with pytest.raises(ValueError, match="'lr' = -0.1"):
        _validate(sgd(lr=-0.1))
    with pytest.raises(ValueError, match=r"'betas\[0\]' = 1.0 is outside"):
        _validate(adam(betas=(1.0, 0.999)))
    with pytest.raises(TypeError, match="'betas' must be a pair"):
        _validate(adam(betas=0.9))
    with pytest.raises(TypeError, match="'nesterov' must be a Python bool"):
        _validate(sgd(momentum=0.9), {"nesterov": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        _validate(sgd(nesterov=True))
    with pytest.raises(TypeError, match="'eps' is a str"):
        _validate(adagrad(eps="small"))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        _validate(sgd(), steps=0)
    with pytest.raises(TypeError, match=r"params\['w'\] has dtype torch.int64"):
        _validate(sgd(), params={"w": torch.ones(2, dtype=torch.long)})
    with pytest.raises(TypeError, match="foreach"):
        sgd(foreach="yes")


def test_error_params_grads_key_mismatch():
    opt = sgd(lr=0.1)
    params = {"a": torch.ones(2, dtype=DT), "b": torch.ones(2, dtype=DT)}
    with pytest.raises(ValueError, match=r"same keys.*\['a', 'b'\].*\['a', 'c'\]"):
        opt.step(
            params, {"a": torch.ones(2, dtype=DT), "c": torch.ones(2, dtype=DT)}, opt.init(params)
        )
    with pytest.raises(ValueError, match="no 'exp_avg' buffer for parameter 'b'"):
        adam().step(
            params,
            params,
            {
                "step": 1,
                **{k: {"a": params["a"]} for k in ("exp_avg", "exp_avg_sq")},
                "max_exp_avg_sq": None,
            },
        )
