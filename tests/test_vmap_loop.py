"""``vmap(f)`` is ``f`` on each element: every inner and linear solver, converged or truncated."""

import warnings

import pytest
import torch

import bilevel
from bilevel import constraints, linalg, solvers

D = torch.float64
B, N = 3, 4


@pytest.fixture(autouse=True)
def _quiet():
    # truncated solves warn (by design); the comparison is what these tests check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _tasks():
    """Quadratics whose conditioning differs per task, so solvers need different iterations."""
    g = torch.Generator().manual_seed(7)
    As, bs = [], []
    for i, spread in enumerate((1.5, 20.0, 300.0)):
        Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D))
        ev = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), N, dtype=D)
        As.append(Q @ torch.diag(ev) @ Q.T + 0.1 * i * torch.eye(N, dtype=D))
        bs.append(torch.randn(N, generator=g, dtype=D))
    h = torch.tensor([0.3, 0.7, 1.1], dtype=D)
    return torch.stack(As), torch.stack(bs), h


def _loss(w, h, d):
    A, b = d
    return 0.5 * w @ A @ w - b @ w + 0.5 * h * (w @ w) + 0.05 * (w**4).sum()


def _compare(layer):
    """layer(A, b, h) -> w; solutions and per-task hypergradients, vmap against a loop."""
    A, b, h = _tasks()
    hv = h.clone().requires_grad_(True)
    wv = torch.func.vmap(layer)(A, b, hv)
    (gv,) = torch.autograd.grad((wv**2).sum(), hv)
    ws, gs = [], []
    for i in range(B):
        hi = h[i].clone().requires_grad_(True)
        wi = layer(A[i], b[i], hi)
        (gi,) = torch.autograd.grad((wi**2).sum(), hi)
        ws.append(wi.detach())
        gs.append(gi)
    wl, gl = torch.stack(ws), torch.stack(gs)
    torch.testing.assert_close(wv.detach(), wl, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gv, gl, rtol=1e-12, atol=1e-13)
    return wl


INNER = {
    "gradient_descent": lambda full: solvers.gradient_descent(
        bilevel.optim.sgd(lr=0.005), tol=1e-10, maxiter=20000 if full else 7, check_every=1
    ),
    "lbfgs": lambda full: solvers.lbfgs(tol=1e-11, maxiter=200 if full else 3),
    "newton_cg": lambda full: solvers.newton_cg(tol=1e-11, maxiter=50 if full else 1),
    "scipy_minimize": lambda full: solvers.scipy_minimize(tol=1e-9, maxiter=None if full else 2),
}


@pytest.mark.parametrize("full", [True, False], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", list(INNER))
def test_argmin_inner_solvers(name, full):
    solver = INNER[name](full)

    def layer(A, b, h):
        return bilevel.argmin(_loss, torch.zeros(N, dtype=D), h, (A, b), solver=solver)

    _compare(layer)


@pytest.mark.parametrize("full", [True, False], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson"])
def test_fixed_point_solvers(name, full):
    maxiter = 3000 if full else 4
    solver = getattr(solvers, name)(tol=1e-12, maxiter=maxiter)
    eta = 0.003

    def step(w, h, d):
        A, b = d
        # (A * w).sum(-1), not A @ w: under vmap the matrix-vector product is a batched
        # matmul, whose rounding differs from a single mv's on some CPUs (1.4e-17 measured),
        # and a truncated Anderson step amplifies that by its Gram system's condition number
        # (to 1.1e-12 here). What is tested is the solver: the same map bits per element give
        # the same answer; test_anderson_user_matmul below bounds the A @ w case.
        return w - eta * ((A * w).sum(-1) - b + h * w + 0.2 * w**3)

    def layer(A, b, h):
        return bilevel.fixed_point(step, torch.zeros(N, dtype=D), h, (A, b), solver=solver)

    _compare(layer)


def test_anderson_user_matmul():
    """With the user's own A @ w (a batched matmul under vmap), a truncated Anderson solve
    agrees with the loop to the map's rounding amplified by the Gram system, not bitwise."""
    solver = solvers.anderson(tol=1e-12, maxiter=4)

    def step(w, h, d):
        A, b = d
        return w - 0.003 * (A @ w - b + h * w + 0.2 * w**3)

    A, b, h = _tasks()
    wv = torch.func.vmap(
        lambda A, b, h: bilevel.fixed_point(step, torch.zeros(N, dtype=D), h, (A, b), solver=solver)
    )(A, b, h)
    wl = torch.stack(
        [
            bilevel.fixed_point(step, torch.zeros(N, dtype=D), h[i], (A[i], b[i]), solver=solver)
            for i in range(B)
        ]
    )
    torch.testing.assert_close(wv, wl, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("full", [True, False], ids=["converged", "truncated"])
def test_projected_gradient(full):
    solver = constraints.projected_gradient(
        constraints.project_nonnegative, 0.003, tol=1e-11, maxiter=20000 if full else 5
    )

    def layer(A, b, h):
        return constraints.projected_argmin(
            _loss,
            torch.zeros(N, dtype=D),
            h,
            (A, b),
            projection=constraints.project_nonnegative,
            step_size=0.003,
            solver=solver,
        )

    _compare(layer)


LINEAR = {
    "cg": lambda full: linalg.cg(tol=1e-13, maxiter=None if full else 2),
    "minres": lambda full: linalg.minres(tol=1e-13, maxiter=None if full else 2),
    "gmres": lambda full: linalg.gmres(tol=1e-13, maxiter=None if full else 2, restart=3),
    "neumann": lambda full: linalg.neumann(alpha=0.003, maxiter=20000 if full else 3, tol=1e-13),
    "dense": lambda full: linalg.dense(),
}


CASES = [(n, f) for n in LINEAR for f in (True, False) if n != "dense" or f]  # dense: exact


@pytest.mark.parametrize(("name", "full"), CASES)
def test_linear_solvers_in_the_backward_pass(name, full):
    lin = LINEAR[name](full)
    inner = solvers.lbfgs(tol=1e-12, maxiter=200)

    def layer(A, b, h):
        return bilevel.argmin(
            _loss, torch.zeros(N, dtype=D), h, (A, b), solver=inner, linear_solver=lin
        )

    _compare(layer)


def test_iteration_counts_differ_across_the_batch():
    """The batch must be a real test: the tasks need different numbers of CG steps."""
    A, b, h = _tasks()
    counts = []
    for i in range(B):
        _, info = linalg.cg(tol=1e-13, check_every=1)(lambda v, M=A[i]: M @ v, b[i])
        counts.append(info.iterations)
    assert len(set(counts)) > 1, counts


# -- L-BFGS solves a vmap stack at once: each row its own line search and stopping --------


def _stack():
    """Four problems unlike each other: an isotropic quadratic (one step), the quartic tasks
    above at objective scales 1e-2 .. 1e2 (so first steps 1 / ||g|| and line searches differ)."""
    A, b, h = _tasks()
    eye = torch.eye(N, dtype=D)
    A = torch.cat([eye.unsqueeze(0), A])
    b = torch.cat([torch.linspace(-1, 2, N, dtype=D).unsqueeze(0), b])
    h = torch.cat([torch.zeros(1, dtype=D), h])
    scale = torch.tensor([1.0, 1e-2, 1.0, 1e2], dtype=D)
    return A, b, h, scale


def _scaled(w, h, d):
    A, b, s, quartic = d
    return s * (0.5 * w @ A @ w - b @ w + 0.5 * h * (w @ w) + quartic * (w**4).sum())


def _quartic_weights():
    return torch.tensor([0.0, 0.05, 0.05, 0.05], dtype=D)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "backtracking"])
@pytest.mark.parametrize("maxiter", [200, 3, 7], ids=["converged", "truncated3", "truncated7"])
def test_lbfgs_solve_batch_rows_equal_single_calls(line_search, maxiter):
    A, b, h, scale = _stack()
    q = _quartic_weights()
    solver = solvers.lbfgs(tol=1e-11, maxiter=maxiter, line_search=line_search)
    values = torch.func.vmap(lambda w, *d: _scaled(w, d[0], d[1:]))
    W, infos = solver.solve_batch(
        lambda W: values(W, h, A, b, scale, q), torch.zeros(4, N, dtype=D)
    )
    per_iteration = set()
    for i, info in enumerate(infos):
        w, one = solver(
            lambda w, i=i: _scaled(w, h[i], (A[i], b[i], scale[i], q[i])), torch.zeros(N, dtype=D)
        )
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        assert (info.iterations, info.evaluations, info.converged, info.message) == (
            one.iterations,
            one.evaluations,
            one.converged,
            one.message,
        )
        per_iteration.add(round(info.evaluations / max(info.iterations, 1), 6))
    # the batch is a real test: rows stop at different iterations, for different reasons,
    # after line searches of different lengths
    assert len({i.iterations for i in infos}) > 1
    assert len(per_iteration) > 1
    if maxiter == 3:
        assert infos[0].converged and not all(i.converged for i in infos)


@pytest.mark.parametrize("maxiter", [200, 3])
def test_vmap_of_argmin_with_lbfgs_runs_the_stack_at_once(maxiter, monkeypatch):
    """No per-element loop: the vmap rule hands the whole stack to solve_batch, once."""
    calls = []
    single = solvers.LBFGS._solve
    monkeypatch.setattr(
        solvers.LBFGS, "_solve", lambda self, *a: calls.append("single") or single(self, *a)
    )
    batch = solvers.LBFGS.solve_batch
    monkeypatch.setattr(
        solvers.LBFGS, "solve_batch", lambda self, *a: calls.append("batch") or batch(self, *a)
    )
    A, b, h, scale = _stack()
    q = _quartic_weights()
    solver = solvers.lbfgs(tol=1e-11, maxiter=maxiter)

    def layer(A, b, h, s, q):
        return bilevel.argmin(_scaled, torch.zeros(N, dtype=D), h, (A, b, s, q), solver=solver)

    hv = h.clone().requires_grad_(True)
    wv = torch.func.vmap(layer)(A, b, hv, scale, q)
    assert calls == ["batch"]
    (gv,) = torch.autograd.grad((wv**2).sum(), hv)
    for i in range(4):
        hi = h[i].clone().requires_grad_(True)
        wi = layer(A[i], b[i], hi, scale[i], q[i])
        (gi,) = torch.autograd.grad((wi**2).sum(), hi)
        torch.testing.assert_close(wv[i].detach(), wi.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(gv[i], gi, rtol=1e-12, atol=1e-13)


def test_lbfgs_solve_batch_rejects_a_stack_without_a_batch_dimension():
    with pytest.raises(ValueError, match="dimension 0"):
        solvers.lbfgs().solve_batch(lambda W: W.sum(), torch.tensor(1.0, dtype=D))
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        solvers.lbfgs().solve_batch(lambda W: W.sum(), torch.zeros(3, 2, dtype=D))


def test_lbfgs_rows_that_fail_their_line_search_stop_alone():
    """A non-smooth row (|w - c|) never converges (its line searches end in no step or
    tiny ones); the smooth rows converge, each as it would alone."""
    c = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.7, 0.1]], dtype=D)
    kink = torch.tensor([1.0, 0.0, 0.0], dtype=D)

    def one(w, c, k):
        return k * (w - c).abs().sum() + (1 - k) * ((w - c) ** 2).sum() + 0.1 * (w**4).sum()

    solver = solvers.lbfgs(tol=1e-10, maxiter=40)
    W, infos = solver.solve_batch(
        lambda W: torch.func.vmap(one)(W, c, kink), torch.zeros(3, 2, dtype=D)
    )
    assert not infos[0].converged
    assert infos[1].converged and infos[2].converged
    for i in range(3):
        w, info = solver(lambda w, i=i: one(w, c[i], kink[i]), torch.zeros(2, dtype=D))
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        assert (info.iterations, info.evaluations, info.message) == (
            infos[i].iterations,
            infos[i].evaluations,
            infos[i].message,
        )


@pytest.mark.parametrize("linear", ["cg", "dense"])
def test_stacked_products_under_func_grad_equal_a_loop(linear, monkeypatch):
    """The backward CG of a stack of argmin problems runs on one reused graph of the stack
    (dense, which vmaps its products over basis vectors, keeps the vmapped products), also
    inside torch.func.grad, as iMAML's meta-gradient is computed."""
    import bilevel.implicit.batched_problem as batched

    built = []
    stacked = batched.stacked_hvp
    monkeypatch.setattr(
        batched, "stacked_hvp", lambda *a: built.append(stacked(*a) is not None) or stacked(*a)
    )
    A, b, h, scale = _stack()
    q = _quartic_weights()
    lin = LINEAR[linear](True)
    inner = solvers.lbfgs(tol=1e-12, maxiter=200)

    def layer(A, b, h, s, q):
        return bilevel.argmin(
            _scaled, torch.zeros(N, dtype=D), h, (A, b, s, q), solver=inner, linear_solver=lin
        )

    def outer(h):
        return (torch.func.vmap(layer)(A, b, h, scale, q) ** 2).sum()

    gv = torch.func.grad(outer)(h)
    assert built and all(built)
    for i in range(4):
        hi = h[i].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad((layer(A[i], b[i], hi, scale[i], q[i]) ** 2).sum(), hi)
        torch.testing.assert_close(gv[i], gi, rtol=1e-11, atol=1e-13)
