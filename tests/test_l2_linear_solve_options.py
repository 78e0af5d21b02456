"""``l2``'s backward solves: warm start and Jacobi (the defaults) learn the same weights as
plain CG, their state is checkpointed so a resumed run is exact, and ``--torchopt on``
computes TorchOpt's hypergradients at the same solutions, checked and timed."""

import json
import warnings

import pytest
import torch

import bilevel
from bilevel import linalg
from experiments.__main__ import main
from experiments.io import load_verified_checkpoint
from experiments.l2_torchopt import agree_rtol

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


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def test_warm_start_and_jacobi_learn_the_same_weights(tmp_path):
    runs = {}
    for name, extra in (
        ("plain", ["--warm-start", "off", "--preconditioner", "none"]),
        ("warm+jacobi", []),  # the defaults
    ):
        assert main([*ARGS, "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = _summary(tmp_path / name)
    assert runs["warm+jacobi"]["config"]["warm_start"] == "on"
    assert runs["warm+jacobi"]["config"]["preconditioner"] == "jacobi"
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
    assert "torchopt" not in fast  # off by default


def test_a_resumed_run_keeps_the_warm_start_and_the_preconditioner(tmp_path):
    """Stopped inside the learning phase (after the Jacobi estimate and a stored solution),
    the checkpoint holds the WarmStart's state, loadable with weights_only=True, and the
    resumed run's metrics equal the uninterrupted run's exactly."""
    args = [*ARGS, "--outer-steps", "6", "--checkpoint-every", "100"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "stopped"
    # grid 2 steps, then 3 of per-feature's 6
    assert main([*args, "--out", str(out), "--max-outer-steps", "5"]) == 0
    ckpt = load_verified_checkpoint(out / "checkpoint.pt")  # torch.load(weights_only=True)
    assert ckpt["phase"] == "breast_cancer/per-feature" and ckpt["phase_step"] == 3
    warm = ckpt["state"]["warm"]
    assert warm["solutions"]["vjp"][0].shape == (30, 1)
    memory = warm["preconditioners"]["vjp"]
    assert memory["uses"] == 3 and memory["estimates"] == 1
    assert memory["diagonal"] is not None
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert _untimed(_metrics(out)) == _untimed(_metrics(tmp_path / "ref"))
    ref = _summary(tmp_path / "ref")["results"]["breast_cancer/per-feature"]
    got = _summary(out)["results"]["breast_cancer/per-feature"]
    assert got["l2"] == ref["l2"]  # bit for bit


def test_warm_start_state_dict_round_trip_solves_bit_for_bit():
    """A WarmStart saved after two outer steps (torch.save, weights_only load) and restored
    into a fresh object makes the third step's solve exactly as the original object does."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(60, 25, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)

    def loss(w, h):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()

    solver = linalg.cg(tol=1e-10, preconditioner=linalg.jacobi(probes=4, every=5))

    def step(ws, t):
        h = torch.linspace(-2, 1, 25, dtype=torch.float64) + 0.05 * t
        w_star = torch.linalg.solve(X.T @ X / 60 + torch.diag(h.exp()), X.T @ y / 60)
        hh = h.requires_grad_()
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.argmin(loss, w_star, hh, linear_solver=solver, warm_start=ws, diagnostics=diag)
        (grad,) = torch.autograd.grad(w.sum(), hh)
        return grad, diag.last_backward

    ws = bilevel.WarmStart()
    for t in range(2):
        step(ws, t)
    path = f"/tmp/_ws_{id(ws)}.pt"
    torch.save(ws.state_dict(), path)
    restored = bilevel.WarmStart()
    restored.load_state_dict(torch.load(path, weights_only=True))
    fresh = bilevel.WarmStart()
    g_orig, info_orig = step(ws, 2)
    g_rest, info_rest = step(restored, 2)
    g_cold, info_cold = step(fresh, 2)
    assert torch.equal(g_orig, g_rest)
    assert info_orig.iterations == info_rest.iterations < info_cold.iterations
    assert (
        info_rest.preconditioner
        == info_orig.preconditioner
        == ("jacobi (Hutchinson, 4 probes, reused 2 times)")
    )
    with pytest.raises(ValueError, match="state_dict"):
        restored.load_state_dict({"solutions": {}})


def test_torchopt_comparison_agrees_and_reports_the_time_ratio(tmp_path):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a disagreement would warn
        warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch use
        assert main([*ARGS, "--out", str(out), "--torchopt", "on"]) == 0
    res = _summary(out)["results"]["breast_cancer/per-feature"]["torchopt"]
    assert res["agree"] and 0 <= res["max_rel_diff"] <= res["agree_rtol"] == agree_rtol(1e-6)
    assert res["hypergrad_s"] > 0
    ours = _summary(out)["results"]["breast_cancer/per-feature"]["hypergrad_s"]
    assert res["hypergrad_vs_torchopt"] == pytest.approx(ours / res["hypergrad_s"])
    rows = [r for r in _metrics(out) if r["phase"] == "breast_cancer/per-feature"]
    assert len(rows) == 3 and all(0 <= r["torchopt_rel_diff"] <= res["agree_rtol"] for r in rows)


def test_torchopt_disagreement_warns(monkeypatch, tmp_path):
    """A TorchOpt hypergradient far from ours (here: made so) warns, and the summary says so."""
    from experiments import l2_torchopt

    real = l2_torchopt.TorchOptHypergradient.__call__

    def off_by_a_percent(self, w_star, log_l2):
        g, seconds = real(self, w_star, log_l2)
        return 1.01 * g, seconds

    monkeypatch.setattr(l2_torchopt.TorchOptHypergradient, "__call__", off_by_a_percent)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="differ by 9.9"):
        assert main([*ARGS, "--out", str(out), "--torchopt", "on"]) == 0
    res = _summary(out)["results"]["breast_cancer/per-feature"]["torchopt"]
    assert not res["agree"] and res["max_rel_diff"] == pytest.approx(0.01 / 1.01, rel=1e-3)
