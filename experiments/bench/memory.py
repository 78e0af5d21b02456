"""Bench problem ``memory``: bilevel's modes on the ``unroll`` problem (SGD, momentum 0.9):
time, bytes saved for backward, peak RSS of a fresh process (CPU), allocator peak (GPU)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import core
from .children import run_child
from .report import Report, dtype_name, log, rtol_for, standard_cells
from .settings import Settings
from .unroll import MEMORY_MODES, bilevel_impl, digits_data, make_setup, memory_impls, mode_kwargs


def run_memory(s: Settings, report: Report) -> None:
    dtype = s.dtypes_for(["float32"])[0]
    data = digits_data(dtype, s.device, s.seed)
    steps_list = sorted(s.memory_steps)
    t_min, t_max = steps_list[0], steps_list[-1]
    rss_jobs: set[tuple[str, int]] = set()
    if s.rss and s.device.type == "cpu":
        if s.quick:
            rss_jobs = {("forward", t_max)}
        else:
            rss_jobs = {(m, t) for m in MEMORY_MODES for t in steps_list}
    data_file = None
    if rss_jobs:
        fd, name = tempfile.mkstemp(prefix="bilevel-bench-", suffix=".pt")
        os.close(fd)
        data_file = Path(name)
        torch.save({k: v for k, v in data.items()}, data_file)
    by: dict[tuple[str, int], dict[str, Any]] = {}
    table = []
    try:
        for steps in steps_list:
            log(s, f"[memory] {dtype_name(dtype)} T={steps}")
            setup = make_setup(data, "sgd", steps)
            impls = memory_impls(setup)
            results = s.measure(impls, "bilevel reverse", rtol_for(dtype))
            extra: dict[str, dict[str, Any]] = {}
            for impl in impls:
                mode = impl.name.split()[-1]
                info: dict[str, Any] = {"mode": mode}
                if results[impl.name].failed is None:
                    info["saved_bytes"] = core.saved_bytes(impl.fn)
                    if s.device.type == "cuda":
                        info["cuda_peak_bytes"] = core.cuda_peak(impl.fn, s.device)
                if (mode, steps) in rss_jobs and data_file is not None:
                    info.update(memory_child(s, mode, steps, dtype, data_file))
                extra[impl.name] = info
            config = {"dtype": dtype_name(dtype), "T": steps, "opt": "sgd"}
            for row in report.add_rows("memory", config, results, "bilevel reverse", None, extra):
                by[(row["mode"], steps)] = row
                cells = standard_cells(row)
                table.append(
                    {
                        "T": str(steps),
                        "mode": row["mode"],
                        "median": cells["median"],
                        "IQR": cells["IQR"],
                        "n": cells["n"],
                        "saved (autograd)": core.fmt_bytes(row.get("saved_bytes")),
                        "peak RSS": core.fmt_bytes(row.get("peak_rss_bytes")),
                        "RSS over setup": core.fmt_bytes(row.get("rss_increase_bytes")),
                        **(
                            {"GPU peak": core.fmt_bytes(row.get("cuda_peak_bytes"))}
                            if s.device.type == "cuda"
                            else {}
                        ),
                        "rel.err": cells["rel.err"],
                        "agree": cells["agree"],
                        "time/reverse": core.fmt_ratio(1 / row["ratio"])
                        if row.get("ratio")
                        else "-",
                        "note": cells["note"],
                    }
                )
    finally:
        if data_file is not None:
            data_file.unlink(missing_ok=True)
    if t_max >= 1000:  # the targets are stated at T = 1000 (against T = 10)
        _memory_targets(report, by, t_min, t_max, s.device.type == "cuda")
    cols = ["T", "mode", "median", "IQR", "n", "saved (autograd)", "peak RSS", "RSS over setup"]
    if s.device.type == "cuda":
        cols.append("GPU peak")
    cols += ["time/reverse", "rel.err", "agree", "note"]
    report.tables.append(
        core.format_table(
            table,
            cols,
            "== memory: bilevel's modes, SGD momentum 0.9, the unroll problem (saved = peak bytes autograd "
            "holds for backward, unique storages; peak RSS = fresh process; rel.err vs reverse) ==",
        )
    )


def _memory_targets(
    report: Report, by: dict[tuple[str, int], dict[str, Any]], t_min: int, t_max: int, cuda: bool
) -> None:
    rev, ck, fw = (
        by.get(("reverse", t_max)),
        by.get(("checkpoint", t_max)),
        by.get(("forward", t_max)),
    )
    fw0 = by.get(("forward", t_min))

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if a is not None and b else None

    def target(what: str, r: float | None, label: str, ok: Callable[[float], bool]) -> None:
        report.target("memory", what, r, label, None if r is None else ok(r))

    if rev and ck:
        r = ratio(ck.get("saved_bytes"), rev.get("saved_bytes"))
        target(f"T={t_max}: checkpoint saved bytes / reverse", r, "<= 0.15", lambda r: r <= 0.15)
        r = ratio(ck.get("median_s"), rev.get("median_s"))
        target(f"T={t_max}: checkpoint time / reverse", r, "<= 2.2", lambda r: r <= 2.2)
    if fw and fw0 and t_max != t_min:
        keys = [("saved_bytes", "saved bytes"), ("peak_rss_bytes", "peak RSS")]
        if cuda:
            keys.append(("cuda_peak_bytes", "GPU peak"))
        for key, label in keys:
            r = ratio(fw.get(key), fw0.get(key))
            target(
                f"forward {label} T={t_max} / T={t_min}", r, "0.8 .. 1.2", lambda r: 0.8 <= r <= 1.2
            )
    if rev and fw:
        r = ratio(fw.get("median_s"), rev.get("median_s"))
        target(f"T={t_max}: forward time / reverse", r, "<= 2.5", lambda r: r <= 2.5)


def memory_child(
    s: Settings, mode: str, steps: int, dtype: torch.dtype, data_file: Path
) -> dict[str, Any]:
    log(s, f"[memory]   fresh process: {mode} T={steps}")
    return run_child(
        {
            "kind": "memory",
            "mode": mode,
            "steps": steps,
            "dtype": dtype_name(dtype),
            "threads": s.threads,
            "data": str(data_file),
        },
        s.threads,
    )


def child_fn(spec: dict[str, Any]) -> Callable[[], Any]:
    """In the fresh process: the hypergradient of one mode and T (data from the parent)."""
    data = torch.load(spec["data"], weights_only=True)
    setup = make_setup(data, "sgd", int(spec["steps"]))
    return bilevel_impl(setup, spec["mode"], **mode_kwargs(spec["mode"], setup.steps))
