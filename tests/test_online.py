"""Online hyperparameter updates equal the offline hypergradient of each window."""

import pytest
import torch

import bilevel
from bilevel.unroll.online import OnlineHyperOptimizer

DT = torch.float64
K, WINDOWS = 4, 3


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 2, generator=g, dtype=DT) * 0.1}
    batches = [
        (torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT))
        for _ in range(K * WINDOWS)
    ]
    val = (torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT))
    return params, batches, val


def inner(p, h, batch):
    x, y = batch
    return ((x @ p["w"] - y) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum()


def outer(p, h, val):
    x, y = val
    return ((x @ p["w"] - y) ** 2).mean()


def leaves():
    return (
        torch.tensor(-2.0, dtype=DT, requires_grad=True),
        torch.tensor(0.05, dtype=DT, requires_grad=True),
    )


def hp_of(log_lr, l2):
    return {"lr": log_lr.exp(), "l2": l2}


OPT = bilevel.optim.sgd(momentum=0.5)


def run_online(mode, carry_tangent, hyper_lr):
    params, batches, val = setup()
    log_lr, l2 = leaves()
    online = OnlineHyperOptimizer(
        inner,
        outer,
        params,
        lambda: hp_of(log_lr, l2),
        OPT,
        torch.optim.SGD([log_lr, l2], lr=hyper_lr),
        every=K,
        mode=mode,
        carry_tangent=carry_tangent,
    )
    for b in batches:
        online.step(b, val_batch=val)
    return online, (log_lr, l2)


def offline_windows(mode, hyper_lr):
    """The same run, one offline unroll per window, the same hyperparameter updates."""
    params, batches, val = setup()
    log_lr, l2 = leaves()
    hyper_opt = torch.optim.SGD([log_lr, l2], lr=hyper_lr)
    state, grads = None, []
    for k in range(WINDOWS):
        hp = hp_of(log_lr, l2)
        r = bilevel.unroll(
            inner, params, hp, OPT, K, batches[k * K : (k + 1) * K], mode, state=state
        )
        lr_t, l2_t = hp["lr"], hp["l2"]
        g_lr, g_l2 = torch.autograd.grad(outer(r.params, hp, val), [lr_t, l2_t])
        grads.append({"lr": g_lr, "l2": g_l2})
        hyper_opt.zero_grad()
        torch.autograd.backward([lr_t, l2_t], [g_lr, g_l2])
        hyper_opt.step()
        params = {k_: v.detach() for k_, v in r.params.items()}
        state = bilevel._tree.tree_detach(r.state)
    return grads, (log_lr, l2), params


@pytest.mark.parametrize("mode, offline", [("forward", "forward"), ("truncated", "reverse")])
def test_each_update_is_the_offline_window_hypergradient(mode, offline):
    online, (log_lr, l2) = run_online(mode, carry_tangent=False, hyper_lr=0.5)
    grads, (log_lr_ref, l2_ref), params_ref = offline_windows(offline, hyper_lr=0.5)
    assert [t for t, _ in online.updates] == [K * (k + 1) for k in range(WINDOWS)]
    for (_, got), want in zip(online.updates, grads):
        for name in ("lr", "l2"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(log_lr, log_lr_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(l2, l2_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(online.params["w"], params_ref["w"], rtol=1e-12, atol=0)
    assert online.updates[0][1]["lr"] != 0 and log_lr != leaves()[0]  # updates happened


def test_carried_tangent_is_the_full_prefix_forward_hypergradient():
    # with the hyperparameters held fixed (hyper lr 0), the carried tangent makes each
    # update the forward-mode hypergradient through every step so far
    online, _ = run_online("forward", carry_tangent=True, hyper_lr=0.0)
    params, batches, val = setup()
    for k, (_, got) in enumerate(online.updates):
        log_lr, l2 = leaves()
        hp = hp_of(log_lr, l2)
        r = bilevel.unroll(inner, params, hp, OPT, K * (k + 1), batches, "forward")
        g_lr, g_l2 = torch.autograd.grad(outer(r.params, hp, val), [hp["lr"], l2])
        torch.testing.assert_close(got["lr"], g_lr, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got["l2"], g_l2, rtol=1e-10, atol=1e-13)


def test_bad_arguments():
    params, _, _ = setup()
    log_lr, l2 = leaves()
    hyper_opt = torch.optim.SGD([log_lr], lr=0.1)
    with pytest.raises(ValueError, match="every"):
        OnlineHyperOptimizer(inner, outer, params, {"lr": 0.1}, OPT, hyper_opt, every=0)
    with pytest.raises(ValueError, match="mode"):
        OnlineHyperOptimizer(inner, outer, params, {}, OPT, hyper_opt, every=2, mode="reverse")
    online = OnlineHyperOptimizer(
        inner, outer, params, {"lr": 0.1, "l2": 0.0}, OPT, hyper_opt, every=2
    )
    with pytest.raises(ValueError, match="requires grad"):
        online.step(setup()[1][0])
