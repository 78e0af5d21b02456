"""``l2 --warm-start on --preconditioner jacobi``: the same learning run as the defaults (the
backward solves stop at the same tolerance), with the backward time reported."""

import json

from experiments.__main__ import main

ARGS = [
    "l2",
    "--quick",
    "--threads",
    "1",
    "--progress",
    "off",
    "--datasets",
    "breast_cancer",
    "--methods",
    "per-feature",
    "--outer-steps",
    "3",
    "--grid-size",
    "2",
]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_warm_start_and_jacobi_learn_the_same_weights(tmp_path):
    runs = {}
    for name, extra in (
        ("plain", []),
        ("warm+jacobi", ["--warm-start", "on", "--preconditioner", "jacobi"]),
    ):
        assert main([*ARGS, "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = _summary(tmp_path / name)
    plain, fast = (
        runs[k]["results"]["breast_cancer/per-feature"] for k in ("plain", "warm+jacobi")
    )
    assert len(plain["l2"]) == len(fast["l2"]) == 30
    for a, b in zip(plain["l2"], fast["l2"]):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
    assert abs(plain["final"]["val_loss"] - fast["final"]["val_loss"]) <= 1e-6
    assert 0 < fast["hypergrad_s"] <= fast["wall_s"]
    row = next(r for r in runs["warm+jacobi"]["table"] if r["method"] == "per-feature")
    assert row["hypergrad_s"] == fast["hypergrad_s"]
