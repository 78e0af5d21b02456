"""unroll(mode="forward", compiled=True): the same hypergradient as the uncompiled forward mode."""

import pytest
import torch

import bilevel

DT = torch.float64


def problem():
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(6, 8, generator=g, dtype=DT) * 0.3,
        "w2": torch.randn(8, 3, generator=g, dtype=DT) * 0.3,
        "unused": torch.ones(2, dtype=DT),  # no gradient: left alone, as torch.optim does
    }
    batches = [
        (torch.randn(16, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
        for _ in range(6)
    ]
    val = (torch.randn(16, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
    return params, batches, val


def net(p, x):
    return torch.tanh(x @ p["w1"]) @ p["w2"]


def inner(p, h, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(p, x), y) + h["l2"] * (p["w1"] ** 2).sum()


def hypergrad(**kw):
    params, batches, (xv, yv) = problem()
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    l2 = torch.tensor(1e-2, dtype=DT, requires_grad=True)
    # momentum as a number in the optimizer: the configuration in which torch.compile's
    # default backend (inductor) gave wrong tangents from the second step on
    r = bilevel.unroll(
        inner,
        params,
        {"lr": lr, "l2": l2},
        bilevel.optim.sgd(momentum=0.8),
        len(batches),
        batches,
        "forward",
        **kw,
    )
    loss = torch.nn.functional.cross_entropy(net(r.params, xv), yv)
    return torch.stack(torch.autograd.grad(loss, [lr, l2])), r


@pytest.mark.slow
def test_compiled_equals_uncompiled():
    want, r_eager = hypergrad()
    got, r_compiled = hypergrad(compiled=True)
    assert want.abs().min() > 1e-6  # every hypergradient is a real number to compare
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(r_compiled.losses, r_eager.losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        r_compiled.state["momentum_buffer"]["w1"], r_eager.state["momentum_buffer"]["w1"]
    )
    assert r_compiled.state["step"] == r_eager.state["step"] == 6
    assert torch.equal(r_compiled.params["unused"], torch.ones(2, dtype=DT))
    assert torch.equal(r_eager.params["unused"], torch.ones(2, dtype=DT))


def test_compiled_is_only_for_forward():
    with pytest.raises(ValueError, match="only used with mode='forward'"):
        params, batches, _ = problem()
        bilevel.unroll(
            inner, params, {"l2": 0.0}, bilevel.optim.sgd(lr=0.1), 2, batches, compiled=True
        )
