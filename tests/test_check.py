"""hypergradcheck: passes on correct hypergradients, fails on wrong ones."""

import pytest
import torch

import bilevel
from bilevel.check import HypergradCheckError

DT = torch.float64


class WrongBackward(torch.autograd.Function):
    """x**2 with a deliberately wrong derivative (3x instead of 2x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * g


def test_passes_on_a_correct_unrolled_hypergradient():
    def outer(h):
        result = bilevel.unroll(
            lambda p, h: ((p["w"] - h["target"]) ** 2).sum(),
            {"w": torch.zeros(3, dtype=DT)},
            h,
            bilevel.optim.sgd(),
            6,
        )
        return (result.params["w"] ** 3).sum()

    report = bilevel.hypergradcheck(
        outer, {"lr": torch.tensor(0.1, dtype=DT), "target": torch.arange(3, dtype=DT)}
    )
    assert report.passed and bool(report)
    assert [e.kind for e in report.entries] == ["elements", "elements"]
    assert report.max_rel_error < 1e-7
    assert "passed" in str(report)


def test_fails_and_raises_on_a_wrong_gradient():
    def outer(h):
        return WrongBackward.apply(h["x"]).sum()

    report = bilevel.hypergradcheck(outer, {"x": torch.tensor([1.0, 2.0], dtype=DT)})
    assert not report.passed
    assert "FAIL" in str(report)
    torch.testing.assert_close(report.entries[0].numeric, torch.tensor([2.0, 4.0], dtype=DT))
    with pytest.raises(HypergradCheckError, match="hypergradient check failed"):
        bilevel.hypergradcheck(
            outer, {"x": torch.tensor([1.0, 2.0], dtype=DT)}, raise_exception=True
        )


def test_random_directions_for_large_hyperparameters():
    weights = torch.linspace(0.5, 1.5, 40, dtype=DT)

    def outer(h):
        return (h["v"] ** 2 * weights).sum()

    report = bilevel.hypergradcheck(outer, {"v": torch.ones(40, dtype=DT)}, n_directions=3)
    assert report.passed
    assert report.entries[0].kind == "directions" and report.entries[0].analytic.numel() == 3

    def wrong(h):
        return WrongBackward.apply(h["v"]).sum()

    assert not bilevel.hypergradcheck(wrong, {"v": torch.ones(40, dtype=DT)}).passed


def test_bad_input():
    with pytest.raises(TypeError, match="non-empty dict"):
        bilevel.hypergradcheck(lambda h: h, {})
    with pytest.raises(TypeError, match=r"hparams\['x'\] must be a floating-point tensor"):
        bilevel.hypergradcheck(lambda h: h["x"], {"x": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        bilevel.hypergradcheck(lambda h: h["x"] * 2, {"x": torch.ones(2, dtype=DT)})
