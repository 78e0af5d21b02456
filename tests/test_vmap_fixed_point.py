"""The fixed-point solvers on a stack of problems: every row is a single call, under vmap too."""

import math
import warnings

import pytest
import torch

import bilevel
from bilevel import solvers
from bilevel._sync import count_syncs
from bilevel.solvers import NotStationaryWarning

D = torch.float64
B, N = 4, 5


def _problems():
    """Contractive maps ``w - eta (A w - b + h w + 0.2 w^3)`` whose rates differ per problem,
    so the solvers need different numbers of iterations."""
    g = torch.Generator().manual_seed(3)
    As, bs = [], []
    for spread in (2.0, 5.0, 12.0, 30.0):
        Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D))
        ev = torch.logspace(0, math.log10(spread), N, dtype=D)
        As.append(Q @ torch.diag(ev) @ Q.T)
        bs.append(torch.randn(N, generator=g, dtype=D))
    h = torch.tensor([0.3, 0.7, 1.1, 0.5], dtype=D)
    return torch.stack(As), torch.stack(bs), h


ETA = 0.05


def _step(w, h, d):
    # (A * w).sum(-1) rather than A @ w: under vmap a matmul becomes a batched kernel that
    # rounds differently from the single one, and Anderson's least squares amplifies such
    # last-bit differences of the map (not of the solver) beyond 1e-12 in truncated solves
    A, b = d
    return w - ETA * ((A * w).sum(-1) - b + h * w + 0.2 * w * w * w)


SOLVERS = {
    "fpi_check_1": lambda maxiter: solvers.fixed_point_iteration(
        tol=1e-12, maxiter=maxiter, check_every=1
    ),
    "fpi_check_10": lambda maxiter: solvers.fixed_point_iteration(tol=1e-12, maxiter=maxiter),
    "anderson": lambda maxiter: solvers.anderson(tol=1e-12, maxiter=maxiter),
    "anderson_damped": lambda maxiter: solvers.anderson(
        tol=1e-12, maxiter=maxiter, memory=3, mixing=0.5, check_every=2
    ),
}
FULL, TRUNCATED = 20000, 7


def _same_records(infos, singles, exact=False):
    for info, single in zip(infos, singles):
        if exact:
            assert info.grad_norm == single.grad_norm or math.isnan(single.grad_norm)
        assert info.iterations == single.iterations, (info, single)
        assert info.evaluations == single.evaluations
        assert info.converged == single.converged
        assert info.message == single.message
        assert info.extra == single.extra
        if math.isnan(single.grad_norm):
            assert math.isnan(info.grad_norm)
        else:
            # near convergence the residual is rounding of the iterate (the batched map's
            # products round differently from the single ones): a tenth of tol absolute
            assert info.grad_norm == pytest.approx(single.grad_norm, rel=1e-6, abs=1e-13)


@pytest.mark.parametrize("maxiter", [FULL, TRUNCATED], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_solve_batch_rows_are_single_calls(name, maxiter):
    A, b, h = _problems()
    solver = SOLVERS[name](maxiter)
    maps = torch.func.vmap(lambda w, h, A, b: _step(w, h, (A, b)))
    W, infos = solver.solve_batch(lambda W: maps(W, h, A, b), torch.zeros(B, N, dtype=D))
    assert solver.last_info is infos[-1] and infos[0].time > 0
    singles, sols = [], []
    for i in range(B):
        w, info = solver(lambda w, i=i: _step(w, h[i], (A[i], b[i])), torch.zeros(N, dtype=D))
        sols.append(w)
        singles.append(info)
    torch.testing.assert_close(W, torch.stack(sols), rtol=1e-12, atol=1e-13)
    _same_records(infos, singles)
    if maxiter == FULL:
        assert all(i.converged for i in infos)
        assert len({i.iterations for i in infos}) == B, [i.iterations for i in infos]
    else:
        assert not any(i.converged for i in infos)
        assert all(i.iterations == TRUNCATED and "maxiter" in i.message for i in infos)


@pytest.mark.parametrize("n", [7, 300])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_rows_are_bitwise_single_calls_when_the_map_rounds_per_row(name, n):
    """With a map of exactly rounded elementwise ops, nothing but the solver could make a
    row depend on the stack: its bits, iterations and residual equal a single call's."""
    g = torch.Generator().manual_seed(0)
    rows = 6
    c = torch.randn(rows, n, generator=g, dtype=D)
    k = torch.rand(rows, 1, generator=g, dtype=D) * 0.5 + 0.05

    def T(W, c=c, k=k):
        return k * W - 0.02 * W * W * W + 0.2 * W.roll(1, -1) + 0.5 * c

    for maxiter in (2000, TRUNCATED):
        solver = SOLVERS[name](maxiter)
        W, infos = solver.solve_batch(T, torch.zeros(rows, n, dtype=D))
        for i in range(rows):
            one = lambda w, i=i: T(w.unsqueeze(0), c[i : i + 1], k[i : i + 1])[0]  # noqa: E731
            w, single = solver(one, torch.zeros(n, dtype=D))
            assert torch.equal(W[i], w), (name, n, maxiter, i)
            _same_records([infos[i]], [single], exact=True)
        assert all(i.converged for i in infos) == (maxiter != TRUNCATED)
        if maxiter != TRUNCATED:
            assert len({i.iterations for i in infos}) > 1


@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson"])
def test_a_diverging_problem_stops_alone(name):
    """A row whose image is infinite stops at its first check; the others go on unchanged."""
    c = torch.tensor([[1.0, 2.0], [math.inf, 0.0], [-3.0, 0.5]], dtype=D)
    solver = getattr(solvers, name)(tol=1e-12, maxiter=500)
    W, infos = solver.solve_batch(lambda W: 0.6 * W + c, torch.zeros(3, 2, dtype=D))
    assert infos[1].message.startswith("diverged: non-finite residual at iteration")
    assert not infos[1].converged and infos[1].iterations <= 10
    for i in (0, 2):
        w, single = solver(lambda w, i=i: 0.6 * w + c[i], torch.zeros(2, dtype=D))
        assert single.converged
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(W[i], c[i] / 0.4, rtol=1e-10, atol=1e-10)
        _same_records([infos[i]], [single])


def test_solve_batch_on_a_tree_of_mixed_shapes_and_dtypes():
    c = {"u": torch.tensor([[0.3, -1.0], [2.0, 0.1]], dtype=D), "v": torch.ones(2, 1, 1)}

    def T(w):
        return {"u": 0.5 * torch.cos(w["u"]) + c["u"], "v": 0.3 * w["v"] + c["v"]}

    init = {"u": torch.zeros(2, 2, dtype=D), "v": torch.zeros(2, 1, 1)}
    solver = solvers.anderson(tol=1e-12, memory=3)
    W, infos = solver.solve_batch(T, init)
    assert W["v"].dtype == torch.float32 and W["u"].shape == (2, 2)
    for i in range(2):
        w, single = solver(
            lambda w, i=i: {
                "u": 0.5 * torch.cos(w["u"]) + c["u"][i],
                "v": 0.3 * w["v"] + c["v"][i],
            },
            {k: v[i] for k, v in init.items()},
        )
        torch.testing.assert_close(W["u"][i], w["u"], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(W["v"][i], w["v"], rtol=0, atol=0)
        _same_records([infos[i]], [single])


def test_solve_batch_bad_input():
    solver = solvers.fixed_point_iteration()
    with pytest.raises(TypeError, match="maps must be callable"):
        solver.solve_batch("map", torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="dimension 0"):
        solver.solve_batch(lambda W: W, torch.zeros((), dtype=D))
    with pytest.raises(ValueError, match="dimension 0"):
        solver.solve_batch(lambda W: W, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="structure"):
        solvers.anderson().solve_batch(lambda W: {"x": W}, torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="shape"):
        solver.solve_batch(lambda W: W[:1], torch.zeros(2, 3, dtype=D))


@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson"])
def test_host_reads_one_per_check_and_one_for_the_records(name):
    c = torch.tensor([[1.0], [5.0], [40.0]], dtype=D)
    solver = getattr(solvers, name)(tol=1e-12, maxiter=1000, check_every=3)
    solver.solve_batch(lambda W: 0.5 * W + c, torch.zeros(3, 1, dtype=D))  # warm-up
    with count_syncs("cpu") as syncs:
        _, infos = solver.solve_batch(lambda W: 0.5 * W + c, torch.zeros(3, 1, dtype=D))
    last = max(i.iterations for i in infos)
    assert all(i.converged for i in infos) and last % 3 == 0
    assert syncs.count == last // 3 + 1, syncs
    with count_syncs("cpu") as syncs:  # truncated: no read at maxiter, where all stop
        solver.__class__(tol=1e-12, maxiter=7, check_every=3).solve_batch(
            lambda W: 0.5 * W + c, torch.zeros(3, 1, dtype=D)
        )
    assert syncs.count == 2 + 1, syncs  # checks at 3 and 6, the records


# ------------------------------------------------------------------ through the vmapped layers


def _counting(monkeypatch, cls):
    """Record every ``solve_batch`` call's info records."""
    calls = []
    original = cls.solve_batch

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out[1])
        return out

    monkeypatch.setattr(cls, "solve_batch", spy)
    return calls


@pytest.mark.parametrize("shared", [False, True], ids=["batched_h", "shared_h"])
@pytest.mark.parametrize("maxiter", [FULL, TRUNCATED], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_vmapped_fixed_point_layer_equals_a_loop(monkeypatch, name, maxiter, shared):
    A, b, h = _problems()
    if shared:
        h = h[1]
    solver = SOLVERS[name](maxiter)
    calls = _counting(monkeypatch, type(solver))
    layer = lambda A, b, h: bilevel.fixed_point(  # noqa: E731
        _step, torch.zeros(N, dtype=D), h, (A, b), solver=solver
    )
    hv = h.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotStationaryWarning)
        wv = torch.func.vmap(layer, in_dims=(0, 0, None if shared else 0))(A, b, hv)
    assert len(calls) == 1, "the stack is solved by one solve_batch call"
    (gv,) = torch.autograd.grad((wv**2).sum(), hv)
    ws, gs, singles, loop_warned = [], [], [], 0
    for i in range(B):
        hi = (h if shared else h[i]).clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as single_caught:
            warnings.simplefilter("always", NotStationaryWarning)
            wi = layer(A[i], b[i], hi)
        singles.append(solver.last_info)
        loop_warned += len(single_caught)
        (gi,) = torch.autograd.grad((wi**2).sum(), hi)
        ws.append(wi.detach())
        gs.append(gi)
    assert len(calls) == 1, "a single call does not go through solve_batch"
    gl = torch.stack(gs).sum(0) if shared else torch.stack(gs)
    torch.testing.assert_close(wv.detach(), torch.stack(ws), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gv, gl, rtol=1e-12, atol=1e-13)
    _same_records(calls[0], singles)  # each element's own record
    if maxiter == FULL:
        assert len({i.iterations for i in singles}) > 1
    # each element warns on its own, as in the loop
    assert len(caught) == loop_warned == (0 if maxiter == FULL else B)


def test_vmapped_layer_on_a_tree_solution_and_in_a_nested_vmap(monkeypatch):
    A, b, h = _problems()
    solver = solvers.anderson(tol=1e-12, maxiter=2000)
    calls = _counting(monkeypatch, solvers.Anderson)

    def step(w, h, d):
        A, b = d
        return {"x": _step(w["x"], h, (A, b)), "s": 0.5 * w["s"] + h}

    def layer(A, b, h):
        w0 = {"x": torch.zeros(N, dtype=D), "s": torch.zeros((), dtype=D)}
        w = bilevel.fixed_point(step, w0, h, (A, b), solver=solver)
        return (w["x"] ** 2).sum() + w["s"]

    hv = h.clone().requires_grad_(True)
    out = torch.func.vmap(layer)(A, b, hv)
    assert len(calls) == 1
    (gv,) = torch.autograd.grad(out.sum(), hv)
    gl = torch.stack([torch.func.grad(layer, argnums=2)(A[i], b[i], h[i]) for i in range(B)])
    torch.testing.assert_close(gv, gl, rtol=1e-12, atol=1e-13)
    # two levels: the outer vmap runs its elements in turn, each a stack of the inner one
    H = torch.stack([h, 2 * h])
    nested = torch.func.vmap(torch.func.vmap(layer), in_dims=(None, None, 0))(A, b, H)
    assert len(calls) == 1 + 2
    expected = torch.stack(
        [torch.stack([layer(A[i], b[i], H[j, i]) for i in range(B)]) for j in range(2)]
    )
    torch.testing.assert_close(nested, expected, rtol=1e-12, atol=1e-13)


def test_vmapped_layer_with_another_solver_runs_it_per_element():
    A, b, h = _problems()
    calls = []

    def plain(map_fn, init):
        calls.append(1)
        return solvers.fixed_point_iteration(tol=1e-12, maxiter=20000)(map_fn, init)

    layer = lambda A, b, h: bilevel.fixed_point(  # noqa: E731
        _step, torch.zeros(N, dtype=D), h, (A, b), solver=plain
    )
    wv = torch.func.vmap(layer)(A, b, h)
    assert len(calls) == B
    wl = torch.stack([layer(A[i], b[i], h[i]) for i in range(B)])
    torch.testing.assert_close(wv, wl, rtol=0, atol=0)


def test_root_refuses_a_fixed_point_solver():
    h = torch.tensor(4.0, dtype=D)
    for solver in (solvers.anderson(), solvers.fixed_point_iteration()):
        with pytest.raises(ValueError, match="fixed point of optimality_fn, not a root"):
            bilevel.root(lambda w, h: w**2 - h, torch.tensor(2.0, dtype=D), h, solver=solver)


def test_vmapped_root_with_the_solution_given_equals_a_loop():
    """``root``'s default (``solver=None``): the given stack is the solution, at once."""
    h = torch.tensor([1.0, 4.0, 9.0], dtype=D, requires_grad=True)
    layer = lambda h: bilevel.root(lambda w, h: w**3 - h, h.detach() ** (1 / 3), h)  # noqa: E731
    wv = torch.func.vmap(layer)(h)
    (gv,) = torch.autograd.grad(wv.sum(), h)
    gl = torch.stack([torch.autograd.grad(layer(h[i]), h)[0][i] for i in range(3)])
    torch.testing.assert_close(wv.detach(), h.detach() ** (1 / 3), rtol=1e-14, atol=0)
    torch.testing.assert_close(gv, gl, rtol=1e-12, atol=0)
    torch.testing.assert_close(gv, (h.detach() ** (-2 / 3)) / 3, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the benchmark script


def test_bench_fixed_point_vmap_agrees_and_prints_a_table(capsys, monkeypatch):
    from experiments.bench import fixed_point_vmap as bench

    assert (
        bench.main(["--batch", "3", "--sizes", "6", "--repeats", "1", "--families", "shared"]) == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("fixed_point", "anderson"))]
    assert len(rows) == 2 * 2  # solvers x (solver, layer)
    assert "FAILED" not in out and all(" True" in r for r in rows if " solver " in r)
    # a truncated solve is reported and fails the command
    monkeypatch.setitem(
        bench.SOLVERS, "anderson", lambda: solvers.anderson(tol=bench.TOL, maxiter=3)
    )
    quick = ["--batch", "2", "--sizes", "4", "--repeats", "1", "--solvers", "anderson"]
    with pytest.warns(NotStationaryWarning, match="anderson: NOT converged"):
        assert bench.main([*quick, "--families", "own"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
@pytest.mark.parametrize("layer_name", ["fixed_point", "argmin"])
def test_vmap_of_a_jacobian_equals_a_loop_with_the_default_dense_solve(layer_name, transform):
    """vmap over problems of jacrev / jacfwd: the default linear solver (auto: dense LU for
    few unknowns) solves each problem's matrix against cotangents batched at another vmap
    level (torch's lu_solve rule gets that wrong; dense must not)."""
    A = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=D)
    S = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=D)

    def layer(h):
        if layer_name == "fixed_point":
            solver = solvers.anderson(tol=1e-13)
            return bilevel.fixed_point(
                lambda w, h: torch.tanh(A @ w) + h, torch.zeros(2, dtype=D), h, solver=solver
            )
        return bilevel.argmin(
            lambda w, h: 0.5 * w @ S @ w - h @ w + 0.1 * (w**4).sum(),
            torch.zeros(2, dtype=D),
            h,
            solver=solvers.lbfgs(tol=1e-12),
        )

    jac = getattr(torch.func, transform)
    H = torch.tensor([[0.3, -0.2], [1.5, 0.7], [-0.8, 1.1]], dtype=D)
    looped = torch.stack([jac(layer)(H[i]) for i in range(3)])
    torch.testing.assert_close(torch.func.vmap(jac(layer))(H), looped, rtol=1e-10, atol=1e-12)
    assert (looped[1] - looped[0]).abs().max() > 0.1  # the problems' Jacobians differ
