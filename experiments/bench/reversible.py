"""Memory and time of ``mode="reversible"`` against ``reverse`` and ``checkpoint``.

``python -m experiments.bench.reversible [--steps 100,1000] [--dtype float32] [--repeats 3]
[--no-rss]``: the digits MLP 64-50-10 (tanh), batch 200, SGD with momentum 0.9 and a
per-step learning-rate schedule (the hyperparameter, T elements), outer loss the
validation cross-entropy. For each mode and T it prints the median time of one
hypergradient (forward and backward, the modes interleaved; wall-clock and this process's
CPU time, the steadier figure on a shared machine), the peak bytes saved for
backward (unique storages, through saved-tensor hooks), for reversible the bit buffer's
bytes and bits per weight per step, the peak RSS of a fresh process running one
hypergradient (and its increase over the setup), and the relative difference of the
hypergradient from reverse mode's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel

from . import core
from .children import run_child

MODES = ("reverse", "checkpoint", "reversible")
BATCH = 200
TRAIN = 1400


def problem(dtype: torch.dtype, steps: int) -> dict[str, Any]:
    """The data, initial weights and batches (fixed seeds)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xs, ys = torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(64, 50, generator=g, dtype=dtype) * 0.1,
        "b1": torch.zeros(50, dtype=dtype),
        "w2": torch.randn(50, 10, generator=g, dtype=dtype) * 0.1,
        "b2": torch.zeros(10, dtype=dtype),
    }
    index = [torch.randint(0, TRAIN, (BATCH,), generator=g) for _ in range(steps)]
    return {
        "params": params,
        "batches": [(xs[i], ys[i]) for i in index],
        "val": (xs[TRAIN:], ys[TRAIN:]),
        "steps": steps,
        "dtype": dtype,
    }


def _mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _inner(p: dict[str, Tensor], h: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(_mlp(p, batch[0]), batch[1])


def hypergradient(setup: dict[str, Any], mode: str, info: dict[str, Any]) -> Callable[[], Tensor]:
    """One hypergradient d(validation loss) / d(lr schedule) from scratch."""
    steps = setup["steps"]

    def run() -> Tensor:
        lr = torch.full((steps,), 0.1, dtype=setup["dtype"], requires_grad=True)
        r = bilevel.unroll(
            _inner,
            setup["params"],
            {"lr": lr},
            bilevel.optim.sgd(momentum=0.9),
            steps,
            setup["batches"],
            mode=mode,
        )
        if r.reversible is not None:
            info["report"] = r.reversible
        x, y = setup["val"]
        (g,) = torch.autograd.grad(F.cross_entropy(_mlp(r.params, x), y), [lr])
        return g

    return run


def child_fn(spec: dict[str, Any]) -> Callable[[], Any]:
    """In a fresh process (``python -m experiments bench --_child``): one mode and T."""
    setup = problem(getattr(torch, spec["dtype"]), int(spec["steps"]))
    return hypergradient(setup, spec["mode"], {})


def measure(steps: int, dtype: torch.dtype, repeats: int, rss: bool) -> list[dict[str, Any]]:
    setup = problem(dtype, steps)
    infos: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    fns = {m: hypergradient(setup, m, infos[m]) for m in MODES}
    grads = {m: fns[m]() for m in MODES}  # also a warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats):
        for m in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:  # rotate the order
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[m]()
            times[m].append(time.perf_counter() - start)
            cpu[m].append(time.process_time() - start_cpu)
    rows = []
    for m in MODES:
        row: dict[str, Any] = {
            "T": steps,
            "mode": m,
            "median_s": statistics.median(times[m]),
            "median_cpu_s": statistics.median(cpu[m]),
            "saved_bytes": core.saved_bytes(fns[m]),
            "rel_err": float((grads[m] - grads["reverse"]).norm() / grads["reverse"].norm()),
        }
        report = infos[m].get("report")
        if report is not None:
            row["buffer_bytes"] = report.buffer_bytes
            row["bits"] = report.bits_per_weight_step
            row["expected_bits"] = report.expected_bits_per_weight_step
        if rss:
            threads = torch.get_num_threads()
            spec = {"kind": "reversible", "mode": m, "steps": steps, "dtype": str(dtype)[6:]}
            row.update(run_child({**spec, "threads": threads}, threads))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.reversible")
    parser.add_argument("--steps", default="100,1000", help="inner steps T (default 100,1000)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh processes")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    table = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for row in measure(steps, dtype, args.repeats, not args.no_rss):
            bits = (
                f"{row['bits']:.4f} (log2(1/0.9) = {row['expected_bits']:.4f})"
                if "bits" in row
                else "-"
            )
            table.append(
                {
                    "T": str(row["T"]),
                    "mode": row["mode"],
                    "time": core.fmt_time(row["median_s"]),
                    "CPU time": core.fmt_time(row["median_cpu_s"]),
                    "saved (autograd)": core.fmt_bytes(row["saved_bytes"]),
                    "buffer": core.fmt_bytes(row.get("buffer_bytes")),
                    "bits/weight/step": bits,
                    "peak RSS": core.fmt_bytes(row.get("peak_rss_bytes")),
                    "RSS over setup": core.fmt_bytes(row.get("rss_increase_bytes")),
                    "rel.err vs reverse": core.fmt_err(row["rel_err"]),
                }
            )
    print(
        core.format_table(
            table,
            list(table[0]),
            f"== reversible vs reverse and checkpoint: digits MLP 64-50-10, batch {BATCH}, "
            f"SGD momentum 0.9, lr schedule, {args.dtype}, {torch.get_num_threads()} thread(s) ==",
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
