"""The lasso and portfolio experiments: quick runs, exact resume, the DJIA CSV, bad options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.__main__ import main

COMMON = ["--quick", "--threads", "1", "--progress", "off", "--checkpoint-every", "3"]
SMALL = {
    "lasso": ["--datasets", "diabetes,synthetic", "--outer-steps", "4", "--grid-size", "4"],
    "portfolio": ["--outer-steps", "6"],
}


def run(name: str, out: Path, *extra: str) -> int:
    return main([name, *COMMON, "--out", str(out), *SMALL[name], *extra])


def untimed(obj):
    if isinstance(obj, dict):
        return {
            k: untimed(v) for k, v in obj.items() if not (k.endswith("_s") or k.endswith("_ms"))
        }
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["lasso", "portfolio"])
def test_quick_run_and_exact_resume(tmp_path, name):
    ref = tmp_path / "ref"
    assert run(name, ref) == 0
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["table"] and summary["plots"]
    assert (ref / summary["plots"][0]).read_bytes()[:4] == b"\x89PNG"
    for row in metrics(ref):
        for value in row.values():
            if isinstance(value, float):
                assert math.isfinite(value)
    if name == "lasso":
        methods = {r["method"] for r in summary["table"]}
        assert {"sklearn path", "LassoCV (1 split)", "lasso", "enet", "enet-feature"} <= methods
        for r in summary["table"]:
            if r["method"] == "lasso":
                assert 0 < r["nnz"]  # a sparse but non-empty model
    else:
        strategies = [r["strategy"] for r in summary["table"]]
        assert strategies == ["predict-then-optimise", "decision-focused", "equal weights"]
        for r in summary["table"]:
            assert r["max_weight"] <= 0.3 + 1e-6  # the per-asset cap holds out of sample
    out = tmp_path / "resumed"
    stop = len(metrics(ref)) // 2
    assert run(name, out, "--max-outer-steps", str(stop)) == 0
    assert (out / "checkpoint.pt").exists()
    assert run(name, out, "--resume") == 0
    got = json.loads((out / "summary.json").read_text())
    assert untimed(got) == untimed(summary)


def test_portfolio_on_the_djia_stock_csv(tmp_path, stock_csv):
    csv = stock_csv(tickers=8)
    out = tmp_path / "djia"
    assert run("portfolio", out, "--csv", str(csv), "--assets", "8") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["assets"] == 8 and summary["data"] == str(csv)


def test_portfolio_bad_options(tmp_path, capsys):
    code = main(
        ["portfolio", "--quick", "--cap", "0.1", "--assets", "5", "--out", str(tmp_path / "x")]
    )
    assert code == 2 and "no fully invested portfolio" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("Date,Close\n2020-01-01,1\n")
    code = main(["portfolio", "--quick", "--csv", str(bad), "--out", str(tmp_path / "y")])
    assert code == 2 and "missing column" in capsys.readouterr().err


def test_bench_qp_agrees_and_prints_a_table(capsys):
    from experiments.bench.qp import main as bench_main

    assert bench_main(["--batches", "1,3", "--sizes", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bilevel" in out and " ms" in out and "DISAGREES" not in out
