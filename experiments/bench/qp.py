"""Bench problem ``qp``: a batched QP layer's forward + backward against qpth and cvxpylayers.

``python -m experiments.bench.qp [--batches 1,64,512] [--sizes 10,50,200] [--device cpu]``

Random strictly convex QPs with ``n`` variables, ``n // 10`` (at least 1) equalities and
``n`` inequalities (about half active at the solution), float64, the same tensors for every
implementation. Timed: the solve and one backward of ``sum(w * x)`` w.r.t. every input.
Before timing, every implementation's solution and gradients are compared with bilevel's;
on a disagreement a central finite difference (w.r.t. ``p`` and ``h``) decides: a peer
that is wrong is printed as ``WRONG grad`` and not timed; the command exits 1 when
bilevel's gradient is the one off. Times are medians of ``--repeats``
rounds after a warm-up (the agreement check), implementations interleaved within each
round; rounds stop once one takes more than ``--budget`` seconds. cvxpylayers is skipped for a
configuration when its estimated time exceeds ``--cvx-max`` seconds (it solves the batch
element by element with a conic solver on the host).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import bilevel

Inputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def random_qp(batch: int, n: int, seed: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    me = max(1, n // 10)
    L = torch.randn(batch, n, n, generator=g, dtype=dt) / n**0.5
    Q = L @ L.mT + 0.1 * torch.eye(n, dtype=dt)
    p = torch.randn(batch, n, generator=g, dtype=dt)
    A = torch.randn(batch, me, n, generator=g, dtype=dt)
    x0 = torch.randn(batch, n, generator=g, dtype=dt)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    G = torch.randn(batch, n, n, generator=g, dtype=dt)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, n, generator=g, dtype=dt)
    return tuple(t.to(device) for t in (Q, p, A, b, G, h))  # type: ignore[return-value]


def _bilevel(data: Inputs) -> Tensor:
    x = bilevel.qp(*data)
    assert isinstance(x, Tensor)
    return x


def _qpth(data: Inputs) -> Tensor:
    from qpth.qp import QPFunction

    Q, p, A, b, G, h = data
    return QPFunction(verbose=-1, eps=1e-10, maxIter=50, check_Q_spd=False)(Q, p, G, h, A, b)


def _cvx_layer(n: int, me: int) -> Callable[[Inputs], Tensor]:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    params = [cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((me, n)), cp.Parameter(me)]
    params += [cp.Parameter((n, n)), cp.Parameter(n)]
    Lp, pp, Ap, bp, Gp, hp = params
    # Q = L'L through a DPP parametrisation (quad_form(x, Q) with Q a parameter is not DPP)
    objective = cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + pp @ x)
    layer = CvxpyLayer(cp.Problem(objective, [Ap @ x == bp, Gp @ x <= hp]), params, [x])

    def solve(data: Inputs) -> Tensor:
        Q, *rest = data
        L = torch.linalg.cholesky(Q).mT  # Q = L'L: gradients reach Q through L
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return layer(L, *rest, solver_args={"eps": 1e-10})[0]

    return solve


def forward_backward(
    fn: Callable[[Inputs], Tensor], data: Inputs, weight: Tensor
) -> tuple[Tensor, list[Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in data]
    x = fn(tuple(leaves))  # type: ignore[arg-type]
    (x * weight).sum().backward()
    return x.detach(), [t.grad for t in leaves]  # type: ignore[misc]


def _interleaved_medians(
    fns: dict[str, Callable[[Inputs], Tensor]],
    data: Inputs,
    weight: Tensor,
    repeats: int,
    budget: float,
) -> dict[str, float]:
    """Median seconds per implementation, repeats interleaved (the warm-up was the agreement
    check); once a round exceeds ``budget`` seconds in total, no further rounds are run."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        start_round = time.perf_counter()
        for name, fn in fns.items():
            t0 = time.perf_counter()
            forward_backward(fn, data, weight)
            if data[0].is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start_round > budget:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def _agree(ref: tuple[Tensor, list[Tensor]], got: tuple[Tensor, list[Tensor]]) -> float:
    """Largest relative difference over the solution and the six gradients."""
    worst = 0.0
    for a, b in zip([ref[0], *ref[1]], [got[0], *got[1]]):
        worst = max(worst, float((a - b).abs().max() / (1 + a.abs().max())))
    return worst


def _fd_error(data: Inputs, weight: Tensor, grads: list[Tensor]) -> float:
    """Relative error of ``grads`` (w.r.t. p and h) against a central finite difference
    of bilevel's accurate (augmented-system) solution along one random direction."""
    gen = torch.Generator().manual_seed(7)
    dp = torch.randn(data[1].shape, generator=gen, dtype=torch.float64).to(data[1].device)
    dh = torch.randn(data[5].shape, generator=gen, dtype=torch.float64).to(data[5].device)
    solver = bilevel.qp.interior_point(system="augmented")  # type: ignore[attr-defined]
    eps = 1e-6

    def f(sign: float) -> float:
        Q, p, A, b, G, h = data
        x = bilevel.qp(Q, p + sign * eps * dp, A, b, G, h + sign * eps * dh, solver=solver)
        return float((x * weight).sum())  # type: ignore[operator]

    fd = (f(1.0) - f(-1.0)) / (2 * eps)
    got = float((grads[1] * dp).sum() + (grads[5] * dh).sum())
    return abs(got - fd) / (1 + abs(fd))


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    impls: dict[str, Any] = {"bilevel": _bilevel}
    try:
        import qpth  # noqa: F401

        impls["qpth"] = _qpth
    except ImportError:
        print("qpth not installed: skipped")
    try:
        import cvxpylayers  # noqa: F401

        have_cvx = True
    except ImportError:
        have_cvx, _ = False, print("cvxpylayers not installed: skipped")
    print(
        f"torch {torch.__version__}, device {device}, {args.threads} thread(s), float64, "
        f"median of {args.repeats} after a warm-up; forward + backward (all six inputs)"
    )
    header = f"{'batch':>5} {'n':>4} | " + " | ".join(
        f"{name:>22}" for name in ["bilevel", "qpth", "cvxpylayers"]
    )
    print(header)
    print("-" * len(header))
    failed = False
    for n in args.sizes:
        for batch in args.batches:
            data = random_qp(batch, n, seed=batch * 1000 + n, device=device)
            weight = torch.randn(
                batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
            ).to(device)
            ref = forward_backward(_bilevel, data, weight)
            cells = {}
            fns = dict(impls)
            if have_cvx and device.type == "cpu":
                cvx = _cvx_layer(n, max(1, n // 10))
                one = tuple(t[:1] for t in data)
                t0 = time.perf_counter()
                forward_backward(cvx, one, weight[:1])  # type: ignore[arg-type]
                estimate = (time.perf_counter() - t0) * batch
                if estimate <= args.cvx_max:
                    fns["cvxpylayers"] = cvx
                else:
                    cells["cvxpylayers"] = f"skip (est. {estimate:.0f} s)"
            timed = {"bilevel": _bilevel}
            for name, fn in fns.items():
                if name != "bilevel":
                    got = forward_backward(fn, data, weight)
                    err = _agree(ref, got)
                    if err > args.rtol:
                        # who is right? a finite difference decides
                        ours, theirs = (
                            _fd_error(data, weight, ref[1]),
                            _fd_error(data, weight, got[1]),
                        )
                        failed = failed or ours > args.rtol
                        cells[name] = (
                            f"WRONG grad (FD {theirs:.0e})"
                            if theirs > args.rtol and ours <= args.rtol
                            else f"DISAGREES ({err:.1e})"
                        )
                        continue
                    timed[name] = fn
            for name, t in _interleaved_medians(
                timed, data, weight, args.repeats, args.budget
            ).items():
                cells[name] = f"{1000 * t:9.1f} ms"
            base = cells.get("bilevel", "")
            row = f"{batch:>5} {n:>4} | {base:>22}"
            for name in ("qpth", "cvxpylayers"):
                cell = cells.get(name, "-")
                row += f" | {cell:>22}"
            print(row, flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.qp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ints = lambda t: [int(v) for v in t.split(",")]  # noqa: E731
    parser.add_argument("--batches", type=ints, default=[1, 64, 512])
    parser.add_argument("--sizes", type=ints, default=[10, 50, 200])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--cvx-max", type=float, default=120.0)
    parser.add_argument("--rtol", type=float, default=1e-4)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
