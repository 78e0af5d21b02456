"""One L-BFGS problem runs host-decided (``_lbfgs_single``) with the stack's arithmetic; a
stack drops its finished rows from the history's work. Neither may change an answer."""

import functools

import pytest
import torch

from bilevel import solvers
from bilevel.solvers._lbfgs_batch import _History, _lbfgs, _LBFGSSettings, _value_and_grad
from bilevel.solvers._lbfgs_single import _lbfgs_single
from bilevel.solvers.line_search import _WolfeOptions


def _problems(dtype):
    """(name, objective of a (n,) vector, start): smooth, a short ring that wraps, a kink."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(12, 12, generator=g, dtype=dtype) / 12**0.5 + torch.eye(12, dtype=dtype)
    c = torch.randn(12, generator=g, dtype=dtype)
    out = [
        ("ridge+quartic", lambda w: 0.5 * ((A @ w - c) ** 2).sum() + 0.01 * (w**4).sum(), 12),
        ("sin+quartic", lambda w: ((w - 3 * c[:5]) ** 4).sum() + (3 * w.sin()).sum(), 5),
    ]
    # a kink: in float32 its line searches run to thousands of evaluations, where a tensor
    # search and a host search once rounded a trial step one ulp apart; both sides now
    # decide on the host
    out.append(("kink", lambda w: (w - c[:3]).abs().sum() + 0.1 * (w**2).sum(), 3))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strong", [True, False], ids=["strong_wolfe", "backtracking"])
@pytest.mark.parametrize("maxiter, history", [(300, 20), (300, 3), (4, 20)])
def test_single_path_takes_the_stack_of_ones_steps_bit_for_bit(dtype, strong, maxiter, history):
    """The host-decided loop against the batched core run on the same stack of one."""
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    opts = _LBFGSSettings(tol, maxiter, history, _WolfeOptions(strong, 1e-4, 0.9, 25))
    reasons = set()
    for _, objective, n in _problems(dtype):

        def values(X, objective=objective):
            return objective(X[0]).reshape(1)

        X0 = torch.full((1, n), 0.5, dtype=dtype)
        batch = _lbfgs(values, X0.clone(), opts)
        single = _lbfgs_single(functools.partial(_value_and_grad, values), X0.clone(), opts)
        assert torch.equal(batch.X, single.X)
        for field in ("f", "gnorm", "iterations", "evaluations", "status"):
            assert torch.equal(getattr(batch, field), getattr(single, field)), field
        reasons.add(int(single.status))
    if maxiter > 4 and dtype == torch.float64:  # converged, and stopped at the kink
        assert len(reasons) > 1


def test_a_single_call_uses_the_host_path(monkeypatch):
    calls = []
    module = __import__("bilevel.solvers.lbfgs", fromlist=["_lbfgs_single"])
    real = module._lbfgs_single
    monkeypatch.setattr(module, "_lbfgs_single", lambda *a: calls.append(1) or real(*a))
    w, info = solvers.lbfgs(tol=1e-10)(lambda w: ((w - 1) ** 2).sum(), torch.zeros(3))
    assert calls == [1] and info.converged
    torch.testing.assert_close(w, torch.ones(3))


@pytest.mark.parametrize("selectable", [False, True], ids=["all_rows", "running_rows"])
def test_a_stack_drops_its_finished_rows_and_each_row_equals_its_single_call(
    monkeypatch, selectable
):
    """Eight problems needing 1 to ~30 iterations, with a 3-pair ring (it wraps): the
    history is compacted as rows stop, and no row's answer or count changes. Where the
    values can select problems (as the vmap rule's can), only the running ones are
    evaluated."""
    held = []
    keep = _History.keep

    def spy(self, live):
        keep(self, live)
        held.append(len(self.member_list))

    monkeypatch.setattr(_History, "keep", spy)
    D = torch.float64
    B, n = 8, 5
    g = torch.Generator().manual_seed(11)
    C = torch.randn(B, n, generator=g, dtype=D) * torch.logspace(-1, 1, B, dtype=D)[:, None]
    quartic = torch.linspace(0, 0.5, B, dtype=D)  # row 0: a quadratic, solved in one step

    def one(w, c, q):
        return ((w - c) ** 2).sum() + q * ((w - c) ** 4).sum() + q * (w.sin() ** 2).sum()

    sizes, subsets = [], {}  # subsets: the rows tensors by identity (kept alive)

    def values(W, rows=None):
        sizes.append(W.shape[0])
        if rows is None:
            return torch.func.vmap(one)(W, C, quartic)
        subsets[id(rows)] = rows
        return torch.func.vmap(one)(W, C[rows], quartic[rows])

    values.selectable = selectable
    solver = solvers.lbfgs(tol=1e-11, maxiter=100, history_size=3)
    W, infos = solver.solve_batch(values, torch.zeros(B, n, dtype=D))
    assert min(held) < B  # compacted while some rows were still running
    if selectable:  # the slowest problem ran alone at the end; a subset per change
        assert sizes[0] == B and min(sizes) == 1 and sizes == sorted(sizes, reverse=True)
        assert len(subsets) == len(set(sizes)) - 1
    else:
        assert set(sizes) == {B}
    assert len({i.iterations for i in infos}) > 3
    for i in range(B):
        w, info = solver(lambda w, i=i: one(w, C[i], quartic[i]), torch.zeros(n, dtype=D))
        torch.testing.assert_close(W[i], w, rtol=1e-12, atol=1e-14)
        assert (info.iterations, info.evaluations, info.message) == (
            infos[i].iterations,
            infos[i].evaluations,
            infos[i].message,
        )


def test_the_single_call_bench_prints_one_row_per_size_against_a_reference(capsys):
    """``python -m experiments.bench.lbfgs_single``: this checkout against itself here."""
    import pathlib

    from experiments.bench import lbfgs_single

    root = str(pathlib.Path(lbfgs_single.__file__).resolve().parents[2])
    assert lbfgs_single.main(["--reference", root, "--repeats", "1", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "unknowns" in line]
    assert [row.split()[0] for row in rows] == ["3", "30", "300"]
    # the same code on both sides: the same iterations and evaluations
    for row in rows:
        counts = row.split("(")[1].split()[0], row.split("(")[2].split(")")[0]
        assert counts[0] == counts[1], row


def test_a_stack_reads_the_host_a_few_times_per_pass_whatever_its_size():
    """The stack decides on the host from three small reads (the evaluation's values and
    slopes; where searches ended, the pairs' curvature and gradient norms; the new
    directions' slopes), not one per problem."""
    from bilevel._sync import count_syncs

    D = torch.float64
    g = torch.Generator().manual_seed(5)
    counts = {}
    for B in (2, 8):
        C = torch.randn(B, 4, generator=g, dtype=D)

        def values(W, C=C):
            return ((W - C) ** 2).sum(1) + 0.1 * ((W - C) ** 4).sum(1) + (W.sin() ** 2).sum(1)

        with count_syncs("cpu") as syncs:
            _, infos = solvers.lbfgs(tol=1e-10).solve_batch(values, torch.zeros(B, 4, dtype=D))
        passes = max(i.evaluations for i in infos) - 1
        # two at the start and five for the records (one per field); per pass at most three
        # (a fourth when a direction is not one of descent)
        assert passes + 7 <= syncs.count <= 3 * passes + 7, (B, syncs.count, passes)
        counts[B] = syncs.count / passes
    assert counts[8] < 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_stack_in_half_precision_is_refused_naming_the_fix(dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        solvers.lbfgs().solve_batch(lambda W: (W**2).sum(1), torch.ones(3, 2, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("history", [3, 7])
def test_rows_holding_different_pair_counts_take_their_single_calls_steps_bit_for_bit(
    dtype, history
):
    """Smooth rows and rows with a kink (failed searches, restarts, cleared rings) in one
    stack, truncated: every row's iterate, counts and message are its single call's, bit
    for bit; a row holding fewer pairs than the longest history must not be solved padded
    (identity rows round otherwise in the triangular solves and slot sums)."""
    B, n = 6, 5
    g = torch.Generator().manual_seed(0)
    C = torch.randn(B, n, generator=g, dtype=dtype) * torch.logspace(-1, 1, B, dtype=dtype)[:, None]
    q = torch.rand(B, generator=g, dtype=dtype)
    kink = torch.tensor([0, 1, 0, 1, 0, 0], dtype=dtype)

    def one(w, c, q, k):
        smooth = ((w - c) ** 2).sum() + q * ((w - c) ** 4).sum() + q * (w.sin() ** 2).sum()
        return smooth + k * (w - c).abs().sum()

    tol = 1e-10 if dtype == torch.float64 else 1e-4
    solver = solvers.lbfgs(tol=tol, maxiter=60, history_size=history)
    W, infos = solver.solve_batch(
        lambda W: torch.func.vmap(one)(W, C, q, kink), torch.zeros(B, n, dtype=dtype)
    )
    assert len({i.evaluations for i in infos}) > 3
    for i in range(B):
        w, info = solver(lambda w, i=i: one(w, C[i], q[i], kink[i]), torch.zeros(n, dtype=dtype))
        assert torch.equal(W[i], w), i
        assert (info.iterations, info.evaluations, info.message) == (
            infos[i].iterations,
            infos[i].evaluations,
            infos[i].message,
        )
