"""bilevel.qp under torch.func: jacrev (a vmap over cotangents in the backward) equals a loop
of reverse passes, float64."""

from __future__ import annotations

import pytest
import torch

import bilevel

DT = torch.float64


@pytest.mark.parametrize("rows", [[], [0, 1, 2], [0, 1, 2, 2]])
def test_jacrev_equals_a_loop_of_backward_passes(rows):
    """jacrev runs the KKT backward once with the cotangents batched by vmap: without
    inequalities it reuses the forward's LU (lu_solve of an unbatched LU against batched
    right-hand sides), with them it solves the active-set KKT matrix (singular when a bound
    is given twice: the least-squares answer, chosen without a host read)."""
    Q = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 1.5]], dtype=DT)
    A = torch.ones(1, 3, dtype=DT)
    b = torch.ones(1, dtype=DT)
    mi = len(rows)
    G = -torch.eye(3, dtype=DT)[rows]
    h = torch.zeros(mi, dtype=DT)

    def layer(p):
        return bilevel.qp(Q, p, A, b, G, h) if mi else bilevel.qp(Q, p, A, b)

    p = torch.tensor([-0.2, -0.1, 0.8], dtype=DT)  # with bounds, only x_2 >= 0 is active
    jac = torch.func.jacrev(layer)(p)
    leaf = p.clone().requires_grad_()
    x = layer(leaf)
    looped = torch.stack([torch.autograd.grad(x[i], leaf, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(jac, looped, rtol=1e-10, atol=1e-12)
    assert (looped[1] - looped[0]).abs().max() > 0.1  # the rows differ: a real Jacobian
    if mi:
        assert bool(x.detach()[2].abs() < 1e-8) and looped[2].abs().max() < 1e-8  # at its bound
        assert bool(x.detach()[:2].min() > 0.1)  # the others are free


def _batch_of_problems():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(4, 3, 3, generator=g, dtype=DT)
    Q = M @ M.mT + torch.eye(3, dtype=DT)
    p = torch.randn(4, 3, generator=g, dtype=DT)
    G, h = -torch.eye(3, dtype=DT), torch.zeros(3, dtype=DT)
    return Q, p, G, h


def test_vmap_and_jacfwd_are_refused_early_naming_what_works():
    """qp is batched itself; under vmap it raises before any solve, naming the
    leading-batch-dimension call, which gives each problem its own answer; jacfwd raises
    naming reverse mode."""
    Q, p, G, h = _batch_of_problems()
    with pytest.raises(RuntimeError, match="leading batch dimension"):
        torch.func.vmap(lambda Qi, pi: bilevel.qp(Qi, pi, G=G, h=h))(Q, p)
    with pytest.raises(RuntimeError, match="jacrev"):  # its tangents are seen first
        torch.func.jacfwd(lambda pi: bilevel.qp(Q[0], pi, G=G, h=h))(p[0])
    batched = bilevel.qp(Q, p, G=G, h=h)  # the call the message names
    for i in range(4):
        torch.testing.assert_close(batched[i], bilevel.qp(Q[i], p[i], G=G, h=h), rtol=0, atol=1e-12)


def test_forward_mode_is_refused_naming_reverse_mode():
    Q, p, G, h = _batch_of_problems()
    with pytest.raises(RuntimeError, match="jacrev"):
        torch.func.jvp(
            lambda pi: bilevel.qp(Q[0], pi, G=G, h=h), (p[0],), (torch.ones(3, dtype=DT),)
        )
