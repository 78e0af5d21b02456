"""Forward mode works wherever reverse mode works (float64, to 1e-10).

A table of common losses and layers, some of which have no or a broken forward-mode formula
in torch (``huber_loss``; ``mse_loss``'s raises "ZeroTensors are immutable"): the
hypergradient of ``bilevel.unroll(mode="forward")`` (both the loop and the vmap path) and of
``bilevel.argmin(hvp="forward")`` must equal reverse mode's. Where forward mode falls back to
reverse-mode Jacobian-vector products, it says so once with a ForwardModeFallbackWarning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel
from bilevel.forward_ad import ForwardModeFallbackWarning, is_forward_ad_gap

DT = torch.float64
N = 12


@dataclass
class Case:
    """An inner problem: ``loss(params, batch, buffers)``, initial params, a batch, buffers."""

    loss: Callable[..., torch.Tensor]
    params: dict[str, torch.Tensor]
    batch: Any
    buffers: dict[str, torch.Tensor] | None = None


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def _linear_case(head: Callable[[torch.Tensor, Any], torch.Tensor], target: Any, k: int) -> Case:
    g = _gen()
    x = _randn(N, 4, g=g)
    params = {"w": 0.3 * _randn(4, k, g=g), "b": 0.1 * _randn(k, g=g)}
    return Case(lambda p, batch, _: head(batch[0] @ p["w"] + p["b"], batch[1]), params, (x, target))


def _module_case(model: nn.Module, inputs: Any, out_loss: Callable[[Any], torch.Tensor]) -> Case:
    model = model.to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()} or None

    def loss(p: dict, batch: Any, buffers: dict | None) -> torch.Tensor:
        tensors = {**p, **(buffers or {})}
        return out_loss(functional_call(model, tensors, batch))

    return Case(loss, params, inputs, buffers)


def make_case(name: str) -> Case:
    g = _gen(1)
    y_reg = _randn(N, 1, g=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    if name == "mse":
        return _linear_case(F.mse_loss, y_reg, 1)
    if name == "l1":
        return _linear_case(F.l1_loss, y_reg, 1)
    if name == "smooth_l1":
        return _linear_case(lambda a, b: F.smooth_l1_loss(a, b, beta=0.5), y_reg, 1)
    if name == "huber":
        return _linear_case(lambda a, b: F.huber_loss(a, b, delta=0.5), y_reg, 1)
    if name == "cross_entropy":
        return _linear_case(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), labels, 3)
    if name == "nll":
        return _linear_case(lambda a, b: F.nll_loss(F.log_softmax(a, 1), b), labels, 3)
    if name == "bce_with_logits":
        t = (y_reg > 0).to(DT)
        return _linear_case(F.binary_cross_entropy_with_logits, t, 1)
    if name == "kl_div":
        target = torch.softmax(_randn(N, 3, g=g), 1)
        return _linear_case(
            lambda a, b: F.kl_div(F.log_softmax(a, 1), b, reduction="batchmean"), target, 3
        )
    torch.manual_seed(0)  # the modules' default initialization
    if name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 1))
        x = _randn(N, 2, 8, g=g)
        return _module_case(model, (x,), lambda out: F.mse_loss(out, y_reg))
    if name == "conv2d":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 9, 1))
        x = _randn(N, 1, 5, 5, g=g)
        return _module_case(model, (x,), lambda out: F.mse_loss(out, y_reg))
    if name == "layer_norm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
        return _module_case(model, (_randn(N, 4, g=g),), lambda out: F.cross_entropy(out, labels))
    if name == "batch_norm":  # train mode: statistics from the batch, running buffers updated
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        model.train()
        return _module_case(model, (_randn(N, 4, g=g),), lambda out: F.cross_entropy(out, labels))
    if name == "embedding":
        model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 3))
        idx = torch.randint(0, 7, (N, 2), generator=g)
        return _module_case(model, (idx,), lambda out: F.cross_entropy(out, labels))
    if name == "gru_cell":
        model = nn.GRUCell(3, 4)
        x, h = _randn(N, 3, g=g), _randn(N, 4, g=g)
        return _module_case(model, (x, h), lambda out: (out**2).mean())
    if name == "lstm_cell":
        model = nn.LSTMCell(3, 4)
        x, hc = _randn(N, 3, g=g), (_randn(N, 4, g=g), _randn(N, 4, g=g))
        return _module_case(model, (x, hc), lambda out: (out[0] ** 2).mean() + out[1].mean())
    if name in ("softplus", "gelu", "silu"):
        act = {"softplus": nn.Softplus(), "gelu": nn.GELU(), "silu": nn.SiLU()}[name]
        model = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 1))
        return _module_case(model, (_randn(N, 4, g=g),), lambda out: F.mse_loss(out, y_reg))
    raise KeyError(name)


CASES = [
    "mse",
    "l1",
    "smooth_l1",
    "huber",
    "cross_entropy",
    "nll",
    "bce_with_logits",
    "kl_div",
    "conv1d",
    "conv2d",
    "layer_norm",
    "batch_norm",
    "embedding",
    "gru_cell",
    "lstm_cell",
    "softplus",
    "gelu",
    "silu",
]


def _hyper() -> dict[str, torch.Tensor]:
    return {
        "lr": torch.tensor(0.05, dtype=DT, requires_grad=True),
        "l2": torch.tensor(0.1, dtype=DT, requires_grad=True),
    }


def _unroll_hypergrad(case: Case, mode: str, vectorize: bool | None = None) -> list[torch.Tensor]:
    h = _hyper()

    def inner(p, hp, batch, buffers=None):
        reg = sum((v**2).sum() for v in p.values())
        return case.loss(p, batch, buffers) + 0.5 * hp["l2"] * reg

    kwargs: dict[str, Any] = {"buffers": case.buffers} if case.buffers is not None else {}
    if vectorize is not None:
        kwargs["vectorize"] = vectorize
    result = bilevel.unroll(
        inner,
        case.params,
        {"lr": h["lr"], "l2": h["l2"]},
        bilevel.optim.sgd(momentum=0.5),
        steps=4,
        data=case.batch,
        mode=mode,
        **kwargs,
    )
    outer = sum((v**2).sum() for v in result.params.values()) + result.losses.sum() * 0
    return list(torch.autograd.grad(outer, [h["lr"], h["l2"]]))


@pytest.mark.parametrize("name", CASES)
def test_unroll_forward_equals_reverse(name):
    case = make_case(name)
    reverse = _unroll_hypergrad(case, "reverse")
    for vectorize in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward = _unroll_hypergrad(case, "forward", vectorize)
        fallbacks = [w for w in caught if issubclass(w.category, ForwardModeFallbackWarning)]
        assert len(fallbacks) <= 1, [str(w.message) for w in fallbacks]  # once per problem
        for f, r in zip(forward, reverse):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10)
    if name in ("mse", "huber"):  # torch lacks these formulas today: the fallback says so
        assert fallbacks, f"no fallback warning for {name}"


@pytest.mark.parametrize("name", CASES)
def test_argmin_forward_hvp_equals_reverse(name):
    case = make_case(name)
    if case.buffers is not None:  # argmin has no buffers: use the statistics as constants
        case = Case(case.loss, case.params, case.batch, None)
        base = make_case(name)
        fixed = base.buffers

        def loss(p, batch, _):
            return base.loss(p, batch, {k: v.clone() for k, v in fixed.items()})

        case = Case(loss, case.params, case.batch, None)
    grads = {}
    for hvp in ("forward", "reverse"):
        h = _hyper()

        def inner(p, hp, batch):
            reg = sum((v**2).sum() for v in p.values())
            return case.loss(p, batch, None) + 0.5 * (hp["l2"] + 1.0) * reg

        # solver=None: the given point is taken as the solution, so both modes solve the
        # same linear system (dense: exact) whatever the inner problem's conditioning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ForwardModeFallbackWarning)
            w = bilevel.argmin(
                inner,
                case.params,
                {"l2": h["l2"]},
                case.batch,
                solver=None,
                linear_solver=bilevel.linalg.dense(),
                hvp=hvp,
            )
            outer = sum((v**2).sum() for v in w.values())
            (grads[hvp],) = torch.autograd.grad(outer, [h["l2"]])
    torch.testing.assert_close(grads["forward"], grads["reverse"], rtol=1e-10, atol=1e-10)


def test_fallback_warns_once_per_problem_and_only_on_gaps():
    case = make_case("mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _unroll_hypergrad(case, "forward", vectorize=False)
        _unroll_hypergrad(case, "forward", vectorize=False)
    fallbacks = [w for w in caught if issubclass(w.category, ForwardModeFallbackWarning)]
    assert len(fallbacks) == 2  # one per unroll call, not one per step
    assert "mode/hvp='reverse'" in str(fallbacks[0].message)
    assert "\n" not in str(fallbacks[0].message)
    assert not is_forward_ad_gap(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_real_error_is_not_swallowed_by_the_fallback():
    def inner(p, hp):
        return F.huber_loss(p["w"] @ torch.ones(3, 2, dtype=DT), torch.zeros(2, dtype=DT))

    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bilevel.unroll(
            inner,
            {"w": torch.ones(2, dtype=DT)},
            {"lr": lr},
            bilevel.optim.sgd(),
            2,
            mode="forward",
        )
