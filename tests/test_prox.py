"""bilevel.prox: closed forms (the prox's defining minimisation) and finite-difference Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from bilevel import prox
from bilevel.constraints import project_l2_ball

DT = torch.float64


def away_from_kinks(n: int, seed: int, gap: float = 0.05, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = scale * (2 * torch.rand(n, generator=g, dtype=DT) - 1)
    # keep |x| away from the thresholds used below (0.3 * 1.5 = 0.45 and 0.6)
    for t in (0.0, 0.45, 0.6):
        near = (x.abs() - t).abs() < gap
        x = torch.where(near, x + 3 * gap * torch.sign(x + 1e-9), x)
    return x


def brute_prox(f, x, step, iters=3000):
    """argmin_z 1/2 ||z - x||^2 + step f(z) by subgradient-free smoothing: proximal check by
    evaluating the objective at the candidate and at random perturbations."""
    return lambda z: 0.5 * ((z - x) ** 2).sum() + step * f(z)


CASES = [
    ("lasso", lambda x, h, s: prox.lasso(x, h, s), 0.3, lambda z, h: h * z.abs().sum(), None),
    (
        "elastic_net",
        lambda x, h, s: prox.elastic_net(x, (h, 0.7), s),
        0.3,
        lambda z, h: h * z.abs().sum() + 0.35 * (z**2).sum(),
        None,
    ),
    ("ridge", lambda x, h, s: prox.ridge(x, h, s), 0.3, lambda z, h: 0.5 * h * (z**2).sum(), None),
    (
        "non_negative_lasso",
        lambda x, h, s: prox.non_negative_lasso(x, h, s),
        0.3,
        lambda z, h: h * z.sum(),
        "nonneg",
    ),
    (
        "non_negative_ridge",
        lambda x, h, s: prox.non_negative_ridge(x, h, s),
        0.3,
        lambda z, h: 0.5 * h * (z**2).sum(),
        "nonneg",
    ),
    (
        "group_lasso",
        lambda x, h, s: prox.group_lasso(x.reshape(4, 3), h, s).reshape(-1),
        0.3,
        lambda z, h: h * torch.linalg.vector_norm(z.reshape(4, 3), dim=-1).sum(),
        None,
    ),
]


@pytest.mark.parametrize("name,op,weight,f,domain", CASES, ids=[c[0] for c in CASES])
def test_prox_minimises_its_objective(name, op, weight, f, domain):
    x = away_from_kinks(12, seed=1)
    step = 1.5
    z = op(x, weight, step)
    obj = brute_prox(lambda v: f(v, weight), x, step)
    base = obj(z)
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        cand = z + 1e-3 * torch.randn(12, generator=g, dtype=DT)
        if domain == "nonneg":
            cand = cand.clamp_min(0)
        assert obj(cand) >= base - 1e-12


@pytest.mark.parametrize("name,op,weight,f,domain", CASES, ids=[c[0] for c in CASES])
def test_prox_jacobians_match_finite_differences(name, op, weight, f, domain):
    x = away_from_kinks(12, seed=3).requires_grad_()
    h = torch.tensor(weight, dtype=DT, requires_grad=True)
    s = torch.tensor(1.5, dtype=DT, requires_grad=True)
    assert gradcheck(lambda x, h, s: op(x, h, s), (x, h, s), eps=1e-6, atol=1e-8)


def test_lasso_closed_form_jacobian_and_per_feature_weights():
    x = torch.tensor([3.0, -0.5, -2.0, 0.2], dtype=DT, requires_grad=True)
    l1 = torch.tensor([1.0, 1.0, 0.5, 0.1], dtype=DT, requires_grad=True)
    z = prox.lasso(x, l1)
    assert torch.equal(z.detach(), torch.tensor([2.0, 0.0, -1.5, 0.1], dtype=DT))
    jac = torch.autograd.functional.jacobian(lambda x: prox.lasso(x, l1.detach()), x.detach())
    assert torch.equal(jac, torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT)))
    z.sum().backward()
    assert torch.equal(l1.grad, torch.tensor([-1.0, 0.0, 1.0, -1.0], dtype=DT))


def test_group_lasso_zero_group_has_zero_jacobian():
    x = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    out = prox.group_lasso(x, 1.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.zeros_like(x))


def test_from_projection_and_errors():
    p = prox.from_projection(project_l2_ball)
    x = torch.tensor([3.0, 4.0], dtype=DT)
    assert torch.allclose(p(x, 2.0, 0.1), torch.tensor([1.2, 1.6], dtype=DT))
    with pytest.raises(ValueError, match="does not broadcast"):
        prox.lasso(torch.zeros(3), torch.ones(2))
    with pytest.raises(TypeError, match=r"\(l1, l2\)"):
        prox.elastic_net(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="floating tensor"):
        prox.ridge([1.0], 1.0)
