"""End-to-end tests of the experiments: every ``--quick`` run, exact resume, the CSV reader.

Each experiment runs once in-process (module-scoped fixture); its folder is checked (files,
finite metrics, summary fields, the outer loss going down) and serves as the uninterrupted
reference for the resume test, which stops a run with ``--max-outer-steps``, leaves behind
metrics lines written after the checkpoint (as a kill would), resumes it and must reproduce
the reference's summary and metrics exactly on the CPU.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from experiments.__main__ import main

EXPERIMENTS = ["learn-lr", "l2", "maml", "hyperclean", "argmin-timeseries"]
COMMON = ["--quick", "--threads", "1", "--progress", "off", "--checkpoint-every", "4"]
# the DJIA 30 stock CSV of the course tutorial is not in the repository: a path in this
# variable runs test_argmin_timeseries_on_the_tutorial_stock_csv on it
DJIA_ENV = "BILEVEL_DJIA_CSV"

# expected summary fields and the columns of its main table
FIELDS = {
    "learn-lr": (
        ["grid_best", "best_learned", "beats_grid", "val_loss_improvement", "learned"],
        [
            "method",
            "mode",
            "lr",
            "momentum",
            "val_loss",
            "val_acc",
            "test_loss",
            "test_acc",
            "hypergrad_ms",
            "inner_runs",
        ],
    ),
    "l2": (
        ["results", "beats_grid"],
        ["data", "method", "l2", "val_loss", "test_acc", "solves", "wall_s", "solves_to_best"],
    ),
    "maml": (
        ["results", "best_method", "beats_pretrained"],
        ["method", "mse@0", "ci95@0", "mse@1", "mse@5", "mse@10", "ci95@10", "mse@own"],
    ),
    "hyperclean": (["flags", "test_acc", "tables"], ["training set", "val_loss", "test_acc"]),
    "argmin-timeseries": (
        ["results", "naive", "beats_naive", "beats_linear_head", "windows"],
        ["model", "val_mse", "test_mse"],
    ),
}


def run_quick(name: str, out: Path, *extra: str) -> int:
    return main([name, *COMMON, "--out", str(out), *extra])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(obj):
    """Drop wall-clock fields (keys ending in _s or _ms): they differ between runs."""
    if isinstance(obj, dict):
        return {
            k: untimed(v) for k, v in obj.items() if not (k.endswith("_s") or k.endswith("_ms"))
        }
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


class _References(dict):
    """name -> (folder, exit code) of the uninterrupted quick run, run on first use."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        out = self.factory.mktemp(name.replace("-", "_")) / "run"
        self[name] = (out, run_quick(name, out))
        return self[name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each experiment's uninterrupted quick run, run once per module and only when needed."""
    return _References(tmp_path_factory)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_writes_a_complete_folder(reference, name):
    out, code = reference[name]
    assert code == 0
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt").exists()  # removed once the run is complete
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == name and config["quick"] is True and config["seed"] == 0

    summary = json.loads((out / "summary.json").read_text())
    fields, columns = FIELDS[name]
    for key in [*fields, "table", "plots", "outer_steps", "wall_s", "config"]:
        assert key in summary, key
    assert summary["table"], "empty summary table"
    for col in columns:
        assert all(col in row for row in summary["table"]), col
    for png in summary["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    rows = read_metrics(out)
    assert [r["global_step"] for r in rows] == list(range(1, len(rows) + 1))
    assert summary["outer_steps"] == len(rows)
    for r in rows:
        for key, value in r.items():
            if isinstance(value, float):
                assert math.isfinite(value), (r["phase"], key, value)

    # the outer loss went down in every phase that optimizes one
    by_phase: dict[str, list[float]] = {}
    for r in rows:
        if r.get("outer_loss") is not None:
            by_phase.setdefault(r["phase"], []).append(r["outer_loss"])
    assert by_phase, "no outer loss logged"
    for phase, losses in by_phase.items():
        assert len(losses) >= 2, phase
        assert losses[-1] < losses[0], (phase, losses)


def test_learn_lr_summary_values(reference):
    summary = json.loads((reference["learn-lr"][0] / "summary.json").read_text())
    modes = {(r["method"], r["mode"]) for r in summary["table"]}
    assert {
        ("scalar", m) for m in ["reverse", "truncated", "checkpoint", "forward", "first_order"]
    } <= modes
    assert {("per-layer", "reverse"), ("per-step", "reverse"), ("grid search", "-")} <= modes
    per_step = summary["learned"]["per-step/reverse"]["lr"]
    assert (
        len(per_step)
        == json.loads((reference["learn-lr"][0] / "config.json").read_text())["inner_steps"]
    )
    for r in summary["table"]:
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1


def test_hyperclean_flags_corrupted_examples(reference):
    summary = json.loads((reference["hyperclean"][0] / "summary.json").read_text())
    flags = summary["flags"]
    assert 0 <= flags["precision"] <= 1 and 0 <= flags["recall"] <= 1
    assert flags["f1"] > 0.5  # far better than chance (about 0.5 only if flagging everything)
    acc = summary["test_acc"]
    assert acc["learned weights"] > acc["all examples"]


# -- resume -------------------------------------------------------------------------------

STOP_AT = {"learn-lr": 20, "l2": 21, "maml": 30, "hyperclean": 5, "argmin-timeseries": 17}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_resume_reproduces_the_uninterrupted_run(reference, tmp_path, name):
    ref_out, code = reference[name]
    assert code == 0
    out = tmp_path / "run"
    stop = STOP_AT[name]
    assert run_quick(name, out, "--max-outer-steps", str(stop)) == 0
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()
    assert len(read_metrics(out)) == stop
    # a kill after the checkpoint leaves extra lines: resume must drop them, not duplicate
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "stale", "step": 0, "global_step": stop + 1}) + "\n")
        f.write('{"phase": "half-writ')
    assert run_quick(name, out, "--resume") == 0
    assert not (out / "checkpoint.pt").exists()
    ref = json.loads((ref_out / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert untimed(got) == untimed(ref)
    assert untimed(read_metrics(out)) == untimed(read_metrics(ref_out))


def test_resume_of_a_finished_run_prints_its_summary(reference, capsys):
    out, _ = reference["hyperclean"]
    capsys.readouterr()
    assert run_quick("hyperclean", out, "--resume") == 0
    assert "finished run" in capsys.readouterr().out


# -- the CSV reader and the tutorial's data ------------------------------------------------


def test_read_stock_csv_groups_sorts_and_skips_missing(tmp_path):
    from experiments.argmin_timeseries import read_stock_csv

    text = (
        "Date,Open,High,Low,Close,Volume,Name\n"
        "2020-01-02,1,1,1,11.0,5,BBB\n"
        "2020-01-01,1,1,1,10.0,5,BBB\n"
        "2020-01-01,,,,20.5,5,AAA\n"
        "2020-01-03,1,1,1,,5,BBB\n"
    )
    plain = tmp_path / "s.csv"
    plain.write_text(text)
    packed = tmp_path / "s.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        assert read_stock_csv(str(path)) == {"AAA": [20.5], "BBB": [10.0, 11.0]}


def test_argmin_timeseries_on_the_tutorial_stock_csv(tmp_path, stock_csv):
    csv = stock_csv()
    out = tmp_path / "djia"
    assert run_quick("argmin-timeseries", out, "--csv", str(csv), "--outer-steps", "4") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == str(csv)
    assert min(summary["windows"].values()) > 100
    assert all(math.isfinite(r["test_mse"]) for r in summary["table"])


def test_checkpoint_round_trip_restores_tensors_and_optimizer(tmp_path):
    from experiments.io import load_checkpoint, save_checkpoint
    from experiments.run import _pack, _unpack_into

    w = torch.randn(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    state = {"w": w, "opt": opt, "n": 3, "rows": [{"a": 1.5}], "_skip": object()}
    save_checkpoint(tmp_path / "c.pt", {"state": _pack(state)})
    w2 = torch.zeros(3, requires_grad=True)
    opt2 = torch.optim.Adam([w2], lr=0.1)
    new = _unpack_into(
        {"w": w2, "opt": opt2, "n": 0, "rows": []},
        load_checkpoint(tmp_path / "c.pt")["state"],
        torch.device("cpu"),
    )
    assert new["w"] is w2 and torch.equal(w2, w) and new["n"] == 3 and new["rows"] == [{"a": 1.5}]
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("method", ["maml-1", "maml-5", "fomaml-5"])
def test_maml_batched_meta_gradient_equals_vmap_of_task_loss(method, activation):
    from experiments import maml

    gen = torch.Generator().manual_seed(3)
    params = maml.init_params(gen, torch.device("cpu"), torch.float64)
    tasks = maml.sample_tasks(gen, 6, 10, 7)
    cfg = {"method": method, "inner_lr": 0.05, "activation": activation}
    loss, grads = maml.meta_value_and_grad(params, tasks, cfg)  # the batched path

    def mean_loss(p):
        return torch.func.vmap(lambda t: maml.task_loss(p, t, cfg))(tasks).mean()

    ref_grads = torch.func.grad(mean_loss)(params)
    torch.testing.assert_close(loss, mean_loss(params), rtol=1e-12, atol=1e-12)
    for name in params:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)


def test_maml_meta_test_divergence_is_reported_not_averaged():
    # an SGD step far beyond 2/curvature: the adapted weights blow up on some tasks; the
    # evaluation must say so (null and a count, and a note) rather than average the rest
    from experiments import maml

    params = maml.init_params(torch.Generator().manual_seed(0), "cpu", torch.float64)
    tasks = maml.sample_tasks(torch.Generator().manual_seed(1), 6, 10, 20)
    ev = maml.evaluate(params, tasks, [0, 20], lr=1e3, activation="gelu")
    assert math.isfinite(ev["0"]["mse"]) and "diverged_tasks" not in ev["0"]
    assert ev["20"]["mse"] is None and ev["20"]["ci95"] is None
    assert 1 <= ev["20"]["diverged_tasks"] <= 6
    notes = maml.diverged_notes({"imaml": {"eval": ev}}, {"inner_lr": 1e3, "test_tasks": 6})
    assert len(notes) == 1
    assert notes[0].startswith("imaml: 20 SGD steps at --inner-lr 1000 diverged on")
    assert "mse@own" in notes[0]


def test_maml_own_adaptation_is_the_trained_rule():
    # MAML-k's own adaptation is k SGD steps (equal to the SGD column); iMAML's is its argmin
    from experiments import maml

    params = maml.init_params(torch.Generator().manual_seed(0), "cpu", torch.float64)
    tasks = maml.sample_tasks(torch.Generator().manual_seed(1), 4, 10, 20)
    cfg = {"inner_lr": 0.01, "activation": "gelu", "imaml_lambda": 10.0}
    cfg.update({"imaml_tol": 1e-8, "imaml_steps": 200, "cg_steps": 200})
    sgd = maml.evaluate(params, tasks, [1], 0.01, "gelu")["1"]
    own = maml.evaluate_own(params, tasks, {**cfg, "method": "maml-1"})
    assert own["mse"] == pytest.approx(sgd["mse"], rel=1e-12)
    own_imaml = maml.evaluate_own(params, tasks, {**cfg, "method": "imaml"})
    # vmapped over the tasks it equals the per-task loop (each task its own L-BFGS solve)
    loop = []
    for i in range(4):
        xs, ys, xq, yq = (t[i] for t in tasks)
        w = maml.imaml_adapt(params, xs, ys, {**cfg, "method": "imaml"})
        loop.append(float(maml.mse(w, xq, yq, "gelu")))
    assert own_imaml["mse"] == pytest.approx(sum(loop) / 4, rel=1e-10)
    assert own_imaml["mse"] != pytest.approx(sgd["mse"], rel=1e-3)
