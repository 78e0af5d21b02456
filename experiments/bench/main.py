"""The bench's entry point: run the chosen problems, print the tables, write the JSON."""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

import torch

from . import core, implicit, implicit_outer, jaxopt_peer, maml, memory, unroll
from .children import measure_rss
from .report import Report, targets_table
from .settings import PEERS, PROG, Settings, UsageError, build_parser, settings_from


def child_main(spec: dict[str, Any]) -> int:
    """A fresh process measuring one configuration's peak RSS; prints one JSON line."""
    torch.set_num_threads(int(spec.get("threads", 1)))
    # imported here: ``python -m experiments.bench.reversible`` runs it as __main__
    from . import reversible

    children = {
        "memory": memory.child_fn,
        "implicit": implicit.child_fn,
        "reversible": reversible.child_fn,
    }
    if spec["kind"] not in children:
        raise ValueError(f"unknown child kind {spec['kind']!r}")
    return measure_rss(children[spec["kind"]](spec))


def environment(s: Settings) -> dict[str, Any]:
    import bilevel

    peers = [core.peer(n) for n in PEERS]
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
        "compile": s.compile,
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

    jaxopt_peer.configure(s.threads)  # before JAX's backend starts (environment imports it)
    env = environment(s)
    print(header(env), flush=True)
    report = Report(s)
    runners = {
        "unroll": unroll.run_unroll,
        "memory": memory.run_memory,
        "implicit": _run_implicit,
        "maml": maml.run_maml,
    }
    started = time.perf_counter()
    with warnings.catch_warnings():
        # the peers' deprecation chatter (functorch.vjp, higher) is not the user's business here
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        for name in s.problems:
            shown = len(report.tables)
            runners[name](s, report)
            for table in report.tables[shown:]:
                print("\n" + table, flush=True)
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


def _run_implicit(s: Settings, report: Report) -> None:
    """The implicit problem's tables: one hypergradient per configuration (with the small
    problems), then the outer loop (warm starts and preconditioners against the peers)."""
    implicit.run_implicit(s, report)
    report.tables.append(implicit_outer.run_outer(s, report))


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
