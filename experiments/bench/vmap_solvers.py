"""The stacked inner solvers under ``vmap`` against a loop of separate calls.

    python -m experiments.bench.vmap_solvers [--batch 25] [--sizes 50,500] [--repeats 5]

``B`` logistic regressions (100 samples, ``p`` unknowns, float64, one thread) with their
own labels and L2 weight, and their own design (``own``) or one design shared by all
(``shared``: ``in_dims=None``, a regularisation path), each solved to tol 1e-8 by ``gradient_descent`` (SGD,
lr 0.5), ``newton_cg``, ``constraints.projected_gradient`` (w >= 0) and
``proximal_gradient`` (lasso):

* ``solve``: the solver's ``solve_batch`` on the stack against a loop of single calls;
* ``layer``: ``vmap`` of the layer (``argmin``, ``projected_argmin``,
  ``proximal_argmin``) with its backward pass to the per-task weights against a loop of
  layer calls and backward passes.

Before timing, every element of the stack is checked against its own call (solution,
iterations, hypergradient); the largest difference is printed. Times are medians of
interleaved repeats of the process CPU time (robust to other processes on the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import bilevel
from bilevel import constraints, solvers
from bilevel.solvers.proximal_gradient import Composite

D = torch.float64


def _data(
    batch: int, p: int, seed: int, shared: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Own data per task ``X (B, m, p)``, or one design ``X (m, p)`` shared by all (a
    regularisation path: per-task labels and weights); ``m = 100`` samples."""
    g = torch.Generator().manual_seed(seed)
    m = 100
    X = torch.randn(*(() if shared else (batch,)), m, p, generator=g, dtype=D)
    y = (torch.rand(batch, m, generator=g, dtype=D) > 0.5).to(D)
    h = 0.2 + torch.rand(batch, generator=g, dtype=D)  # per-task L2: different conditioning
    return X, y, h


def _loss(w: torch.Tensor, h: torch.Tensor, d: Any) -> torch.Tensor:
    X, y = d
    z = X @ w
    return F.softplus(z).mean() - (y * z).mean() + 0.5 * h * (w @ w)


def _cases(p: int) -> dict[str, tuple[Any, Callable[..., torch.Tensor]]]:
    """name -> (solver, layer(X, y, h))."""
    gd = solvers.gradient_descent(bilevel.optim.sgd(lr=0.5), tol=1e-8, maxiter=5000)
    newton = solvers.newton_cg(tol=1e-8)
    proj = constraints.projected_gradient(
        constraints.project_nonnegative, 0.5, tol=1e-8, maxiter=5000
    )
    prox = solvers.proximal_gradient(tol=1e-8)
    zero = torch.zeros(p, dtype=D)

    def argmin_with(solver: Any) -> Callable[..., torch.Tensor]:
        return lambda X, y, h: bilevel.argmin(_loss, zero, h, (X, y), solver=solver)

    def projected(X: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return constraints.projected_argmin(
            _loss,
            zero,
            h,
            (X, y),
            projection=constraints.project_nonnegative,
            step_size=0.5,
            solver=proj,
        )

    def proximal(X: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return bilevel.proximal_argmin(
            _loss, zero, h, (X, y), prox=bilevel.prox.lasso, prox_hparams=0.02 * h, solver=prox
        )

    return {
        "gradient_descent": (gd, argmin_with(gd)),
        "newton_cg": (newton, argmin_with(newton)),
        "projected_gradient": (proj, projected),
        "proximal_gradient": (prox, proximal),
    }


def _solve_fns(name: str, solver: Any, X: torch.Tensor, y: torch.Tensor, h: torch.Tensor):
    """(stacked, loop) forward solves, each returning (solutions, iteration counts)."""
    B, p = y.shape[0], X.shape[-1]
    shared = X.ndim == 2
    init = torch.zeros(B, p, dtype=D)
    values = torch.func.vmap(
        lambda w, h, X, y: _loss(w, h, (X, y)), in_dims=(0, 0, None if shared else 0, 0)
    )

    def one(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: _loss(w, h[i], (X if shared else X[i], y[i]))

    if name == "proximal_gradient":
        lasso = 0.02 * h

        def stacked() -> tuple[torch.Tensor, list[int]]:
            target = Composite(
                lambda W: values(W, h, X, y),
                lambda W, s: bilevel.prox.lasso(W, lasso[:, None], s[:, None]),
                batch=B,
            )
            W, infos = solver.solve_batch(target, init)
            return W, [i.iterations for i in infos]

        def loop() -> tuple[torch.Tensor, list[int]]:
            out = [
                solver(
                    Composite(one(i), lambda w, s, i=i: bilevel.prox.lasso(w, lasso[i], s)),
                    init[i],
                )
                for i in range(B)
            ]
            return torch.stack([w for w, _ in out]), [info.iterations for _, info in out]

        return stacked, loop

    part: list[Any] = [None]

    def selectable(W: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # the problems `rows` only, as the vmap rule's stacks offer: stopped ones are skipped
        if rows is None:
            return values(W, h, X, y)
        if part[0] is None or part[0][0] is not rows:  # sliced once per subset
            part[0] = (rows, h[rows], X if shared else X[rows], y[rows])
        return values(W, *part[0][1:])

    selectable.selectable = True  # type: ignore[attr-defined]

    def stacked() -> tuple[torch.Tensor, list[int]]:
        W, infos = solver.solve_batch(selectable, init)
        return W, [i.iterations for i in infos]

    def loop() -> tuple[torch.Tensor, list[int]]:
        out = [solver(one(i), init[i]) for i in range(B)]
        return torch.stack([w for w, _ in out]), [info.iterations for _, info in out]

    return stacked, loop


def _layer_fns(layer: Callable[..., torch.Tensor], X: torch.Tensor, y: torch.Tensor, h):
    """(vmapped, loop) hypergradients of sum ||w_i||^2 with respect to the per-task h."""

    shared = X.ndim == 2
    stacked = torch.func.vmap(layer, in_dims=(None if shared else 0, 0, 0))

    def vmapped() -> torch.Tensor:
        hv = h.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((stacked(X, y, hv) ** 2).sum(), hv)
        return g

    def loop() -> torch.Tensor:
        gs = []
        for i in range(y.shape[0]):
            hi = h[i].clone().requires_grad_(True)
            (gi,) = torch.autograd.grad((layer(X if shared else X[i], y[i], hi) ** 2).sum(), hi)
            gs.append(gi)
        return torch.stack(gs)

    return vmapped, loop


def _median_cpu(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.process_time()
            f()
            times[i].append(time.process_time() - t0)
    return [statistics.median(t) for t in times]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # a truncated solve would warn
    print(
        f"B = {args.batch} problems, float64, {args.threads} thread(s), CPU-time medians of "
        f"{args.repeats} interleaved repeats"
    )
    print(
        f"{'solver':20s} {'data':6s} {'p':>4s} {'what':6s} {'stack':>9s} {'loop':>9s} "
        f"{'speed-up':>8s} {'iterations':>11s} {'max diff':>9s}"
    )
    status = 0
    for data, p in [(d, p) for d in args.data for p in args.sizes]:
        X, y, h = _data(args.batch, p, args.seed, data == "shared")
        for name, (solver, layer) in _cases(p).items():
            if args.only and name not in args.only:
                continue
            stacked, loop = _solve_fns(name, solver, X, y, h)
            (Ws, its), (Wl, itl) = stacked(), loop()
            diff = float((Ws - Wl).abs().max())
            ok = its == itl and diff < 1e-10
            status |= not ok
            ts, tl = _median_cpu([stacked, loop], args.repeats)
            span = f"{min(its)}-{max(its)}"
            flag = "" if ok else "  MISMATCH"
            print(
                f"{name:20s} {data:6s} {p:4d} {'solve':6s} {ts * 1e3:7.1f}ms {tl * 1e3:7.1f}ms "
                f"{tl / ts:7.1f}x {span:>11s} {diff:9.1e}{flag}"
            )
            vmapped, loop_layer = _layer_fns(layer, X, y, h)
            diff = float((vmapped() - loop_layer()).abs().max())
            status |= not diff < 1e-8
            tv, tl = _median_cpu([vmapped, loop_layer], args.repeats)
            print(
                f"{'':20s} {data:6s} {p:4d} {'layer':6s} {tv * 1e3:7.1f}ms {tl * 1e3:7.1f}ms "
                f"{tl / tv:7.1f}x {'':>11s} {diff:9.1e}"
            )
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[50, 500])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        nargs="+",
        choices=["own", "shared"],
        default=["own", "shared"],
        help="own data per task, or one design shared by the tasks (in_dims None)",
    )
    parser.add_argument("--only", nargs="*", help="solver names to run (default: all)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
