"""solvers.lbfgs(compiled=True): the whole loop as one compiled call gives the eager solver's
answer (< 1e-10, float64) and info record, a hypergradient matching central finite
differences of re-solved problems, honours tol and maxiter without recompiling, reuses its
graph across new closures, and falls back (warning) where it cannot compile or under vmap.

Compiling takes 10-40 s per entry: the slow tests share two entries (float64 tree, float32
tensor), compiled once per session.
"""

import warnings

import pytest
import torch
import torch._dynamo

import bilevel
from bilevel import linalg, solvers
from bilevel.solvers import _lbfgs_compiled as compiled_module

D = torch.float64


def _data(seed, n=12, p=3, dtype=D):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=dtype)
    return X, X @ torch.randn(p, generator=g, dtype=dtype) + torch.randn(
        n, generator=g, dtype=dtype
    )


def _tree_loss(w, h, data):
    # a tree unknown (two leaves of different shapes) and a quartic term: a problem whose
    # L-BFGS run needs line searches with several evaluations now and then
    X, y = data
    coef = torch.cat([w["a"], w["b"].reshape(-1)])
    return ((X @ coef - y) ** 2).mean() + h * (coef**2).sum() + 0.1 * (coef**4).sum()


def _start(dtype=D):
    return {"a": torch.zeros(1, dtype=dtype), "b": torch.zeros(2, 1, dtype=dtype)}


def _solve(data, h, compiled, tol=1e-12, **kw):
    solver = solvers.lbfgs(tol=tol, compiled=compiled, **kw)
    w, info = solver(lambda w: _tree_loss(w, h, data), _start())
    return torch.cat([w["a"], w["b"].reshape(-1)]), info


def _entries():
    fns = [v for v in compiled_module._CACHE.values() if not isinstance(v, str)]
    return [len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(f._own_code)) for f in fns]


@pytest.mark.slow
def test_compiled_equals_eager_honours_limits_and_reuses_its_graph():
    compiled_module._CACHE.clear()
    before = compiled_module.COMPILES["count"]
    data, h = _data(0), torch.tensor(0.3, dtype=D)
    got, info = _solve(data, h, True)
    want, eager = _solve(data, h, False)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert info.converged and eager.converged and info.grad_norm <= 1e-12
    assert "compiled (inductor)" in info.message and "compiled" not in eager.message
    assert info.extra["compiled"] is True and info.method == "lbfgs"
    # the same line search and history rules: the counts agree here (the history's
    # arithmetic is over all slots, masked, so its rounding can differ elsewhere)
    assert (info.iterations, info.evaluations) == (eager.iterations, eager.evaluations)
    assert abs(info.objective - eager.objective) <= 1e-12 * abs(eager.objective)
    # maxiter and tol are inputs: a truncated run reuses the graph and reports it
    cut, cut_info = _solve(data, h, True, maxiter=3)
    cut_eager, cut_eager_info = _solve(data, h, False, maxiter=3)
    assert not cut_info.converged and cut_info.iterations == 3
    assert cut_info.message.startswith("maxiter=3 reached")
    torch.testing.assert_close(cut, cut_eager, rtol=0, atol=1e-10)
    assert cut_info.evaluations == cut_eager_info.evaluations
    loose, loose_info = _solve(data, h, True, tol=1e-3)
    assert loose_info.converged and 1e-12 < loose_info.grad_norm <= 1e-3
    assert loose_info.iterations < info.iterations
    # new data and a new closure of the same shapes: the same graph
    for seed in (1, 2):
        got_s, _ = _solve(_data(seed), torch.tensor(0.1 * seed, dtype=D), True)
        want_s, _ = _solve(_data(seed), torch.tensor(0.1 * seed, dtype=D), False)
        torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-10)
    assert compiled_module.COMPILES["count"] == before + 1 and _entries() == [1]


@pytest.mark.slow
def test_compiled_argmin_hypergradient_matches_finite_differences_and_warns_as_eager():
    compiled_module._CACHE.clear()
    data = _data(3)
    solver = solvers.lbfgs(tol=1e-12, compiled=True)

    def hypergrad(h):
        w = bilevel.argmin(
            _tree_loss, _start(), h, data, solver=solver, linear_solver=linalg.cg(tol=1e-12)
        )
        return (w["a"] ** 2).sum() + w["b"].sum()

    h = torch.tensor(0.2, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(hypergrad(h), h)
    assert "compiled" in solver.last_info.message
    eps = 1e-5

    def outer_at(v):
        with torch.no_grad():
            w, info = solvers.lbfgs(tol=1e-13)(lambda w: _tree_loss(w, v, data), _start())
        assert info.converged
        return float((w["a"] ** 2).sum() + w["b"].sum())

    fd = (outer_at(0.2 + eps) - outer_at(0.2 - eps)) / (2 * eps)
    assert abs(fd) > 1e-2
    assert abs(float(grad) - fd) <= 1e-6 * abs(fd)
    # a truncated compiled solve warns exactly as the eager one
    messages = []
    for compiled in (True, False):
        cut = solvers.lbfgs(tol=1e-12, maxiter=2, compiled=compiled)
        with pytest.warns(RuntimeWarning, match="did not converge") as record:
            bilevel.argmin(
                _tree_loss, _start(), h, data, solver=cut, linear_solver=linalg.cg(tol=1e-12)
            )
        messages.append(str(record[0].message).split("(lbfgs")[0])
    assert messages[0] == messages[1]
    assert _entries() == [1]  # the argmin wrapper of this loss: one entry, one graph


@pytest.mark.slow
def test_compiled_float32_tensor():
    X, y = _data(4, dtype=torch.float32)
    loss = lambda w: ((X @ w - y) ** 2).mean() + 0.1 * (w**2).sum()  # noqa: E731
    w0 = torch.zeros(3, dtype=torch.float32)
    got, info = solvers.lbfgs(tol=1e-5, compiled=True)(loss, w0)
    want, eager = solvers.lbfgs(tol=1e-5)(loss, w0)
    assert got.dtype == torch.float32 and info.converged and "compiled" in info.message
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    exact = torch.linalg.solve(X.T @ X / 12 + 0.1 * torch.eye(3), X.T @ y / 12)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-4)


def test_uncompilable_objective_warns_and_runs_eager():
    X, y = _data(5)

    def loss(w):
        fit = ((X @ w - y) ** 2).mean()
        if fit > 1e6:  # a Python branch on a value: dynamo cannot trace it
            fit = fit.sqrt()
        return fit + 0.1 * (w**2).sum()

    w0 = torch.zeros(3, dtype=D)
    with pytest.warns(bilevel.CompileFallbackWarning, match="lbfgs.compiled=True.*eager"):
        got, info = solvers.lbfgs(tol=1e-12, compiled=True)(loss, w0)
    want, eager = solvers.lbfgs(tol=1e-12)(loss, w0)
    assert torch.equal(got, want) and "compiled" not in info.message
    assert (info.iterations, info.evaluations) == (eager.iterations, eager.evaluations)
    # warned once: the entry remembers why it fell back
    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.CompileFallbackWarning)
        again, _ = solvers.lbfgs(tol=1e-12, compiled=True)(loss, w0)
    assert torch.equal(again, want)


def test_no_gradient_path_raises_the_eager_error():
    c = torch.ones(2, dtype=D)
    with pytest.raises(ValueError, match="does not depend on the params"):
        solvers.lbfgs(compiled=True)(lambda w: (c**2).sum(), torch.zeros(2, dtype=D))


def test_vmap_runs_the_eager_stack_and_equals_the_loop():
    # under vmap argmin calls solve_batch (eager, per-row decisions): no compile happens
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(12, 3, generator=g, dtype=D), torch.randn(4, 12, generator=g, dtype=D)
    hs = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=D)
    loss = lambda w, h, yy: ((X @ w - yy) ** 2).mean() + h * (w**2).sum() + (w**4).sum()  # noqa: E731
    solver = solvers.lbfgs(tol=1e-12, compiled=True)
    before = compiled_module.COMPILES["count"]

    def layer(h, yy):
        w = bilevel.argmin(
            loss, torch.zeros(3, dtype=D), h, yy, solver=solver, linear_solver=linalg.cg(tol=1e-12)
        )
        return (w**2).sum()

    stacked = torch.func.vmap(torch.func.grad(layer))(hs, y)
    eager = solvers.lbfgs(tol=1e-12)
    loop = []
    for h, yy in zip(hs, y):
        hh = h.clone().requires_grad_(True)
        w = bilevel.argmin(
            loss, torch.zeros(3, dtype=D), hh, yy, solver=eager, linear_solver=linalg.cg(tol=1e-12)
        )
        loop.append(torch.autograd.grad((w**2).sum(), hh)[0])
    torch.testing.assert_close(stacked, torch.stack(loop), rtol=1e-10, atol=1e-12)
    assert compiled_module.COMPILES["count"] == before


def test_compiled_must_be_a_bool():
    with pytest.raises(TypeError, match="compiled must be True or False"):
        solvers.lbfgs(compiled=1)


def test_inverse_history_direction_equals_the_stack_history():
    # the compiled loop's ring (R^-1 kept as state) against the eager stack's compact
    # form: pushes past a wrap of the ring, a skipped push and a clear (no compile)
    from bilevel.solvers._inverse_history import _Pairs
    from bilevel.solvers._lbfgs_batch import _History

    g = torch.Generator().manual_seed(7)
    n, m = 5, 3
    A = torch.randn(n, n, generator=g, dtype=D)
    A = A @ A.T + n * torch.eye(n, dtype=D)
    pairs, hist = (
        _Pairs.empty(m, torch.zeros(1, n, dtype=D)),
        _History(1, m, n, torch.zeros(1, n, dtype=D)),
    )
    yes, no = torch.tensor([True]), torch.tensor([False])
    for i in range(9):
        s = torch.randn(1, n, generator=g, dtype=D)
        mask = no if i == 4 else yes
        if i == 6:
            pairs = pairs.clear(yes)
            hist.clear(yes.numpy())  # the eager stack's masks are host arrays
        pairs = pairs.push(mask, s, s @ A)
        hist.push(mask.numpy(), torch.stack([s, s @ A], 1), hist.used())
        grad = torch.randn(1, n, generator=g, dtype=D)
        want = hist.direction(grad, yes.numpy())
        assert want.sub(-grad).abs().max() > 1e-3  # the pairs shape the direction
        torch.testing.assert_close(pairs.direction(grad), want, rtol=1e-12, atol=1e-13)
    assert bool(pairs.held_any()) and int(pairs.valid.sum()) == 3


def test_packed_state_round_trips_fields_as_views():
    # the loop's carried state: float, long and bool fields in two flat buffers (no compile)
    from bilevel.solvers._packed_state import _Packing

    g = torch.Generator().manual_seed(3)
    state = (
        torch.randn(1, 4, generator=g, dtype=D),
        torch.tensor([7, -2]),
        torch.tensor([[True, False, True]]),
        torch.randn(1, 2, 2, generator=g, dtype=D),
        torch.tensor(5),
    )
    packing = _Packing.of(state, D)
    floats, ints = packing.pack(state)
    assert floats.shape == (8,) and floats.dtype == D
    assert ints.shape == (6,) and ints.dtype == torch.long
    back = packing.unpack(floats, ints)
    for want, got in zip(state, back):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    # the float fields are views of the buffer (the compiled body reads them in place)
    assert back[0].data_ptr() == floats.data_ptr()
    assert back[3].data_ptr() == floats.data_ptr() + 4 * floats.element_size()
    with pytest.raises(TypeError, match="state of dtype torch.float32 in a torch.float64 loop"):
        _Packing.of((torch.zeros(2, dtype=torch.float32),), D)


@pytest.mark.parametrize("shape", [(7, 3), (300, 80)])
def test_inductor_mv_rule_equals_mv(shape):
    # the decomposition the compiled loop gives inductor: the BLAS branch (large) and the
    # fused branch (small) are both the matrix-vector product, for a transposed view too
    g = torch.Generator().manual_seed(4)
    A = torch.randn(*shape, generator=g, dtype=D)
    v, u = torch.randn(shape[1], generator=g, dtype=D), torch.randn(shape[0], generator=g, dtype=D)
    assert (A.numel() >= compiled_module._BLAS_MV_NUMEL) == (shape[0] > 7)
    torch.testing.assert_close(compiled_module._mv(A, v), torch.mv(A, v), rtol=1e-13, atol=0)
    torch.testing.assert_close(compiled_module._mv(A.T, u), torch.mv(A.T, u), rtol=1e-13, atol=0)


@pytest.mark.slow
def test_compiled_blas_products_equal_eager(monkeypatch):
    # a least-squares objective whose matrix-vector products (value and gradient) go to
    # the BLAS inside the compiled loop (the threshold lowered so that a small design
    # takes that branch): the eager solver's counts and solution
    seen = []
    rule = compiled_module._mv

    def spy(matrix, vector):
        seen.append(matrix.numel() >= compiled_module._BLAS_MV_NUMEL)
        return rule(matrix, vector)

    monkeypatch.setattr(compiled_module, "_BLAS_MV_NUMEL", 1)
    monkeypatch.setattr(compiled_module, "_mv", spy)
    X, y = _data(5, n=40, p=20)

    def solve(compiled):
        solver = solvers.lbfgs(tol=1e-12, compiled=compiled)
        return solver(
            lambda w: ((X @ w - y) ** 2).mean() + 0.1 * (w * w).sum(), torch.zeros(20, dtype=D)
        )

    (got, info), (want, eager) = solve(True), solve(False)
    assert "compiled (inductor)" in info.message and seen and all(seen)
    assert (info.iterations, info.evaluations) == (eager.iterations, eager.evaluations)
    assert info.converged and info.iterations > 5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
