"""``python -m experiments.bench.floors``: each floor does the work it stands for."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.bench import floors, implicit_small, jaxopt_peer


def test_cg_loop_floor_solves_the_backward_system() -> None:
    problem = implicit_small.ridge(100, 30, 0)
    X, y = problem.train
    A = X.T @ X / 100 + math.exp(problem.h.item()) * torch.eye(30, dtype=torch.float64)
    w = problem.w_star.detach().clone().requires_grad_()
    b = -torch.autograd.grad(problem.outer(w), w)[0]
    impl, _ = floors._cg_loop(problem)
    x = impl.fn()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=0)
    assert impl.name.startswith("floor: cg loop, ")


def test_evaluations_floor_returns_the_gradient_at_zero() -> None:
    problem = implicit_small.ridge(10, 3, 0)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(problem.inner(w, problem.h.detach()), w)
    impl = floors._evaluations(problem, 4)
    assert impl.name == "floor: 4 evaluations"
    torch.testing.assert_close(impl.fn(), expected, rtol=0, atol=0)


def test_product_floors_agree_across_libraries() -> None:
    impls = floors._products(5)
    names = [impl.name for impl in impls]
    assert names[:2] == ["floor: 5 HVP matmul pairs, torch", "floor: 5 HVP matmul pairs, numpy"]
    assert len(impls) == (3 if jaxopt_peer.peer().available else 2)
    reference = impls[0].fn()
    assert reference.shape == (64, 10)
    norm = torch.linalg.vector_norm(reference).item()
    assert 1e-6 < norm < 1e6  # bounded, and not collapsed to zero
    for impl in impls[1:]:
        torch.testing.assert_close(impl.fn(), reference, rtol=1e-10, atol=1e-12)


def test_quick_run_prints_the_lbfgs_floor(capsys: pytest.CaptureFixture[str]) -> None:
    assert floors.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "== ridge 10x3 (3 unknowns) ==" in out
    line = next(x for x in out.splitlines() if x.startswith("lbfgs: floor "))
    floor = float(line.split()[2].rstrip("x,"))
    assert math.isfinite(floor) and floor > 0
    assert "failed" not in out


def test_repeats_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        floors.main(["--repeats", "0"])


def test_imaml_floor_makes_each_tasks_hessian_products() -> None:
    """The iMAML floor's stacked products are each task's Hessian-vector product of its
    proximal loss (against forward-over-reverse on one task), and the counts are the
    slowest task's solves."""
    from experiments import maml as experiment
    from experiments.bench import maml as bench_maml

    cfg, params, tasks = bench_maml.imaml_setup(3, torch.float64, torch.device("cpu"), 0)
    k, j = floors._imaml_counts(cfg, params, tasks)
    assert k > 1 and j > 1
    impl = floors._imaml_floor(cfg, params, tasks, 2, 1)
    out = impl.fn()
    lam, act = cfg["imaml_lambda"], cfg["activation"]
    names = list(params)
    n = sum(v.numel() for v in params.values())
    for i in range(3):

        def grad(w, i=i):
            loss = lambda w: experiment._prox_loss(lam, act, w, params, (tasks[0][i], tasks[1][i]))  # noqa: E731
            return torch.func.grad(loss)(w)

        w = {k_: v.detach() for k_, v in params.items()}
        ones = {k_: torch.ones_like(v) for k_, v in w.items()}
        _, hv = torch.func.jvp(grad, (w,), (ones,))
        expected = torch.cat([hv[k_].reshape(-1) for k_ in names])
        # the floor's output: the leaves' products one after the other, each (B, ...)
        got = torch.cat(
            [
                part.reshape(3, -1)[i]
                for part in torch.split(out, [3 * params[k_].numel() for k_ in names])
            ]
        )
        assert got.shape == (n,)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
