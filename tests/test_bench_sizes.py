"""The bench's sizes: CPU defaults, the GPU defaults (``--device cuda``: sized for about five
minutes on one GPU), ``--quick``, and explicit options, which always win."""

import json

import pytest
import torch

from experiments import bench
from experiments.bench.settings import build_parser, settings_from


def _settings(*argv):
    return settings_from(build_parser().parse_args(list(argv)))


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cpu_defaults():
    s = _settings("all")
    assert s.device == torch.device("cpu")
    assert (s.repeats, s.steps, s.memory_steps) == (5, [10, 50, 200], [10, 100, 1000])
    assert s.features == [1000, 10_000, 100_000, 1_000_000]
    assert s.meta_batches == [32]


def test_cuda_defaults_reach_the_large_sizes(fake_cuda):
    s = _settings("all", "--device", "cuda")
    assert s.device == torch.device("cuda")
    assert s.repeats == 3
    assert s.features == [1000, 10_000, 100_000, 1_000_000, 10_000_000]
    assert s.meta_batches == [32, 1024]
    assert (s.steps, s.memory_steps) == ([10, 50, 200], [10, 100, 1000])


def test_quick_and_explicit_options_win_on_cuda(fake_cuda):
    quick = _settings("all", "--device", "cuda", "--quick")
    assert (quick.repeats, quick.features, quick.meta_batches) == (1, [300], [4])
    s = _settings(
        "maml", "--device", "cuda", "--meta-batch", "8,64", "--features", "1e4", "--repeats", "7"
    )
    assert (s.meta_batches, s.features, s.repeats) == ([8, 64], [10_000], 7)


def test_bad_meta_batch_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["maml", "--meta-batch", "0"])
    assert err.value.code == 2
    assert "--meta-batch" in capsys.readouterr().err


def test_maml_runs_every_meta_batch(tmp_path):
    path = tmp_path / "bench.json"
    assert bench.main(["maml", "--quick", "--meta-batch", "2,3", "--json", str(path)]) == 0
    rows = [r for r in json.loads(path.read_text())["rows"] if r["problem"] == "maml"]
    assert {r["meta_batch"] for r in rows} == {2, 3}
    assert all(r["agree"] is not False for r in rows)
