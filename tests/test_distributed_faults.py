"""Faults of one rank in a 2-process gloo run of the experiments CLI: a NaN meta-gradient on
rank 1 only, an input file only rank 0 can read. Every rank must stop with a message naming
the rank (never gloo's "Connection closed by peer").

The same file is the worker: ``python tests/test_distributed_faults.py SCENARIO OUTDIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from test_distributed import launch

ARGS = ["--quick", "--threads", "1", "--progress", "off"]


def _maml_nan_on_rank_1(outdir: Path) -> int:
    import experiments.maml as maml
    from bilevel import distributed
    from experiments.__main__ import main

    real = maml.meta_value_and_grad
    calls = {"n": 0}

    def nan_on_rank_1(params, tasks, cfg):
        calls["n"] += 1
        loss, grads = real(params, tasks, cfg)
        if distributed.rank() == 1 and calls["n"] == 2:
            grads = {k: g * float("nan") for k, g in grads.items()}
        return loss, grads

    maml.meta_value_and_grad = nan_on_rank_1
    argv = ["maml", *ARGS, "--methods", "maml-1", "--outer-steps", "3", "--out", str(outdir / "r")]
    return main(argv)


def _csv_only_on_rank_0(outdir: Path) -> int:
    import os

    from experiments.__main__ import main

    # a relative path that exists from rank 0's working folder only (as on two machines)
    os.chdir(outdir / ("data" if os.environ["RANK"] == "0" else "elsewhere"))
    argv = ["argmin-timeseries", *ARGS, "--csv", "prices.csv", "--out", str(outdir / "r")]
    return main(argv)


def _write_csv(folder: Path) -> None:
    import datetime

    folder.mkdir()
    start = datetime.date(2001, 1, 1)
    rows = [
        f"{start + datetime.timedelta(days=i)},1,1,1,{10 + (i * 7) % 11},5,A\n" for i in range(400)
    ]
    (folder / "prices.csv").write_text("Date,Open,High,Low,Close,Volume,Name\n" + "".join(rows))


def test_a_nan_meta_gradient_on_one_rank_stops_every_rank_naming_it(tmp_path):
    cmd = [sys.executable, __file__, "maml_nan", str(tmp_path)]
    codes, _, logs = launch("maml_nan", tmp_path, cmd=cmd)
    assert codes == [3, 3], logs
    rank0 = (tmp_path / "log0.txt").read_text()
    assert "maml-1: the meta-gradient of outer step 2 is not finite on rank 1" in rank0, logs
    assert "Traceback" not in logs and "Connection closed" not in logs, logs


def test_an_error_on_one_rank_only_is_printed_with_its_rank(tmp_path):
    _write_csv(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    cmd = [sys.executable, __file__, "csv_rank0", str(tmp_path)]
    codes, _, logs = launch("csv_rank0", tmp_path, cmd=cmd)
    assert codes == [2, 2], logs
    for r in (0, 1):
        lines = (tmp_path / f"log{r}.txt").read_text().splitlines()
        assert lines == [
            "python -m experiments argmin-timeseries: error: [rank 1/2] --csv prices.csv: "
            "cannot read it (No such file or directory)"
        ], logs
    assert "Traceback" not in logs and "Connection closed" not in logs, logs


def test_every_rank_prints_its_own_error_prefixed_with_its_rank(tmp_path):
    codes, _, logs = launch("fail", tmp_path)  # test_distributed's worker: rank 1 raises
    assert all(c not in (0, None) for c in codes), logs
    rank1 = (tmp_path / "log1.txt").read_text()
    assert "[rank 1/2] ValueError: deliberate failure on rank 1" in rank1, logs
    assert "[rank 0/2] " in (tmp_path / "log0.txt").read_text(), logs  # its own, prefixed


if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    run = {"maml_nan": _maml_nan_on_rank_1, "csv_rank0": _csv_only_on_rank_0}[scenario]
    raise SystemExit(run(out))
