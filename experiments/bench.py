"""``python -m experiments bench [unroll|memory|implicit|maml|all]``: bilevel against the peers.

Answers "is bilevel as fast as what I use now, and how much memory does each mode need?"
with tables measured on this machine, bilevel and the peer libraries (higher, TorchOpt) on
identical problems in one run:

``unroll``    learning-rate hypergradient through T steps of SGD (momentum 0.9) and Adam, an
              MLP 64-128-10 on digits: bilevel ``reverse`` against a hand-written PyTorch loop
              (the compute floor), higher, TorchOpt (functional API and MetaSGD/MetaAdam).
``memory``    bilevel's ``reverse``, ``checkpoint``, ``forward`` and ``truncated`` modes: time,
              bytes saved for backward, peak RSS of a fresh process (CPU), allocator peak (GPU).
``implicit``  L2-regularised logistic regression (one weight, one per feature), breast cancer
              and a sparse synthetic design up to p = 1e6: bilevel's linear solvers, TorchOpt's
              implicit differentiation, the course tutorial's dense Hessian, finite
              differences; error against the exact hypergradient.
``maml``      one sinusoid MAML meta-gradient: bilevel batched with ``vmap`` against per-task
              loops (higher, TorchOpt, plain PyTorch).

Every hypergradient is checked against a reference before any timing is reported; a
disagreement is printed in the table and makes the command exit with status 1. Timings are
medians of ``--repeats`` interleaved repeats after a warm-up; ratios are bilevel's time over
each implementation's, from the same run; threads are pinned with ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments import bench_core as core

DESCRIPTION = "speed and memory of bilevel's hypergradients against higher and TorchOpt"
PROBLEMS = ("unroll", "memory", "implicit", "maml")
PROG = "python -m experiments bench"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    problems: list[str]
    device: torch.device
    dtypes: list[torch.dtype] | None
    repeats: int
    warmup: int
    threads: int
    quick: bool
    seed: int
    steps: list[int]
    memory_steps: list[int]
    features: list[int]
    dense_max_bytes: float
    rss: bool
    verbose: bool
    json_path: Path | None = None

    def dtypes_for(self, default: Sequence[str]) -> list[torch.dtype]:
        return self.dtypes or [getattr(torch, d) for d in default]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype_list(text: str) -> list[torch.dtype]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ("float32", "float64")]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected float32, float64 or both (comma-separated), got {text!r}"
        )
    return [getattr(torch, n) for n in names]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(__doc__ or DESCRIPTION).split("\n", 1)[-1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Full run (defaults): unroll at T = 10, 50, 200 in float32 and float64; memory at "
            "T = 10, 100, 1000; implicit on breast cancer and p = 1e3 .. 1e6; maml with a "
            "meta-batch of 32. --quick: small sizes, 1 repeat, no warm-up (a correctness run "
            "for CI, well under a minute)."
        ),
    )
    parser.add_argument(
        "problems",
        nargs="*",
        default=["all"],
        metavar="PROBLEM",
        help="unroll, memory, implicit, maml or all (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat, no warm-up")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda", "auto"],
        help="cpu, cuda or auto (default: cpu)",
    )
    parser.add_argument(
        "--dtype",
        type=_dtype_list,
        default=None,
        metavar="DTYPES",
        help="float32, float64 or float32,float64 for unroll, memory and maml "
        "(default: unroll both, memory and maml float32; implicit always float64)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        metavar="N",
        help="timed repeats per implementation, median reported (default: 5; --quick: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=_nonneg,
        default=None,
        metavar="N",
        help="untimed warm-up calls after the check run (default: 1; --quick: 0)",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=1,
        metavar="N",
        help="torch.set_num_threads(N) for every measurement (default: 1)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        dest="json_path",
        help="write every row, target and the environment to PATH",
    )
    parser.add_argument(
        "--steps",
        type=_int_list,
        default=None,
        metavar="T,...",
        help="unroll: inner steps (default: 10,50,200; --quick: 5)",
    )
    parser.add_argument(
        "--memory-steps",
        type=_int_list,
        default=None,
        metavar="T,...",
        help="memory: inner steps (default: 10,100,1000; --quick: 5,20)",
    )
    parser.add_argument(
        "--features",
        type=_int_list,
        default=None,
        metavar="P,...",
        help="implicit: synthetic feature counts (default: 1e3,1e4,1e5,1e6; --quick: 300)",
    )
    parser.add_argument(
        "--dense-max-gb",
        type=_positive_float,
        default=2.0,
        metavar="GB",
        help="skip the dense-Hessian methods when they would need more (default: 2)",
    )
    parser.add_argument(
        "--no-rss", action="store_true", help="skip the fresh-process peak-RSS measurements (CPU)"
    )
    parser.add_argument(
        "--seed", type=_nonneg, default=0, help="data and initialization seed (default: 0)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print tracebacks of failing implementations"
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    problems: list[str] = []
    for name in args.problems:
        if name == "all":
            problems.extend(p for p in PROBLEMS if p not in problems)
        elif name in PROBLEMS:
            if name not in problems:
                problems.append(name)
        else:
            raise UsageError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)} or all")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(
                "--device cuda: CUDA is not available on this machine (try --device cpu)"
            )
    quick = args.quick
    return Settings(
        problems=problems,
        device=device,
        dtypes=args.dtype,
        repeats=args.repeats if args.repeats is not None else (1 if quick else 5),
        warmup=args.warmup if args.warmup is not None else (0 if quick else 1),
        threads=args.threads,
        quick=quick,
        seed=args.seed,
        steps=args.steps or ([5] if quick else [10, 50, 200]),
        memory_steps=args.memory_steps or ([5, 20] if quick else [10, 100, 1000]),
        features=args.features or ([300] if quick else [1000, 10_000, 100_000, 1_000_000]),
        dense_max_bytes=args.dense_max_gb * 2**30,
        rss=not args.no_rss,
        verbose=args.verbose,
        json_path=args.json_path,
    )


class UsageError(Exception):
    """A bad option value: one line on stderr, exit status 2."""


# --------------------------------------------------------------------------- report


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def rtol_for(dtype: torch.dtype) -> float:
    """Agreement tolerance: rounding differences of reordered float32 kernels grow through
    hundreds of steps; float64 leaves no room for a real difference."""
    return 1e-4 if dtype == torch.float32 else 1e-9


@dataclass
class Report:
    settings: Settings
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def add_rows(
        self,
        problem: str,
        config: dict[str, Any],
        results: dict[str, core.Result],
        subject: str,
        targets: dict[str, tuple[float, str]] | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
        label: str | None = None,
    ) -> list[dict[str, Any]]:
        """One row per implementation; ``targets[name] = (max ratio, label)`` where the ratio
        is the subject's time over that implementation's; ``extra[name]`` adds fields."""
        subj = results.get(subject)
        subj_t = subj.median if subj is not None else None
        added = []
        for name, res in results.items():
            ratio = None
            if name != subject and subj_t is not None and res.median:
                ratio = subj_t / res.median
            target = (targets or {}).get(name)
            met = None
            if target is not None and ratio is not None:
                met = ratio <= target[0]
            row = {
                "problem": problem,
                **config,
                "implementation": name,
                "median_s": res.median,
                "spread": res.spread,
                "repeats": len(res.times),
                "times_s": res.times,
                "rel_error": _num(res.rel_error),
                "agree": res.agree,
                "failed": res.failed,
                "ratio": ratio,
                "target": target[1] if target else None,
                "target_max_ratio": target[0] if target else None,
                "met": met,
                "note": res.note,
                "reference": res.reference,
                "checked": res.checked,
                **((extra or {}).get(name, {})),
            }
            self.rows.append(row)
            added.append(row)
            if target is not None:
                what = f"{label or config_label(config)}: {subject} / {name}"
                self.target(problem, what, ratio, target[1], met)
        return added

    def target(
        self, problem: str, what: str, value: float | None, target: str, met: bool | None
    ) -> None:
        self.targets.append(
            {"problem": problem, "what": what, "value": _num(value), "target": target, "met": met}
        )

    @property
    def disagreements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("agree") is False]

    @property
    def bilevel_failures(self) -> list[dict[str, Any]]:
        return [
            r for r in self.rows if r["implementation"].startswith("bilevel") and r.get("failed")
        ]


def config_label(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _agree_cell(row: dict[str, Any]) -> str:
    if row.get("failed"):
        return "FAILED"
    if row.get("reference"):
        return "ref"
    if row.get("agree") is None:
        return "n/a" if not row.get("checked", True) else "-"
    return "yes" if row["agree"] else "NO (DISAGREES)"


def _met_cell(row: dict[str, Any]) -> str:
    if row.get("met") is None:
        return ""
    return "ok" if row["met"] else "MISS"


def _target_cell(row: dict[str, Any]) -> str:
    return f"<={row['target_max_ratio']:.3g}" if row.get("target_max_ratio") is not None else ""


def _time_cells(row: dict[str, Any]) -> dict[str, str]:
    spread = row.get("spread")
    return {
        "median": core.fmt_time(row.get("median_s")) if not row.get("failed") else "-",
        "IQR": f"{100 * spread:.0f}%" if spread is not None else "-",
        "n": str(row.get("repeats", "")),
    }


def _standard_cells(row: dict[str, Any]) -> dict[str, str]:
    return {
        "implementation": row["implementation"],
        **_time_cells(row),
        "rel.err": core.fmt_err(row.get("rel_error")),
        "agree": _agree_cell(row),
        "bilevel/impl": core.fmt_ratio(row.get("ratio")),
        "target": _target_cell(row),
        "met": _met_cell(row),
        "note": (row.get("failed") or row.get("note") or "")[:90],
    }


def _log(settings: Settings, message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- problems


def run_unroll(s: Settings, report: Report) -> None:
    from experiments import bench_unroll as U

    unroll_targets = {50, 200}
    table = []
    for dtype in s.dtypes_for(["float32", "float64"]):
        data = U.digits_data(dtype, s.device, s.seed)
        for opt in ("sgd", "adam"):
            for steps in s.steps:
                _log(s, f"[unroll] {opt} {_dt(dtype)} T={steps}")
                setup = U.make_setup(data, opt, steps)
                results = core.measure(
                    U.unroll_impls(setup),
                    reference=U.FLOOR,
                    rtol=rtol_for(dtype),
                    repeats=s.repeats,
                    warmup=s.warmup,
                    device=s.device,
                    verbose=s.verbose,
                )
                targets = None
                if steps in unroll_targets:
                    targets = {U.FLOOR: (1.10, "bilevel <= 1.10x plain")}
                    for name in results:
                        if name.startswith(("higher", "torchopt")):
                            targets[name] = (1.0, f"bilevel <= 1.0x {name}")
                config = {"opt": opt, "dtype": _dt(dtype), "T": steps}
                for row in report.add_rows("unroll", config, results, U.SUBJECT, targets):
                    table.append(
                        {"opt": opt, "dtype": _dt(dtype), "T": str(steps), **_standard_cells(row)}
                    )
    cols = [
        "opt",
        "dtype",
        "T",
        "implementation",
        "median",
        "IQR",
        "n",
        "rel.err",
        "agree",
        "bilevel/impl",
        "target",
        "met",
        "note",
    ]
    report.tables.append(
        core.format_table(
            table,
            cols,
            "== unroll: learning-rate hypergradient, MLP 64-128-10 on digits, batches of 256 "
            "(rel.err vs plain PyTorch; bilevel/impl = time ratio, < 1 means bilevel is faster) ==",
        )
    )


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_memory(s: Settings, report: Report) -> None:
    from experiments import bench_unroll as U

    dtype = s.dtypes_for(["float32"])[0]
    data = U.digits_data(dtype, s.device, s.seed)
    steps_list = sorted(s.memory_steps)
    t_min, t_max = steps_list[0], steps_list[-1]
    rss_jobs: set[tuple[str, int]] = set()
    if s.rss and s.device.type == "cpu":
        if s.quick:
            rss_jobs = {("forward", t_max)}
        else:
            rss_jobs = {(m, t) for m in U.MEMORY_MODES for t in steps_list}
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
            _log(s, f"[memory] {_dt(dtype)} T={steps}")
            setup = U.make_setup(data, "sgd", steps)
            impls = U.memory_impls(setup)
            results = core.measure(
                impls,
                reference="bilevel reverse",
                rtol=rtol_for(dtype),
                repeats=s.repeats,
                warmup=s.warmup,
                device=s.device,
                verbose=s.verbose,
            )
            extra: dict[str, dict[str, Any]] = {}
            for impl in impls:
                mode = impl.name.split()[-1]
                info: dict[str, Any] = {"mode": mode}
                if results[impl.name].failed is None:
                    info["saved_bytes"] = core.saved_bytes(impl.fn)
                    if s.device.type == "cuda":
                        info["cuda_peak_bytes"] = core.cuda_peak(impl.fn, s.device)
                if (mode, steps) in rss_jobs and data_file is not None:
                    info.update(_memory_child(s, mode, steps, dtype, data_file))
                extra[impl.name] = info
            config = {"dtype": _dt(dtype), "T": steps, "opt": "sgd"}
            for row in report.add_rows("memory", config, results, "bilevel reverse", None, extra):
                by[(row["mode"], steps)] = row
                cells = _standard_cells(row)
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

    if rev and ck:
        r = ratio(ck.get("saved_bytes"), rev.get("saved_bytes"))
        report.target(
            "memory",
            f"T={t_max}: checkpoint saved bytes / reverse",
            r,
            "<= 0.15",
            None if r is None else r <= 0.15,
        )
        r = ratio(ck.get("median_s"), rev.get("median_s"))
        report.target(
            "memory",
            f"T={t_max}: checkpoint time / reverse",
            r,
            "<= 2.2",
            None if r is None else r <= 2.2,
        )
    if fw and fw0 and t_max != t_min:
        keys = [("saved_bytes", "saved bytes"), ("peak_rss_bytes", "peak RSS")]
        if cuda:
            keys.append(("cuda_peak_bytes", "GPU peak"))
        for key, label in keys:
            r = ratio(fw.get(key), fw0.get(key))
            report.target(
                "memory",
                f"forward {label} T={t_max} / T={t_min}",
                r,
                "0.8 .. 1.2",
                None if r is None else 0.8 <= r <= 1.2,
            )
    if rev and fw:
        r = ratio(fw.get("median_s"), rev.get("median_s"))
        report.target(
            "memory",
            f"T={t_max}: forward time / reverse",
            r,
            "<= 2.5",
            None if r is None else r <= 2.5,
        )


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run ``python -m experiments.bench --_child SPEC`` and parse its last stdout line."""
    cmd = [sys.executable, "-m", "experiments.bench", "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_child_env(threads), timeout=1800
        )
    except subprocess.TimeoutExpired:
        return {"rss_error": "timed out"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"rss_error": f"exit {proc.returncode}: {tail[:120]}"}
    return dict(json.loads(lines[-1]))


def _memory_child(
    s: Settings, mode: str, steps: int, dtype: torch.dtype, data_file: Path
) -> dict[str, Any]:
    _log(s, f"[memory]   fresh process: {mode} T={steps}")
    return _run_child(
        {
            "kind": "memory",
            "mode": mode,
            "steps": steps,
            "dtype": _dt(dtype),
            "threads": s.threads,
            "data": str(data_file),
        },
        s.threads,
    )


def run_implicit(s: Settings, report: Report) -> None:
    from experiments import bench_implicit as I

    configs: list[tuple[str, Any, float]] = [
        ("breast-cancer", lambda: I.breast_cancer(s.seed), I.LAMBDA["breast-cancer"])
    ]
    for p in s.features:
        configs.append(
            (f"synthetic p={p:g}", lambda p=p: I.synthetic(p, s.seed), I.LAMBDA["synthetic"])
        )
    table = []
    p_max = max(s.features) if s.features else 0
    for name, make_data, lam in configs:
        data = make_data()
        exact = I.Exact(*data)
        p = data[0][0].p
        for per_feature in (False, True):
            hname = "per feature" if per_feature else "one weight"
            _log(s, f"[implicit] {name} {hname}")
            problem = I.make_problem(name, data, per_feature, lam, s.device)
            impls, notes = I.implicit_impls(
                problem, dense_max_bytes=s.dense_max_bytes, fd=True, exact=exact
            )
            results = core.measure(
                impls,
                reference=problem.exact,
                rtol=1e-9,
                repeats=s.repeats,
                warmup=s.warmup,
                device=s.device,
                verbose=s.verbose,
            )
            targets: dict[str, tuple[float, str]] = {}
            if p >= 10_000 and "torchopt cg" in results:
                targets["torchopt cg"] = (0.8, "bilevel cg <= 0.8x torchopt cg (p >= 1e4)")
            if p == 10_000 and "tutorial dense" in results:
                targets["tutorial dense"] = (
                    1 / 40,
                    "bilevel cg >= 40x faster than dense (p = 1e4)",
                )
            extra: dict[str, dict[str, Any]] = {}
            if p == p_max and p >= 100_000:
                extra[I.SUBJECT] = _implicit_memory(s, problem, p, per_feature)
            config = {"data": name, "p": p, "h": hname}
            rows = report.add_rows(
                "implicit", config, results, I.SUBJECT, targets, extra, label=f"{name} {hname}"
            )
            for note in notes:
                report.notes.append(f"implicit {name} {hname}: {note}")
            sub = next(r for r in rows if r["implementation"] == I.SUBJECT)
            err = sub.get("rel_error")
            report.target(
                "implicit",
                f"{name} {hname}: bilevel cg rel. error",
                err,
                "<= 1e-9",
                None if err is None else err <= 1e-9,
            )
            if p == 10_000 and "tutorial dense" not in results:
                report.target(
                    "implicit",
                    f"{name} {hname}: bilevel cg >= 40x faster than dense",
                    None,
                    "dense skipped (--dense-max-gb)",
                    None,
                )
            for key in ("peak_rss_bytes", "cuda_peak_bytes"):
                if sub.get(key) is not None:
                    report.target(
                        "implicit",
                        f"{name} {hname}: bilevel cg {key.replace('_bytes', '')}",
                        sub[key] / 2**30,
                        "< 4 GiB",
                        sub[key] < 4 * 2**30,
                    )
            for row in rows:
                table.append(
                    {
                        "data": name,
                        "h": hname,
                        **_standard_cells(row),
                        "peak RSS": core.fmt_bytes(
                            row.get("peak_rss_bytes") or row.get("cuda_peak_bytes")
                        ),
                    }
                )
    cols = [
        "data",
        "h",
        "implementation",
        "median",
        "IQR",
        "n",
        "rel.err",
        "agree",
        "bilevel/impl",
        "target",
        "met",
        "peak RSS",
        "note",
    ]
    report.tables.append(
        core.format_table(
            table,
            cols,
            "== implicit: L2-regularised logistic regression, hypergradient w.r.t. log L2 weights given w* "
            "(rel.err vs the exact closed-form Hessian solve; linear solves at tol 1e-12) ==",
        )
    )


def _implicit_memory(s: Settings, problem: Any, p: int, per_feature: bool) -> dict[str, Any]:
    if s.device.type == "cuda":
        from bilevel import linalg
        from experiments import bench_implicit as I

        fn = I.bilevel_impl(problem, linalg.cg(tol=I.TOL))
        return {"cuda_peak_bytes": core.cuda_peak(fn, s.device)}
    if not s.rss:
        return {}
    _log(s, f"[implicit]   fresh process: bilevel cg p={p:g}")
    return _run_child(
        {
            "kind": "implicit",
            "p": p,
            "per_feature": per_feature,
            "seed": s.seed,
            "threads": s.threads,
        },
        s.threads,
    )


def run_maml(s: Settings, report: Report) -> None:
    from experiments import bench_maml as M

    batch = 4 if s.quick else 32
    table = []
    for dtype in s.dtypes_for(["float32"]):
        _log(s, f"[maml] {_dt(dtype)} meta-batch {batch}")
        tasks = M.make_tasks(batch, 10, 5, dtype, s.device, s.seed)
        results = core.measure(
            M.maml_impls(tasks),
            reference=M.REFERENCE,
            rtol=rtol_for(dtype),
            repeats=s.repeats,
            warmup=s.warmup,
            device=s.device,
            verbose=s.verbose,
        )
        targets = None
        if batch == 32:  # the target is stated for a meta-batch of 32
            targets = {"higher loop": (1 / 8, "bilevel vmap >= 8x faster than higher loop")}
        config = {"dtype": _dt(dtype), "meta_batch": batch, "K": 10, "inner_steps": 5}
        for row in report.add_rows("maml", config, results, M.SUBJECT, targets):
            table.append({"dtype": _dt(dtype), **_standard_cells(row)})
    cols = [
        "dtype",
        "implementation",
        "median",
        "IQR",
        "n",
        "rel.err",
        "agree",
        "bilevel/impl",
        "target",
        "met",
        "note",
    ]
    report.tables.append(
        core.format_table(
            table,
            cols,
            f"== maml: one meta-gradient, sinusoid, MLP 1-40-40-1, K=10, 5 inner SGD steps, meta-batch "
            f"{batch} (rel.err vs the plain per-task loop) ==",
        )
    )


# --------------------------------------------------------------------------- children


def child_main(spec: dict[str, Any]) -> int:
    """A fresh process measuring one configuration's peak RSS; prints one JSON line."""
    torch.set_num_threads(int(spec.get("threads", 1)))
    if spec["kind"] == "memory":
        from experiments import bench_unroll as U

        data = torch.load(spec["data"])
        setup = U.make_setup(data, "sgd", int(spec["steps"]))
        fn = U.bilevel_impl(setup, spec["mode"], **U.mode_kwargs(spec["mode"], setup.steps))
    elif spec["kind"] == "implicit":
        from bilevel import linalg
        from experiments import bench_implicit as I

        data = I.synthetic(int(spec["p"]), int(spec["seed"]))
        problem = I.make_problem(
            "child", data, bool(spec["per_feature"]), I.LAMBDA["synthetic"], torch.device("cpu")
        )
        del data
        fn = I.bilevel_impl(problem, linalg.cg(tol=I.TOL))
    else:
        raise ValueError(f"unknown child kind {spec['kind']!r}")
    import gc

    gc.collect()
    before = core.peak_rss_bytes()
    fn()
    after = core.peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": after, "rss_increase_bytes": after - before}))
    return 0


# --------------------------------------------------------------------------- main


def environment(s: Settings) -> dict[str, Any]:
    import bilevel

    peers = [core.peer(n) for n in ("higher", "torchopt")]
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bilevel": getattr(bilevel, "__version__", "?"),
        "device": str(s.device),
        "device_name": core.machine(s.device),
        "threads": torch.get_num_threads(),
        "peers": {
            p.name: {"available": p.available, "version": p.version, "note": p.note} for p in peers
        },
        "peers_text": [p.describe() for p in peers],
        "repeats": s.repeats,
        "warmup": s.warmup,
        "quick": s.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def header(env: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"bilevel bench: torch {env['torch']}, Python {env['python']}, bilevel {env['bilevel']}",
            f"device: {env['device']} ({env['device_name']}); threads: {env['threads']} (torch.set_num_threads)",
            "peers: " + "; ".join(env["peers_text"]),
            f"method: check run, {env['warmup']} warm-up, median of {env['repeats']} repeats, implementations "
            "interleaved (rotating start); ratios = bilevel time / implementation time from the same run",
        ]
    )


def targets_table(report: Report) -> str:
    rows = [
        {
            "problem": t["problem"],
            "what": t["what"],
            "value": "-" if t["value"] is None else f"{t['value']:.3g}",
            "target": t["target"],
            "met": "" if t["met"] is None else ("ok" if t["met"] else "MISS"),
        }
        for t in report.targets
    ]
    return core.format_table(rows, ["problem", "what", "value", "target", "met"], "== targets ==")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m experiments bench``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args._child is not None:
        return child_main(json.loads(args._child))
    try:
        s = settings_from(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _main(s)
    finally:
        torch.set_num_threads(previous)


def _main(s: Settings) -> int:
    import warnings

    env = environment(s)
    print(header(env), flush=True)
    report = Report(s)
    runners = {
        "unroll": run_unroll,
        "memory": run_memory,
        "implicit": run_implicit,
        "maml": run_maml,
    }
    started = time.perf_counter()
    with warnings.catch_warnings():
        # the peers' deprecation chatter (functorch.vjp, higher) is not the user's business here
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        for name in s.problems:
            runners[name](s, report)
            print("\n" + report.tables[-1], flush=True)
    if report.targets:
        print("\n" + targets_table(report))
    for note in report.notes:
        print(f"note: {note}")
    bad = report.disagreements
    failures = report.bilevel_failures
    print()
    if bad or failures:
        for r in bad:
            print(
                f"DISAGREEMENT: {r['problem']} {r['implementation']} ({_row_config(r)}): "
                f"rel. error {r['rel_error']}"
            )
        for r in failures:
            print(
                f"FAILURE: {r['problem']} {r['implementation']} ({_row_config(r)}): {r['failed']}"
            )
    else:
        print("all implementations agree on every hypergradient")
    print(f"({time.perf_counter() - started:.0f} s)")
    if s.json_path is not None:
        out = {
            "environment": env,
            "settings": {
                "problems": s.problems,
                "steps": s.steps,
                "memory_steps": s.memory_steps,
                "features": s.features,
                "dense_max_gb": s.dense_max_bytes / 2**30,
                "seed": s.seed,
                "rss": s.rss,
            },
            "rows": report.rows,
            "targets": report.targets,
            "notes": report.notes,
            "all_agree": not bad,
            "bilevel_ok": not failures,
            "disagreements": [
                {k: r[k] for k in ("problem", "implementation", "rel_error")} for r in bad
            ],
        }
        s.json_path.parent.mkdir(parents=True, exist_ok=True)
        s.json_path.write_text(json.dumps(out, indent=1, default=str))
    return 1 if bad or failures else 0


def _row_config(row: dict[str, Any]) -> str:
    skip = {
        "problem",
        "implementation",
        "median_s",
        "spread",
        "repeats",
        "times_s",
        "rel_error",
        "agree",
        "failed",
        "ratio",
        "target",
        "target_max_ratio",
        "met",
        "note",
        "reference",
        "checked",
    }
    return ", ".join(
        f"{k}={v}" for k, v in row.items() if k not in skip and not k.endswith("_bytes")
    )


if __name__ == "__main__":
    sys.exit(main())
