"""bilevel.qp: against qpth, cvxpylayers, closed forms and finite differences (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.qp import QPError, QPLayer, interior_point, make_kkt_optimality_fn

DT = torch.float64
NAMES = "QpAbGh"


def random_qp(B: int, n: int, me: int, mi: int, seed: int = 0, slack: float = 1.0):
    """A feasible, strictly convex batch: some inequalities active, some not."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = L @ L.mT + 0.1 * torch.eye(n, dtype=DT)
    p = torch.randn(B, n, generator=g, dtype=DT)
    A = torch.randn(B, me, n, generator=g, dtype=DT)
    x0 = torch.randn(B, n, generator=g, dtype=DT)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    G = torch.randn(B, mi, n, generator=g, dtype=DT)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + slack * torch.rand(B, mi, generator=g, dtype=DT)
    return Q, p, A, b, G, h


def grads_of(fn, inputs, weight):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    x = fn(*leaves)
    (x * weight).sum().backward()
    return x.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("system", ["reduced", "augmented"])
def test_against_qpth_batched(system):
    qpth = pytest.importorskip("qpth.qp")
    data = random_qp(4, 6, 2, 5)
    w = torch.randn(4, 6, dtype=DT)
    solver = interior_point(system=system)
    x, ours = grads_of(lambda *a: bilevel.qp(*a, solver=solver), data, w)
    # qpth's argument order is (Q, p, G, h, A, b)
    ref_fn = lambda Q, p, A, b, G, h: qpth.QPFunction(  # noqa: E731
        verbose=-1, eps=1e-12, maxIter=100, check_Q_spd=False
    )(Q, p, G, h, A, b)
    xr, theirs = grads_of(ref_fn, data, w)
    assert (x - xr).abs().max() < 1e-6
    for name, a, c in zip(NAMES, ours, theirs):
        assert (a - c).abs().max() < 1e-5, name


def test_against_cvxpylayers_batched():
    cp = pytest.importorskip("cvxpy")
    cvl = pytest.importorskip("cvxpylayers.torch")
    B, n, me, mi = 3, 5, 2, 4
    # Q = L'L through a DPP parametrisation 1/2 ||L x||^2; gradients compared w.r.t. L
    x = cp.Variable(n)
    params = [cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((me, n)), cp.Parameter(me)]
    params += [cp.Parameter((mi, n)), cp.Parameter(mi)]
    Lp, pp, Ap, bp, Gp, hp = params
    prob = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + pp @ x), [Ap @ x == bp, Gp @ x <= hp]
    )
    layer = cvl.CvxpyLayer(prob, params, [x])
    _, p, A, b, G, h = random_qp(B, n, me, mi, seed=1)
    L = torch.randn(B, n, n, dtype=DT, generator=torch.Generator().manual_seed(2))
    L = L + 2 * torch.eye(n, dtype=DT)
    data = (L, p, A, b, G, h)
    w = torch.randn(B, n, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peer's own sparse-tensor and numpy notices
        xr, theirs = grads_of(lambda *a: layer(*a, solver_args={"eps": 1e-12})[0], data, w)
    x, ours = grads_of(lambda L, *r: bilevel.qp(L.mT @ L, *r), data, w)
    assert (x - xr).abs().max() < 1e-6
    for name, a, c in zip("LpAbGh", ours, theirs):
        assert (a - c).abs().max() < 1e-5, name


@pytest.mark.parametrize("me,mi", [(2, 5), (0, 4), (3, 0), (0, 0)])
def test_finite_differences_every_input(me, mi):
    data = random_qp(2, 5, me, mi, seed=3)
    w = torch.randn(2, 5, dtype=DT)
    _, ours = grads_of(bilevel.qp, data, w)

    def f(*a):
        return (bilevel.qp(*a) * w).sum()

    eps = 1e-6
    g = torch.Generator().manual_seed(4)
    for k, name in enumerate(NAMES):
        if data[k].numel() == 0:
            continue
        d = torch.randn(data[k].shape, generator=g, dtype=DT)
        if name == "Q":
            d = d + d.mT
        plus = [t.clone() for t in data]
        minus = [t.clone() for t in data]
        plus[k] += eps * d
        minus[k] -= eps * d
        fd = (f(*plus) - f(*minus)) / (2 * eps)
        assert abs(float(fd - (ours[k] * d).sum())) < 1e-5 * (1 + abs(float(fd))), name


def test_closed_forms_unconstrained_and_equality():
    Q, p, A, b, _, _ = random_qp(3, 4, 2, 0, seed=5)
    x = bilevel.qp(Q, p)
    assert (x - torch.linalg.solve(Q, -p)).abs().max() < 1e-10
    xe = bilevel.qp(Q, p, A, b)
    K = torch.cat(
        [torch.cat([Q, A.mT], -1), torch.cat([A, torch.zeros(3, 2, 2, dtype=DT)], -1)], -2
    )
    ref = torch.linalg.solve(K, torch.cat([-p, b], -1))[:, :4]
    assert (xe - ref).abs().max() < 1e-10


def test_batch_equals_loop_and_shared_inputs():
    Q, p, A, b, G, h = random_qp(5, 6, 1, 4, seed=6)
    batch = bilevel.qp(Q, p, A, b, G, h)
    for i in range(5):
        one = bilevel.qp(Q[i], p[i], A[i], b[i], G[i], h[i])
        assert one.shape == (6,)
        assert (one - batch[i]).abs().max() < 1e-12
    # G, h shared by the batch: their gradient is the sum over elements
    Gs, hs = G[0].clone().requires_grad_(), h[0].clone().requires_grad_()
    bilevel.qp(Q, p, A, b, Gs, hs).sum().backward()
    total = torch.zeros_like(Gs)
    for i in range(5):
        Gi = G[0].clone().requires_grad_()
        bilevel.qp(Q[i], p[i], A[i], b[i], Gi, h[0]).sum().backward()
        total += Gi.grad
    assert (Gs.grad - total).abs().max() < 1e-9


def test_infeasible_element_named():
    Q, p, A, b, G, h = random_qp(4, 3, 0, 2, seed=7)
    G = G.clone()
    h = h.clone()
    # element 2: x1 <= -1 and -x1 <= -1 (x1 >= 1): empty
    G[2] = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=DT)
    h[2] = torch.tensor([-1.0, -1.0], dtype=DT)
    with pytest.raises(QPError, match=r"batch element\(s\) 2\b") as err:
        bilevel.qp(Q, p, G=G, h=h)
    assert err.value.elements == [2]
    assert "infeasible" in str(err.value)


def test_weakly_active_constraint_gives_a_one_sided_derivative():
    # min 1/2 (x - 1)^2 s.t. x <= 1: the constraint holds with equality and a zero multiplier
    Q = torch.eye(1, dtype=DT)
    p = torch.tensor([-1.0], dtype=DT, requires_grad=True)
    h = torch.tensor([1.0], dtype=DT, requires_grad=True)
    x = bilevel.qp(Q, p, G=torch.eye(1, dtype=DT), h=h)
    # no strict complementarity: an interior point reaches only sqrt(tol) here
    assert abs(float(x.detach()) - 1) < 1e-4
    x.sum().backward()
    pair = (float(p.grad), float(h.grad))
    assert pair in [(-1.0, 0.0), (0.0, 1.0)]  # the inactive or the active side, nothing else


def test_solution_from_another_solver():
    Q, p, A, b, G, h = random_qp(3, 5, 1, 6, seed=8)
    w = torch.randn(3, 5, dtype=DT)
    x, ours = grads_of(bilevel.qp, (Q, p, A, b, G, h), w)
    _, given = grads_of(lambda *a: bilevel.qp(*a, solution=x), (Q, p, A, b, G, h), w)
    for name, a, c in zip(NAMES, ours, given):
        assert (a - c).abs().max() < 1e-7, name
    with pytest.warns(RuntimeWarning, match="not a KKT point"):
        bilevel.qp(Q, p, A, b, G, h, solution=x + 0.1)


def test_duals_are_differentiable_and_match_kkt():
    Q, p, A, b, G, h = random_qp(2, 4, 1, 3, seed=9)
    x, y, z = bilevel.qp(Q, p, A, b, G, h, return_duals=True)
    stat = (Q @ x[..., None]).squeeze(-1) + p + (A.mT @ y[..., None]).squeeze(-1)
    stat = stat + (G.mT @ z[..., None]).squeeze(-1)
    assert stat.abs().max() < 1e-8 and (z >= 0).all()
    # gradients through a dual: against finite differences in h
    hh = h.clone().requires_grad_()
    bilevel.qp(Q, p, A, b, G, hh, return_duals=True)[2].sum().backward()
    d = torch.randn_like(h)
    eps = 1e-6
    zp = bilevel.qp(Q, p, A, b, G, h + eps * d, return_duals=True)[2].sum()
    zm = bilevel.qp(Q, p, A, b, G, h - eps * d, return_duals=True)[2].sum()
    assert abs(float((zp - zm) / (2 * eps) - (hh.grad * d).sum())) < 1e-5


def test_kkt_optimality_fn_with_root_matches_qp():
    Q, p, A, b, G, h = (t[0] for t in random_qp(1, 4, 1, 3, seed=10))
    pr = p.clone().requires_grad_()
    x, y, z = bilevel.qp(Q, pr, A, b, G, h, return_duals=True)
    x.sum().backward()
    F = make_kkt_optimality_fn(
        lambda x, q: 0.5 * x @ Q @ x + q @ x,
        lambda x, q: A @ x - b,
        lambda x, q: G @ x - h,
    )
    q = p.clone().requires_grad_()
    sol = bilevel.root(
        F, (x.detach(), y.detach(), z.detach()), q, linear_solver=bilevel.linalg.dense()
    )
    sol[0].sum().backward()
    assert (q.grad - pr.grad).abs().max() < 1e-7


def test_layer_and_empty_batch_and_bad_input():
    assert bilevel.qp.QPError is QPError and bilevel.qp.interior_point is interior_point
    layer = QPLayer(solver=interior_point(tol=1e-9))
    Q, p, A, b, G, h = random_qp(0, 3, 1, 2)
    assert layer(Q, p, A, b, G, h).shape == (0, 3)
    with pytest.raises(ValueError, match="Q must be"):
        bilevel.qp(torch.eye(2, dtype=DT), torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="batch sizes differ"):
        bilevel.qp(torch.eye(2, dtype=DT).expand(3, 2, 2), torch.zeros(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="both of G, h"):
        bilevel.qp(torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT), G=torch.eye(2, dtype=DT))
    with pytest.raises(TypeError, match="same dtype"):
        bilevel.qp(torch.eye(2), torch.zeros(2, dtype=DT))


def test_float32_runs():
    Q, p, A, b, G, h = (t.float() for t in random_qp(2, 4, 1, 3, seed=11))
    x = bilevel.qp(Q, p, A, b, G, h)
    x64 = bilevel.qp(*random_qp(2, 4, 1, 3, seed=11))
    assert x.dtype == torch.float32 and (x.double() - x64).abs().max() < 1e-3
