"""Property-based checks (hypothesis) of invariants the engines rely on."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel.distributed import shard_bounds

DT = torch.float64


@given(n=st.integers(0, 500), world=st.integers(1, 16))
def test_shards_are_contiguous_balanced_and_cover(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


OPTIMIZERS = {
    "sgd": lambda: bilevel.optim.sgd(momentum=0.9, weight_decay=0.01),
    "adam": lambda: bilevel.optim.adam(weight_decay=0.01),
    "rmsprop": lambda: bilevel.optim.rmsprop(momentum=0.5, centered=True),
    "adagrad": lambda: bilevel.optim.adagrad(lr_decay=0.01),
}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    lr=st.floats(1e-4, 0.5),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 4),
)
def test_every_form_of_a_constant_hyperparameter_gives_the_same_steps(name, lr, seed, steps):
    """A number, a 0-d tensor, a per-tensor mapping, a per-element mapping, a schedule tensor
    and a schedule function holding the same value are the same optimizer."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "a": torch.randn(3, 2, generator=g, dtype=DT),
        "b": torch.randn(4, generator=g, dtype=DT),
    }
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}
        for _ in range(steps)
    ]
    forms = {
        "number": lr,
        "tensor": torch.tensor(lr, dtype=DT),
        "per_tensor": {k: lr for k in params},
        "per_element": {
            k: bilevel.optim.per_element(torch.full_like(v, lr)) for k, v in params.items()
        },
        "schedule": bilevel.optim.schedule(torch.full((steps,), lr, dtype=DT)),
        "function": lambda t: lr,
    }
    results = {}
    for form, value in forms.items():
        opt = OPTIMIZERS[name]()
        p, s = dict(params), opt.init(params, {"lr": value})
        for grad in grads:
            p, s = opt.step(p, grad, s, {"lr": value})
        results[form] = torch.cat([v.flatten() for v in p.values()])
    for form, value in results.items():
        torch.testing.assert_close(value, results["number"], rtol=1e-13, atol=1e-15, msg=form)
