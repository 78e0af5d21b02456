"""mode="auto": the choice fits the memory budget (bytes saved for backward, measured with
saved-tensor hooks), and the hypergradient is the chosen exact mode's."""

import pytest
import torch

import bilevel
from experiments.bench.core import saved_bytes

DT = torch.float64
T = 30


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(8, 16, generator=g, dtype=DT) * 0.3,
        "w2": torch.randn(16, 3, generator=g, dtype=DT) * 0.3,
    }
    batches = [
        (torch.randn(64, 8, generator=g, dtype=DT), torch.randint(0, 3, (64,), generator=g))
        for _ in range(T)
    ]
    val = (torch.randn(32, 8, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g))
    return params, batches, val


def net(p, x):
    return torch.tanh(x @ p["w1"]) @ p["w2"]


def inner(p, h, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(p, x), y)


def hypergrad(mode, budget=None, data=None, **kw):
    params, batches, (xv, yv) = problem()
    log_lr = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    extra = {"memory_budget": budget} if budget is not None else {}
    r = bilevel.unroll(
        inner,
        params,
        {"lr": log_lr.exp()},
        bilevel.optim.sgd(momentum=0.9),
        T,
        batches if data is None else data,
        mode,
        **extra,
        **kw,
    )
    torch.nn.functional.cross_entropy(net(r.params, xv), yv).backward()
    return log_lr.grad, r


def measured(mode, budget):
    """Peak bytes saved by the unroll and its backward pass, less the outer loss's own
    (which the budget of the unroll does not cover; measured alone on the same shapes)."""
    params, _, (xv, yv) = problem()
    live = {k: v.requires_grad_() for k, v in params.items()}
    outer = saved_bytes(lambda: torch.nn.functional.cross_entropy(net(live, xv), yv).backward())
    return saved_bytes(lambda: hypergrad(mode, budget)) - outer


@pytest.fixture(scope="module")
def estimates():
    _, r = hypergrad("auto", 2**40)
    return r.auto.estimates


def test_large_budget_runs_reverse(estimates):
    g, r = hypergrad("auto", 2**40)
    assert r.auto.mode == "reverse" and r.auto.segments is None
    torch.testing.assert_close(g, hypergrad("reverse")[0], rtol=1e-12, atol=0)
    assert measured("auto", 2**40) <= estimates["reverse"]


def test_middle_budget_runs_checkpoint_within_it(estimates):
    assert estimates["checkpoint"] < estimates["reverse"]
    budget = (estimates["checkpoint"] + estimates["reverse"]) // 2
    g, r = hypergrad("auto", budget)
    assert r.auto.mode == "checkpoint" and r.auto.estimated_bytes <= budget
    torch.testing.assert_close(g, hypergrad("reverse")[0], rtol=1e-10, atol=0)
    used = measured("auto", budget)
    assert used <= budget
    assert measured("reverse", None) > budget  # reverse would not have fitted


def test_small_budget_runs_forward_within_it(estimates):
    budget = estimates["checkpoint"] - 1
    g, r = hypergrad("auto", budget)
    assert r.auto.mode == "forward"
    torch.testing.assert_close(g, hypergrad("reverse")[0], rtol=1e-10, atol=0)
    assert measured("auto", budget) <= budget
    assert measured("checkpoint", None) > estimates["forward"]


def test_no_mode_fits_names_the_fix(estimates):
    with pytest.raises(ValueError, match="raise the budget to at least"):
        hypergrad("auto", min(estimates.values()) - 1)


def test_trial_steps_consume_no_batch():
    # an iterator of exactly T batches: the trial steps' batches are replayed, not lost
    _, batches, _ = problem()
    g_iter, r = hypergrad("auto", 2**40, data=iter(batches))
    torch.testing.assert_close(g_iter, hypergrad("reverse")[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(r.losses, hypergrad("reverse")[1].losses, rtol=0, atol=0)


def test_budget_is_only_for_auto():
    with pytest.raises(ValueError, match="memory_budget is only used with mode='auto'"):
        hypergrad("reverse", 10**9)
    with pytest.raises(ValueError, match="needs memory_budget"):
        hypergrad("auto")
