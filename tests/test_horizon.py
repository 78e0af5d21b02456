"""The horizon experiment: its schedule optimizer against finite differences in every mode,
the peak-memory measurement, a quick run with every method, exact resume, bad options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bilevel
from experiments import horizon
from experiments.__main__ import main

DT = torch.float64
COMMON = ["--quick", "--threads", "1", "--progress", "off", "--checkpoint-every", "2"]


def problem(steps: int = 12):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=g, dtype=DT) * 0.3}
    batches = [
        (torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]
    val = (torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
    return params, batches, val


def inner(p, h, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(torch.tanh(x @ p["w"]), y)


def val_loss(opt, log_lr, mode, steps=12):
    params, batches, (xv, yv) = problem(steps)
    r = bilevel.unroll(inner, params, {"log_lr": log_lr}, opt, steps, batches, mode)
    return torch.nn.functional.cross_entropy(torch.tanh(xv @ r.params["w"]), yv)


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_block_schedule_hypergradient_matches_finite_differences(mode):
    opt = horizon.BlockLRSGD(block=4, blocks=3, momentum=0.9)
    theta = torch.log(torch.tensor([0.5, 0.3, 0.1], dtype=DT)).requires_grad_()
    (got,) = torch.autograd.grad(val_loss(opt, theta, mode), theta)
    eps = 1e-6
    want = torch.zeros(3, dtype=DT)
    with torch.no_grad():
        for i in range(3):
            e = torch.zeros(3, dtype=DT)
            e[i] = eps
            up = val_loss(opt, theta + e, "reverse")
            down = val_loss(opt, theta - e, "reverse")
            want[i] = (up - down) / (2 * eps)
    assert want.abs().min() > 1e-4  # every block changes the outcome
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)


def test_block_schedule_steps_use_the_block_of_each_step():
    # the last block also covers the steps left over when B does not divide T
    opt = horizon.BlockLRSGD(block=2, blocks=2, momentum=0.0)
    h = {"log_lr": torch.log(torch.tensor([0.1, 0.5], dtype=DT))}
    p = {"w": torch.zeros(1, dtype=DT)}
    s = opt.init(p, h)
    seen = []
    for _ in range(5):
        new, s = opt.step(p, {"w": torch.ones(1, dtype=DT)}, s, h)
        seen.append(float(p["w"] - new["w"]))
        p = new
    assert seen == pytest.approx([0.1, 0.1, 0.5, 0.5, 0.5])


def test_measure_counts_the_peak_of_tensors_alive_at_once():
    with horizon.Measure(torch.device("cpu")) as m:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB alive
        del a
        c = b + 1  # 8 MB alive again, never 12
        del b, c
    assert 8e6 <= m.peak < 1.1e7


def test_method_names_follow_the_options():
    cfg = {
        "methods": ["truncated", "pes", "forward", "checkpoint"],
        "truncations": [10, 50],
        "pes_window": 10,
        "forward_every": 20,
    }
    assert horizon.method_names(cfg) == [
        "truncated-10",
        "truncated-50",
        "pes-10",
        "forward-20",
        "checkpoint",
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(obj):
    """Drop wall-clock fields and the memory measurement (its allocations are the
    process's, not part of the run's numbers)."""
    if isinstance(obj, dict):
        return {
            k: comparable(v)
            for k, v in obj.items()
            if not (k.endswith(("_s", "_ms", "_bytes")) or k in ("peak_memory",))
        }
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def test_quick_run_every_method_and_exact_resume(tmp_path):
    ref = tmp_path / "ref"
    assert main(["horizon", *COMMON, "--out", str(ref)]) == 0
    summary = json.loads((ref / "summary.json").read_text())
    config = json.loads((ref / "config.json").read_text())
    names = horizon.method_names(config)
    assert [r["method"] for r in summary["table"]] == ["initial (constant)", *names]
    assert (ref / "horizon.png").read_bytes()[:4] == b"\x89PNG"
    init_loss = summary["initial"]["val_loss"]
    for name in names:
        r = summary["learned"][name]
        assert len(r["lr"]) == config["blocks"]
        assert r["lr"] != [config["init_lr"]] * config["blocks"]  # the schedule was learned
        assert r["val_loss"] < init_loss  # every method improved on the initial schedule
        assert r["peak_bytes"] > 0 and r["inner_step_ms"] > 0
    # the windowed estimators carry state across steps; reverse modes do not
    learned = summary["learned"]
    assert learned[f"pes-{config['pes_window']}"]["carried_bytes"] > 0
    assert learned[f"forward-{config['forward_every']}"]["carried_bytes"] > 0
    if "reversible" in learned:  # both exact: the same schedule up to the fixed-point grid
        assert learned["reversible"]["lr"] == pytest.approx(learned["checkpoint"]["lr"], rel=1e-3)
    for row in metrics(ref):
        for value in row.values():
            if isinstance(value, float):
                assert math.isfinite(value)

    out = tmp_path / "resumed"
    stop = 5  # inside the second method's phase
    assert main(["horizon", *COMMON, "--out", str(out), "--max-outer-steps", str(stop)]) == 0
    assert (out / "checkpoint.pt").exists() and len(metrics(out)) == stop
    assert main(["horizon", *COMMON, "--out", str(out), "--resume"]) == 0
    got = json.loads((out / "summary.json").read_text())
    assert comparable(got) == comparable(summary)
    assert comparable(metrics(out)) == comparable(metrics(ref))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--truncations", "7"], "--truncations 7 must be a positive divisor"),
        (["--pes-window", "0"], "--pes-window"),
        (["--blocks", "100"], "--blocks 100 exceeds"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, extra, message):
    assert main(["horizon", *COMMON, "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_reversible_is_a_default_method_exactly_when_bilevel_has_the_mode(tmp_path, capsys):
    assert ("reversible" in horizon.DEFAULT_KINDS) == horizon.HAS_REVERSIBLE
    if not horizon.HAS_REVERSIBLE:  # asked for anyway: refused before any work
        args = ["horizon", *COMMON, "--out", str(tmp_path / "x"), "--methods", "reversible"]
        assert main(args) == 2
        assert "mode='reversible'" in capsys.readouterr().err
