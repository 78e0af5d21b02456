"""The memory measurement of experiments.stateful_memory on a small loop: after the outer
backward, bilevel.stateful holds O(1) copies of the weights, higher one per step."""

import pytest

from bilevel import stateful
from experiments.bench import stateful_memory

higher = pytest.importorskip("higher")


def test_long_loop_memory_after_backward_does_not_grow_with_steps():
    ours = [stateful_memory.run(stateful, steps, 32, collect_each_step=False) for steps in (3, 7)]
    theirs = [
        stateful_memory.run(higher, steps, 32, collect_each_step=False)["after_backward"]
        for steps in (3, 7)
    ]
    weights = ours[0]["param_bytes"]
    after = [r["after_backward"] for r in ours]
    assert after[1] == after[0] <= 4 * weights  # initial + latest weights + gradients
    assert theirs[1] - theirs[0] >= 4 * weights  # higher: every step's weights


def test_no_graph_loop_holds_one_copy():
    r = stateful_memory.run(stateful, 3, 32, track=False)
    assert max(r["steps"].values()) == r["param_bytes"]


@pytest.mark.slow
def test_cli_prints_both_libraries(capsys):
    stateful_memory.main(["--steps", "2", "--width", "8"])
    out = capsys.readouterr().out
    assert "bilevel.stateful" in out and "higher" in out and "post-backward" in out
