"""The command line: ``python -m experiments NAME [options]`` from a checkout; installed, ``bilevel-exp``
or ``python -m bilevel_experiments``."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch

from bilevel import distributed

from . import EXPERIMENTS
from .io import describe_os_error
from .lock import FolderBusy, RunFolderLock
from .options import add_options, choice, nonneg_int, positive_int, resolve
from .run import (
    CHECKPOINT,
    Diverged,
    Interrupted,
    Run,
    Stopped,
    UsageError,
    format_table,
    nonfinite_values,
    read_json_file,
)

PROG = f"python -m {__package__}"
# intra-op threads of every experiment unless --threads says otherwise: at the bundled sizes
# torch's default (one per core) was never faster than one thread and up to 6x slower on a
# shared 2-core machine (README: Experiments, threads)
DEFAULT_THREADS = 1
CHECKPOINT_EVERY = 10
SHARED = (
    "device",
    "dtype",
    "seed",
    "out",
    "quick",
    "resume",
    "overwrite",
    "checkpoint_every",
    "max_outer_steps",
    "threads",
    "progress",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option on one line (no usage block) and exits with 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def load_experiment(name: str) -> ModuleType:
    # relative names: the package is ``experiments`` in a checkout, ``bilevel_experiments``
    # once installed (a top-level ``experiments`` would collide with users' own folders)
    return importlib.import_module(EXPERIMENTS[name], __package__)


def _describe(name: str) -> str:
    try:
        return str(getattr(load_experiment(name), "DESCRIPTION", ""))
    except Exception as exc:  # a broken module must not break --help of the others
        return f"(unavailable: {type(exc).__name__}: {exc})"


def _add_shared(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    g = parser.add_argument_group("run options (shared by all experiments)")
    g.add_argument(
        "--device",
        type=choice(["cpu", "cuda", "auto"]),
        default="cpu",
        help="cpu, cuda or auto (cuda when available) (default: cpu)",
    )
    g.add_argument(
        "--dtype",
        type=choice(["float32", "float64"]),
        default=None,
        help=f"floating-point precision (default: {default_dtype})",
    )
    g.add_argument("--seed", type=nonneg_int, default=0, help="base random seed (default: 0)")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: runs/NAME; runs/NAME-quick with --quick, runs/NAME-PRESET "
        "with --preset)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="a small version that finishes in well under a minute on 2 CPU cores",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run in --out instead of refusing (its *.json, *.jsonl, *.pt "
        "and *.png files are deleted first)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=None,  # None: a --preset may choose, else CHECKPOINT_EVERY
        metavar="N",
        help=f"save a checkpoint every N outer steps, 0 = only on Ctrl-C (default: "
        f"{CHECKPOINT_EVERY}; maml --preset paper: 500)",
    )
    g.add_argument(
        "--max-outer-steps",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="stop (with a checkpoint) once N outer steps are done in total",
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"torch CPU threads (default: {DEFAULT_THREADS}: the bundled problems are small, "
        "and more threads measured slower, much slower on a busy machine)",
    )
    g.add_argument(
        "--progress",
        type=choice(["auto", "bar", "lines", "off"]),
        default="auto",
        help="bar (redrawn), lines (one every few seconds, for logs), off; auto: a bar on a "
        "terminal, lines otherwise (default: auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    names = list(EXPERIMENTS)
    listing = "\n".join(f"  {n:<20} {_describe(n)}" for n in names)
    parser = _Parser(
        prog=PROG,
        description="Run a bi-level optimization experiment; results go to a run folder "
        "(config.json, metrics.jsonl, summary.json, PNG plots).",
        epilog=f"experiments:\n{listing}\n  {'bench':<20} bilevel and the peer libraries side by "
        f"side: unroll, memory, implicit, maml (its own options: `{PROG} bench --help`)\n\n"
        f"`{PROG} NAME --help` lists the options of one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="experiment",
        metavar="NAME",
        parser_class=_Parser,
        help="the experiment to run (listed below)",
    )
    sub.required = True
    for name in names:
        try:
            module = load_experiment(name)
        except Exception:
            module = None
        if module is not None and hasattr(module, "main"):
            sub.add_parser(name, add_help=False)  # main() hands it its own arguments
            continue
        p = sub.add_parser(
            name,
            description=getattr(module, "__doc__", None) or _describe(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if module is not None:
            add_options(p, getattr(module, "OPTIONS", []))
            presets = getattr(module, "PRESETS", {})
            if presets:
                p.add_argument(
                    "--preset",
                    type=choice(sorted(presets)),
                    default=None,
                    help="a named configuration; options given on the command line win: "
                    + "; ".join(f"{n}: {_show_preset(v)}" for n, v in presets.items()),
                )
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
        # a module that fails to import still parses the shared options, so that main()
        # reaches load_experiment() and shows the real import error
        _add_shared(p, getattr(module, "DTYPE", "float32"))
    # bench parses its own options (__main__ hands it the command line); listed here so
    # that an unknown NAME's error names it too
    sub.add_parser("bench", add_help=False)
    return parser


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` as a device; ``cuda`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (try --device cpu)")
    return torch.device(name)


def _show_preset(values: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return " ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in values.items())


def apply_preset(module: ModuleType, args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from ``--preset NAME`` (the module's
    ``PRESETS[NAME]``: its own options, and run options whose default is None such as
    ``checkpoint_every``); a preset and ``--quick`` exclude each other."""
    name = getattr(args, "preset", None)
    if name is None:
        return
    if args.quick:
        raise UsageError(f"--preset {name} and --quick exclude each other; choose one")
    for key, value in module.PRESETS[name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def run_config(module: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration recorded in config.json and checked on --resume."""
    apply_preset(module, args)
    cfg = resolve(args, getattr(module, "OPTIONS", []), args.quick)
    for key, value in vars(args).items():
        if key not in cfg and key not in SHARED and key != "experiment":
            cfg[key] = str(value) if isinstance(value, Path) else value
    cfg.update(
        experiment=args.experiment,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device.type,
        quick=args.quick,
    )
    return cfg


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    print(format_table(summary.get("table", []), title=f"== {summary.get('experiment', '')} =="))
    for title, rows in summary.get("tables", {}).items():
        print()
        print(format_table(rows, title=f"-- {title} --"))
    print(
        f"\nresults in {out}/ (summary.json, metrics.jsonl, config.json"
        + "".join(f", {p}" for p in summary.get("plots", []))
        + ")"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m experiments`` and ``bilevel-exp``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] in EXPERIMENTS:
        module = load_experiment(argv[0])
        if hasattr(module, "main"):  # the module parses its own command line
            return int(module.main(argv[1:]) or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, message already printed)
        return int(exc.code or 0)
    module = load_experiment(args.experiment)
    previous_threads = torch.get_num_threads()
    started = clean = False
    # on every rank but 0 of a torchrun launch, messages are left to rank 0
    say = functools.partial(print, file=sys.stderr) if distributed.is_main() else _silent
    try:
        args.device = resolve_device(args.device)
        args.dtype = args.dtype or getattr(module, "DTYPE", "float32")
        args.device, started = _init_distributed(args.device)
        say = functools.partial(print, file=sys.stderr) if distributed.is_main() else _silent
        # usage errors, step limits and interrupts happen at the same point on every rank;
        # any other failure ends this rank at once so the others do not wait for it
        with distributed.fail_fast(expected=(UsageError, Interrupted, Stopped, Diverged)):
            code = _run(module, args)
            clean = True
            return code
    except UsageError as exc:
        say(f"{PROG} {args.experiment}: error: {exc}")
        code = 2
    except Diverged as exc:
        say(f"{PROG} {args.experiment}: error: {exc}")
        code = 3
    except OSError as exc:  # the run folder cannot be written: disk full, read-only, ...
        hint = _resume_hint(getattr(args, "out_folder", None))
        say(f"{PROG} {args.experiment}: error: {describe_os_error(exc)}; {hint}")
        code = 2
    except Interrupted as exc:
        say(f"{PROG} {args.experiment}: {exc}")
        code = 130
    except Stopped as exc:
        say(f"{PROG} {args.experiment}: {exc}")
        code = 0
    except KeyboardInterrupt:
        say(f"{PROG} {args.experiment}: aborted (no checkpoint saved for the current step)")
        code = 130
    finally:
        torch.set_num_threads(previous_threads)
        if started and clean:
            distributed.shutdown()
    if started:
        # every rank meets an exception that gets here at the same point. Tearing gloo down,
        # or leaving it to the interpreter's exit, races with the other ranks' exits and can
        # abort this one ("terminate called without an active exception"): wait for each
        # other, then leave at once, as fail_fast does
        distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _init_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Join the ``torchrun`` process group if launched by it: gloo for ``--device cpu``,
    NCCL on GPUs, each rank on its own GPU (``cuda:LOCAL_RANK``). Returns the device and
    whether a group was started here (to be destroyed at the end)."""
    before = torch.distributed.is_available() and torch.distributed.is_initialized()
    _, world = distributed.init_from_env(backend="gloo" if device.type == "cpu" else None)
    if world > 1 and device.type == "cuda":
        device = distributed.device()
    return device, world > 1 and not before


def default_out(experiment: str, quick: bool, preset: str | None = None) -> Path:
    """``runs/NAME``; ``runs/NAME-quick`` for ``--quick`` and ``runs/NAME-PRESET`` for
    ``--preset``: a quick try never collides with (or is refused because of) the full run.

    Example:
        >>> str(default_out("maml", True)), str(default_out("maml", False, "paper"))
        ('runs/maml-quick', 'runs/maml-paper')
    """
    suffix = "-quick" if quick else f"-{preset}" if preset else ""
    return Path("runs") / f"{experiment}{suffix}"


def _resume_hint(out: Path | None) -> str:
    if out is not None and (out / CHECKPOINT).exists():
        return (
            f"the last checkpoint in {out} is intact: fix this, then continue with the same "
            "command and --resume"
        )
    return "nothing to resume from: fix this, then run the command again"


def _setup(module: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration, validated on every rank; in a distributed run the ranks'
    verdicts are gathered, so that an error met by one rank only (a file that rank cannot
    read) is reported by every rank, prefixed with the rank that met it."""
    error: str | None = None
    cfg: dict[str, Any] = {}
    try:
        cfg = run_config(module, args)
        if hasattr(module, "validate"):
            module.validate(cfg)
    except UsageError as exc:
        if not distributed.is_distributed():
            raise
        error = str(exc)
    if not distributed.is_distributed():
        return cfg
    errors: list[str | None] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return cfg
    if len(failed) == len(errors) and len(set(errors)) == 1:
        raise UsageError(failed[0][1])  # the same on every rank: rank 0 says it once
    message = "; ".join(f"[rank {r}/{len(errors)}] {e}" for r, e in failed)
    if not distributed.is_main():  # rank 0 prints it with every other usage error
        print(f"{PROG} {args.experiment}: error: {message}", file=sys.stderr, flush=True)
    raise UsageError(message)


def _check_out(
    args: argparse.Namespace, out: Path, lock: RunFolderLock | None
) -> tuple[str, str | None]:
    """Whether the run folder can be used: ``("go", None)``, ``("finished", None)`` (a
    finished run on --resume) or ``("usage", message)``. Takes the folder's lock first."""
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a folder")
        if lock is not None:
            try:
                lock.acquire()
            except FolderBusy as exc:
                raise UsageError(f"--out {exc}") from None
            except OSError as exc:
                raise UsageError(
                    f"--out {out}: {describe_os_error(exc)}; {_resume_hint(out)}"
                ) from None
        if args.resume:
            if not (out / CHECKPOINT).exists():
                if (out / "summary.json").exists():
                    read_json_file(out / "summary.json", dict, "the finished run's summary")
                    return "finished", None
                raise UsageError(
                    f"--resume: no checkpoint in {out}; start the run without --resume"
                )
        elif (out / "config.json").exists() and not args.overwrite:
            raise UsageError(
                f"--out {out} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
    except UsageError as exc:
        return "usage", str(exc)
    return "go", None


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    cfg = _setup(module, args)
    out: Path = (
        args.out
        if args.out is not None
        else default_out(args.experiment, args.quick, getattr(args, "preset", None))
    )
    # rank 0 alone locks and reads the folder and decides, so that every rank acts the same
    # (the other ranks share rank 0's lock: they never write the folder)
    lock = RunFolderLock(out) if distributed.is_main() else None
    try:
        verdict, message = distributed.broadcast_object(
            _check_out(args, out, lock) if distributed.is_main() else None
        )
        if verdict == "usage":
            raise UsageError(message)
        if verdict == "finished":
            if distributed.is_main():
                print(f"{out} holds a finished run; nothing to resume. Its summary:")
                _print_summary(read_json_file(out / "summary.json", dict, "summary"), out)
            return 0
        args.out_folder = out
        return _run_locked(module, args, cfg, out)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    module: ModuleType, args: argparse.Namespace, cfg: dict[str, Any], out: Path
) -> int:
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    run = Run(
        name=args.experiment,
        config=cfg,
        out=out,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        seed=args.seed,
        checkpoint_every=(
            CHECKPOINT_EVERY if args.checkpoint_every is None else args.checkpoint_every
        ),
        max_outer_steps=args.max_outer_steps,
        resume=args.resume,
        progress=args.progress,
        writer=distributed.is_main(),
    )
    try:
        with run.catch_sigint():
            run.start()
            summary = module.run(run, cfg)
    finally:
        run.close()
    summary = {
        "experiment": args.experiment,
        **summary,
        "outer_steps": run.global_step,
        "wall_s": run.elapsed(),
        "config": cfg,
    }
    from .io import atomic_write_json

    # NaN / inf would be written as null: a diverged run must not pass for a result
    bad = nonfinite_values({k: v for k, v in summary.items() if k != "config"})
    if run.writer:
        atomic_write_json(out / "summary.json", summary)
    run.finished()
    if run.writer:
        _print_summary(summary, out)
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise Diverged(
            f"{len(bad)} final metric(s) are not finite ({shown}): the run diverged; "
            f"summary.json records them as null. Try a smaller step size"
        )
    return 0
