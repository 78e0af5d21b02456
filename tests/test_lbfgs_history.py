"""The stack's compact-form directions: every row is the single problem's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel.solvers._lbfgs_history import _History
from bilevel.solvers._lbfgs_single import _Ring


def _pairs(count: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` curvature pairs ``[s; y]`` with ``s^T y > 0`` (``y = A s``, A positive definite)."""
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    out = []
    for _ in range(count):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        out.append(torch.stack([s, A @ s]).to(dtype))
    return out


def _filled(counts, m, n, gen, dtype):
    """A stack history and one single ring per row, each row pushed its own ``counts[i]``
    random pairs (rows stop pushing as their counts run out)."""
    B = len(counts)
    hist = _History(B, m, n, torch.zeros(1, dtype=dtype))
    rings = [_Ring(m, n, torch.zeros(1, dtype=dtype)) for _ in range(B)]
    pairs = [_pairs(c, n, gen, dtype) for c in counts]
    for k in range(max(counts)):
        mask = np.array([k < c for c in counts])
        sy = torch.stack(
            [pairs[i][k] if k < counts[i] else torch.zeros(2, n, dtype=dtype) for i in range(B)]
        )
        hist.push(mask, sy, hist.used())
        for i in np.flatnonzero(mask):
            rings[i].push(pairs[i][k])
    return hist, rings


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_of_a_stack_with_many_pairs_get_their_single_directions_bit_for_bit(dtype):
    """Rows holding the same odd number (>= 9) of pairs, in a stack of 16: a batched
    triangular solve rounded some rows by their place in the batch (measured: 1-11 of 16-25
    rows differed); each row must be the direction its own ring gives."""
    gen = torch.Generator().manual_seed(3)
    B, m, n = 16, 20, 40
    counts = [11] * 12 + [9, 13, 15, 11]
    hist, rings = _filled(counts, m, n, gen, dtype)
    g = torch.randn(B, n, generator=gen, dtype=torch.float64).to(dtype)
    d = hist.direction(g, np.ones(B, dtype=bool))
    for i in range(B):
        assert torch.equal(d[i : i + 1], rings[i].direction(g[i : i + 1])), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_rows_pushing_or_wanted_are_made_apart_bit_for_bit(dtype):
    """Pushes by few rows, directions wanted for few rows and counts held by few rows are
    made on those rows only (full rings that went round among them): each wanted row must
    still be its own ring's direction."""
    gen = torch.Generator().manual_seed(4)
    B, m, n = 10, 6, 30
    counts = [9, 2, 3, 3, 7, 1, 4, 8, 2, 5]  # late pushes come from few rows
    hist, rings = _filled(counts, m, n, gen, dtype)
    g = torch.randn(B, n, generator=gen, dtype=torch.float64).to(dtype)
    for wanted in ([0, 4, 7], [1, 2, 3, 6, 8, 9], list(range(B))):
        which = np.isin(np.arange(B), wanted)
        d = hist.direction(g, which)
        for i in wanted:
            assert torch.equal(d[i : i + 1], rings[i].direction(g[i : i + 1])), (wanted, i)
