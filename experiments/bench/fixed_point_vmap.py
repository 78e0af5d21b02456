"""Micro-benchmark: a stack of fixed-point problems under ``vmap`` against a loop of calls.

    python -m experiments.bench.fixed_point_vmap [--batch 25] [--sizes 50 200 500]
        [--families shared own] [--repeats 5]

``B`` problems of ``n`` unknowns (float64, one thread), solved to ``tol = 1e-10`` by
:func:`bilevel.solvers.fixed_point_iteration` and :func:`bilevel.solvers.anderson`, each
problem with its own hyperparameter ``h_i`` and its own rate, so the problems need different
iteration counts. Two families:

* ``shared`` (a deep-equilibrium layer over a batch of inputs): ``w = (1 - d_i) w + d_i
  tanh(A w + h_i x_i)``, one matrix ``A`` (spectral radius 0.9) for all, its own input
  ``x_i`` and damping ``d_i`` in 0.2-0.8 per problem: under vmap the products are one
  matrix-matrix product;
* ``own``: ``w = w - eta_i (A_i w - b_i + h_i w + 0.1 tanh(w))``, a dense SPD ``A_i`` per
  problem (condition number 4-20): under vmap a batched matrix-vector product, which reads
  every matrix once per pass as the loop does (memory-bound: the worst case for batching).

Two rows per solver, family and size:

* ``solver``: ``solve_batch`` of the stack (the map vmapped over the problems) against a
  loop of single solver calls;
* ``layer``: the hypergradient ``d sum_i ||w_i||^2 / dh`` through :func:`bilevel.fixed_point`,
  ``torch.func.vmap`` of the layer against a Python loop of layer calls (forward and backward).

Before timing, the batched answers are compared with the loop's (maximum absolute difference
of the solutions and hypergradients, and whether every problem took the same iteration count
as its single call); a difference above 1e-12, or a solve that did not converge, is printed
and makes the command exit with status 1. Times are medians of interleaved repeats of the
process CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import bilevel
from bilevel import solvers

D = torch.float64
TOL = 1e-10
Data = tuple[Tensor, ...]


def own_problems(batch: int, n: int, seed: int = 0) -> tuple[Tensor, Data]:
    """``(h, (A, b, eta))``: SPD ``A_i`` with eigenvalues in ``[1, kappa_i]``, kappa_i in 4-20."""
    g = torch.Generator().manual_seed(seed)
    As = []
    kappas = torch.linspace(4.0, 20.0, batch, dtype=D)[torch.randperm(batch, generator=g)]
    for kappa in kappas:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
        ev = torch.linspace(1.0, float(kappa), n, dtype=D)
        As.append((Q * ev) @ Q.T)
    b = torch.randn(batch, n, generator=g, dtype=D)
    h = torch.rand(batch, generator=g, dtype=D) + 0.1
    return h, (torch.stack(As), b, 1.0 / (kappas + 2.0))


def own_step(w: Tensor, h: Tensor, d: Data) -> Tensor:
    A, b, eta = d
    return w - eta * (A @ w - b + h * w + 0.1 * torch.tanh(w))


def shared_problems(batch: int, n: int, seed: int = 0) -> tuple[Tensor, Data]:
    """``(h, (A, x, damping))``: one ``A`` with eigenvalues in [-0.9, 0.9] for all problems."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (Q * torch.linspace(-0.9, 0.9, n, dtype=D)) @ Q.T
    x = torch.randn(batch, n, generator=g, dtype=D)
    h = torch.rand(batch, generator=g, dtype=D) + 0.5
    damping = torch.linspace(0.2, 0.8, batch, dtype=D)[torch.randperm(batch, generator=g)]
    return h, (A.expand(batch, n, n), x, damping)


def shared_step(w: Tensor, h: Tensor, d: Data) -> Tensor:
    A, x, damping = d
    return (1 - damping) * w + damping * torch.tanh(A @ w + h * x)


FAMILIES: dict[str, tuple[Callable[[int, int], tuple[Tensor, Data]], Callable[..., Tensor]]] = {
    "shared": (shared_problems, shared_step),
    "own": (own_problems, own_step),
}
# in_dims of the data: the shared matrix is not batched
DATA_DIMS: dict[str, tuple[int | None, ...]] = {"shared": (None, 0, 0), "own": (0, 0, 0)}


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        names = list(fns)
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate who starts
            t0 = time.process_time()
            fns[k]()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _data(family: str, data: Data) -> Data:
    """The data as vmap takes it: a shared matrix once, the rest stacked."""
    return tuple(t[0] if d is None else t for t, d in zip(data, DATA_DIMS[family]))


def _solver_fns(
    solver: Any, family: str, h: Tensor, data: Data
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    step = FAMILIES[family][1]
    B, n = data[1].shape
    stacked = torch.func.vmap(lambda w, h, d: step(w, h, d), in_dims=(0, 0, DATA_DIMS[family]))
    vdata = _data(family, data)

    def batched() -> tuple[Tensor, list[Any]]:
        return solver.solve_batch(lambda W: stacked(W, h, vdata), torch.zeros(B, n, dtype=D))

    def loop() -> tuple[Tensor, list[Any]]:
        out = [
            solver(lambda w, i=i: step(w, h[i], tuple(t[i] for t in data)), torch.zeros(n, dtype=D))
            for i in range(B)
        ]
        return torch.stack([w for w, _ in out]), [info for _, info in out]

    return batched, loop


def _layer_fns(
    solver: Any, family: str, h: Tensor, data: Data
) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    step = FAMILIES[family][1]
    B, n = data[1].shape
    vdata = _data(family, data)

    def layer(h: Tensor, d: Data) -> Tensor:
        return bilevel.fixed_point(step, torch.zeros(n, dtype=D), h, d, solver=solver)

    def batched() -> Tensor:
        hv = h.clone().requires_grad_(True)
        w = torch.func.vmap(layer, in_dims=(0, DATA_DIMS[family]))(hv, vdata)
        return torch.autograd.grad((w**2).sum(), hv)[0]

    def loop() -> Tensor:
        hv = h.clone().requires_grad_(True)
        w = torch.stack([layer(hv[i], tuple(t[i] for t in data)) for i in range(B)])
        return torch.autograd.grad((w**2).sum(), hv)[0]

    return batched, loop


SOLVERS: dict[str, Callable[[], Any]] = {
    "fixed_point_iteration": lambda: solvers.fixed_point_iteration(tol=TOL, maxiter=20000),
    "anderson": lambda: solvers.anderson(tol=TOL, maxiter=2000),
}


def run(
    batch: int, sizes: Sequence[int], repeats: int, names: Sequence[str], families: Sequence[str]
) -> bool:
    """Print the table; returns whether every batched answer agreed with the loop's."""
    torch.set_num_threads(1)
    ok = True
    print(
        f"{batch} fixed-point problems, float64, tol {TOL:g}, 1 thread: batched (vmap / "
        "solve_batch) against a loop of single calls; medians of process CPU time"
    )
    header = (
        f"{'solver':<22} {'family':<7} {'n':>4} {'row':<7} {'iterations':>11} "
        f"{'batched':>10} {'loop':>10} {'speed-up':>9} {'max diff':>9} {'same its':>8}"
    )
    print(header)
    print("-" * len(header))
    for family in families:
        for n in sizes:
            h, data = FAMILIES[family][0](batch, n)
            for name in names:
                solver = SOLVERS[name]()
                head = f"{name:<22} {family:<7} {n:>4}"
                batched, loop = _solver_fns(solver, family, h, data)
                (Wb, ib), (Wl, il) = batched(), loop()
                diff = float((Wb - Wl).abs().max())
                same = all(x.iterations == y.iterations for x, y in zip(ib, il))
                its = [x.iterations for x in il]
                ok &= diff <= 1e-12 and same and all(x.converged for x in ib)
                t = _median_times({"batched": batched, "loop": loop}, repeats)
                print(
                    f"{head} {'solver':<7} {f'{min(its)}-{max(its)}':>11} "
                    f"{t['batched'] * 1e3:>8.1f}ms {t['loop'] * 1e3:>8.1f}ms "
                    f"{t['loop'] / t['batched']:>8.1f}x {diff:>9.1e} {str(same):>8}"
                )
                lb, ll = _layer_fns(solver, family, h, data)
                gdiff = float((lb() - ll()).abs().max())
                ok &= gdiff <= 1e-12
                t = _median_times({"batched": lb, "loop": ll}, repeats)
                print(
                    f"{head} {'layer':<7} {'':>11} "
                    f"{t['batched'] * 1e3:>8.1f}ms {t['loop'] * 1e3:>8.1f}ms "
                    f"{t['loop'] / t['batched']:>8.1f}x {gdiff:>9.1e} {'':>8}"
                )
    if not ok:
        print(
            "FAILED: a batched answer differs from the loop's (max diff, same its) or a solve "
            "did not converge"
        )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=list(SOLVERS))
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or any(n < 1 for n in args.sizes):
        parser.error("--batch, --repeats and --sizes must be positive")
    ok = run(args.batch, args.sizes, args.repeats, args.solvers, args.families)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
