"""The command line of ``python -m experiments bench``: options, and the settings they give."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import core

DESCRIPTION = "speed and memory of bilevel's hypergradients against higher, TorchOpt and JAXopt"
PROBLEMS = ("unroll", "memory", "implicit", "maml")
PEERS = ("higher", "torchopt", "jaxopt")  # the optional peer libraries, in the header's order
PROG = "python -m experiments bench"


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
    meta_batches: list[int]
    dense_max_bytes: float
    rss: bool
    verbose: bool
    compile: bool = True
    json_path: Path | None = None

    def dtypes_for(self, default: Sequence[str]) -> list[torch.dtype]:
        return self.dtypes or [getattr(torch, d) for d in default]

    def measure(
        self, impls: list[core.Impl], reference: str, rtol: float
    ) -> dict[str, core.Result]:
        """:func:`core.measure` with these settings' repeats, warm-up, device, verbosity."""
        return core.measure(
            impls,
            reference=reference,
            rtol=rtol,
            repeats=self.repeats,
            warmup=self.warmup,
            device=self.device,
            verbose=self.verbose,
        )


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


def _checked(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return int(_checked(text, int, lambda v: v > 0, "a positive integer"))


def _nonneg(text: str) -> int:
    return int(_checked(text, int, lambda v: v >= 0, "an integer >= 0"))


def _positive_float(text: str) -> float:
    return float(_checked(text, float, lambda v: v > 0, "a positive number"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as overview  # the package's docstring is the command's help

    parser = _Parser(
        prog=PROG,
        description=(overview or DESCRIPTION).split("\n", 1)[-1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Full run (defaults): unroll at T = 10, 50, 200 in float32 and float64; memory at "
            "T = 10, 100, 1000; implicit on breast cancer and p = 1e3 .. 1e6; maml with a "
            "meta-batch of 32. With --device cuda the defaults are sized for about 5 minutes on "
            "one GPU: 3 repeats, implicit up to p = 1e7, maml with meta-batches of 32 and 1024. "
            "--quick: small sizes, 1 repeat, no warm-up (a correctness run for CI, well under a "
            "minute)."
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
        help="timed repeats per implementation, median reported (default: 5; cuda: 3; --quick: 1)",
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
        help="implicit: synthetic feature counts (default: 1e3,1e4,1e5,1e6; cuda: up to 1e7; "
        "--quick: 300)",
    )
    parser.add_argument(
        "--meta-batch",
        type=_int_list,
        default=None,
        metavar="B,...",
        dest="meta_batches",
        help="maml: meta-batch sizes (default: 32; cuda: 32,1024; --quick: 4)",
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
        "--no-compile",
        action="store_true",
        help="leave out the rows that run torch.compile (bilevel compiled, bilevel lbfgs "
        "compiled): their compiles are most of a --quick run's time; the notes say so",
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
    # On a GPU the small problems are bound by kernel launches, not arithmetic, so the full
    # run affords the large sizes (implicit p = 1e7, a meta-batch of 1024) in about 5 minutes.
    gpu = device.type == "cuda" and not quick
    return Settings(
        problems=problems,
        device=device,
        dtypes=args.dtype,
        repeats=args.repeats if args.repeats is not None else (1 if quick else 3 if gpu else 5),
        warmup=args.warmup if args.warmup is not None else (0 if quick else 1),
        threads=args.threads,
        quick=quick,
        seed=args.seed,
        steps=args.steps or ([5] if quick else [10, 50, 200]),
        memory_steps=args.memory_steps or ([5, 20] if quick else [10, 100, 1000]),
        features=args.features
        or ([300] if quick else [1000, 10_000, 100_000, 1_000_000] + ([10_000_000] if gpu else [])),
        meta_batches=args.meta_batches or ([4] if quick else [32, 1024] if gpu else [32]),
        dense_max_bytes=args.dense_max_gb * 2**30,
        rss=not args.no_rss,
        verbose=args.verbose,
        compile=not args.no_compile,
        json_path=args.json_path,
    )


class UsageError(Exception):
    """A bad option value: one line on stderr, exit status 2."""
