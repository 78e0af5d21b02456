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


def _ridge_outer(dtype, wrong=False):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g).to(dtype), torch.randn(20, generator=g).to(dtype)

    def inner(p, h):
        l2 = WrongBackward.apply(h["l2"].sqrt()) if wrong else h["l2"]
        return ((x @ p["w"] - y) ** 2).mean() + l2 * (p["w"] ** 2).sum()

    def outer(h):
        result = bilevel.unroll(
            inner,
            {"w": torch.zeros(5, dtype=dtype)},
            h,
            bilevel.optim.sgd(lr=0.05),
            20,
        )
        return ((x @ result.params["w"] - y + 0.3) ** 2).mean()

    return outer


def test_float32_steps_and_tolerances_come_from_the_dtype():
    h = {"l2": torch.tensor(0.1, dtype=torch.float32)}
    report = bilevel.hypergradcheck(_ridge_outer(torch.float32), h)
    # with float64's step (1e-6) the same correct gradient is 85% off and FAILS
    assert not bilevel.hypergradcheck(_ridge_outer(torch.float32), h, eps=1e-6, rtol=1e-2)
    assert report.passed, str(report)
    assert report.dtype == torch.float32 and 1e-3 < report.eps < 1e-2
    # float64 keeps its tight defaults
    h64 = {"l2": torch.tensor(0.1, dtype=DT)}
    r64 = bilevel.hypergradcheck(_ridge_outer(DT), h64)
    assert r64.passed and (r64.eps, r64.rtol) == (1e-6, 1e-6)


def test_a_wrong_float32_gradient_still_fails_and_the_report_suggests_float64():
    h = {"l2": torch.tensor(0.1, dtype=torch.float32)}
    report = bilevel.hypergradcheck(_ridge_outer(torch.float32, wrong=True), h)
    assert not report.passed
    assert "rerun the check in float64" in str(report)
    h64 = {"l2": torch.tensor(0.1, dtype=DT)}
    assert "float64" not in str(bilevel.hypergradcheck(_ridge_outer(DT, wrong=True), h64))
