"""Tests of bilevel.linalg against dense solves (float64)."""

import math

import pytest
import torch

from bilevel import linalg
from bilevel._tree import tree_ravel, tree_unravel
from bilevel.linalg import base as linalg_base

DT = torch.float64
SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}  # n = 25
N = 25


def make_tree(gen, shapes=SHAPES):
    return {k: torch.randn(*s, generator=gen, dtype=DT) for k, s in shapes.items()}


def orthogonal(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q


def matrix(kind, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = orthogonal(n, gen)
    if kind == "spd":
        eig = torch.linspace(1.0, 10.0, n, dtype=DT)
    elif kind == "indefinite":
        mags = torch.linspace(1.0, 10.0, n, dtype=DT)
        eig = mags * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)
    elif kind == "nonsymmetric":
        return 5 * torch.eye(n, dtype=DT) + torch.randn(n, n, generator=gen, dtype=DT) / math.sqrt(
            n
        )
    elif kind == "scaled_spd":  # spectrum in [0.5, 1.5]: ||I - A|| = 0.5
        eig = torch.linspace(0.5, 1.5, n, dtype=DT)
    else:
        raise ValueError(kind)
    return q @ torch.diag(eig) @ q.T


def tree_matvec(M, like):
    """The operator of the matrix M acting on the raveled tree."""

    def matvec(v):
        return tree_unravel(M @ tree_ravel(v), like)

    return matvec


def rhs(seed=1):
    return make_tree(torch.Generator().manual_seed(seed))


def rel_err(x, ref):
    return ((tree_ravel(x) - ref).norm() / ref.norm()).item()


def true_residual(M, x, b, damping=0.0):
    xf = tree_ravel(x)
    return (M @ xf + damping * xf - tree_ravel(b)).norm().item()


CASES = [
    ("cg", "spd", lambda: linalg.cg(tol=1e-13)),
    ("minres", "spd", lambda: linalg.minres(tol=1e-13)),
    ("minres", "indefinite", lambda: linalg.minres(tol=1e-13)),
    ("gmres", "spd", lambda: linalg.gmres(tol=1e-13)),
    ("gmres", "indefinite", lambda: linalg.gmres(tol=1e-13, restart=N)),
    ("gmres", "nonsymmetric", lambda: linalg.gmres(tol=1e-13)),
    ("gmres-restart5", "nonsymmetric", lambda: linalg.gmres(tol=1e-13, restart=5, maxiter=500)),
    ("dense", "spd", lambda: linalg.dense()),
    ("dense", "indefinite", lambda: linalg.dense()),
    ("dense", "nonsymmetric", lambda: linalg.dense()),
    ("dense-lstsq", "nonsymmetric", lambda: linalg.dense(method="lstsq")),
    ("dense-columns", "nonsymmetric", lambda: linalg.dense(vectorize=False)),
    ("neumann", "scaled_spd", lambda: linalg.neumann(alpha=1.0, maxiter=200, tol=1e-13)),
]


@pytest.mark.parametrize("name,kind,factory", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_solvers_match_dense_solve_on_trees(name, kind, factory):
    M = matrix(kind)
    b = rhs()
    solver = factory()
    x, info = solver(tree_matvec(M, b), b)
    assert isinstance(x, dict) and list(x) == list(b)
    assert all(x[k].shape == b[k].shape and x[k].dtype == DT for k in b)
    ref = torch.linalg.solve(M, tree_ravel(b))
    assert rel_err(x, ref) < 1e-10, (info, rel_err(x, ref))
    assert info.converged, info
    assert solver.last_info is info
    assert info.method == solver.name
    if name != "dense" and not name.startswith("dense"):
        assert 0 < info.iterations <= (solver.maxiter or 10 * N)


def test_single_tensor_and_tuple_trees():
    M = matrix("spd")
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(N, generator=gen, dtype=DT)
    x, info = linalg.cg(tol=1e-13)(lambda v: M @ v, b)
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-10
    bt = (b[:10].reshape(2, 5), b[10:])
    xt, _ = linalg.minres(tol=1e-13)(tree_matvec(M, bt), bt)
    assert isinstance(xt, tuple) and xt[0].shape == (2, 5)
    assert rel_err(xt, torch.linalg.solve(M, b)) < 1e-10


@pytest.mark.parametrize(
    "factory",
    [
        lambda d: linalg.cg(tol=1e-13, damping=d),
        lambda d: linalg.minres(tol=1e-13, damping=d),
        lambda d: linalg.gmres(tol=1e-13, damping=d),
        lambda d: linalg.dense(damping=d),
        lambda d: linalg.dense(method="lstsq", damping=d),
        lambda d: linalg.neumann(alpha=0.5, maxiter=300, tol=1e-13, damping=d),
    ],
    ids=["cg", "minres", "gmres", "dense", "lstsq", "neumann"],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_damping(factory, as_tensor):
    M = matrix("scaled_spd")
    b = rhs()
    lam = 0.7
    solver = factory(torch.tensor(lam, dtype=DT) if as_tensor else lam)
    x, info = solver(tree_matvec(M, b), b)
    ref = torch.linalg.solve(M + lam * torch.eye(N, dtype=DT), tree_ravel(b))
    assert rel_err(x, ref) < 1e-10, info
    assert rel_err(x, torch.linalg.solve(M, tree_ravel(b))) > 1e-2  # damping did something


def test_damping_makes_cg_work_on_indefinite():
    M = matrix("indefinite")  # eigenvalues in [-10, -1] u [1, 10]
    b = rhs()
    x, info = linalg.cg(tol=1e-13, damping=11.0)(tree_matvec(M, b), b)
    assert info.converged and not info.negative_curvature
    ref = torch.linalg.solve(M + 11.0 * torch.eye(N, dtype=DT), tree_ravel(b))
    assert rel_err(x, ref) < 1e-10


ITERATIVE = {
    "cg": lambda **kw: linalg.cg(**kw),
    "minres": lambda **kw: linalg.minres(**kw),
    "gmres": lambda **kw: linalg.gmres(**kw),
    "neumann": lambda **kw: linalg.neumann(alpha=1.0, **kw),
}


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_x0_is_respected(name):
    M = matrix("scaled_spd")
    b = rhs()
    A = tree_matvec(M, b)
    ref = torch.linalg.solve(M, tree_ravel(b))
    exact = tree_unravel(ref, b)
    # started at the solution: nothing to do
    x, info = ITERATIVE[name](tol=1e-10, maxiter=100)(A, b, x0=exact)
    assert info.iterations == 0 and info.converged
    assert all(torch.equal(x[k], exact[k]) for k in b)
    # started near the solution: converges in fewer iterations than from zero
    gen = torch.Generator().manual_seed(5)
    near = {
        k: exact[k] + 1e-6 * torch.randn(v.shape, generator=gen, dtype=DT) for k, v in b.items()
    }
    x_near, info_near = ITERATIVE[name](tol=1e-12, maxiter=200)(A, b, x0=near)
    x_zero, info_zero = ITERATIVE[name](tol=1e-12, maxiter=200)(A, b)
    assert info_near.converged and info_zero.converged
    assert info_near.iterations < info_zero.iterations
    assert rel_err(x_near, ref) < 1e-10
    # a single iteration from x0 is a step from x0, not from zero
    x1, _ = ITERATIVE[name](tol=0.0, maxiter=1)(A, b, x0=near)
    assert rel_err(x1, ref) < 1e-5


def test_cg_reports_negative_curvature():
    M = matrix("indefinite")
    b = rhs()
    x, info = linalg.cg()(tree_matvec(M, b), b)
    assert info.negative_curvature and not info.converged
    assert "minres" in info.message and "damping" in info.message
    assert "NOT converged" in str(info)
    assert all(torch.isfinite(v).all() for v in x.values())
    # the same system is fine for minres
    _, info_m = linalg.minres()(tree_matvec(M, b), b)
    assert info_m.converged and not info_m.negative_curvature


def test_cg_zero_curvature_is_reported():
    M = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=DT))  # semidefinite
    b = torch.tensor([0.0, 1.0, 0.0], dtype=DT)  # p^T A p = 0 at once
    _, info = linalg.cg()(lambda v: M @ v, b)
    assert info.negative_curvature and not info.converged


def singular_matrix(seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(N, 5, generator=gen, dtype=DT)
    return u @ u.T  # rank 5


def test_dense_solve_on_singular_matrix_raises_clearly():
    S = singular_matrix()
    b = rhs()
    with pytest.raises(RuntimeError, match="singular") as err:
        linalg.dense()(tree_matvec(S, b), b)
    assert "lstsq" in str(err.value) and "damping" in str(err.value)
    # exactly singular too
    Z = torch.zeros(N, N, dtype=DT)
    with pytest.raises(RuntimeError, match="lstsq"):
        linalg.dense()(tree_matvec(Z, b), b)


def test_dense_lstsq_gives_min_norm_solution():
    S = singular_matrix()
    b = rhs()
    x, info = linalg.dense(method="lstsq")(tree_matvec(S, b), b)
    ref = torch.linalg.pinv(S) @ tree_ravel(b)
    assert rel_err(x, ref) < 1e-10
    assert "rank 5 of 25" in info.message
    assert info.residual_norm == pytest.approx(true_residual(S, x, b), rel=1e-8)
    # damping also turns the singular matrix into a solvable one
    x_d, _ = linalg.dense(damping=0.1)(tree_matvec(S, b), b)
    ref_d = torch.linalg.solve(S + 0.1 * torch.eye(N, dtype=DT), tree_ravel(b))
    assert rel_err(x_d, ref_d) < 1e-10


def test_dense_lstsq_rcond_cutoff():
    q = orthogonal(N, torch.Generator().manual_seed(2))
    eig = torch.logspace(0, -8, N, dtype=DT)
    M = q @ torch.diag(eig) @ q.T
    b = rhs()
    x, info = linalg.dense(method="lstsq", rcond=1.5e-4)(tree_matvec(M, b), b)
    keep = eig > 1.5e-4  # 10^(-k/3): no eigenvalue near the cutoff
    ref = q[:, keep] @ ((q[:, keep].T @ tree_ravel(b)) / eig[keep])
    assert rel_err(x, ref) < 1e-10
    assert f"rank {int(keep.sum())} of {N}" in info.message


def test_minres_singular_inconsistent_system_is_reported():
    S = torch.diag(torch.tensor([2.0, -1.0, 0.0, 3.0], dtype=DT))
    b = torch.ones(4, dtype=DT)  # has a component in the null space
    x, info = linalg.minres()(lambda v: S @ v, b)
    assert not info.converged and "singular" in info.message
    # a least-squares solution (not the minimum-norm one: that would need MINRES-QLP)
    assert (S @ (S @ x - b)).norm() < 1e-12
    assert info.residual_norm == pytest.approx(1.0, rel=1e-12)
    assert (S @ x - b).norm().item() == pytest.approx(1.0, rel=1e-12)
    assert x.norm() < 10  # stopped before dividing by the vanishing pivot


def test_minres_singular_consistent_system():
    S = singular_matrix()
    gen = torch.Generator().manual_seed(8)
    bf = S @ torch.randn(N, generator=gen, dtype=DT)  # in the range of S
    x, info = linalg.minres(tol=1e-12)(lambda v: S @ v, bf)
    assert info.converged
    assert (S @ x - bf).norm() <= 1e-10 * bf.norm()


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_info_not_converged_when_maxiter_too_small(name):
    M = matrix("scaled_spd", seed=4) if name == "neumann" else matrix("spd", seed=4)
    b = rhs()
    solver = ITERATIVE[name](tol=1e-12, maxiter=3)
    x, info = solver(tree_matvec(M, b), b)
    assert not info.converged and not info.negative_curvature
    assert info.iterations == 3
    assert "maxiter" in info.message
    assert info.residual_norm > info.threshold
    assert info.residual_norm == pytest.approx(true_residual(M, x, b), rel=1e-8)
    assert info.threshold == pytest.approx(1e-12 * tree_ravel(b).norm().item())


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_info_converged_residual_matches_true_residual(name):
    M = matrix("scaled_spd")
    b = rhs()
    solver = ITERATIVE[name](tol=1e-6, maxiter=100)
    x, info = solver(tree_matvec(M, b), b)
    assert info.converged and info.residual_norm <= info.threshold
    assert info.iterations <= 100
    assert info.residual_norm == pytest.approx(true_residual(M, x, b), rel=1e-6)
    assert "converged in" in str(info)


def test_atol():
    M = matrix("spd")
    b = rhs()
    bnorm = tree_ravel(b).norm().item()
    _, info = linalg.cg(tol=0.0, atol=1e-3 * bnorm)(tree_matvec(M, b), b)
    assert info.converged and info.threshold == pytest.approx(1e-3 * bnorm)
    assert 1e-5 * bnorm < info.residual_norm <= 1e-3 * bnorm


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_check_every_does_not_change_results(name):
    M = matrix("scaled_spd")
    b = rhs()
    A = tree_matvec(M, b)
    results = [
        ITERATIVE[name](tol=1e-12, maxiter=100, check_every=k)(A, b) for k in (1, 7, 10, 100)
    ]
    x_ref, info_ref = results[0]
    assert info_ref.converged and info_ref.iterations < 60  # later checks ran masked iterations
    for x, info in results[1:]:
        assert info.iterations == info_ref.iterations
        assert info.residual_norm == pytest.approx(info_ref.residual_norm, rel=1e-12)
        for k in b:
            if name == "gmres":  # triangular solves of different sizes round differently
                torch.testing.assert_close(x[k], x_ref[k], rtol=1e-13, atol=1e-15)
            else:
                assert torch.equal(x[k], x_ref[k])


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_one_host_sync_when_check_every_is_maxiter(name, monkeypatch):
    calls = []
    real = linalg_base._to_host

    def counting(t):
        calls.append(t.numel())
        return real(t)

    monkeypatch.setattr(linalg_base, "_to_host", counting)
    M = matrix("scaled_spd")
    b = rhs()
    _, info = ITERATIVE[name](tol=1e-12, maxiter=80, check_every=80)(tree_matvec(M, b), b)
    assert info.converged
    assert len(calls) == 1
    calls.clear()
    ITERATIVE[name](tol=1e-12, maxiter=80, check_every=10)(tree_matvec(M, b), b)
    assert 1 < len(calls) <= 9  # checks at 10, 20, ... until convergence, then the final read


def test_no_item_or_bool_on_tensors_inside_loop(monkeypatch):
    """Any other device->host read (Tensor.item / __bool__ / tolist) would be a sync."""
    M = matrix("nonsymmetric")
    b = rhs()
    reads = []
    for meth in ("item", "__bool__", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, meth)

        def wrapped(self, *a, _real=real, _m=meth, **k):
            reads.append(_m)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, wrapped)
    for solver in (
        linalg.cg(maxiter=40, check_every=40),
        linalg.minres(maxiter=40, check_every=40),
        linalg.gmres(maxiter=40, check_every=40),
        linalg.neumann(alpha=0.2, maxiter=40, check_every=40),
    ):
        reads.clear()
        solver(tree_matvec(M, b), b)
        assert reads == ["tolist"], (solver.name, reads)


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_zero_rhs_and_lucky_breakdown_stay_finite(name):
    b = rhs()
    zero = {k: torch.zeros_like(v) for k, v in b.items()}
    eye = lambda v: v  # noqa: E731
    x, info = ITERATIVE[name](check_every=10, maxiter=30)(eye, zero)
    assert info.converged and info.iterations == 0
    assert all(torch.equal(x[k], zero[k]) for k in b)
    # identity: exact after one step; masked steps afterwards must not divide by zero
    x, info = ITERATIVE[name](check_every=30, maxiter=30)(eye, b)
    assert info.converged and info.iterations == 1
    for k in b:
        torch.testing.assert_close(x[k], b[k], rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_nan_operator_stops_early_and_is_reported(name):
    b = rhs()
    x, info = ITERATIVE[name](maxiter=500, check_every=5)(
        lambda v: {k: t * float("nan") for k, t in v.items()}, b
    )
    assert not info.converged and info.iterations <= 5
    if name == "neumann":
        assert all(torch.isfinite(t).all() for t in x.values())  # frozen before the NaN
    else:
        assert "non-finite" in info.message


def test_neumann_documented_rate_and_divergence():
    M = matrix("scaled_spd")  # ||I - A|| = 0.5
    b = rhs()
    bnorm = tree_ravel(b).norm().item()
    K = 20
    x, info = linalg.neumann(alpha=1.0, maxiter=K, tol=0.0)(tree_matvec(M, b), b)
    assert not info.converged and info.iterations == K
    assert info.residual_norm <= 0.5**K * bnorm * (1 + 1e-10)
    assert info.residual_norm == pytest.approx(true_residual(M, x, b), rel=1e-8)
    # error bound ||A^-1|| ||I - alpha A||^K ||b|| with ||A^-1|| = 2
    ref = torch.linalg.solve(M, tree_ravel(b))
    assert (tree_ravel(x) - ref).norm() <= 2 * 0.5**K * bnorm * (1 + 1e-10)
    # the partial sums are alpha * sum_{k<K} (I - alpha A)^k b
    alpha, bf = 0.8, tree_ravel(b)
    term, total = bf.clone(), torch.zeros_like(bf)
    for _ in range(5):
        total = total + term
        term = term - alpha * (M @ term)
    x5, _ = linalg.neumann(alpha=alpha, maxiter=5, tol=0.0)(tree_matvec(M, b), b)
    torch.testing.assert_close(tree_ravel(x5), alpha * total, rtol=1e-13, atol=1e-14)
    # alpha too large for the spectrum (||I - 2.5 A|| = 2.75): reported, finite
    S = matrix("spd")
    x, info = linalg.neumann(alpha=1.0, maxiter=2000)(tree_matvec(S, b), b)
    assert not info.converged and "diverges" in info.message and "alpha" in info.message
    assert info.residual_norm <= 1e6 * bnorm and info.iterations < 50  # stopped early
    assert all(torch.isfinite(v).all() for v in x.values())
    # a well-chosen alpha ~ 1 / lambda_max converges on the same operator
    x, info = linalg.neumann(alpha=0.1, maxiter=1000, tol=1e-12)(tree_matvec(S, b), b)
    assert info.converged
    assert rel_err(x, torch.linalg.solve(S, tree_ravel(b))) < 1e-10


def test_hessian_vector_products_of_logistic_loss():
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(40, 6, generator=gen, dtype=DT)
    y = (torch.rand(40, generator=gen, dtype=DT) > 0.5).to(DT) * 2 - 1
    params = {"w": 0.1 * torch.randn(6, generator=gen, dtype=DT), "b": torch.tensor(0.3, dtype=DT)}

    def loss(p):
        z = X @ p["w"] + p["b"]
        return torch.nn.functional.softplus(-y * z).mean() + 0.05 * (p["w"] ** 2).sum()

    def hvp(v):
        return torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]

    H = torch.func.hessian(lambda f: loss(tree_unravel(f, params)))(tree_ravel(params))
    v = {"w": torch.randn(6, generator=gen, dtype=DT), "b": torch.tensor(-1.0, dtype=DT)}
    ref = torch.linalg.solve(H, tree_ravel(v))
    for solver in (
        linalg.cg(tol=1e-13),
        linalg.minres(tol=1e-13),
        linalg.gmres(tol=1e-13),
        linalg.dense(),
        linalg.dense(method="lstsq"),
    ):
        x, info = solver(hvp, v)
        assert info.converged, (solver, info)
        assert x["b"].shape == ()
        assert rel_err(x, ref) < 1e-9, (solver, info)


def test_vmap_over_right_hand_sides():
    M = matrix("nonsymmetric", n=8)
    S = matrix("spd", n=8)
    B = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    for solver, Mx in (
        (linalg.cg(tol=1e-13, maxiter=40), S),
        (linalg.minres(tol=1e-13, maxiter=40), S),
        (linalg.gmres(tol=1e-13, maxiter=40), M),
        (linalg.dense(), M),
    ):
        xs = torch.func.vmap(lambda bb, s=solver, A=Mx: s(lambda v: A @ v, bb)[0])(B)
        # iterative solvers summarise the batch (each problem stops on its own); dense cannot
        assert solver.last_info.checked == (solver.name != "dense")
        ref = torch.linalg.solve(Mx, B.T).T
        torch.testing.assert_close(xs, ref, rtol=1e-10, atol=1e-12)
    # a batch of operators with a shared right-hand side: the batch appears mid-solve
    Ms = torch.stack([matrix("spd", n=8, seed=s) for s in range(3)])
    b = B[0]
    for solver in (
        linalg.cg(tol=1e-13, maxiter=40),
        linalg.minres(tol=1e-13, maxiter=40),
        linalg.gmres(tol=1e-13, maxiter=40),
        linalg.neumann(alpha=0.1, maxiter=400, tol=1e-13),
        linalg.dense(method="lstsq"),
    ):
        xs = torch.func.vmap(lambda A, s=solver: s(lambda v: A @ v, b)[0])(Ms)
        assert "vmap" in solver.last_info.message
        assert solver.last_info.checked == (solver.name != "dense")
        if solver.name != "dense":
            assert solver.last_info.converged and "3 problems" in solver.last_info.message
        torch.testing.assert_close(xs, torch.linalg.solve(Ms, b), rtol=1e-10, atol=1e-12)


def test_gradients_flow_through_the_solve():
    M = matrix("nonsymmetric", n=8)
    b = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=DT, requires_grad=True)
    x, _ = linalg.gmres(tol=1e-13)(lambda v: M @ v, b)
    (g,) = torch.autograd.grad(x.sum(), b)
    torch.testing.assert_close(g, torch.linalg.solve(M.T, torch.ones(8, dtype=DT)))


def test_float32_keeps_dtype():
    M = matrix("spd").float()
    b = {k: v.float() for k, v in rhs().items()}
    for solver in (linalg.cg(tol=1e-5), linalg.minres(tol=1e-5), linalg.gmres(tol=1e-5)):
        x, info = solver(tree_matvec(M, b), b)
        assert info.converged and all(v.dtype == torch.float32 for v in x.values())


def test_attributes_and_repr():
    assert linalg.cg().symmetric and linalg.minres().symmetric
    assert not linalg.gmres().symmetric and not linalg.dense().symmetric
    assert not linalg.neumann().symmetric  # a Neumann series needs ||I - alpha A|| < 1 only
    for f in (linalg.cg, linalg.minres, linalg.gmres, linalg.neumann, linalg.dense):
        s = f()
        assert isinstance(s, linalg.LinearSolver) and s.last_info is None
        assert repr(s).startswith(s.name + "(")
    assert linalg.gmres(restart=7).restart == 7


def test_bad_input_is_rejected():
    b = rhs()
    M = matrix("spd")
    with pytest.raises(ValueError, match="tol"):
        linalg.cg(tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        linalg.minres(maxiter=0)
    with pytest.raises(ValueError, match="check_every"):
        linalg.gmres(check_every=0)
    with pytest.raises(ValueError, match="restart"):
        linalg.gmres(restart=0)
    with pytest.raises(ValueError, match="alpha"):
        linalg.neumann(alpha=-1.0)
    with pytest.raises(ValueError, match="method"):
        linalg.dense(method="svd")
    with pytest.raises(ValueError, match="damping"):
        linalg.cg(damping=-0.1)
    with pytest.raises(ValueError, match="x0"):
        linalg.cg()(tree_matvec(M, b), b, x0={"a": b["a"]})
    with pytest.raises(ValueError, match="matvec"):
        linalg.cg()(lambda v: tree_ravel(v), b)
    with pytest.raises(TypeError, match="floating"):
        linalg.cg()(lambda v: v, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="b must"):
        linalg.cg()(lambda v: v, {})
    with pytest.raises(TypeError, match="matvec"):
        linalg.cg()(None, b)


def test_inner_products_under_vmap_are_row_sums_not_batched_matrix_products():
    """Under ``vmap`` a solver's inner products take the product and the row sum (dot's
    batching rule is a batched matrix product with its reshapes, ~3x the time): each row
    equals its own inner product, for 1-d and n-d leaves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bilevel.linalg._vec import _dot

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(6, 5, generator=gen, dtype=DT), torch.randn(6, 2, 3, generator=gen, dtype=DT)]
    b = [torch.randn(6, 5, generator=gen, dtype=DT), torch.randn(6, 2, 3, generator=gen, dtype=DT)]
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        batched = torch.func.vmap(_dot)(a, b)
    assert "bmm" not in ops and "mul" in ops
    loop = torch.stack([_dot([x[i] for x in a], [y[i] for y in b]) for i in range(6)])
    torch.testing.assert_close(batched, loop, rtol=1e-14, atol=0)
    # one side batched, the other shared
    shared = torch.func.vmap(_dot, in_dims=(0, None))(a, [y[0] for y in b])
    torch.testing.assert_close(shared[3], _dot([x[3] for x in a], [y[0] for y in b]))


@pytest.mark.parametrize("name", ["cg", "minres"])
@pytest.mark.parametrize("shared_rhs", [False, True])
def test_krylov_under_vmap_runs_on_the_stacks_and_each_problem_is_its_own_solve(
    name, shared_rhs, monkeypatch
):
    """A cold, unpreconditioned ``cg`` or ``minres`` under ``vmap`` runs its loop on the stacks under
    the batched tensors (row-wise scalars, no batching rule per operation): every problem
    stops on its own (different iteration counts), its solution is its own solve's, and the
    record is the batched summary (most iterations, converged when all did). A tree of two
    leaves; a right-hand side shared by the problems (not batched: the stack's size is
    unknown before the first product) keeps the loop under ``vmap``, with the same answers."""
    import importlib

    rows_module = importlib.import_module("bilevel.linalg._rows")
    solver = getattr(linalg, name)
    gen = torch.Generator().manual_seed(1)
    B, n = 5, 8
    Q = torch.randn(B, n, n, generator=gen, dtype=DT)
    scale = torch.logspace(0, -3, B, dtype=DT)  # condition numbers ~1 .. 1e3: different counts
    A = Q @ Q.mT / n + scale[:, None, None] * torch.eye(n, dtype=DT)
    b = torch.randn(B, n, generator=gen, dtype=DT)
    if shared_rhs:
        b = b[:1].expand(B, n)
    seen, infos = [], []
    real = rows_module.rows_of
    monkeypatch.setattr(rows_module, "rows_of", lambda v: seen.append(real(v)) or seen[-1])

    def product(A_i, v):
        y = A_i @ torch.cat([v["a"], v["b"]])
        return {"a": y[:3], "b": y[3:]}

    def one(A_i, b_i):
        x, info = solver(tol=1e-12)(lambda v: product(A_i, v), {"a": b_i[:3], "b": b_i[3:]})
        infos.append(info)
        return torch.cat([x["a"], x["b"]])

    xs = torch.func.vmap(one, in_dims=(0, None if shared_rhs else 0))(A, b[0] if shared_rhs else b)
    if shared_rhs:
        assert seen == [None]
    else:
        assert seen[0] is not None and seen[0].batch_size == B
    counts = []
    for i in range(B):
        x_i, info_i = solver(tol=1e-12)(lambda v, i=i: A[i] @ v, b[i].clone())
        torch.testing.assert_close(xs[i], x_i, rtol=1e-10, atol=1e-12)
        counts.append(info_i.iterations)
    assert len(set(counts)) > 1
    (info,) = infos
    assert info.converged and info.iterations == max(counts)
    assert "under torch.func.vmap: 5 problems" in info.message
    assert info.min_curvature > 0  # the Rayleigh quotients of an SPD stack
