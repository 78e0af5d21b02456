"""JAXopt in ``bench implicit``: its hypergradients against the exact ones, a wrong one is
flagged, a missing JAXopt is reported as missing; the small problems' exact references.

The quick run with JAXopt's rows is checked in test_bench.py (one run of the whole bench).
"""

import json
import sys

import numpy as np
import pytest
import torch

from experiments import bench
from experiments.bench import core as bench_core
from experiments.bench import implicit, implicit_small, jaxopt_peer

HAVE_JAXOPT = bench_core.peer("jaxopt").available


@pytest.fixture
def no_jaxopt(monkeypatch):
    """Simulate jax and jaxopt not installed: their imports fail, detection runs again."""
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.setitem(sys.modules, "jaxopt", None)
    monkeypatch.delitem(bench_core._PEERS, "jaxopt", raising=False)
    yield
    bench_core._PEERS.pop("jaxopt", None)


def _breast_cancer(per_feature):
    data = implicit.breast_cancer(0)
    problem = implicit.make_problem(
        "breast-cancer", data, per_feature, implicit.LAMBDA["breast-cancer"], torch.device("cpu")
    )
    return problem


def test_missing_jaxopt_is_reported(no_jaxopt, tmp_path, monkeypatch, capsys):
    assert not bench_core.peer("jaxopt").available
    assert "import of jaxopt halted" in bench_core.peer("jaxopt").note
    # the small problems alone (the logistic configurations are covered below), without the
    # two compiled rows (test_bench.py's test_quick_compiled_rows_agree checks them)
    monkeypatch.setattr(implicit, "run_implicit", _small_only)
    path = tmp_path / "b.json"
    code = bench.main(["implicit", "--quick", "--no-compile", "--json", str(path)])
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert code == 0
    assert "jaxopt: missing (ModuleNotFoundError" in out  # the header's peers line
    assert data["environment"]["peers"]["jaxopt"]["available"] is False
    assert out.count("missing") >= 3  # header, the ridge table, the digits table
    names = {r["implementation"] for r in data["rows"]}
    assert names and not any(n.startswith("jaxopt") for n in names)
    notes: list[str] = []
    assert implicit.jaxopt_impls(_breast_cancer(False), notes) == []
    assert notes == [f"jaxopt cg: missing ({bench_core.peer('jaxopt').note})"]
    assert jaxopt_peer.missing_cells("jaxopt cg")["agree"] == "missing"


def _small_only(s, report):
    report.tables.append(implicit_small.run_small(s, report))


def test_jaxopt_logistic_agrees_and_a_wrong_one_is_flagged():
    if not HAVE_JAXOPT:
        assert implicit.jaxopt_impls(_breast_cancer(True), []) == []
        return
    for per_feature in (False, True):
        problem = _breast_cancer(per_feature)
        (impl,) = implicit.jaxopt_impls(problem, [])
        assert impl.fn.compile_s > 0 and "compile" in impl.note
        wrong = bench_core.Impl("wrong", lambda fn=impl.fn: fn() * (1 + 1e-6))
        results = bench_core.measure(
            [impl, wrong],
            reference=problem.exact,
            rtol=1e-9,
            repeats=2,
            warmup=1,
            device=torch.device("cpu"),
        )
        assert results[impl.name].agree is True and results[impl.name].rel_error < 1e-10
        assert results["wrong"].agree is False
        assert len(results[impl.name].times) == 2


def test_jaxopt_sparse_design_agrees():
    problem = implicit.make_problem(
        "synthetic", implicit.synthetic(50, 0), True, 1e-3, torch.device("cpu")
    )
    impls = implicit.jaxopt_impls(problem, [])
    if not HAVE_JAXOPT:
        assert impls == []
        return
    g = impls[0].fn()
    assert g.dtype == torch.float64 and g.shape == problem.exact.shape
    assert bench_core.rel_error(g, problem.exact) < 1e-10


@pytest.mark.parametrize("size", [(10, 3), (100, 30)])
def test_ridge_exact_is_the_closed_form_gradient(size):
    problem = implicit_small.ridge(*size, seed=0)
    g = implicit_small.closed_form_impl(problem)()
    assert bench_core.rel_error(g.reshape(-1), problem.exact.reshape(-1)) < 1e-12
    if HAVE_JAXOPT:
        # cg only: LBFGS jitted takes ~15 s to compile, and the quick bench (test_bench.py)
        # checks its row against the same exact answer
        for impl in implicit_small.jaxopt_impls(problem, lbfgs=False):
            assert bench_core.rel_error(impl.fn().reshape(-1), problem.exact.reshape(-1)) < 1e-9


def test_digits_exact_matches_finite_differences():
    X, y, Xv, yv = implicit_small.digits_data(0)
    lam, eps = implicit_small.DIGITS_LAMBDA, 1e-4

    problem = implicit_small.digits(0)
    W0 = problem.w_star.numpy()

    def val_loss(h):  # re-solved from the solution at h (a few Newton steps)
        W, _ = implicit_small.digits_newton(X, y, 10, float(np.exp(h)), W0)
        return implicit_small.digits_val_loss(W, Xv, yv)

    h = np.log(lam)
    fd = (val_loss(h + eps) - val_loss(h - eps)) / (2 * eps)
    assert problem.unknowns == 640
    assert abs(fd - float(problem.exact)) <= 1e-6 * abs(fd)
    W = problem.w_star.requires_grad_()
    grad = torch.autograd.grad(problem.inner(W, problem.h.detach()), W)[0]
    assert float(grad.norm()) < 1e-12  # the given solution is stationary
