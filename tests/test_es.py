"""ES and Persistent ES on a linear-quadratic inner problem with a closed-form hypergradient.

Inner loss 0.5 w'Qw - theta'w, SGD with a fixed step eta: w_t = A^t w_0 + S_t theta with
A = I - eta Q and S_t = eta sum_{j<t} A^j (linear in theta). Outer loss at the end of each
window k: 0.5 ||w_{kK} - c||^2; the full-horizon objective is their sum. It is quadratic in
the per-window perturbed hyperparameters, so the Gaussian-smoothed objective has the same
gradient as the unsmoothed one: the closed form below is the exact target of PES.
"""

import pytest
import torch

import bilevel
from bilevel.unroll.es import PersistentES

DT = torch.float64
ETA, K, WINDOWS = 0.3, 3, 4
Q = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]], dtype=DT)
C = torch.tensor([1.0, -0.5, 0.8], dtype=DT)
THETA = torch.tensor([0.2, 0.1, -0.3], dtype=DT)
W0 = torch.zeros(3, dtype=DT)


def inner_loss(p, h):
    w = p["w"]
    return 0.5 * w @ (Q @ w) - h["theta"] @ w


def outer_loss(p, h):
    return 0.5 * ((p["w"] - C) ** 2).sum()


def closed_form_full_horizon():
    a = torch.eye(3, dtype=DT) - ETA * Q
    grad = torch.zeros(3, dtype=DT)
    w, s = W0.clone(), torch.zeros(3, 3, dtype=DT)
    for t in range(1, K * WINDOWS + 1):
        w = a @ w + ETA * THETA
        s = a @ s + ETA * torch.eye(3, dtype=DT)
        if t % K == 0:
            grad += s.T @ (w - C)
    return grad


def truncated_reverse():
    """Each window differentiated on its own, from a detached start (truncated BPTT)."""
    total = torch.zeros(3, dtype=DT)
    w = W0
    for _ in range(WINDOWS):
        theta = THETA.clone().requires_grad_()
        r = bilevel.unroll(inner_loss, {"w": w}, {"theta": theta}, bilevel.optim.sgd(lr=ETA), K)
        outer_loss(r.params, None).backward()
        total += theta.grad
        w = r.params["w"].detach()
    return total


def run_es(persistent, pairs=4000, seed=0):
    theta = THETA.clone().requires_grad_()
    es = PersistentES(
        inner_loss,
        outer_loss,
        {"w": W0},
        bilevel.optim.sgd(lr=ETA),
        window=K,
        sigma=0.05,
        pairs=pairs,
        persistent=persistent,
        horizon=K * WINDOWS,
        generator=torch.Generator().manual_seed(seed),
    )
    per_pair = sum(es.step({"theta": theta}).pair_grads for _ in range(WINDOWS))
    mean = per_pair.mean(0)
    se = per_pair.std(0) / per_pair.shape[0] ** 0.5
    assert es.t == 0  # the horizon was reached: the particles restarted
    return mean, se


def test_closed_form_matches_full_backprop():
    theta = THETA.clone().requires_grad_()
    r = bilevel.unroll(
        inner_loss,
        {"w": W0},
        {"theta": theta},
        bilevel.optim.sgd(lr=ETA),
        K * WINDOWS,
        mode="checkpoint",
    )
    # the closed form is the sum over window ends; rebuild it by reverse mode through all
    loss = 0
    w = W0
    for _ in range(WINDOWS):
        w = bilevel.unroll(
            inner_loss, {"w": w}, {"theta": theta}, bilevel.optim.sgd(lr=ETA), K
        ).params["w"]
        loss = loss + outer_loss({"w": w}, None)
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(g, closed_form_full_horizon(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.params["w"], w, rtol=1e-12, atol=1e-12)


def test_pes_is_unbiased_and_truncation_is_not():
    truth = closed_form_full_horizon()
    mean, se = run_es(persistent=True)
    z = (mean - truth) / se
    assert z.abs().max() < 4, (mean, truth, se)
    trunc = truncated_reverse()
    # the truncated hypergradient is many standard errors away: the estimate could tell
    assert ((trunc - truth) / se).abs().max() > 10


def test_truncated_es_estimates_the_truncated_gradient():
    # without persistence, ES sees one window at a time: its mean is truncated BPTT's
    trunc = truncated_reverse()
    mean, se = run_es(persistent=False)
    assert ((mean - trunc) / se).abs().max() < 4
    assert ((mean - closed_form_full_horizon()) / se).abs().max() > 10


def test_estimate_backward_reaches_the_leaf():
    log_theta = torch.zeros(3, dtype=DT, requires_grad=True)
    es = PersistentES(
        inner_loss,
        outer_loss,
        {"w": W0},
        bilevel.optim.sgd(lr=ETA),
        window=K,
        sigma=0.05,
        pairs=8,
        generator=torch.Generator().manual_seed(1),
    )
    theta = log_theta.exp()
    est = es.step({"theta": theta, "unused": 3.0})
    est.backward()
    torch.testing.assert_close(log_theta.grad, est.grads["theta"] * theta.detach())
    assert est.pair_grads.shape == (8, 3) and est.standard_error().shape == (3,)


def test_momentum_state_is_carried_per_particle():
    # SGD with momentum: each particle's velocity persists; with sigma tiny, the particles'
    # mean trajectory equals the unperturbed unroll
    theta = THETA.clone().requires_grad_()
    opt = bilevel.optim.sgd(lr=ETA, momentum=0.5)
    es = PersistentES(
        inner_loss, outer_loss, {"w": W0}, opt, window=K, sigma=1e-9, pairs=2, persistent=True
    )
    for _ in range(2):
        es.step({"theta": theta})
    ref = bilevel.unroll(inner_loss, {"w": W0}, {"theta": THETA}, opt, 2 * K)
    torch.testing.assert_close(es.particles["w"].mean(0), ref.params["w"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        es.state_tensors[0].mean(0), ref.state["momentum_buffer"]["w"], rtol=1e-7, atol=1e-9
    )


def test_bad_arguments():
    opt = bilevel.optim.sgd(lr=ETA)
    with pytest.raises(ValueError, match="window"):
        PersistentES(inner_loss, outer_loss, {"w": W0}, opt, window=0, sigma=0.1, pairs=2)
    with pytest.raises(ValueError, match="sigma"):
        PersistentES(inner_loss, outer_loss, {"w": W0}, opt, window=2, sigma=0.0, pairs=2)
    es = PersistentES(inner_loss, outer_loss, {"w": W0}, opt, window=2, sigma=0.1, pairs=2)
    with pytest.raises(ValueError, match="requires grad"):
        es.step({"theta": THETA})
