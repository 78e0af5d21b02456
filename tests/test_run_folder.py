"""Run-folder faults: two runs on one folder, tampered checkpoints, file-system errors,
damaged files on resume, leftovers of killed runs, ``--overwrite``, non-finite results.

Each ends in a one-line error (exit 2, or 3 for a diverged run) that says what happened and
how to go on, or in a correct result; none in a traceback or a silent wrong folder.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import experiments.io as eio
from experiments.__main__ import main
from experiments.lock import RunFolderLock
from experiments.run import UsageError, read_json_file

REPO = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--progress", "off"]
TINY = [
    "learn-lr",
    "--quick",
    "--methods",
    "scalar",
    "--modes",
    "reverse",
    "--outer-steps",
    "3",
    "--grid-lrs",
    "1",
    "--grid-momenta",
    "0.5",
    "--eval-runs",
    "1",
    *FAST,
]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def one_line(capsys, code: int, expected_code: int = 2) -> str:
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def stopped_run(out: Path, capsys, steps: int = 2) -> None:
    """A TINY run stopped with a checkpoint after ``steps`` outer steps (its output dropped)."""
    assert main([*TINY, "--out", str(out), "--max-outer-steps", str(steps)]) == 0
    capsys.readouterr()


def summary(out: Path) -> dict:
    data = json.loads((out / "summary.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith(("_s", "_ms"))}  # noqa: E731
    return [strip(r) for r in data["table"]]


# --------------------------------------------------------------------------- the lock


def test_a_second_run_on_a_locked_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", *TINY, "--outer-steps", "400", "--out", str(out)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        line = one_line(capsys, main([*TINY, "--seed", "1", "--out", str(out), "--overwrite"]))
        assert "in use by another run" in line and f"pid {proc.pid}" in line
        # the other run's files were not touched
        assert json.loads((out / "config.json").read_text())["seed"] == 0
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_is_released_and_the_folder_not_left_behind(capsys, tmp_path):
    out = tmp_path / "r"
    with RunFolderLock(out):
        line = one_line(capsys, main([*TINY, "--out", str(out)]))
        assert f"pid {os.getpid()}" in line
    assert not out.exists()  # the lock alone was in it
    assert main([*TINY, "--out", str(out)]) == 0
    assert not (out / ".lock").exists()
    # a refused --resume on a missing folder leaves no folder either
    capsys.readouterr()
    assert "no checkpoint" in one_line(
        capsys, main([*TINY, "--out", str(tmp_path / "x"), "--resume"])
    )
    assert not (tmp_path / "x").exists()


def test_a_stale_lock_of_a_killed_run_is_reclaimed_and_its_temporaries_removed(tmp_path):
    out = tmp_path / "r"
    args = [*TINY, "--outer-steps", "400", "--checkpoint-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", *args, "--out", str(out)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # left by the dead run
    # what a kill during a checkpoint write leaves (made sure of here, a kill may miss it)
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    (out / ".summary.json.abc.tmp").write_bytes(b"{")
    assert main([*args, "--out", str(out), "--resume", "--max-outer-steps", "60"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert not (out / ".lock").exists()


# --------------------------------------------------------------------------- checkpoint hash


def test_a_flipped_bit_in_a_parameter_is_refused_on_resume(capsys, tmp_path):
    out = tmp_path / "r"
    stopped_run(out, capsys)
    path = out / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    inner = torch.load(__import__("io").BytesIO(payload), weights_only=True)
    # a parameter's bytes, as stored: find them in the file and flip one bit
    tensor = next(v for v in inner["state"].values() if isinstance(v, torch.Tensor))
    needle = tensor.numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + len(needle) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    line = one_line(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert "content check" in line and "SHA-256" in line


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_is_detected_or_harmless(tmp_path, data):
    path = tmp_path / "c.pt"
    obj = {"w": torch.arange(64, dtype=torch.float64), "step": 3, "name": "x"}
    if not path.exists():
        eio.save_verified_checkpoint(path, obj)
    raw = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    raw[at] ^= 1 << bit
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    try:
        got = eio.load_verified_checkpoint(bad)
    except eio.CheckpointError:
        return
    # a byte nobody reads (zip padding, a name field) may change: the content must not
    assert torch.equal(got["w"], obj["w"]) and got["step"] == 3 and got["name"] == "x"


# --------------------------------------------------------------------------- file-system faults


def _fail_writes(monkeypatch, err: int, text: str, *, only: str | None = None, after: int = 0):
    """Make writes of run files fail with ``err`` (optionally only for names containing
    ``only``, after ``after`` successful ones)."""
    real = eio._write_all
    calls = {"n": 0}

    def write(f, data, target):
        if only is None or only in str(target):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(err, text)
        real(f, data, target)

    monkeypatch.setattr(eio, "_write_all", write)


def test_disk_full_gives_one_line_and_keeps_the_previous_checkpoint(capsys, monkeypatch, tmp_path):
    out = tmp_path / "r"
    ref = tmp_path / "ref"
    assert main([*TINY, "--out", str(ref)]) == 0
    capsys.readouterr()
    args = [*TINY, "--checkpoint-every", "1", "--out", str(out)]
    _fail_writes(monkeypatch, errno.ENOSPC, "No space left on device", only="checkpoint", after=1)
    line = one_line(capsys, main(args))
    assert "checkpoint.pt: No space left on device (the disk is full)" in line
    assert "checkpoint" in line and "--resume" in line
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    eio.load_verified_checkpoint(out / "checkpoint.pt")  # the first one survived intact
    assert main([*args, "--resume"]) == 0
    assert summary(out) == summary(ref)


def test_a_read_only_folder_gives_one_line(capsys, monkeypatch, tmp_path):
    out = tmp_path / "r"
    stopped_run(out, capsys)
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    # (the tests run as root here, where chmod does not stop writes: simulate the kernel)
    monkeypatch.setattr("experiments.lock.os.open", read_only_open)
    line = one_line(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert "Read-only file system (the file system is read-only)" in line
    assert "intact" in line and "--resume" in line


def test_a_read_only_metrics_file_gives_one_line(capsys, monkeypatch, tmp_path):
    out = tmp_path / "r"
    stopped_run(out, capsys)
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and any(c in mode for c in "aw+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    line = one_line(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert "metrics.jsonl: Permission denied (permission denied)" in line
    assert "intact" in line


def test_the_file_size_limit_gives_one_line(tmp_path):
    out = tmp_path / "r"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))

    result = subprocess.run(
        [sys.executable, "-m", "experiments", *TINY, "--checkpoint-every", "1", "--out", str(out)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "File too large (the file-size limit was reached (ulimit -f))" in lines[0]
    assert "checkpoint.pt" in lines[0]
    assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    "name, damage, needle",
    [
        ("metrics.jsonl", lambda t: t.replace("\n", "\n#garbage\n", 1), "line 2 is damaged"),
        ("metrics.jsonl", lambda t: t[: len(t) // 2], "line"),
        ("config.json", lambda t: "}{" + t, "config.json (the run's options) is damaged"),
        ("config.json", lambda t: t.replace('"seed": 0', '"seed": 5'), "does not match"),
        ("config.json", lambda t: "[1, 2]", "expected a JSON dict"),
        ("summary.json", lambda t: '{"table": [', "summary.json"),
    ],
)
def test_damaged_files_are_refused_on_resume_before_any_work(
    capsys, tmp_path, name, damage, needle
):
    out = tmp_path / "r"
    stopped_run(out, capsys)
    path = out / name
    path.write_text(damage(path.read_text() if path.exists() else ""))
    before = (out / "metrics.jsonl").read_bytes()
    line = one_line(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert needle in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_bytes() == before  # no step was run


def test_a_truncated_summary_of_a_finished_run_is_reported(capsys, tmp_path):
    out = tmp_path / "r"
    assert main([*TINY, "--out", str(out)]) == 0
    (out / "summary.json").write_text('{"table": [{"meth')
    capsys.readouterr()
    line = one_line(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert "summary.json" in line and "damaged" in line


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_read_json_file_accepts_exactly_json_objects(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("j") / "config.json"
    path.write_text(text, encoding="utf-8")
    try:
        expected = json.loads(text)
    except ValueError:
        expected = None
    if isinstance(expected, dict):
        assert read_json_file(path, dict, "x") == expected
    else:
        with pytest.raises(UsageError, match="damaged"):
            read_json_file(path, dict, "x")


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 3), steps=st.integers(3, 5))
def test_resume_refuses_any_changed_option_and_accepts_the_same(
    capsys, tmp_path_factory, seed, steps
):
    out = tmp_path_factory.mktemp("r") / "r"
    base = [*TINY, "--out", str(out), "--outer-steps", "3", "--seed", "0"]
    stopped_run_args = [*base, "--max-outer-steps", "1"]
    assert main(stopped_run_args) == 0
    capsys.readouterr()
    changed = [
        *TINY,
        "--out",
        str(out),
        "--outer-steps",
        str(steps),
        "--seed",
        str(seed),
        "--resume",
    ]
    code = main(changed)
    if seed == 0 and steps == 3:
        assert code == 0
    else:
        line = one_line(capsys, code)
        assert "options differ" in line
        assert ("seed" in line) == (seed != 0) and ("outer_steps" in line) == (steps != 3)


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_removes_the_old_runs_files(tmp_path):
    out = tmp_path / "r"
    assert main([*TINY, "--out", str(out)]) == 0
    (out / "old_plot.png").write_bytes(b"png")
    (out / "meta_params.pt").write_bytes(b"pt")
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "old_plot.png" not in names and "meta_params.pt" not in names
    assert "notes.txt" in names and "summary.json" in names


# --------------------------------------------------------------------------- diverged results


def test_non_finite_final_metrics_exit_3(capsys, monkeypatch, tmp_path):
    import types

    from experiments import EXPERIMENTS

    module = types.ModuleType("_diverging_experiment")
    module.DESCRIPTION = "ends with a NaN metric"
    module.OPTIONS = []
    module.run = lambda run, cfg: {"table": [{"method": "a", "val_loss": float("nan")}]}
    monkeypatch.setitem(sys.modules, "_diverging_experiment", module)
    monkeypatch.setitem(EXPERIMENTS, "diverging", "_diverging_experiment")
    out = tmp_path / "r"
    code = main(["diverging", *FAST, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    err = [x for x in captured.err.splitlines() if x.strip()]
    assert len(err) == 1 and "table[0].val_loss=nan" in err[0] and "diverged" in err[0]
    # the summary is kept (NaN as null) and printed: the record of what happened
    assert json.loads((out / "summary.json").read_text())["table"][0]["val_loss"] is None
    assert "nan" in captured.out


MAML = ["maml", "--quick", "--methods", "maml-1", "--outer-steps", "3", *FAST]


def test_a_nonfinite_meta_gradient_stops_naming_the_method_and_step(capsys, tmp_path):
    code = main([*MAML, "--inner-lr", "1e30", "--out", str(tmp_path / "r")])
    line = one_line(capsys, code, expected_code=3)
    assert "maml-1: the meta-gradient of outer step 1 is not finite" in line
    assert "--skip-nonfinite" in line


def test_skip_nonfinite_counts_and_a_method_with_every_step_skipped_fails(
    capsys, monkeypatch, tmp_path
):
    import experiments.maml as maml

    real = maml.meta_value_and_grad
    calls = {"n": 0}

    def second_call_nan(params, tasks, cfg):
        calls["n"] += 1
        loss, grads = real(params, tasks, cfg)
        if calls["n"] == 2:
            grads = {k: g * float("nan") for k, g in grads.items()}
        return loss, grads

    monkeypatch.setattr(maml, "meta_value_and_grad", second_call_nan)
    out = tmp_path / "r"
    assert main([*MAML, "--skip-nonfinite", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["phase"] == "maml-1"] == [0, 1, 0]
    assert json.loads((out / "summary.json").read_text())["results"]["maml-1"]["skipped_steps"] == 1
    monkeypatch.undo()
    capsys.readouterr()
    code = main([*MAML, "--inner-lr", "1e30", "--skip-nonfinite", "--out", str(tmp_path / "s")])
    line = one_line(capsys, code, expected_code=3)
    assert "all 3 meta-steps were skipped" in line


def test_a_meta_batch_that_cannot_fit_is_refused_with_the_estimate(capsys, tmp_path):
    code = main([*MAML, "--meta-batch", "100000000", "--out", str(tmp_path / "r")])
    line = one_line(capsys, code)
    assert "a meta-step needs about" in line and "TiB" in line and "available" in line
    assert not (tmp_path / "r").exists()  # refused up front, before the run started


# --------------------------------------------------------------------------- resume anywhere

_REFERENCE: dict[str, Path] = {}


def _reference(tmp_path_factory) -> Path:
    if "ref" not in _REFERENCE:
        out = tmp_path_factory.mktemp("ref") / "r"
        assert main([*TINY, "--outer-steps", "4", "--out", str(out)]) == 0
        _REFERENCE["ref"] = out
    return _REFERENCE["ref"]


def _rows(out: Path) -> list[dict]:
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith(("_s", "_ms"))}  # noqa: E731
    return [strip(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stops=st.lists(st.integers(1, 7), min_size=1, max_size=2, unique=True).map(sorted),
    every=st.sampled_from([0, 1, 3]),
    torn=st.booleans(),
)
def test_resume_at_random_interruption_points_is_exact(
    capsys, tmp_path_factory, stops, every, torn
):
    ref = _reference(tmp_path_factory)
    total = len(_rows(ref))
    out = tmp_path_factory.mktemp("stop") / "r"
    args = [*TINY, "--outer-steps", "4", "--checkpoint-every", str(every), "--out", str(out)]
    resume = []
    for stop in [s for s in stops if s < total]:
        assert main([*args, *resume, "--max-outer-steps", str(stop)]) == 0
        if torn:  # what a kill leaves: metrics lines after the checkpoint, a torn last one
            with open(out / "metrics.jsonl", "a") as f:
                f.write('{"phase": "x", "step": 99}\n{"pha')
        resume = ["--resume"]
    assert main([*args, *resume]) == 0
    capsys.readouterr()
    assert summary(out) == summary(ref)
    assert _rows(out) == _rows(ref)
