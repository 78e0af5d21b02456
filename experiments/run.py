"""The run folder, metrics, checkpoints, resume and Ctrl-C handling shared by all experiments.

An experiment is a sequence of *phases*; a phase is a loop of outer steps over a state dict::

    result = run.phase("scalar-reverse", steps=100, init=init, step=step, finish=finish)

``init() -> state`` builds the state (tensors, dicts of tensors, ``torch.optim`` optimizers,
plain numbers and lists; keys starting with ``_`` hold anything and are not saved), ``step(state, k) -> metrics`` does outer step ``k`` in place and
returns a dict of numbers (one line of ``metrics.jsonl``), ``finish(state) -> result``
evaluates the phase. Every ``checkpoint_every`` outer steps the run saves the phases finished
so far, the current phase's state, the step counters and the torch / numpy / python RNG states.

Resume is exact on the CPU because nothing random depends on history: every outer step draws
its randomness from its own generator, ``run.rng(phase, k)``, seeded from ``(seed, phase, k)``;
setup code uses ``run.rng("name")`` too. The global RNGs are seeded at the start and saved in
checkpoints as well, for library code that uses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel import distributed

from .io import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_verified_checkpoint,
    remove_stale_temporaries,
    save_verified_checkpoint,
    to_jsonable,
)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

State = dict[str, Any]
StepFn = Callable[[State, int], dict[str, Any]]


class UsageError(Exception):
    """Bad options or input data: the CLI prints the message on one line and exits with 2."""


class Diverged(Exception):
    """The run produced non-finite values (a diverged method): the CLI exits with 3."""


class Stopped(Exception):
    """The run reached ``--max-outer-steps``; a checkpoint was saved (exit code 0)."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) arrived; a checkpoint was saved (exit code 130)."""


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from a base seed and any keys, stable across runs and platforms.

    Example:
        >>> derive_seed(0, "grid", 3) == derive_seed(0, "grid", 3) != derive_seed(1, "grid", 3)
        True
    """
    text = json.dumps([seed, *[str(k) for k in keys]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (rank 0 only): legal but degenerate input or results."""
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def nonfinite_values(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """``(path, value)`` of every NaN or infinite float (or tensor element) in ``tree``.

    Example:
        >>> nonfinite_values({"table": [{"loss": 1.0}, {"loss": float("nan")}]})
        [('table[1].loss', nan)]
    """
    found: list[tuple[str, float]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += nonfinite_values(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            found += nonfinite_values(v, f"{prefix}[{i}]")
    elif isinstance(tree, torch.Tensor) and tree.is_floating_point():
        bad = ~torch.isfinite(tree.detach())
        if bool(bad.any()):
            found.append((prefix, float(tree.detach()[bad].flatten()[0])))
    elif isinstance(tree, float) and not math.isfinite(tree):
        found.append((prefix, tree))
    return found


def read_json_file(path: Path, kind: type, what: str) -> Any:
    """``path`` parsed as JSON of type ``kind``, or a :class:`UsageError` naming the damage."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--resume: {path} ({what}) is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"--resume: {path} ({what}) is damaged ({exc}); restore it, or start over with "
            "--overwrite"
        ) from None
    if not isinstance(value, kind):
        raise UsageError(
            f"--resume: {path} ({what}) is damaged: expected a JSON {kind.__name__}, got "
            f"{type(value).__name__}; restore it, or start over with --overwrite"
        )
    return value


# files a run writes at the top of its folder; --overwrite deletes them
RUN_FILES = ("*.json", "*.jsonl", "*.pt", "*.png")


# -- RNG state ------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Torch, CUDA, numpy and python RNG states as checkpointable values."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- state packing --------------------------------------------------------------------------


def _pack(value: Any) -> Any:
    """A checkpointable copy of a phase state; dict keys starting with ``_`` are not saved."""
    if isinstance(value, torch.optim.Optimizer):
        return {"__optimizer__": value.state_dict()}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {
            k: _pack(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot checkpoint a {type(value).__name__} in a phase state: keep tensors, optimizers, "
        "numbers, strings and dicts/lists of them, or name the key with a leading '_'"
    )


def _unpack_into(current: Any, saved: Any, device: torch.device) -> Any:
    """Restore ``saved`` into ``current`` (in place where identity matters) and return it.

    Tensors of the same shape are copied in place, so optimizers built in ``init`` keep
    pointing at the tensors they update; optimizers load their state dicts.
    """
    if isinstance(current, torch.optim.Optimizer):
        current.load_state_dict(saved["__optimizer__"])
        return current
    if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor):
        if current.shape == saved.shape and current.dtype == saved.dtype:
            with torch.no_grad():
                current.copy_(saved)
            return current
        return saved.to(device)
    if isinstance(current, dict) and isinstance(saved, dict):
        for k, v in saved.items():
            current[k] = _unpack_into(current.get(k), v, device)
        return current
    return _to_device(saved, device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().item() if value.numel() == 1 else value.detach().cpu().tolist()
    return value


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """One experiment run: its folder, config, counters, checkpoints and progress bar.

    Attributes:
        name: the experiment's name (``learn-lr``).
        config: the resolved configuration (JSON types only); written to ``config.json`` and
            compared with the checkpoint's on ``--resume``.
        out: the run folder.
        device, dtype: where and in which precision tensors live.
        seed: the base seed every generator is derived from.
        writer: whether this process writes the run folder and shows progress: in a
            distributed run (``torchrun``), rank 0 only. The other ranks compute the
            same phases, keep their metrics in memory and read the folder only to resume.
    """

    name: str
    config: dict[str, Any]
    out: Path
    device: torch.device
    dtype: torch.dtype
    seed: int
    checkpoint_every: int = 10
    max_outer_steps: int | None = None
    resume: bool = False
    progress: str = "auto"
    writer: bool = True
    results: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    _metric_lines: int = 0
    _resume_from: dict[str, Any] | None = None
    _elapsed_before: float = 0.0
    _t0: float = field(default_factory=time.perf_counter)
    _planned: int = 0
    _bar: Any = None
    _interrupt: bool = False
    _metrics_file: Any = None
    _rows: list[dict[str, Any]] = field(default_factory=list)

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create or reopen the run folder; on resume, load and check the checkpoint."""
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            # the caller holds the folder's lock: a temporary here is a killed writer's
            remove_stale_temporaries(self.out)
        seed_everything(self.seed)
        ckpt_path = self.out / CHECKPOINT
        if self.resume:
            try:
                ckpt = load_verified_checkpoint(ckpt_path)
            except CheckpointError as exc:
                raise UsageError(
                    f"--resume: {exc}; delete it to start over (--overwrite)"
                ) from None
            self._check_resumable(ckpt)
            if self.writer:
                self._check_folder_files(ckpt)
            self._resume_from = ckpt
            self.results = _to_device(ckpt["results"], self.device)
            self.global_step = int(ckpt["global_step"])
            self._elapsed_before = float(ckpt.get("elapsed_s", 0.0))
            if self.writer:
                self._truncate_metrics(int(ckpt["metric_lines"]))
            else:
                self._metric_lines = int(ckpt["metric_lines"])
        elif self.writer:
            # a new run (or --overwrite): nothing of an earlier run may remain beside it
            if (self.out / "config.json").exists() or ckpt_path.exists():
                for pattern in RUN_FILES:
                    for stale in self.out.glob(pattern):
                        if stale.is_file():
                            stale.unlink()
            atomic_write_json(self.out / "config.json", self.config)
            (self.out / "metrics.jsonl").touch()
        if self.writer:
            self._metrics_file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        required = ("format", "experiment", "config", "global_step", "metric_lines", "results")
        missing = [k for k in required if k not in ckpt]
        if missing or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(
                f"--resume: checkpoint {self.out / CHECKPOINT} is malformed (missing {missing} "
                f"or format {ckpt.get('format')!r} != {CHECKPOINT_FORMAT}); delete it to start over"
            )
        if ckpt["experiment"] != self.name:
            raise UsageError(
                f"--resume: {self.out} holds a {ckpt['experiment']!r} run, not {self.name!r}"
            )
        old = json.loads(ckpt["config"])
        if old != to_jsonable(self.config):
            keys = sorted(
                k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k)
            )
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in keys[:4])
            raise UsageError(
                f"--resume: the options differ from the interrupted run in {self.out} ({diffs}); "
                "resume with the same options or use another --out"
            )

    def _check_folder_files(self, ckpt: dict[str, Any]) -> None:
        """Before any work: the files a resumed run reads or extends must be intact."""
        config = read_json_file(self.out / "config.json", dict, "the run's options")
        if config != json.loads(ckpt["config"]):
            raise UsageError(
                f"--resume: {self.out / 'config.json'} does not match the checkpoint's options "
                "(edited by hand?); restore it, or start over with --overwrite"
            )
        summary = self.out / "summary.json"
        if summary.exists():  # a kill between the summary and the checkpoint's removal
            read_json_file(summary, dict, "the summary of a finished run")
        path = self.out / "metrics.jsonl"
        lines = int(ckpt["metric_lines"])
        try:
            kept = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            kept = []
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"--resume: {path} is damaged ({exc}); start over with --overwrite"
            ) from None
        for number, line in enumerate(kept[:lines], start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not line.endswith("\n"):
                raise UsageError(
                    f"--resume: {path} line {number} is damaged ({line.strip()[:40]!r}); "
                    "restore it, or start over with --overwrite"
                )

    def _truncate_metrics(self, lines: int) -> None:
        path = self.out / "metrics.jsonl"
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        if len(kept) < lines:
            raise UsageError(
                f"--resume: {path} has {len(kept)} lines but the checkpoint expects {lines}; "
                "the run folder is inconsistent, start over with --overwrite"
            )
        atomic_write_text(path, "".join(kept[:lines]))
        self._metric_lines = lines

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    # -- helpers for experiments ----------------------------------------------------------
    def rng(self, *keys: Any) -> torch.Generator:
        """A CPU generator seeded from the run's seed and ``keys`` (same keys, same stream)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *keys))

    def tensor(self, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` as a tensor on the run's device, in the run's dtype (or ``dtype``)."""
        t = torch.as_tensor(x)
        if dtype is None and t.is_floating_point():
            dtype = self.dtype
        return t.to(device=self.device, dtype=dtype)

    def path(self, name: str) -> Path:
        return self.out / name

    def plan(self, total_steps: int) -> None:
        """Declare the total number of outer steps (for the progress bar)."""
        self._planned = int(total_steps)

    def echo(self, message: str) -> None:
        """Print a line without breaking the progress bar (on the writer only)."""
        if not self.writer:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def elapsed(self) -> float:
        """Wall seconds spent on this run, including the time before a resume."""
        return self._elapsed_before + time.perf_counter() - self._t0

    def read_metrics(self, phase: str | None = None) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` (of one phase when given).

        On a non-writer rank: the lines this process produced (since a resume).
        """
        if not self.writer:
            return [r for r in self._rows if phase is None or r.get("phase") == phase]
        if self._metrics_file is not None:
            self._metrics_file.flush()
        rows = []
        with open(self.out / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if phase is None or row.get("phase") == phase:
                    rows.append(row)
        return rows

    # -- the outer loop -------------------------------------------------------------------
    def phase(
        self,
        name: str,
        steps: int,
        init: Callable[[], State],
        step: StepFn,
        finish: Callable[[State], Any] | None = None,
    ) -> Any:
        """Run (or resume, or skip when already done) one phase; return its result.

        Args:
            name: unique within the run; names the metrics lines and the checkpoint entry.
            steps: number of outer steps.
            init: builds the initial state dict.
            step: ``step(state, k)`` performs outer step ``k`` (0-based) and returns metrics.
            finish: ``finish(state)`` returns the phase result (default: ``{}``); it is stored
                in checkpoints and returned again, without rerunning, after a resume.
        """
        if name in self.results:
            return self.results[name]
        state = init()
        start = 0
        ckpt = self._resume_from
        if ckpt is not None and ckpt.get("phase") == name:
            state = _unpack_into(state, ckpt["state"], self.device)
            start = int(ckpt["phase_step"])
            set_rng_state(ckpt["rng"])
            self._resume_from = None
        bar = self._progress()
        last_loss: float | None = None
        for k in range(start, steps):
            self._maybe_stop(name, k, state)
            metrics = {key: _float(v) for key, v in step(state, k).items()}
            self.global_step += 1
            self._write_metrics(
                {"phase": name, "step": k + 1, "global_step": self.global_step, **metrics}
            )
            if bar is not None:
                loss = metrics.get("outer_loss", metrics.get("train_loss"))
                if isinstance(loss, float):
                    last_loss = loss
                text = f"{name}" + (f" loss={last_loss:.4g}" if last_loss is not None else "")
                bar.set_postfix_str(text, refresh=False)
                bar.update(1)
            if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                self._save(name, k + 1, state)
        result = finish(state) if finish is not None else {}
        self.results[name] = result
        return result

    def _maybe_stop(self, phase: str, k: int, state: State) -> None:
        if distributed.is_distributed():
            # every rank must stop at the same step, or the others wait in a collective
            flag = torch.tensor(float(self._interrupt), device=self.device)
            self._interrupt = bool(distributed.all_reduce_sum(flag) > 0)
        if self._interrupt:
            self._save(phase, k, state)
            raise Interrupted(
                f"interrupted at outer step {self.global_step}; checkpoint saved in {self.out}; "
                "continue with the same command and --resume"
            )
        if self.max_outer_steps is not None and self.global_step >= self.max_outer_steps:
            self._save(phase, k, state)
            raise Stopped(
                f"stopped at outer step {self.global_step} (--max-outer-steps); checkpoint saved "
                f"in {self.out}; continue with --resume and a larger or no --max-outer-steps"
            )

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if not self.writer:
            self._rows.append(row)
            self._metric_lines += 1
            return
        self._metrics_file.write(json.dumps(row, allow_nan=True) + "\n")
        self._metrics_file.flush()
        self._metric_lines += 1

    def _save(self, phase: str, k: int, state: State) -> None:
        if not self.writer:
            return
        self._metrics_file.flush()
        os.fsync(self._metrics_file.fileno())
        save_verified_checkpoint(
            self.out / CHECKPOINT,
            {
                "format": CHECKPOINT_FORMAT,
                "experiment": self.name,
                "config": json.dumps(to_jsonable(self.config), sort_keys=True),
                "global_step": self.global_step,
                "metric_lines": self._metric_lines,
                "phase": phase,
                "phase_step": k,
                "state": _pack(state),
                "results": _pack(self.results),
                "rng": get_rng_state(),
                "elapsed_s": self.elapsed(),
            },
        )

    def _progress(self) -> Any:
        """The progress display: ``progress`` is ``"bar"`` (tqdm), ``"lines"`` (a plain line
        every few seconds), ``"off"``, or ``"auto"``: a bar on a terminal, lines otherwise."""
        if self._bar is None and self.progress != "off" and self.writer:
            kind = self.progress
            if kind == "auto":
                kind = "bar" if sys.stderr.isatty() else "lines"
            if kind == "lines":
                from .progress import LineProgress

                self._bar = LineProgress(
                    total=self._planned or None, desc=self.name, initial=self.global_step
                )
            else:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self._planned or None,
                    initial=self.global_step,
                    desc=self.name,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        return self._bar

    def finished(self) -> None:
        """The run completed: the checkpoint is no longer needed."""
        if not self.writer:
            return
        ckpt = self.out / CHECKPOINT
        if ckpt.exists():
            ckpt.unlink()

    # -- Ctrl-C ---------------------------------------------------------------------------
    @contextmanager
    def catch_sigint(self) -> Iterator[None]:
        """First Ctrl-C: finish the current outer step, checkpoint, raise :class:`Interrupted`.

        A second Ctrl-C interrupts at once (``KeyboardInterrupt``). Only installed in the
        main thread; the previous handler comes back on exit.
        """
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt:
                raise KeyboardInterrupt
            self._interrupt = True
            print(
                "\nCtrl-C: saving a checkpoint after this outer step (again to abort)",
                file=sys.stderr,
                flush=True,
            )

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def format_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A plain-text table of ``rows`` (floats to 4 significant digits).

    Example:
        >>> print(format_table([{"method": "grid", "val_loss": 0.123456}]))
        method  val_loss
        ------  --------
        grid    0.1235
    """
    if not rows:
        return title
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            return f"{v:.4g}"
        if v is None:
            return "-"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(cell(x) for x in v[:4]) + (", ...]" if len(v) > 4 else "]")
        return str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)
