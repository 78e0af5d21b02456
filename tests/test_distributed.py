"""bilevel.distributed: 2 gloo processes on the CPU, started by the tests, give the
single-process meta-gradients and hypergradients.

The same file is the worker: ``python tests/test_distributed.py SCENARIO OUTDIR`` with the
torchrun environment variables set runs one rank of a scenario and saves its results.
Every launch is bounded in time and killed on timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import distributed as D
from bilevel import implicit
from bilevel.linalg import cg
from bilevel.solvers import lbfgs

DT = torch.float64
NPROC = 2
LAUNCH_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- problems
# Module-level so that the test process (the single-process reference) and the workers
# build exactly the same problems.


def maml_tasks(n: int = 8) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(n):
        a = torch.randn(3, generator=g, dtype=DT)
        xs = torch.randn(6, 3, generator=g, dtype=DT)
        xq = torch.randn(6, 3, generator=g, dtype=DT)
        tasks.append((xs, torch.tanh(xs @ a), xq, torch.tanh(xq @ a)))
    return tasks


def meta_params(log_scale: float) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([0.1, -0.2, 0.3], dtype=DT, requires_grad=True),
        "log_s": torch.tensor(log_scale, dtype=DT, requires_grad=True),
    }


def _mse(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(x @ w) - y) ** 2).mean()


def unroll_task_loss(meta, task):
    """MAML: 3 reverse-mode SGD steps from the meta-initialisation, learned log step size."""
    xs, ys, xq, yq = task
    res = bilevel.unroll(
        lambda p, h, b: _mse(p["w"], *b),
        {"w": meta["w"]},
        {"lr": meta["log_s"].exp()},
        bilevel.optim.sgd(),
        steps=3,
        data=(xs, ys),
        mode="reverse",
    )
    return _mse(res.params["w"], xq, yq)


def implicit_task_loss(meta, task):
    """iMAML: proximal inner problem around the meta-parameters, learned log strength."""
    xs, ys, xq, yq = task

    def inner(w, h, d):
        return _mse(w, *d) + 0.5 * h["lam"] * ((w - h["theta"]) ** 2).sum()

    w = implicit.argmin(
        inner,
        meta["w"].detach().clone(),
        {"theta": meta["w"], "lam": meta["log_s"].exp()},
        (xs, ys),
        solver=lbfgs(tol=1e-13),
        linear_solver=cg(tol=1e-13),
    )
    return _mse(w, xq, yq)


def batched_task_loss(meta, tasks):
    """Per-task losses of a block of tasks, vmapped (batched=True)."""
    xs, ys = tasks["xs"], tasks["ys"]

    def one(x, y):
        w = meta["w"] - meta["log_s"].exp() * torch.func.grad(lambda w: _mse(w, x, y))(meta["w"])
        return _mse(w, x, y)

    return torch.func.vmap(one)(xs, ys)


def stacked_tasks(n: int) -> dict[str, torch.Tensor]:
    tasks = maml_tasks(n)
    return {"xs": torch.stack([t[0] for t in tasks]), "ys": torch.stack([t[1] for t in tasks])}


def dp_data() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logistic regression: 21 training examples (an uneven 11/10 split), 15 for validation."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, generator=g, dtype=DT)

    def draw(n):
        x = torch.randn(n, 4, generator=g, dtype=DT)
        y = ((x @ a + 0.5 * torch.randn(n, generator=g, dtype=DT)) > 0).to(DT)
        return {"x": x, "y": y}

    return draw(21), draw(15)


def dp_loss(w, h, d):
    return F.binary_cross_entropy_with_logits(d["x"] @ w, d["y"])


def dp_reg(w, h):
    return 0.5 * (h["log_l2"].exp() * w**2).sum()


def dp_log_l2() -> torch.Tensor:
    return torch.tensor([-1.0, 0.0, -2.0, 0.5], dtype=DT, requires_grad=True)


def dp_implicit(train, val, distributed: bool, hvp: str = "reverse"):
    """Implicit hypergradient of the validation loss w.r.t. per-feature log L2 weights."""
    log_l2 = dp_log_l2()
    diag = implicit.ImplicitDiagnostics()
    kw = dict(solver=lbfgs(tol=1e-12), linear_solver=cg(tol=1e-12), diagnostics=diag, hvp=hvp)
    w0 = torch.zeros(4, dtype=DT)
    if distributed:
        w = D.data_parallel_argmin(
            dp_loss,
            w0,
            {"log_l2": log_l2},
            D.shard(train),
            reduction="mean",
            regularizer=dp_reg,
            **kw,
        )
    else:
        w = implicit.argmin(
            lambda w, h, d: dp_loss(w, h, d) + dp_reg(w, h), w0, {"log_l2": log_l2}, train, **kw
        )
    (g,) = torch.autograd.grad(dp_loss(w, None, val), log_l2)
    lin = [info.iterations for _, info in diag.backward]
    return {
        "w": w.detach(),
        "hypergrad": g,
        "forward_iters": diag.forward.iterations,
        "linear_iters": lin,
        "linear_converged": [i.converged for _, i in diag.backward],
    }


def dp_derivatives(train, distributed: bool):
    """Gradient, Hessian-vector products (forward-over-reverse, reverse-over-reverse, under
    vmap) and mixed derivatives of the global loss."""
    h = {"log_l2": dp_log_l2()}
    if distributed:
        n_local = len(D.shard(train)["y"])
        loss = D.data_parallel_loss(dp_loss, n_local / len(train["y"]), dp_reg)
        data = D.shard(train)
    else:
        loss, data = (lambda w, h, d: dp_loss(w, h, d) + dp_reg(w, h)), train
    w = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=DT)
    V = torch.tensor([[1.0, 0.5, -1.0, 2.0], [0.0, 1.0, 0.3, -0.7]], dtype=DT)
    f = lambda w: loss(w, h, data)  # noqa: E731
    g = torch.func.grad(f)(w)
    fwd = torch.func.jvp(torch.func.grad(f), (w,), (V[0],))[1]
    batched = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(f), (w,), (v,))[1])(V)
    wr = w.clone().requires_grad_()
    (gr,) = torch.autograd.grad(f(wr), wr, create_graph=True)
    (rev,) = torch.autograd.grad(gr @ V[0], wr, retain_graph=True)
    (mixed,) = torch.autograd.grad(gr @ V[1], h["log_l2"])
    return {
        "value": f(w).detach(),
        "grad": g,
        "hvp_fwd": fwd,
        "hvp_vmap": batched,
        "hvp_rev": rev,
        "mixed": mixed,
    }


def dp_unroll(train, val, distributed: bool):
    """Data-parallel unrolled hypergradient: 5 reverse-mode SGD steps on the global loss."""
    log_l2 = dp_log_l2()
    if distributed:
        loss = D.data_parallel_loss(dp_loss, len(D.shard(train)["y"]) / len(train["y"]), dp_reg)
        data = D.shard(train)
    else:
        loss, data = (lambda w, h, d: dp_loss(w["w"], h, d) + dp_reg(w["w"], h)), train
    wrapped = loss if not distributed else (lambda p, h, d: loss(p["w"], h, d))
    res = bilevel.unroll(
        wrapped,
        {"w": torch.zeros(4, dtype=DT)},
        {"log_l2": log_l2, "lr": 0.5},
        bilevel.optim.sgd(),
        steps=5,
        data=data,
        mode="reverse",
    )
    (g,) = torch.autograd.grad(dp_loss(res.params["w"], None, val), log_l2)
    return {"hypergrad": g}


def compute_all(distributed: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, fn, log_s in (
        ("reverse", unroll_task_loss, -1.0),
        ("implicit", implicit_task_loss, 0.0),
    ):
        for n in (8, 7):  # 7: a global batch that does not divide evenly
            meta = meta_params(log_s)
            mg = D.meta_gradient(fn, maml_tasks(n), meta)
            out[f"task_{name}_{n}"] = {"grads": mg.grads, "loss": mg.loss, "local": mg.local_tasks}
    meta = meta_params(-1.0)
    mg = D.meta_gradient(batched_task_loss, stacked_tasks(5), meta, batched=True, set_grad=True)
    out["task_batched_5"] = {
        "grads": mg.grads,
        "loss": mg.loss,
        "set_grad": {k: v.grad for k, v in meta.items()},
    }
    x = torch.arange(14.0, dtype=DT).reshape(7, 2)
    out["gather"] = D.all_gather_cat(D.shard(x) if distributed else x)
    out["mean"] = D.all_reduce_mean({"a": torch.full((2,), float(D.rank()), dtype=DT)})
    out["bcast"] = D.broadcast(torch.full((3,), float(D.rank()), dtype=DT))
    train, val = dp_data()
    out["dp_implicit"] = dp_implicit(train, val, distributed)
    out["dp_implicit_fwd"] = dp_implicit(train, val, distributed, hvp="forward")
    out["dp_derivatives"] = dp_derivatives(train, distributed)
    out["dp_unroll"] = dp_unroll(train, val, distributed)
    return out


# --------------------------------------------------------------------------- workers


def _worker(scenario: str, outdir: str) -> None:
    if scenario == "fail_plain":
        # no fail_fast on the failing rank: a plain uncaught exception
        r, _ = D.init_from_env()
        if r == 1:
            raise ValueError("deliberate failure on rank 1")
        scenario = "fail"
    with D.fail_fast():
        r, n = D.init_from_env()
        assert n == NPROC and D.is_distributed(), (r, n)
        if scenario == "compute":
            res = compute_all(distributed=True)
            res["rank"], res["world_size"] = r, n
            torch.save(res, Path(outdir) / f"rank{r}.pt")
        elif scenario == "fail":
            # rank 1 fails before the collective; rank 0 waits in it
            if r == 1:
                raise ValueError("deliberate failure on rank 1")
            D.all_reduce_sum(torch.ones(3))
            Path(outdir, f"rank{r}.unexpected").write_text("the collective returned")
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        D.barrier()
        D.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    scenario: str, outdir: Path, timeout: float = LAUNCH_TIMEOUT, cmd: list[str] | None = None
) -> tuple[list[int | None], float, str]:
    """Start NPROC ranks of a scenario of this file (or of ``cmd``) as torchrun would;
    return their exit codes (None: killed at the timeout), the wall time until the last
    one ended, and their logs."""
    cmd = [sys.executable, __file__, scenario, str(outdir)] if cmd is None else cmd
    port = _free_port()
    procs, logs = [], []
    start = time.monotonic()
    for r in range(NPROC):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(NPROC),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            BILEVEL_DIST_TIMEOUT="30",
        )
        log = outdir / f"log{r}.txt"
        logs.append(log)
        with open(log, "wb") as fh:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=REPO,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    codes: list[int | None] = [None] * NPROC
    try:
        while time.monotonic() - start < timeout and any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            time.sleep(0.1)
        elapsed = time.monotonic() - start
    finally:
        for p, c in zip(procs, codes):
            if c is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = "\n".join(
        f"--- rank {r} (exit {c})\n{log.read_text(errors='replace')[-3000:]}"
        for r, (log, c) in enumerate(zip(logs, codes))
    )
    return codes, elapsed, text


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    codes, _, logs = launch("compute", outdir)
    assert codes == [0] * NPROC, logs
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(NPROC)]
    return ranks, compute_all(distributed=False)


def _close(a, b, tol):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.dtype == DT
            err = (x - y).abs().max().item()
            assert err < tol, (err, x, y)
        else:
            assert x == y


@pytest.mark.parametrize("engine", ["reverse", "implicit"])
@pytest.mark.parametrize("n", [8, 7])
def test_task_parallel_meta_gradient_equals_single_process(results, engine, n):
    ranks, single = results
    key = f"task_{engine}_{n}"
    assert single[key]["local"] == (0, n)
    assert [r[key]["local"] for r in ranks] == [(0, (n + 1) // 2), ((n + 1) // 2, n)]
    for r in ranks:
        assert torch.all(r[key]["grads"]["w"] != 0)
        _close(r[key]["grads"], single[key]["grads"], 1e-10)
        _close(r[key]["loss"], single[key]["loss"], 1e-10)
    # every rank ends with bitwise the same meta-gradient
    for a, b in zip(
        torch.utils._pytree.tree_leaves(ranks[0][key]["grads"]),
        torch.utils._pytree.tree_leaves(ranks[1][key]["grads"]),
    ):
        assert torch.equal(a, b)


def test_task_parallel_batched_and_set_grad(results):
    ranks, single = results
    for r in ranks:
        _close(r["task_batched_5"]["grads"], single["task_batched_5"]["grads"], 1e-10)
        _close(r["task_batched_5"]["set_grad"], single["task_batched_5"]["grads"], 1e-10)


def test_data_parallel_derivatives_of_all_orders(results):
    ranks, single = results
    ref = single["dp_derivatives"]
    assert torch.allclose(ref["hvp_fwd"], ref["hvp_rev"], atol=1e-12)
    for r in ranks:
        _close(r["dp_derivatives"], ref, 1e-12)


@pytest.mark.parametrize("key", ["dp_implicit", "dp_implicit_fwd"])
def test_data_parallel_implicit_hypergradient(results, key):
    ranks, single = results
    ref = single[key]
    assert torch.all(ref["hypergrad"].abs() > 1e-6)
    for r in ranks:
        got = r[key]
        _close(got["w"], ref["w"], 1e-8)
        _close(got["hypergrad"], ref["hypergrad"], 1e-8)
        assert all(got["linear_converged"]) and len(got["linear_iters"]) == 1
    # the same solver and linear-solver iterations on every rank
    a, b = ranks[0][key], ranks[1][key]
    assert a["forward_iters"] == b["forward_iters"] > 1
    assert a["linear_iters"] == b["linear_iters"]
    assert a["linear_iters"][0] > 1
    assert torch.equal(a["hypergrad"], b["hypergrad"])


def test_collective_helpers(results):
    ranks, single = results
    for r in ranks:
        assert torch.equal(r["gather"], single["gather"])
        assert torch.equal(r["mean"]["a"], torch.full((2,), 0.5, dtype=DT))
        assert torch.equal(r["bcast"], torch.zeros(3, dtype=DT))


def test_data_parallel_unroll_hypergradient(results):
    ranks, single = results
    for r in ranks:
        _close(r["dp_unroll"]["hypergrad"], single["dp_unroll"]["hypergrad"], 1e-10)


@pytest.mark.parametrize("scenario", ["fail", "fail_plain"])
def test_failing_rank_ends_the_others(tmp_path, scenario):
    timeout = 90.0
    codes, elapsed, logs = launch(scenario, tmp_path, timeout=timeout)
    assert all(c is not None for c in codes), f"a rank hung past {timeout}s\n{logs}"
    assert all(c != 0 for c in codes), logs
    assert elapsed < timeout
    assert "deliberate failure on rank 1" in logs
    assert not list(tmp_path.glob("*.unexpected")), logs


# --------------------------------------------------------------------------- experiments

EXP_ARGS = ["--quick", "--dtype", "float64", "--threads", "1", "--progress", "off", "--seed", "3"]


def _run_experiment_both_ways(name, tmp_path, *extra, timeout=LAUNCH_TIMEOUT):
    from experiments.__main__ import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main([name, *EXP_ARGS, *extra, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "experiments", name, *EXP_ARGS, *extra, "--out", str(two)]
    codes, _, logs = launch(name, tmp_path, timeout=timeout, cmd=cmd)
    assert codes == [0] * NPROC, logs
    # rank 0 alone writes the folder and prints the summary
    assert f"== {name} ==" in (tmp_path / "log0.txt").read_text()
    assert (tmp_path / "log1.txt").read_text().strip() == "", logs
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    return one, two, logs


def test_maml_experiment_two_ranks_match_one(tmp_path):
    one, two, logs = _run_experiment_both_ways("maml", tmp_path)
    a = torch.load(one / "meta_params.pt", weights_only=True)
    b = torch.load(two / "meta_params.pt", weights_only=True)
    assert set(a) == set(b) == {"pretrained", "maml-1", "maml-5", "fomaml-5", "imaml"}
    for method in ("pretrained", "maml-1", "maml-5", "fomaml-5"):
        for k in a[method]:
            assert a[method][k].dtype == DT
            err = (a[method][k] - b[method][k]).abs().max().item()
            assert err < 1e-10, (method, k, err)
    # iMAML solves the tasks of a process jointly with truncated L-BFGS / CG, so its
    # result depends on the grouping of tasks: only check that it ran
    assert all(torch.isfinite(v).all() for v in b["imaml"].values())
    ma = [r for r in _metrics(one) if r["phase"] != "imaml"]
    mb = [r for r in _metrics(two) if r["phase"] != "imaml"]
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        assert ra["step"] == rb["step"]
        for key in ("train_loss", "outer_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-10 * max(1.0, abs(ra[key])), (ra, rb)


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_l2_experiment_two_ranks_match_one(tmp_path):
    one, two, _ = _run_experiment_both_ways("l2", tmp_path, "--datasets", "breast_cancer")
    ma, mb = _metrics(one), _metrics(two)
    assert len(ma) == len(mb) > 0
    for ra, rb in zip(ma, mb):
        # the same inner-solver iterations; values equal to the solvers' tolerance (quick: 1e-6)
        assert ra.get("inner_iters") == rb.get("inner_iters")
        for key in ("val_loss", "l2"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-4 * max(1.0, abs(ra[key])), (ra, rb)


# --------------------------------------------------------------------------- single-process API


def test_single_process_helpers_are_identities():
    assert D.init_from_env() == (0, 1) and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    assert not D.is_distributed()
    x = {"a": torch.ones(2), "b": 3}
    assert D.all_reduce_sum(x) is x and D.all_reduce_mean(x) is x and D.broadcast(x) is x
    assert D.global_sum(x) is x and D.replicated(x) is x
    D.barrier()


def test_shard_bounds_cover_everything():
    for n in range(0, 23):
        for w in range(1, 6):
            bounds = [D.shard_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_shard_kinds_and_errors():
    assert D.shard(torch.arange(5), 1, 2).tolist() == [3, 4]
    assert D.shard(range(5), 0, 2) == range(0, 3)
    got = D.shard({"x": torch.arange(6).reshape(3, 2), "y": [1, 2, 3]}, 1, 2)
    assert got["x"].tolist() == [[4, 5]] and got["y"] == [3]
    with pytest.raises(ValueError, match="rank"):
        D.shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="same leading length"):
        D.shard({"x": torch.zeros(3), "y": torch.zeros(2)}, 0, 2)
    with pytest.raises(TypeError, match="items_or_tensor"):
        D.shard(5, 0, 1)
    with pytest.raises(ValueError, match="0-d"):
        D.shard(torch.tensor(1.0), 0, 1)


def test_meta_gradient_errors():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        D.meta_gradient(lambda p, t: p.sum(), [1], torch.zeros(2))
    with pytest.raises(ValueError, match="scalar"):
        D.meta_gradient(lambda p, t: p, [1], w)
    with pytest.raises(ValueError, match="empty"):
        D.meta_gradient(lambda p, t: p.sum(), [], w)
    with pytest.raises(ValueError, match="per-task"):
        D.meta_gradient(lambda p, t: p.sum(), torch.zeros(3, 2), w, batched=True)
    with pytest.raises(TypeError, match="batched=True"):
        D.meta_gradient(lambda p, t: p.sum(), {"a": torch.zeros(3)}, w)


def test_init_from_env_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        D.init_from_env(backend="gloo")
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env(backend="tcp")
    with pytest.raises(ValueError, match="timeout"):
        D.init_from_env(timeout=-1)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_usage_error_under_torchrun_is_one_line_from_rank_0_and_exit_2(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a run is there: refused without --overwrite
    cmd = [sys.executable, "-m", "experiments", "l2", *EXP_ARGS, "--out", str(out)]
    codes, _, logs = launch("usage", tmp_path, cmd=cmd)
    assert codes == [2] * NPROC, logs
    rank0 = [line for line in (tmp_path / "log0.txt").read_text().splitlines() if line.strip()]
    assert len(rank0) == 1 and "already holds a run" in rank0[0], logs
    assert "Traceback" not in logs
    assert (tmp_path / "log1.txt").read_text().strip() == "", logs
