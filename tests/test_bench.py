"""``python -m experiments bench --quick``: every implementation agrees, the JSON has the rows.

No timing assertions: the quick run checks correctness (hypergradients of bilevel, the plain
PyTorch floor and the installed peers agree) and the report's structure.
"""

import json

import pytest
import torch

from experiments import bench
from experiments.__main__ import main as cli_main
from experiments.bench import core as bench_core
from experiments.bench import implicit_small
from experiments.bench import unroll as bench_unroll


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    # --no-compile: the two torch.compile rows would take most of this run (inductor's
    # compiles); test_quick_compiled_rows_agree (slow) measures them alone
    code = bench.main(["all", "--quick", "--no-compile", "--json", str(path)])
    return code, json.loads(path.read_text())


def _rows(data, problem):
    return [r for r in data["rows"] if r["problem"] == problem]


def test_quick_run_agrees(quick):
    code, data = quick
    assert code == 0, data["disagreements"]
    assert data["all_agree"] and data["bilevel_ok"]
    checked = [r for r in data["rows"] if r["checked"] and not r["reference"]]
    assert checked and all(r["agree"] is True for r in checked)
    assert not [r for r in data["rows"] if r["failed"]]


def test_quick_run_environment(quick):
    _, data = quick
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["threads"] == 1
    assert set(env["peers"]) == {"higher", "torchopt", "jaxopt"}
    for name, info in env["peers"].items():
        assert info["available"] == bench_core.peer(name).available


def test_quick_run_unroll_rows(quick):
    _, data = quick
    rows = _rows(data, "unroll")
    configs = {(r["opt"], r["dtype"], r["T"]) for r in rows}
    assert configs == {(o, d, 5) for o in ("sgd", "adam") for d in ("float32", "float64")}
    names = {r["implementation"] for r in rows}
    assert {"bilevel reverse", "plain PyTorch"} <= names
    if bench_core.peer("higher").available:
        assert "higher" in names
    if bench_core.peer("torchopt").available:
        assert {"torchopt functional", "torchopt MetaSGD", "torchopt MetaAdam"} <= names
    for r in rows:
        assert r["median_s"] > 0 and r["repeats"] == 1
        if r["implementation"] != "bilevel reverse":
            assert r["ratio"] > 0


def test_quick_run_memory_rows(quick):
    _, data = quick
    rows = _rows(data, "memory")
    assert {(r["mode"], r["T"]) for r in rows} == {
        (m, t) for m in ("reverse", "checkpoint", "forward", "truncated") for t in (5, 20)
    }
    saved = {(r["mode"], r["T"]): r["saved_bytes"] for r in rows}
    # reverse grows with T, forward does not, checkpoint stays below reverse
    assert saved[("reverse", 20)] > 2 * saved[("reverse", 5)]
    assert saved[("forward", 20)] == saved[("forward", 5)]
    assert saved[("checkpoint", 20)] < saved[("reverse", 20)]
    child = [r for r in rows if r.get("peak_rss_bytes")]
    assert [(r["mode"], r["T"]) for r in child] == [("forward", 20)]
    assert child[0]["peak_rss_bytes"] > 10 * 2**20


def test_quick_run_implicit_rows(quick):
    _, data = quick
    rows = _rows(data, "implicit")
    assert {(r["data"], r["h"]) for r in rows} == {
        (d, h) for d in ("breast-cancer", "synthetic p=300") for h in ("one weight", "per feature")
    }
    for r in rows:
        if r["implementation"] in (
            "bilevel cg",
            "bilevel minres",
            "bilevel gmres",
            "tutorial dense",
        ):
            assert r["rel_error"] <= 1e-9
    fd = [r for r in rows if r["implementation"] == "finite differences"]
    assert fd and all(r["rel_error"] < 1e-5 for r in fd)
    errors = [t for t in data["targets"] if "rel. error" in t["what"]]
    assert len(errors) == 4 and all(t["met"] for t in errors)
    jaxopt = [r for r in rows if r["implementation"] == "jaxopt cg"]
    if bench_core.peer("jaxopt").available:  # checked against the exact answer, and timed
        assert len(jaxopt) == 4
        assert all(r["agree"] is True and r["rel_error"] <= 1e-9 for r in jaxopt)
        assert all(r["median_s"] > 0 and "compile" in r["note"] for r in jaxopt)
    else:
        assert not jaxopt and any("jaxopt cg: missing" in n for n in data["notes"])


def test_quick_run_implicit_outer_loop_rows(quick):
    _, data = quick
    rows = _rows(data, "implicit outer")
    names = {"bilevel cg cold", "bilevel cg warm", "bilevel cg warm+jacobi"}
    if bench_core.peer("torchopt").available:
        names.add("torchopt cg")
    if bench_core.peer("jaxopt").available:
        names.add("jaxopt cg")
    for d in ("breast-cancer", "synthetic p=300"):
        mine = [r for r in rows if r["data"] == d]
        auto = {"bilevel auto"} if d == "breast-cancer" else set()  # 30 unknowns: dense LU
        assert {r["implementation"] for r in mine} == names | auto
        assert all(r["outer_steps"] == 3 and r["h"] == "per feature" for r in mine)
        # every step's hypergradient checked against the exact one
        assert all(r["agree"] is True and r["max_step_error"] <= 1e-6 for r in mine)
        products = {r["implementation"]: r["products"] for r in mine}
        # three steps: the warm solves start from the previous solution, never from further
        assert products["bilevel cg warm"] <= products["bilevel cg cold"] + 2
    # the <= 0.8x target is judged at p >= 1e4 only (not in the quick run)
    assert not [t for t in data["targets"] if t["problem"] == "implicit outer"]


def test_quick_run_small_implicit_rows(quick):
    _, data = quick
    rows = _rows(data, "implicit-small")
    names = {(r["data"], r["implementation"]) for r in rows}
    ridge_names = ("closed form", "bilevel auto", "bilevel cg", "bilevel dense", "bilevel lbfgs")
    expected = (
        {("ridge 10x3", n) for n in ridge_names}
        | {("digits", "bilevel cg"), ("digits", "bilevel auto")}
        | {("tutorial step", "closed-form ridge layer"), ("tutorial step", "bilevel RidgeArgMin")}
        | {("tutorial step", "bilevel RidgeArgMin cg")}
    )
    if bench_core.peer("jaxopt").available:
        expected |= {("ridge 10x3", "jaxopt cg"), ("ridge 10x3", "jaxopt LBFGS")}
        expected |= {("digits", "jaxopt cg")}
    assert names == expected
    # the tutorial's two networks agree to the experiment's cg tolerance, the rest exactly
    assert all(
        r["agree"] is True and r["rel_error"] <= (1e-6 if r["data"] == "tutorial step" else 1e-9)
        for r in rows
        if not r["reference"]
    )
    assert [r["implementation"] for r in rows if r["reference"]] == ["closed-form ridge layer"]
    tutorial = [r for r in rows if r["data"] == "tutorial step"]
    assert all(r["ratio_to_closed_form"] > 0 for r in tutorial)
    ridge = [r for r in rows if r["data"] == "ridge 10x3"]
    assert all(r["ratio_to_closed_form"] > 0 for r in ridge)
    assert any("compiled: left out (--no-compile)" in n for n in data["notes"])


@pytest.mark.slow
def test_quick_compiled_rows_agree():
    # the rows --no-compile leaves out, measured the bench's way on its 3-unknown ridge
    problem = implicit_small.ridge(10, 3, 0)
    impls = implicit_small.small_impls(problem, closed_form=True, dense=False, lbfgs=True)
    compiled = {"bilevel compiled", "bilevel lbfgs compiled"}
    assert compiled <= {i.name for i in impls}
    results = bench_core.measure(
        impls,
        reference=problem.exact,
        rtol=implicit_small.RTOL,
        repeats=1,
        warmup=0,
        device=torch.device("cpu"),
    )
    for name in compiled:
        assert results[name].failed is None and results[name].agree is True, name
        assert "compile" in results[name].note and results[name].median > 0
    assert "NOT compiled" not in results["bilevel lbfgs compiled"].note
    without = implicit_small.small_impls(
        problem, closed_form=True, dense=False, lbfgs=True, compiled=False
    )
    assert {i.name for i in without} == {i.name for i in impls} - compiled


def test_quick_run_maml_rows(quick):
    _, data = quick
    names = {r["implementation"] for r in _rows(data, "maml")}
    assert {"bilevel vmap", "torch.func vmap", "plain loop", "bilevel stateful loop"} <= names


def test_disagreement_is_reported(tmp_path, monkeypatch):
    def wrong_floor(setup):
        run = bench_unroll.plain_impl(setup)
        return lambda: run() * 1.01

    monkeypatch.setattr(
        bench_unroll,
        "unroll_impls",
        lambda setup: [
            bench_core.Impl(bench_unroll.SUBJECT, bench_unroll.bilevel_impl(setup)),
            bench_core.Impl(bench_unroll.FLOOR, wrong_floor(setup)),
            bench_core.Impl("broken peer", lambda: 1 / 0),
        ],
    )
    path = tmp_path / "b.json"
    code = bench.main(
        ["unroll", "--quick", "--steps", "2", "--dtype", "float64", "--json", str(path)]
    )
    data = json.loads(path.read_text())
    assert code == 1
    assert not data["all_agree"]
    bad = {r["implementation"] for r in data["rows"] if r["agree"] is False}
    assert bad == {"bilevel reverse"}  # judged against the (here wrong) reference
    broken = [r for r in data["rows"] if r["implementation"] == "broken peer"]
    assert broken and all("ZeroDivisionError" in r["failed"] for r in broken)


def test_missing_peer_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        bench_core._PEERS, "torchopt", bench_core.Peer("torchopt", False, note="not installed")
    )
    monkeypatch.setitem(
        bench_core._PEERS, "higher", bench_core.Peer("higher", False, note="not installed")
    )
    path = tmp_path / "b.json"
    code = bench.main(["maml", "--quick", "--json", str(path)])
    data = json.loads(path.read_text())
    assert code == 0
    assert data["environment"]["peers"]["torchopt"]["available"] is False
    assert "torchopt: missing" in capsys.readouterr().out
    names = {r["implementation"] for r in data["rows"]}
    assert not any(n.startswith(("higher", "torchopt")) for n in names)


def test_saved_bytes_counts_unique_storages_at_peak():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    # x * x saves x twice: one storage of 8000 bytes
    assert bench_core.saved_bytes(lambda: (x * x).sum().backward()) == 8000

    def two_graphs():
        # the first graph is freed before the second is built: the peak is one graph
        for _ in range(2):
            y = x.exp()  # saves its 8000-byte result
            y.sum().backward()

    assert bench_core.saved_bytes(two_graphs) == 8000


def test_measure_rotates_and_times():
    calls = []
    impls = [bench_core.Impl(n, lambda n=n: calls.append(n) or torch.ones(2)) for n in "abc"]
    res = bench_core.measure(
        impls, reference="a", rtol=0, repeats=3, warmup=1, device=torch.device("cpu")
    )
    assert calls[:3] == ["a", "b", "c"]  # the check run
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating start
    assert all(len(r.times) == 3 and r.rel_error == 0 for r in res.values())
    assert res["a"].reference and res["b"].agree


def test_bad_options_exit_2(capsys):
    assert bench.main(["nope"]) == 2
    assert bench.main(["--repeats", "0"]) == 2
    assert bench.main(["--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "unknown problem 'nope'" in err and "float16" in err


def test_cli_dispatches_bench(capsys):
    assert cli_main(["bench", "--help"]) == 0
    assert "implicit" in capsys.readouterr().out
