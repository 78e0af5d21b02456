"""Preconditioned cg / minres, the Hutchinson diagonal estimate, its memory across solves,
and warm starts that never cost more products than a cold solve."""

import math

import pytest
import torch

import bilevel
from bilevel import linalg

D = torch.float64


def spread_spd(n=60, spread=1e6, coupling=0.3, seed=0):
    """SPD with a diagonal from 1 to ``spread`` and off-diagonal couplings: ill-conditioned,
    and a Jacobi preconditioner removes most of it."""
    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(0, math.log10(spread), n, dtype=D)
    B = torch.randn(n, n, generator=g, dtype=D)
    C = (B @ B.T) / n
    s = d.sqrt()
    # D^1/2 (I + c C') D^1/2 with C' scaled to norm < 1: SPD, diagonal ~ d
    C = C / torch.linalg.matrix_norm(C, 2)
    return s[:, None] * (torch.eye(n, dtype=D) + coupling * C) * s[None, :]


def counted(A):
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return A @ v

    return matvec, calls


@pytest.mark.parametrize("name", ["cg", "minres"])
@pytest.mark.parametrize("kind", ["jacobi", "diagonal", "callable"])
def test_preconditioned_solve_equals_unpreconditioned_with_fewer_iterations(name, kind):
    A = spread_spd()
    b = torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=D)
    exact = torch.linalg.solve(A, b)
    diag = torch.diagonal(A).clone()
    pre = {
        "jacobi": linalg.jacobi(probes=64),
        "diagonal": diag,
        "callable": lambda v: v / diag,
    }[kind]
    solver = getattr(linalg, name)
    x0, info0 = solver(tol=1e-13, maxiter=2000)(lambda v: A @ v, b)
    x1, info1 = solver(tol=1e-13, maxiter=2000, preconditioner=pre)(lambda v: A @ v, b)
    assert info0.converged and info1.converged, (info0, info1)
    torch.testing.assert_close(x1, exact, rtol=1e-8, atol=0)
    torch.testing.assert_close(x1, x0, rtol=1e-8, atol=0)
    # the diagonal spread (1e6) is what slows the plain solve down
    assert info1.iterations < info0.iterations / 3, (info0.iterations, info1.iterations)
    assert info0.preconditioner == ""
    assert info1.preconditioner.startswith(
        {"jacobi": "jacobi", "diagonal": "diagonal", "callable": "user"}[kind]
    )
    assert info1.preconditioner in str(info1)


def test_preconditioned_cg_curvature_is_that_of_the_preconditioned_operator():
    A = spread_spd(n=30, spread=1e4)
    d = torch.diagonal(A).clone()
    _, info = linalg.cg(tol=1e-12, preconditioner=d)(lambda v: A @ v, torch.ones(30, dtype=D))
    s = d.rsqrt()
    eig = torch.linalg.eigvalsh(s[:, None] * A * s[None, :])
    assert eig[0] * (1 - 1e-8) <= info.min_curvature <= info.max_curvature <= eig[-1] * (1 + 1e-8)
    assert info.max_curvature > 0.5 * eig[-1]  # the quotients explore the spectrum


def test_preconditioned_solves_of_trees_with_damping():
    A = spread_spd(n=30, spread=1e4)
    b = {"u": torch.ones(10, dtype=D), "v": torch.arange(20, dtype=D).reshape(4, 5)}

    def matvec(t):
        y = A @ torch.cat([t["u"], t["v"].reshape(-1)])
        return {"u": y[:10], "v": y[10:].reshape(4, 5)}

    flat = torch.cat([b["u"], b["v"].reshape(-1)])
    exact = torch.linalg.solve(A + 0.5 * torch.eye(30, dtype=D), flat)
    diag = torch.diagonal(A)
    tree_diag = {"u": diag[:10].clone(), "v": diag[10:].reshape(4, 5).clone()}
    for name in ("cg", "minres"):
        for pre in ("jacobi", tree_diag):
            x, info = getattr(linalg, name)(tol=1e-12, damping=0.5, preconditioner=pre)(matvec, b)
            assert info.converged
            got = torch.cat([x["u"], x["v"].reshape(-1)])
            torch.testing.assert_close(got, exact, rtol=1e-8, atol=0)


def test_preconditioned_minres_on_an_indefinite_operator():
    A = spread_spd(n=40, spread=1e4)
    S = torch.diag(torch.tensor([1.0, -1.0], dtype=D).repeat(20))
    A = S @ A @ S - 2.0 * torch.diag(torch.diagonal(A)) * (torch.arange(40) % 3 == 0)
    assert torch.linalg.eigvalsh(A).min() < 0 < torch.linalg.eigvalsh(A).max()
    b = torch.ones(40, dtype=D)
    x, info = linalg.minres(tol=1e-12, maxiter=2000, preconditioner="jacobi")(lambda v: A @ v, b)
    assert info.converged and info.indefinite()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=0)


def test_hutchinson_estimate_is_within_its_standard_error_and_converges():
    A = spread_spd(n=40, spread=10.0, coupling=0.8, seed=3)
    true = torch.diagonal(A)
    off = A - torch.diag(true)
    errors = []
    for probes in (16, 256, 4096):
        est = linalg.hutchinson_diagonal(lambda v: A @ v, torch.zeros(40, dtype=D), probes=probes)
        se = (off.pow(2).sum(1) / probes).sqrt()  # per entry: sqrt(sum_{i != j} A_ij^2 / k)
        assert ((est - true).abs() <= 4 * se).all(), ((est - true).abs() / se).max()
        errors.append(float((est - true).norm()))
    assert errors[2] < errors[1] < errors[0]
    # exact for a diagonal operator, whatever the number of probes
    d = torch.rand(7, dtype=D) + 0.1
    est = linalg.hutchinson_diagonal(lambda v: d * v, torch.zeros(7, dtype=D), probes=1)
    torch.testing.assert_close(est, d, rtol=1e-15, atol=0)


def test_hutchinson_loops_over_probes_when_the_operator_cannot_be_vmapped():
    A = spread_spd(n=12, spread=10.0)
    reads = []

    def host_reading(v):
        reads.append(float(v.abs().sum()))  # a host read: vmap cannot batch it
        return A @ v

    like = torch.zeros(12, dtype=D)
    looped = linalg.hutchinson_diagonal(host_reading, like, probes=5)
    assert len(reads) == 5
    torch.testing.assert_close(
        looped, linalg.hutchinson_diagonal(lambda v: A @ v, like, probes=5), rtol=1e-14, atol=0
    )


def test_jacobi_estimate_is_positive_even_when_the_estimate_is_not():
    # a strongly coupled matrix: few probes give negative diagonal estimates
    A = spread_spd(n=20, spread=1.0, coupling=0.99, seed=4) + 3.0 * torch.ones(20, 20, dtype=D)
    raw = linalg.hutchinson_diagonal(lambda v: A @ v, torch.zeros(20, dtype=D), probes=1)
    assert (raw < 0).any()
    memory = linalg.PreconditionerMemory()
    b = torch.ones(20, dtype=D)
    x, info = linalg.cg(tol=1e-12, preconditioner=linalg.jacobi(probes=1))(
        lambda v: A @ v, b, memory=memory
    )
    assert memory.diagonal is not None and (memory.diagonal[0] > 0).all()
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=0)


def test_the_estimate_is_remembered_reused_and_refreshed():
    A = spread_spd(n=30, spread=1e4)
    matvec, calls = counted(A)
    b = torch.ones(30, dtype=D)
    memory = linalg.PreconditionerMemory()
    solver = linalg.cg(tol=1e-12, preconditioner=linalg.jacobi(probes=8, every=3))
    described = []
    for _ in range(5):
        _, info = solver(matvec, b, memory=memory)
        described.append(info.preconditioner)
    assert described == [
        "jacobi (Hutchinson, 8 probes, estimated)",
        "jacobi (Hutchinson, 8 probes, reused 1 time)",
        "jacobi (Hutchinson, 8 probes, reused 2 times)",
        "jacobi (Hutchinson, 8 probes, estimated)",
        "jacobi (Hutchinson, 8 probes, reused 1 time)",
    ]
    assert memory.estimates == 2
    memory.refresh()
    solver(matvec, b, memory=memory)
    assert memory.estimates == 3
    # a right-hand side of another shape is not given a stale diagonal
    _, info = solver(lambda v: 2.0 * v, torch.ones(4, dtype=D), memory=memory)
    assert info.preconditioner.endswith("estimated)") and memory.estimates == 4
    # without memory, every solve estimates
    _, info = solver(matvec, b)
    assert info.preconditioner.endswith("estimated)")


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("ilu", ValueError, "'jacobi'"),
        (3.0, TypeError, "got float"),
        ([1, 2], TypeError, "got list"),
        (torch.tensor([1.0, -2.0, 3.0], dtype=D), ValueError, "positive, finite"),
        (torch.tensor([1.0, 0.0, 3.0], dtype=D), ValueError, "positive, finite"),
        (torch.tensor([1.0, math.nan, 3.0], dtype=D), ValueError, "positive, finite"),
        (torch.tensor([1, 2, 3]), TypeError, "floating-point"),
    ],
)
@pytest.mark.parametrize("name", ["cg", "minres"])
def test_bad_preconditioners_fail_early_and_clearly(name, bad, error, match):
    with pytest.raises(error, match=match):
        getattr(linalg, name)(preconditioner=bad)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_preconditioners_of_the_wrong_shape_fail_at_the_solve(name):
    b = torch.ones(3, dtype=D)
    solver = getattr(linalg, name)(preconditioner=torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="preconditioner.*shapes of b"):
        solver(lambda v: v, b)
    solver = getattr(linalg, name)(preconditioner=lambda v: v[:2])
    with pytest.raises(ValueError, match="M\\^-1 v, shaped like b"):
        solver(lambda v: v, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(probes=0), "probes"),
        (dict(every=0), "every"),
        (dict(floor=0.0), "floor"),
        (dict(floor=1.5), "floor"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_jacobi_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linalg.jacobi(**kwargs)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_preconditioned_vmap_equals_a_loop(name):
    A = torch.stack([spread_spd(n=20, spread=10.0**k, seed=k) for k in (1, 3, 5)])
    b = torch.randn(3, 20, generator=torch.Generator().manual_seed(2), dtype=D)
    solver = getattr(linalg, name)(tol=1e-12, maxiter=400, preconditioner=linalg.jacobi(probes=4))

    def one(M, rhs):
        return solver(lambda v: M @ v, rhs)[0]

    batched = torch.func.vmap(one)(A, b)
    loop = torch.stack([one(A[i], b[i]) for i in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["cg", "minres"])
@pytest.mark.parametrize("pre", [None, "jacobi"])
def test_a_warm_start_never_costs_more_products_than_cold(name, pre):
    A = spread_spd(n=50, spread=1e3)
    b = torch.randn(50, generator=torch.Generator().manual_seed(7), dtype=D)
    exact = torch.linalg.solve(A, b)
    solver = getattr(linalg, name)(tol=1e-11, maxiter=2000, preconditioner=pre)
    matvec, calls = counted(A)
    x_cold, info_cold = solver(matvec, b)
    cold = calls[0]
    gen = torch.Generator().manual_seed(8)
    starts = {
        "near": exact + 1e-7 * exact.norm() * torch.randn(50, generator=gen, dtype=D) / 50**0.5,
        "stale": -30.0 * exact,  # much worse than zero: scaled back towards it
        "random": 1e3 * torch.randn(50, generator=gen, dtype=D),
    }
    for what, x0 in starts.items():
        calls[0] = 0
        x, info = solver(matvec, b, x0)
        assert info.converged, (what, info)
        torch.testing.assert_close(x, x_cold, rtol=1e-8, atol=0)
        assert calls[0] <= cold + 1, (what, calls[0], cold)
        if what == "near":
            assert calls[0] < 0.75 * cold, (calls[0], cold)


def test_warm_start_and_jacobi_in_an_outer_loop_match_the_closed_form():
    """argmin with cg(preconditioner=jacobi(every=2)) and a WarmStart: every hypergradient
    equals the closed form, the estimate is reused, and warm solves take fewer iterations."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(80, 40, generator=g, dtype=D) * torch.logspace(-1, 1.5, 40, dtype=D)
    y = torch.randn(80, generator=g, dtype=D)
    v = torch.randn(40, generator=g, dtype=D)

    def loss(w, h):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (h.exp() * w**2).sum()

    def closed(h):
        H = X.T @ X + torch.diag(h.exp())
        w = torch.linalg.solve(H, X.T @ y)
        # d/dh of v^T w: -(H^-1 v) * exp(h) * w
        return -(torch.linalg.solve(H, v)) * h.exp() * w, w

    ws = bilevel.WarmStart()
    solver = linalg.cg(tol=1e-11, preconditioner=linalg.jacobi(probes=8, every=2))
    seen, iters = [], {"warm": [], "cold": []}
    for step in range(4):
        h = torch.linspace(-1, 1, 40, dtype=D) + 0.01 * step
        ref, w_star = closed(h)
        for mode, warm in (("warm", ws), ("cold", None)):
            hh = h.clone().requires_grad_()
            diag = bilevel.ImplicitDiagnostics()
            w = bilevel.argmin(
                loss, w_star, hh, linear_solver=solver, warm_start=warm, diagnostics=diag
            )
            (gh,) = torch.autograd.grad(v @ w, hh)
            torch.testing.assert_close(gh, ref, rtol=1e-8, atol=1e-12)
            iters[mode].append(diag.last_backward.iterations)
            if mode == "warm":
                seen.append(diag.last_backward.preconditioner)
    assert [s.split(", ")[-1] for s in seen] == [
        "estimated)",
        "reused 1 time)",
        "estimated)",
        "reused 1 time)",
    ]
    assert sum(iters["warm"][1:]) < sum(iters["cold"][1:]), iters
    ws.refresh_preconditioner()
    assert ws.preconditioners["vjp"].diagonal is None
    ws.clear()
    assert ws.preconditioners == {} and ws.solutions == {}


def test_the_reused_graph_products_have_a_batched_form_equal_to_one_by_one():
    """The implicit layers' Hessian-vector products on one graph offer a batched form (used
    for the probes on a GPU): the same products as one call per vector."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, 6, generator=g, dtype=D)
    seen = []

    def recording(matvec, b, x0=None):
        seen.append(matvec)
        return linalg.cg(tol=1e-12)(matvec, b, x0)

    h = torch.tensor(0.3, dtype=D, requires_grad=True)
    w_star = torch.zeros(6, dtype=D)

    def loss(w, h):
        return torch.nn.functional.softplus(X @ w).mean() + h * (w**4).sum() + 0.5 * (w**2).sum()

    w_star, _ = bilevel.solvers.lbfgs(tol=1e-12)(lambda w: loss(w, h.detach()), w_star)
    w = bilevel.argmin(loss, w_star, h, linear_solver=recording)
    torch.autograd.grad(w.sum(), h)
    (hvp,) = seen
    V = torch.randn(4, 6, generator=g, dtype=D)
    # the plain backward's operator offers matmat, the reused-graph HVP batched
    stacked = getattr(hvp, "matmat", None) or hvp.batched
    (batched,) = stacked([V])
    one_by_one = torch.stack([hvp([v])[0] for v in V])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-13, atol=1e-15)


def _out_of_place(solver, matvec, b, x0=None):
    """The same solve on the out-of-place path: a right-hand side autograd tracks."""
    leaves = [b] if isinstance(b, torch.Tensor) else list(b.values())
    with torch.enable_grad():
        for t in leaves:
            t.requires_grad_()
        x, info = solver(matvec, b, x0)
        for t in leaves:
            t.requires_grad_(False)
    return x, info


@pytest.mark.parametrize("pre", [None, "jacobi", "diagonal", "callable"])
@pytest.mark.parametrize("start", ["cold", "warm"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_in_place_cg_equals_the_out_of_place_iterates(pre, start, damping):
    """Outside autograd CG updates its vectors in place: the same iterates bit for bit as
    the allocating loop (which runs under autograd), the same iteration counts, and the
    caller's b and x0 untouched."""
    A = spread_spd(n=40, spread=1e4, seed=6)
    gen = torch.Generator().manual_seed(9)
    b = {
        "u": torch.randn(15, generator=gen, dtype=D),
        "v": torch.randn(5, 5, generator=gen, dtype=D),
    }
    x0 = None
    if start == "warm":
        x0 = {k: 0.1 * torch.randn(t.shape, generator=gen, dtype=D) for k, t in b.items()}
    diag = torch.diagonal(A).clone()
    tree_diag = {"u": diag[:15], "v": diag[15:].reshape(5, 5)}
    spec = {
        None: None,
        "jacobi": linalg.jacobi(probes=4),
        "diagonal": tree_diag,
        "callable": lambda t: {k: t[k] / tree_diag[k] for k in t},
    }[pre]

    def matvec(t):
        y = A @ torch.cat([t["u"], t["v"].reshape(-1)])
        return {"u": y[:15], "v": y[15:].reshape(5, 5)}

    for maxiter in (7, 500):  # truncated and converged
        solver = linalg.cg(tol=1e-12, maxiter=maxiter, damping=damping, preconditioner=spec)
        kept = {k: t.clone() for k, t in b.items()}
        kept0 = None if x0 is None else {k: t.clone() for k, t in x0.items()}
        x, info = solver(matvec, b, x0)
        for k in b:
            assert torch.equal(b[k], kept[k])
            if x0 is not None:
                assert torch.equal(x0[k], kept0[k])
        ref, ref_info = _out_of_place(solver, matvec, b, x0)
        assert ref["u"].requires_grad  # it did run the allocating loop
        for k in b:
            assert torch.equal(x[k], ref[k].detach()), (k, (x[k] - ref[k]).abs().max())
        assert info.iterations == ref_info.iterations
        assert info.residual_norm == ref_info.residual_norm
        assert info.converged == ref_info.converged == (maxiter == 500)


def test_cg_is_differentiable_through_its_iterations_when_the_operator_has_a_graph():
    """An operator whose products carry a graph (here A + theta I, theta requiring grad)
    switches CG to the allocating loop at its first product: backpropagating through the
    iterations then gives d x / d theta = -(A + theta I)^-2 b, not an in-place error."""
    A = spread_spd(n=20, spread=10.0, seed=2)
    b = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=D)
    theta = torch.tensor(0.3, dtype=D, requires_grad=True)
    x, info = linalg.cg(tol=1e-13, maxiter=200)(lambda v: A @ v + theta * v, b)
    assert info.converged
    (grad,) = torch.autograd.grad(x.sum(), theta)
    M = A + 0.3 * torch.eye(20, dtype=D)
    expected = -torch.linalg.solve(M, torch.linalg.solve(M, b)).sum()
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=0)


def test_argmin_takes_a_tensor_diagonal_for_a_tensor_unknown():
    g = torch.Generator().manual_seed(11)
    X = torch.randn(50, 12, generator=g, dtype=D) * torch.logspace(-1, 1, 12, dtype=D)
    y = torch.randn(50, generator=g, dtype=D)
    h = torch.tensor(0.1, dtype=D, requires_grad=True)
    H = X.T @ X + 0.1 * torch.eye(12, dtype=D)
    w_star = torch.linalg.solve(H, X.T @ y)

    def loss(w, h):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * h * (w**2).sum()

    diag = bilevel.ImplicitDiagnostics()
    solver = linalg.cg(tol=1e-12, preconditioner=torch.diagonal(H).clone())
    w = bilevel.argmin(loss, w_star, h, linear_solver=solver, diagnostics=diag)
    (gh,) = torch.autograd.grad(w.sum(), h)
    expected = -(torch.linalg.solve(H, torch.ones(12, dtype=D)) @ w_star)
    torch.testing.assert_close(gh, expected, rtol=1e-9, atol=0)
    assert diag.last_backward.preconditioner == "diagonal (given)"
