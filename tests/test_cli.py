"""The command line: help, one-line errors with exit code 2, run-folder rules, Ctrl-C."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import EXPERIMENTS
from experiments.__main__ import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--progress", "off"]
# a learn-lr run small enough for error tests that get past option parsing
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


def one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert "error" in lines[0]
    return lines[0]


def test_help_lists_every_experiment(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert "unavailable" not in out


RUN_EXPERIMENTS = ["learn-lr", "l2", "maml", "hyperclean", "argmin-timeseries"]


@pytest.mark.parametrize("name", RUN_EXPERIMENTS)
def test_experiment_help_shows_shared_and_own_options(capsys, name):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--device",
        "--dtype",
        "--seed",
        "--out",
        "--quick",
        "--resume",
        "--checkpoint-every",
        "--max-outer-steps",
    ):
        assert flag in out


def test_a_module_with_its_own_command_line_gets_the_arguments(monkeypatch, capsys):
    import types

    seen = []
    module = types.ModuleType("_fake_experiment")
    module.DESCRIPTION = "a fake experiment parsing its own options"
    module.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "_fake_experiment", module)
    monkeypatch.setitem(EXPERIMENTS, "fake", "_fake_experiment")
    assert main(["fake", "unroll", "--quick"]) == 7
    assert seen == [["unroll", "--quick"]]
    assert main(["--help"]) == 0
    assert "a fake experiment parsing its own options" in capsys.readouterr().out


def test_module_entry_point_runs_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "experiments", "--help"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "learn-lr" in result.stdout


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["no-such-experiment"], "invalid choice"),
        ([], "required"),
        (["learn-lr", "--outer-steps", "-3"], "positive integer"),
        (["learn-lr", "--outer-steps", "abc"], "positive integer"),
        (["maml", "--meta-batch", "0"], "positive integer"),
        (["learn-lr", "--max-outer-steps", "-1"], "non-negative"),
        (["learn-lr", "--dtype", "float16"], "float32"),
        (["learn-lr", "--device", "tpu"], "cpu"),
        (["learn-lr", "--modes", "reverse,sideways"], "comma-separated"),
        (["learn-lr", "--no-such-flag"], "unrecognized"),
        (["learn-lr", "--quick", "--inner-steps", "5", "--truncate", "9"], "exceeds"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    line = one_line_error(capsys, main([*argv, "--out", str(tmp_path / "r")] if argv else argv))
    assert needle in line
    assert not (tmp_path / "r").exists()  # nothing written for a bad command


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_missing_cuda_device_is_a_usage_error(capsys, tmp_path):
    line = one_line_error(capsys, main([*TINY, "--device", "cuda", "--out", str(tmp_path / "r")]))
    assert "CUDA is not available" in line


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "cannot read"),
        ("", "empty"),
        ("Date,Open,High,Low,Volume,Name\n2020-01-01,1,1,1,5,A\n", "missing column(s) Close"),
        (
            "Date,Open,High,Low,Close,Volume,Name\n2020-01-01,1,1,1,abc,5,A\n",
            "'abc' is not a number",
        ),
        ("Date,Open,High,Low,Close,Volume,Name\n2020-01-01,1,1,1,1.0\n", "fields"),
        (
            "Date,Open,High,Low,Close,Volume,Name\n"
            + "".join(f"2020-01-{i:02d},1,1,1,{i},5,A\n" for i in range(1, 20)),
            "too short",
        ),
        (b"\x1f\x8b\x08garbage", "cannot read"),
    ],
)
def test_bad_csv_gives_one_line_and_exit_2(capsys, tmp_path, content, needle):
    path = tmp_path / "data.csv.gz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_bytes(gzip.compress(content.encode()))
    argv = ["argmin-timeseries", "--quick", "--csv", str(path), "--out", str(tmp_path / "r"), *FAST]
    line = one_line_error(capsys, main(argv))
    assert needle in line
    assert not (tmp_path / "r").exists()


def test_run_folder_rules(capsys, tmp_path):
    out = tmp_path / "r"
    # nothing to resume
    assert "no checkpoint" in one_line_error(capsys, main([*TINY, "--out", str(out), "--resume"]))
    assert main([*TINY, "--out", str(out), "--max-outer-steps", "2"]) == 0
    capsys.readouterr()
    # an existing run is not overwritten by accident
    assert "already holds a run" in one_line_error(capsys, main([*TINY, "--out", str(out)]))
    # resuming with other options is refused, and names the option
    line = one_line_error(capsys, main([*TINY, "--out", str(out), "--resume", "--seed", "3"]))
    assert "seed" in line
    # a corrupt checkpoint is reported, not a traceback
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "malformed" in one_line_error(capsys, main([*TINY, "--out", str(out), "--resume"]))
    # --overwrite starts over
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 0
    assert (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = [
        "learn-lr",
        "--quick",
        "--methods",
        "scalar",
        "--modes",
        "reverse",
        "--outer-steps",
        "60",
        "--inner-steps",
        "20",
        "--checkpoint-every",
        "1000",
        *FAST,
    ]
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", *args, "--out", str(out)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()
    done = len(metrics.read_text().splitlines())
    assert 10 <= done < 66

    assert main([*args, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "reference"
    assert main([*args, "--out", str(ref)]) == 0
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith(("_s", "_ms"))}  # noqa: E731
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert [strip(r) for r in got["table"]] == [strip(r) for r in want["table"]]
    rows = lambda p: [strip(json.loads(x)) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(ref)


# -- the first hour: default folders, presets, threads, progress lines, tie rule -------------


def test_unknown_experiment_error_lists_bench_too(capsys):
    line = one_line_error(capsys, main(["nope"]))
    assert "'bench'" in line and "'learn-lr'" in line


def test_quick_runs_and_presets_get_their_own_default_folders(capsys, tmp_path, monkeypatch):
    from experiments.cli import default_out

    assert default_out("learn-lr", False) == Path("runs/learn-lr")
    assert default_out("learn-lr", True) == Path("runs/learn-lr-quick")
    assert default_out("maml", False, "paper") == Path("runs/maml-paper")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "learn-lr").mkdir(parents=True)
    (tmp_path / "runs" / "learn-lr" / "config.json").write_text("{}")  # a full run is there
    assert main([*TINY, "--max-outer-steps", "1"]) == 0  # the quick run does not collide
    assert (tmp_path / "runs" / "learn-lr-quick" / "config.json").exists()
    assert (tmp_path / "runs" / "learn-lr" / "config.json").read_text() == "{}"


def test_preset_fills_options_not_given_and_excludes_quick(capsys, tmp_path):
    out = tmp_path / "paper"
    argv = ["maml", "--preset", "paper", "--outer-steps", "2", "--test-tasks", "4", "--out"]
    assert main([*argv, str(out), "--max-outer-steps", "0", *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "paper" and cfg["methods"] == ["maml-1"]
    assert cfg["outer_steps"] == 2  # given on the command line: wins over the preset
    assert (cfg["meta_batch"], cfg["shots"], cfg["inner_lr"], cfg["outer_lr"]) == (
        25,
        10,
        0.01,
        1e-3,
    )
    capsys.readouterr()
    line = one_line_error(capsys, main(["maml", "--preset", "paper", "--quick", *FAST]))
    assert "--preset paper and --quick" in line
    assert "paper: --methods maml-1 --outer-steps 70000" in " ".join(
        subprocess.run(
            [sys.executable, "-m", "experiments", "maml", "--help"],
            capture_output=True,
            text=True,
            env=env(),
            cwd=REPO,
            check=True,
        ).stdout.split()
    )


def test_threads_default_to_one_and_are_restored(capsys, tmp_path, monkeypatch):
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    i = TINY.index("--threads")
    argv = TINY[:i] + TINY[i + 2 :]
    assert main([*argv, "--out", str(tmp_path / "r"), "--max-outer-steps", "1"]) == 0
    assert calls[0] == 1 and calls[-1] == before
    assert torch.get_num_threads() == before


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    # a subprocess's stderr is a pipe: --progress auto prints plain lines, no bar redraws
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            *[a for a in TINY if a not in ("--progress", "off")],
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("learn-lr: step")]
    assert lines, proc.stderr
    assert "\r" not in proc.stderr
    assert lines[-1].startswith(f"learn-lr: step {lines[-1].split()[2]}")
    assert "(100%)" in lines[-1]


def test_line_progress_prints_every_few_seconds():
    import io

    from experiments.progress import LineProgress

    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(total=10, desc="x", file=out, every=5.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        bar.set_postfix_str("phase loss=1")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "x: step 5/10 (50%), 5s, ~5s left, phase loss=1",
        "x: step 10/10 (100%), 10s, phase loss=1",
    ]


def test_line_progress_time_left_follows_the_recent_rate():
    # a cheap phase (1 s a step) then one ten times dearer: the time left must come from
    # the recent rate, not from the average since the start
    import io

    from experiments.progress import RATE_WINDOW_S, LineProgress

    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(total=200, desc="x", file=out, every=5.0, clock=lambda: now[0])
    for step in range(150):
        now[0] += 1.0 if step < 100 else 10.0
        bar.update(1)
    last = out.getvalue().splitlines()[-1]
    assert last == "x: step 150/200 (75%), 10m00s, ~8m20s left"
    assert RATE_WINDOW_S <= 60.0  # the window the 8m20s (10 s a step) assumes


def test_tie_rule():
    from experiments.compare import TIE_MARGIN, versus

    assert versus(0.1587, 0.1605) == "tie"  # 1.1% apart: the README's example
    assert versus(0.1605 * (1 - 2 * TIE_MARGIN), 0.1605) == "better"
    assert versus(0.1605 * (1 + 2 * TIE_MARGIN), 0.1605) == "worse"


def test_readme_lists_every_run_option_and_every_bench_option(capsys):
    readme = (REPO / "README.md").read_text()
    assert main(["l2", "--help"]) == 0
    run_help = capsys.readouterr().out.split("run options (shared by all experiments)")[1]
    assert main(["bench", "--help"]) == 0
    bench_help = capsys.readouterr().out
    for text in (run_help, bench_help):
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
        for flag in flags - {"--help"}:
            assert f"`{flag}" in readme, f"README does not mention {flag}"
