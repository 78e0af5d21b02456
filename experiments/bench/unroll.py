"""Bench problems ``unroll`` and ``memory``: the learning-rate hypergradient of an MLP on digits.

The inner problem: an MLP 64-128-10 (tanh) on scikit-learn's digits (standardized), trained
for T steps of SGD with momentum 0.9 or of Adam on minibatches of 256 (a fixed cycle of
``N_BATCHES`` shuffled minibatches, the same tensors for every implementation). The outer
loss is the cross-entropy on 297 held-out digits; the hypergradient is its derivative with
respect to the (scalar, tensor) learning rate.

``unroll`` times bilevel's ``reverse`` mode against a hand-written PyTorch loop (the compute
floor: ``torch.autograd.grad(create_graph=True)`` and the update written inline), higher, and
TorchOpt (its functional API and its MetaSGD/MetaAdam). ``memory`` compares bilevel's modes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel

from . import core
from .core import Impl, peer
from .report import STANDARD_COLUMNS, Report, dtype_name, log, rtol_for, standard_cells
from .settings import Settings

N_BATCHES = 20
BATCH = 256
N_VAL = 297
LR = {"sgd": 0.02, "adam": 3e-3}
MOMENTUM = 0.9
BETAS = (0.9, 0.999)
EPS = 1e-8
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


@dataclass
class Setup:
    """One configuration's inputs, shared by every implementation."""

    opt: str
    steps: int
    params: dict[str, Tensor]
    batches: list[tuple[Tensor, Tensor]]
    val: tuple[Tensor, Tensor]
    lr: Tensor  # the hyperparameter: a leaf that requires grad

    @property
    def dtype(self) -> torch.dtype:
        return self.lr.dtype


def digits_data(dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Any]:
    """Standardized digits: ``N_BATCHES`` training minibatches, a validation set, the init."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=g)
    val_idx, train_idx = perm[:N_VAL], perm[N_VAL:]
    mean, std = X[train_idx].mean(0), X[train_idx].std(0)
    # constant pixels (always 0) stay 0 rather than dividing by a zero deviation
    X = (X - mean) / torch.where(std > 0, std, torch.ones_like(std))
    batches: list[tuple[Tensor, Tensor]] = []
    n_train = len(train_idx)
    while len(batches) < N_BATCHES:
        order = train_idx[torch.randperm(n_train, generator=g)]
        for i in range(n_train // BATCH):
            if len(batches) < N_BATCHES:
                idx = order[i * BATCH : (i + 1) * BATCH]
                batches.append((X[idx], y[idx]))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    return {
        "batches": [(x.to(device, dtype), t.to(device)) for x, t in batches],
        "val": (X[val_idx].to(device, dtype), y[val_idx].to(device)),
        "params": {k: v.detach().to(device, dtype) for k, v in model.named_parameters()},
    }


def make_setup(data: dict[str, Any], opt: str, steps: int) -> Setup:
    batches = data["batches"]
    ref = data["val"][0]
    lr = torch.tensor(LR[opt], dtype=ref.dtype, device=ref.device, requires_grad=True)
    return Setup(
        opt=opt,
        steps=steps,
        params=data["params"],
        batches=[batches[t % len(batches)] for t in range(steps)],
        val=data["val"],
        lr=lr,
    )


def mlp(ps: Sequence[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = ps
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def inner_loss(params: dict[str, Tensor], hparams: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(mlp([params[k] for k in NAMES], x), y)


def outer_loss(params: Any, setup: Setup) -> Tensor:
    ps = [params[k] for k in NAMES] if isinstance(params, dict) else list(params)
    return F.cross_entropy(mlp(ps, setup.val[0]), setup.val[1])


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def bilevel_optimizer(opt: str) -> bilevel.optim.Optimizer:
    """The inner optimizer; the learning rate is read from ``hparams["lr"]``."""
    if opt == "sgd":
        return bilevel.optim.sgd(momentum=MOMENTUM)
    return bilevel.optim.adam(betas=BETAS, eps=EPS)


# --------------------------------------------------------------------------- implementations


def bilevel_impl(setup: Setup, mode: str = "reverse", **kwargs: Any) -> Callable[[], Tensor]:
    opt = bilevel_optimizer(setup.opt)
    hparams = {"lr": setup.lr}

    def run() -> Tensor:
        result = bilevel.unroll(
            inner_loss,
            setup.params,
            hparams,
            opt,
            setup.steps,
            data=setup.batches,
            mode=mode,
            check_finite=False,
            **kwargs,
        )
        return torch.autograd.grad(outer_loss(result.params, setup), setup.lr)[0]

    return run


def plain_impl(setup: Setup) -> Callable[[], Tensor]:
    """The floor: the loop a careful user writes by hand, the update inline."""
    lr, steps, batches = setup.lr, setup.steps, setup.batches
    tiny = _tiny(setup.dtype)
    b1, b2 = BETAS

    def run_sgd() -> Tensor:
        ps = [setup.params[k].detach().requires_grad_() for k in NAMES]
        bufs: list[Tensor] = []
        for t in range(steps):
            x, y = batches[t]
            loss = F.cross_entropy(mlp(ps, x), y)
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            bufs = (
                list(gs) if t == 0 else [torch.add(g, b, alpha=MOMENTUM) for b, g in zip(bufs, gs)]
            )
            ps = [p - lr * b for p, b in zip(ps, bufs)]
        return torch.autograd.grad(outer_loss(ps, setup), lr)[0]

    def run_adam() -> Tensor:
        ps = [setup.params[k].detach().requires_grad_() for k in NAMES]
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        for t in range(steps):
            x, y = batches[t]
            loss = F.cross_entropy(mlp(ps, x), y)
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            k = t + 1
            step = lr / (1 - b1**k)
            bc2 = math.sqrt(1 - b2**k)
            ms = [torch.lerp(m, g, 1 - b1) for m, g in zip(ms, gs)]
            vs = [torch.addcmul(v * b2, g, g, value=1 - b2) for v, g in zip(vs, gs)]
            # sqrt has an infinite slope at 0 (pixels that are always 0): clamp far below eps
            ps = [
                p - step * (m / (v.clamp_min(tiny).sqrt() / bc2 + EPS))
                for p, m, v in zip(ps, ms, vs)
            ]
        return torch.autograd.grad(outer_loss(ps, setup), lr)[0]

    return run_sgd if setup.opt == "sgd" else run_adam


def _module(setup: Setup) -> nn.Module:
    ref = setup.val[0]
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(
        ref.device, ref.dtype
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(setup.params[name])
    return model


def higher_impl(setup: Setup) -> Callable[[], Tensor]:
    import higher

    model = _module(setup)
    if setup.opt == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=LR["sgd"], momentum=MOMENTUM
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=LR["adam"], betas=BETAS, eps=EPS)
    lr, steps, batches = setup.lr, setup.steps, setup.batches
    # higher's Adam adds eps to sqrt(v) before the bias correction, torch.optim after it:
    # a per-step eps of EPS * sqrt(1 - beta2^k) gives torch.optim's update exactly
    eps = [EPS * math.sqrt(1 - BETAS[1] ** (t + 1)) for t in range(steps)]

    def run() -> Tensor:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, override={"lr": [lr]}) as (
            fmodel,
            diffopt,
        ):
            for t in range(steps):
                x, y = batches[t]
                loss = F.cross_entropy(fmodel(x), y)
                if setup.opt == "sgd":
                    diffopt.step(loss)
                else:
                    diffopt.step(loss, override={"eps": [eps[t]]})
            outer = F.cross_entropy(fmodel(setup.val[0]), setup.val[1])
            return torch.autograd.grad(outer, lr)[0]

    return run


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """TorchOpt computes Adam's bias corrections ``1 - beta ** count`` from an int64 count
    tensor, in torch's default dtype: float32 even for float64 parameters (a relative
    error of 5e-5 in the first steps). Running it under the parameters' dtype as the
    default gives torch.optim's update."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def torchopt_impl(setup: Setup) -> Callable[[], Tensor]:
    """TorchOpt's functional API: ``update(..., inplace=False)`` and ``apply_updates``."""
    import torchopt

    lr, steps, batches = setup.lr, setup.steps, setup.batches
    if setup.opt == "sgd":
        # a tensor learning rate is what makes TorchOpt's update differentiable w.r.t. it
        opt: Any = torchopt.sgd(lr=lr, momentum=MOMENTUM)  # type: ignore[arg-type]
    else:
        # eps_root keeps sqrt differentiable where the second moment is exactly 0 (constant
        # pixels); it is far below any value that changes the update
        opt = torchopt.adam(lr=lr, betas=BETAS, eps=EPS, eps_root=_tiny(setup.dtype))  # type: ignore[arg-type]

    def run() -> Tensor:
        with default_dtype(setup.dtype):
            return _run()

    def _run() -> Tensor:
        ps = tuple(setup.params[k].detach().requires_grad_() for k in NAMES)
        state = opt.init(ps)
        for t in range(steps):
            x, y = batches[t]
            loss = F.cross_entropy(mlp(ps, x), y)
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            updates, state = opt.update(gs, state, params=ps, inplace=False)
            ps = torchopt.apply_updates(ps, updates, inplace=False)
        return torch.autograd.grad(outer_loss(ps, setup), lr)[0]

    return run


def torchopt_meta_impl(setup: Setup) -> Callable[[], Tensor]:
    """TorchOpt's MetaSGD / MetaAdam on an ``nn.Module`` (restored before each run)."""
    import torchopt

    model = _module(setup)
    lr, steps, batches = setup.lr, setup.steps, setup.batches
    if setup.opt == "sgd":
        meta: Any = torchopt.MetaSGD(model, lr=lr, momentum=MOMENTUM)  # type: ignore[arg-type]
    else:
        meta = torchopt.MetaAdam(model, lr=lr, betas=BETAS, eps=EPS, eps_root=_tiny(setup.dtype))  # type: ignore[arg-type]
    net_state = torchopt.extract_state_dict(model)
    opt_state = torchopt.extract_state_dict(meta)

    def run() -> Tensor:
        with default_dtype(setup.dtype):
            return _run()

    def _run() -> Tensor:
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(meta, opt_state)
        for t in range(steps):
            x, y = batches[t]
            meta.step(F.cross_entropy(model(x), y))
        outer = F.cross_entropy(model(setup.val[0]), setup.val[1])
        return torch.autograd.grad(outer, lr)[0]

    return run


SUBJECT = "bilevel reverse"
FLOOR = "plain PyTorch"


def unroll_impls(setup: Setup) -> list[Impl]:
    """bilevel, the floor and the peers for one configuration (missing peers are skipped)."""
    impls = [Impl(SUBJECT, bilevel_impl(setup)), Impl(FLOOR, plain_impl(setup))]
    h = peer("higher")
    if h.available:
        impls.append(Impl("higher", higher_impl(setup)))
    t = peer("torchopt")
    if t.available:
        impls.append(Impl("torchopt functional", torchopt_impl(setup)))
        impls.append(
            Impl(
                f"torchopt Meta{'SGD' if setup.opt == 'sgd' else 'Adam'}", torchopt_meta_impl(setup)
            )
        )
    return impls


# --------------------------------------------------------------------------- memory problem

MEMORY_MODES = ("reverse", "checkpoint", "forward", "truncated")
TRUNCATE = 5


def mode_kwargs(mode: str, steps: int) -> dict[str, Any]:
    if mode == "truncated":
        return {"truncate": min(TRUNCATE, steps)}
    return {}


def memory_impls(setup: Setup, modes: tuple[str, ...] = MEMORY_MODES) -> list[Impl]:
    return [
        Impl(
            f"bilevel {m}",
            bilevel_impl(setup, m, **mode_kwargs(m, setup.steps)),
            check=m != "truncated",
            note=f"K={min(TRUNCATE, setup.steps)}, biased" if m == "truncated" else "",
        )
        for m in modes
    ]


def run_unroll(s: Settings, report: Report) -> None:
    unroll_targets = {50, 200}
    table = []
    for dtype in s.dtypes_for(["float32", "float64"]):
        data = digits_data(dtype, s.device, s.seed)
        for opt in ("sgd", "adam"):
            for steps in s.steps:
                log(s, f"[unroll] {opt} {dtype_name(dtype)} T={steps}")
                setup = make_setup(data, opt, steps)
                results = s.measure(unroll_impls(setup), FLOOR, rtol_for(dtype))
                targets = None
                if steps in unroll_targets:
                    targets = {FLOOR: (1.10, "bilevel <= 1.10x plain")}
                    for name in results:
                        if name.startswith(("higher", "torchopt")):
                            targets[name] = (1.0, f"bilevel <= 1.0x {name}")
                config = {"opt": opt, "dtype": dtype_name(dtype), "T": steps}
                for row in report.add_rows("unroll", config, results, SUBJECT, targets):
                    table.append(
                        {
                            "opt": opt,
                            "dtype": dtype_name(dtype),
                            "T": str(steps),
                            **standard_cells(row),
                        }
                    )
    cols = ["opt", "dtype", "T", *STANDARD_COLUMNS]
    report.tables.append(
        core.format_table(
            table,
            cols,
            "== unroll: learning-rate hypergradient, MLP 64-128-10 on digits, batches of 256 "
            "(rel.err vs plain PyTorch; bilevel/impl = time ratio, < 1 means bilevel is faster) ==",
        )
    )
