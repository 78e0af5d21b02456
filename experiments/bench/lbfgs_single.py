"""The cost of one ``solvers.lbfgs`` call, against another checkout of bilevel.

``python -m experiments.bench.lbfgs_single [--reference PATH] [--repeats 21] [--rounds 3]``:
L-BFGS to gradient norm 1e-10 (float64, 1 thread) on ridge + quartic problems with 3, 30
and 300 unknowns, ``0.5 ||A w - c||^2 + 0.1 ||w||^2 + 0.01 sum w^4`` from zero. Prints the
median milliseconds per call, this process's CPU time (steadier than wall-clock on a shared
machine), and the iterations / evaluations. With ``--reference`` (the root of another
checkout, e.g. a ``git worktree`` of an older commit) each round runs both in fresh
processes, alternately, and prints their ratio: how the same call's cost changed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = (3, 30, 300)


def measure(repeats: int) -> dict[int, tuple[float, int, int]]:
    """ms per call (median CPU time), iterations and evaluations, for every size."""
    import torch

    from bilevel import solvers

    torch.set_num_threads(1)
    out = {}
    for n in SIZES:
        g = torch.Generator().manual_seed(0)
        A = torch.eye(n, dtype=torch.float64)
        A = A + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        c = torch.randn(n, generator=g, dtype=torch.float64)

        def loss(w: torch.Tensor, A: torch.Tensor = A, c: torch.Tensor = c) -> torch.Tensor:
            return 0.5 * ((A @ w - c) ** 2).sum() + 0.1 * (w**2).sum() + 0.01 * (w**4).sum()

        solver = solvers.lbfgs(tol=1e-10)
        w0 = torch.zeros(n, dtype=torch.float64)
        _, info = solver(loss, w0)
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            solver(loss, w0)
            times.append(time.thread_time() - start)
        out[n] = (1e3 * statistics.median(times), info.iterations, info.evaluations)
    return out


def _child(root: str, repeats: int) -> dict[int, tuple[float, int, int]]:
    """``measure`` in a fresh process importing the bilevel found at ``root`` (this file's
    code is loaded by path, so a reference checkout may predate it)."""
    code = (
        "import importlib.util, json, sys; sys.path.insert(0, sys.argv[1]); "
        "import bilevel; assert bilevel.__file__.startswith(sys.argv[1]), bilevel.__file__; "
        "spec = importlib.util.spec_from_file_location('lbfgs_single', sys.argv[3]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "print(json.dumps(module.measure(int(sys.argv[2]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, os.path.abspath(root), str(repeats), __file__],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=root,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return {int(k): (float(v[0]), int(v[1]), int(v[2])) for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="root of another bilevel checkout to compare with")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows: dict[str, list[dict[int, tuple[float, int, int]]]] = {"this": [], "reference": []}
    for _ in range(args.rounds):
        rows["this"].append(_child(here, args.repeats))
        if args.reference:
            rows["reference"].append(_child(args.reference, args.repeats))
    print("solvers.lbfgs(tol=1e-10), ridge + quartic, float64, 1 thread: ms per call (CPU time)")
    for n in SIZES:
        mine = [r[n][0] for r in rows["this"]]
        line = f"  {n:>3} unknowns: this {min(mine):.2f}-{max(mine):.2f} ms"
        line += f" ({rows['this'][0][n][1]}/{rows['this'][0][n][2]} it./evals)"
        if args.reference:
            theirs = [r[n][0] for r in rows["reference"]]
            ratio = statistics.median(mine) / statistics.median(theirs)
            line += f", reference {min(theirs):.2f}-{max(theirs):.2f} ms"
            line += f" ({rows['reference'][0][n][1]}/{rows['reference'][0][n][2]}), {ratio:.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
