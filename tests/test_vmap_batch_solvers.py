"""``solve_batch`` of gradient descent, Newton-CG, projected and proximal gradient: a stack
of problems minimised at once, each row what a single call gives (iterations, stopping
message, solution to 1e-12), and ``vmap`` of their layers equal to a loop."""

import warnings

import pytest
import torch

import bilevel
from bilevel import constraints, solvers
from bilevel.solvers.proximal_gradient import Composite

D = torch.float64
B, N = 4, 5


@pytest.fixture(autouse=True)
def _quiet():
    # truncated solves warn (by design); the comparison is what these tests check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _tasks():
    """Quadratics + quartic whose conditioning and scale differ per task, so every solver
    needs a different number of iterations (and line-search steps) per task."""
    g = torch.Generator().manual_seed(3)
    As, bs = [], []
    for spread, far in ((1.0, 0.3), (2.5, 1.0), (6.0, 2.0), (12.0, 4.0)):
        Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=D))
        ev = torch.linspace(1.0, spread, N, dtype=D)
        As.append(Q @ torch.diag(ev) @ Q.T)
        bs.append(far * torch.randn(N, generator=g, dtype=D))  # far: more Newton steps
    h = torch.tensor([0.3, 0.7, 0.1, 1.1], dtype=D)
    return torch.stack(As), torch.stack(bs), h


def _loss(w, h, d):
    A, b = d
    return 0.5 * w @ A @ w - b @ w + 0.5 * h * (w @ w) + 0.05 * (w**4).sum()


def _stacked_values(A, b, h):
    one = torch.func.vmap(lambda w, h, A, b: _loss(w, h, (A, b)))
    return lambda W: one(W, h, A, b)


def _same_record(row, single):
    assert (row.iterations, row.evaluations, row.converged, row.message) == (
        single.iterations,
        single.evaluations,
        single.converged,
        single.message,
    )
    # a residual near tol is a difference of iterates: rounding is relative to the iterate
    assert row.grad_norm == pytest.approx(single.grad_norm, rel=1e-9, abs=1e-13)


MINIMIZERS = {
    "gd": lambda full: solvers.gradient_descent(
        bilevel.optim.sgd(lr=0.05), tol=1e-10, maxiter=3000 if full else 250, check_every=1
    ),
    "gd_momentum_check7": lambda full: solvers.gradient_descent(
        bilevel.optim.sgd(lr=0.05, momentum=0.5),
        tol=1e-10,
        maxiter=3000 if full else 100,
        check_every=7,
    ),
    "newton_cg": lambda full: solvers.newton_cg(tol=1e-11, maxiter=50 if full else 4),
    "projected_gradient": lambda full: constraints.projected_gradient(
        constraints.project_nonnegative, 0.05, tol=1e-10, maxiter=3000 if full else 250
    ),
}


@pytest.mark.parametrize("full", [True, False], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", list(MINIMIZERS))
def test_solve_batch_rows_equal_single_calls(name, full):
    A, b, h = _tasks()
    solver = MINIMIZERS[name](full)
    W, infos = solver.solve_batch(_stacked_values(A, b, h), torch.zeros(B, N, dtype=D))
    for i, info in enumerate(infos):
        w, one = solver(lambda w, i=i: _loss(w, h[i], (A[i], b[i])), torch.zeros(N, dtype=D))
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        _same_record(info, one)
    _a_real_test(infos, full)


def _a_real_test(infos, full):
    """Converged: the rows took different numbers of iterations; truncated: maxiter
    stopped some rows while others had converged before it."""
    if full:
        assert all(i.converged for i in infos)
        assert len({i.iterations for i in infos}) > 1
    else:
        assert {i.converged for i in infos} == {True, False}


def test_solve_batch_rows_of_a_tree_with_two_leaves():
    """Dict trees: gradient descent keeps the leaves (the optimizer's names), Newton-CG
    flattens them; both give each row its single call's answer."""
    A, b, h = _tasks()

    def one(w, h, A, b):
        return _loss(torch.cat([w["u"], w["v"]]), h, (A, b))

    stacked = torch.func.vmap(one)
    init = {"u": torch.zeros(B, 2, dtype=D), "v": torch.zeros(B, N - 2, dtype=D)}
    for solver in (MINIMIZERS["gd"](True), MINIMIZERS["newton_cg"](True)):
        W, infos = solver.solve_batch(lambda W: stacked(W, h, A, b), init)
        for i in range(B):
            w, info = solver(
                lambda w, i=i: one(w, h[i], A[i], b[i]),
                {"u": torch.zeros(2, dtype=D), "v": torch.zeros(N - 2, dtype=D)},
            )
            torch.testing.assert_close(W["u"][i], w["u"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(W["v"][i], w["v"], rtol=1e-12, atol=1e-14)
            _same_record(infos[i], info)


@pytest.mark.parametrize("maxiter", [3000, 40], ids=["converged", "truncated"])
def test_proximal_gradient_solve_batch_rows_equal_single_calls(maxiter):
    A, b, h = _tasks()
    l1 = torch.tensor([0.05, 0.4, 0.9, 0.2], dtype=D)
    solver = solvers.proximal_gradient(tol=1e-10, maxiter=maxiter, check_every=7)
    values = _stacked_values(A, b, h)
    target = Composite(
        values, lambda W, step: bilevel.prox.lasso(W, l1[:, None], step[:, None]), batch=B
    )
    W, infos = solver.solve_batch(target, torch.zeros(B, N, dtype=D))
    for i, info in enumerate(infos):
        single = Composite(
            lambda w, i=i: _loss(w, h[i], (A[i], b[i])),
            lambda w, step, i=i: bilevel.prox.lasso(w, l1[i], step),
        )
        w, one = solver(single, torch.zeros(N, dtype=D))
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        _same_record(info, one)
        assert info.extra["step_size"] == pytest.approx(one.extra["step_size"], rel=1e-12)
    _a_real_test(infos, maxiter == 3000)


# -- vmap of the layers: one solve_batch call, each element its loop's answer -----------


def _argmin_layer(solver):
    def layer(A, b, h):
        return bilevel.argmin(_loss, torch.zeros(N, dtype=D), h, (A, b), solver=solver)

    return layer


def _projected_layer(solver):
    def layer(A, b, h):
        return constraints.projected_argmin(
            _loss,
            torch.zeros(N, dtype=D),
            h,
            (A, b),
            projection=constraints.project_nonnegative,
            step_size=0.05,
            solver=solver,
        )

    return layer


def _proximal_layer(solver):
    def layer(A, b, h):
        return bilevel.proximal_argmin(
            lambda w, h, d: _loss(w, h, d),
            torch.zeros(N, dtype=D),
            h,
            (A, b),
            prox=bilevel.prox.lasso,
            prox_hparams=0.3 * h,
            solver=solver,
        )

    return layer


LAYERS = {
    "gd": (lambda full: _argmin_layer(MINIMIZERS["gd"](full)), solvers.GradientDescent),
    "newton_cg": (lambda full: _argmin_layer(MINIMIZERS["newton_cg"](full)), solvers.NewtonCG),
    "projected_gradient": (
        lambda full: _projected_layer(MINIMIZERS["projected_gradient"](full)),
        constraints.ProjectedGradient,
    ),
    "proximal_gradient": (
        lambda full: _proximal_layer(
            solvers.proximal_gradient(tol=1e-11, maxiter=3000 if full else 40, check_every=3)
        ),
        solvers.ProximalGradient,
    ),
}


def _spy(monkeypatch, cls):
    """Record the single and the stacked calls of a solver class."""
    calls = []
    single, batch = cls.__call__, cls.solve_batch
    monkeypatch.setattr(
        cls, "__call__", lambda self, *a: calls.append("single") or single(self, *a)
    )
    monkeypatch.setattr(
        cls, "solve_batch", lambda self, *a: calls.append("batch") or batch(self, *a)
    )
    return calls


def _assert_vmap_runs_per_element(monkeypatch, cls, solver):
    """vmap of an argmin layer with ``solver`` solves one element at a time (never the
    stack) and equals the loop."""
    calls = _spy(monkeypatch, cls)
    A, b, h = _tasks()
    layer = _argmin_layer(solver)
    wv = torch.func.vmap(layer)(A, b, h)
    assert calls == ["single"] * B
    for i in range(B):
        torch.testing.assert_close(wv[i], layer(A[i], b[i], h[i]), rtol=1e-12, atol=1e-13)


def _records(monkeypatch):
    import bilevel.implicit.user_problem as user_problem

    seen = []
    record = user_problem._record
    monkeypatch.setattr(
        user_problem,
        "_record",
        lambda diag, kind, info: seen.append(info) or record(diag, kind, info),
    )
    return seen


@pytest.mark.parametrize("shared", [False, True], ids=["batched_h", "shared_h"])
@pytest.mark.parametrize("full", [True, False], ids=["converged", "truncated"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_vmap_of_the_layer_equals_a_loop(name, full, shared, monkeypatch):
    make, cls = LAYERS[name]
    layer = make(full)
    A, b, h = _tasks()
    h0 = torch.tensor(0.5, dtype=D)
    calls = _spy(monkeypatch, cls)
    records = _records(monkeypatch)
    hv = (h0 if shared else h).clone().requires_grad_(True)
    wv = torch.func.vmap(layer, in_dims=(0, 0, None if shared else 0))(A, b, hv)
    assert calls == ["batch"]  # the stack at once, not one call per element
    vmapped = list(records)
    (gv,) = torch.autograd.grad((wv**2).sum(), hv)
    del records[:]
    ws, gs = [], []
    for i in range(B):
        hi = (h0 if shared else h[i]).clone().requires_grad_(True)
        wi = layer(A[i], b[i], hi)
        (gi,) = torch.autograd.grad((wi**2).sum(), hi)
        ws.append(wi.detach())
        gs.append(gi)
    torch.testing.assert_close(wv.detach(), torch.stack(ws), rtol=1e-12, atol=1e-13)
    gl = torch.stack(gs).sum(0) if shared else torch.stack(gs)
    torch.testing.assert_close(gv, gl, rtol=1e-10, atol=1e-12)
    # the forward records the layer keeps: one per element, each its single call's
    assert len(vmapped) == len(records) == B
    for row, single in zip(vmapped, records):
        _same_record(row, single)
    _a_real_test(records, full)


def test_an_optimizer_that_couples_parameters_runs_per_element(monkeypatch):
    """Hypergradient descent adapts one learning rate from a dot product over all
    parameters: a stack cannot share it, so vmap solves element by element (and says so)."""
    solver = solvers.gradient_descent(
        bilevel.optim.sgd_hd(lr=0.02, hypergrad_lr=1e-4), tol=1e-9, maxiter=300
    )
    assert not solver.supports_batch
    with pytest.raises(ValueError, match="one by one"):
        solver.solve_batch(lambda W: (W**2).sum(1), torch.zeros(2, 1, dtype=D))
    _assert_vmap_runs_per_element(monkeypatch, solvers.GradientDescent, solver)


def test_newton_cg_with_a_given_linear_solver_runs_per_element(monkeypatch):
    solver = solvers.newton_cg(tol=1e-10, linear_solver=bilevel.linalg.cg(tol=1e-12))
    assert not solver.supports_batch
    with pytest.raises(ValueError, match="linear_solver=None"):
        solver.solve_batch(lambda W: (W**2).sum(1), torch.zeros(2, 1, dtype=D))
    _assert_vmap_runs_per_element(monkeypatch, solvers.NewtonCG, solver)


@pytest.mark.parametrize("hvp", ["reverse", "forward", "auto"])
def test_newton_cg_rows_with_negative_curvature_and_each_hvp_mode(hvp):
    """Rows starting near a saddle meet negative curvature (their notes say so), the
    others do not; every row's notes, products and answer are its single call's."""
    c = torch.tensor([0.1, -0.3, 2.0], dtype=D)
    start = torch.tensor([[0.01, 0.02], [0.5, -0.5], [1.0, 1.0]], dtype=D)

    def one(w, c):
        return (w**4 / 4 - w**2 / 2).sum() + c * w.sum() + 0.5 * c.abs() * (w @ w)

    solver = solvers.newton_cg(tol=1e-10, hvp=hvp)
    W, infos = solver.solve_batch(lambda W: torch.func.vmap(one)(W, c), start)
    notes = []
    for i in range(3):
        w, info = solver(lambda w, i=i: one(w, c[i]), start[i])
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        _same_record(infos[i], info)
        assert infos[i].extra == info.extra
        notes.append(bool(info.extra.get("linear_solver_notes")))
    assert notes[0] and not notes[2]
    assert all(i.converged for i in infos)
    assert infos[0].extra["hvp"] == ("reverse" if hvp == "reverse" else "forward")


def test_solve_batch_rejects_bad_stacks():
    for solver in (
        MINIMIZERS["gd"](True),
        MINIMIZERS["newton_cg"](True),
        MINIMIZERS["projected_gradient"](True),
    ):
        with pytest.raises(ValueError, match="dimension 0"):
            solver.solve_batch(lambda W: W.sum(), torch.tensor(1.0, dtype=D))
        with pytest.raises(ValueError, match="shape \\(3,\\)"):
            solver.solve_batch(lambda W: W.sum(), torch.zeros(3, 2, dtype=D))
        with pytest.raises(TypeError, match="callable"):
            solver.solve_batch(None, torch.zeros(3, 2, dtype=D))
    with pytest.raises(TypeError, match="batch"):
        solvers.proximal_gradient().solve_batch(
            Composite(lambda w: w.sum(), lambda w, s: w), torch.zeros(3, 2, dtype=D)
        )
    with pytest.raises(ValueError, match="dimension 0"):
        solvers.proximal_gradient().solve_batch(
            Composite(lambda W: W.sum(1), lambda W, s: W, batch=2), torch.zeros(3, 2, dtype=D)
        )


def test_a_diverging_row_stops_alone():
    """Gradient descent with a step too long for one row's curvature: that row diverges
    (non-finite gradient) and stops with its own message; the others converge."""
    curv = torch.tensor([1.0, 50.0, 2.0], dtype=D)
    solver = solvers.gradient_descent(bilevel.optim.sgd(lr=0.1), tol=1e-10, maxiter=3000)
    W, infos = solver.solve_batch(
        lambda W: 0.5 * (curv[:, None] * (W - 1) ** 2).sum(1), torch.zeros(3, 2, dtype=D)
    )
    assert [i.converged for i in infos] == [True, False, True]
    assert "diverged" in infos[1].message
    for i in (0, 2):
        w, info = solver(
            lambda w, i=i: 0.5 * (curv[i] * (w - 1) ** 2).sum(), torch.zeros(2, dtype=D)
        )
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        _same_record(infos[i], info)


@pytest.mark.parametrize("name", ["gd", "projected_gradient"])
def test_stopped_problems_are_not_evaluated_again(name):
    """A stack whose values can select problems (as the vmap rule's stacks can) evaluates
    only the running ones after a check; the answers stay each single call's."""
    A, b, h = _tasks()
    one = torch.func.vmap(lambda w, h, A, b: _loss(w, h, (A, b)))
    sizes = []

    def values(W, rows=None):
        sizes.append(W.shape[0])
        if rows is None:
            return one(W, h, A, b)
        return one(W, h[rows], A[rows], b[rows])

    values.selectable = True
    solver = MINIMIZERS[name](True)
    W, infos = solver.solve_batch(values, torch.zeros(B, N, dtype=D))
    assert sizes[0] == B and min(sizes) == 1  # the slowest problem ran alone at the end
    full, _ = solver.solve_batch(_stacked_values(A, b, h), torch.zeros(B, N, dtype=D))
    torch.testing.assert_close(W, full, rtol=1e-12, atol=1e-14)
    for i, info in enumerate(infos):
        w, single = solver(lambda w, i=i: _loss(w, h[i], (A[i], b[i])), torch.zeros(N, dtype=D))
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        _same_record(info, single)


def test_host_reads_of_a_stack():
    """Gradient descent and projected gradient read once per check for the whole stack
    (plus the records at the end); Newton-CG once per CG iteration, trial step and
    Newton step, whatever the number of problems."""
    from bilevel._sync import count_syncs

    A, b, h = _tasks()
    values = _stacked_values(A, b, h)
    gd = solvers.gradient_descent(bilevel.optim.sgd(lr=0.05), tol=0.0, maxiter=20, check_every=5)
    with count_syncs("cpu") as syncs:
        gd.solve_batch(values, torch.zeros(B, N, dtype=D))
    assert syncs.count == 5 + 2  # checks at 0, 5, 10, 15, 20; the records
    pg = constraints.projected_gradient(constraints.project_nonnegative, 0.05, tol=0.0, maxiter=20)
    with count_syncs("cpu") as syncs:
        pg.solve_batch(values, torch.zeros(B, N, dtype=D))
    assert syncs.count == 2 + 2  # checks at 10 and 20; the records
    newton = solvers.newton_cg(tol=1e-11)
    with count_syncs("cpu") as syncs:
        _, (info,) = newton.solve_batch(
            _stacked_values(A[3:], b[3:], h[3:]), torch.zeros(1, N, dtype=D)
        )
    k, products, trials = info.iterations, info.extra["hvp_evaluations"], info.evaluations - 1
    # per Newton step: is any problem live, its CG iterations and the read that ends CG,
    # its trial steps; then the last live check and the records
    assert syncs.count == k * 2 + products + trials + 1 + 3
    with count_syncs("cpu") as syncs:
        _, infos = newton.solve_batch(values, torch.zeros(B, N, dtype=D))
    k = max(i.iterations for i in infos)
    most = k * 2 + max(i.extra["hvp_evaluations"] for i in infos) * B + 30 * k + 4
    assert k * 3 + 4 <= syncs.count <= most  # one read per pass for the whole stack


def test_per_element_settings_run_per_element(monkeypatch):
    """A per-element learning rate has one problem's shape, not the stack's: vmap solves
    element by element; numbers, 0-d tensors and per-parameter numbers stack."""
    per = {"params": bilevel.optim.per_element(torch.linspace(0.02, 0.08, N, dtype=D))}
    solver = solvers.gradient_descent(bilevel.optim.sgd(lr=per), tol=1e-9, maxiter=3000)
    assert not solver.supports_batch
    for lr in (0.05, torch.tensor(0.05, dtype=D), {"params": 0.05}):
        assert solvers.gradient_descent(bilevel.optim.sgd(lr=lr)).supports_batch
    _assert_vmap_runs_per_element(monkeypatch, solvers.GradientDescent, solver)


def test_projected_gradient_stack_of_one_projects_its_row():
    """A stack of one still projects each problem's slice (the simplex of a row, not of
    the whole (1, n) tensor read some other way)."""
    c = torch.tensor([[0.9, 0.4, -0.2]], dtype=D)
    solver = constraints.projected_gradient(constraints.project_simplex, 0.5, tol=1e-12)
    W, (info,) = solver.solve_batch(lambda W: ((W - c) ** 2).sum(1), torch.zeros(1, 3, dtype=D))
    w, single = solver(lambda w: ((w - c[0]) ** 2).sum(), torch.zeros(3, dtype=D))
    torch.testing.assert_close(W[0], w, rtol=1e-12, atol=1e-14)
    _same_record(info, single)
    assert abs(float(W.sum()) - 1) < 1e-12


def test_vmapped_argmin_keeps_and_checks_each_problems_record():
    """``vmap(argmin)`` with a stacked solver: a NotStationaryWarning for each problem its
    truncated solver left unconverged and none for the others, the diagnostics' forward
    record the last problem's (as a loop leaves it), and the solutions the loop's."""
    A, b, h = _tasks()
    maxiter = 11  # tasks need 6, 11, 12 and 13 iterations: two converge, two do not
    solver = solvers.lbfgs(tol=1e-10, maxiter=maxiter)
    diag = bilevel.implicit.ImplicitDiagnostics()

    def layer(h, A, b):
        w0 = torch.zeros(N, dtype=D)
        return bilevel.argmin(_loss, w0, h, data=(A, b), solver=solver, diagnostics=diag)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        W = torch.func.vmap(layer)(h, A, b)
    stationary = [w for w in caught if issubclass(w.category, solvers.NotStationaryWarning)]
    singles = []
    for i in range(B):
        w_i, info_i = solver(lambda w, i=i: _loss(w, h[i], (A[i], b[i])), torch.zeros(N, dtype=D))
        torch.testing.assert_close(W[i], w_i, rtol=1e-12, atol=1e-14)
        singles.append(info_i)
    assert [s.converged for s in singles] == [True, True, False, False]
    assert len(stationary) == 2
    assert all(f"maxiter={maxiter}" in str(w.message) for w in stationary)
    _same_record(diag.forward, singles[-1])  # the record of the last problem is kept
