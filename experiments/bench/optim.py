"""Micro-benchmark of the functional optimizers: foreach vs per-tensor kernels.

    python -m experiments.bench.optim [--steps 20] [--repeats 15]

MLP 64-128-10, float32, one thread. Two settings:

* ``plain``: one optimizer step under ``torch.no_grad`` (what a training loop pays);
* ``unroll``: a differentiable T-step unroll (inner grads with ``create_graph=True``) and
  the backward pass to the learning rate, compared with the same unroll hand-written in
  plain PyTorch (per-tensor ops, the hyperparameters as captured tensors).

Medians of interleaved repeats of the process CPU time (robust to other processes sharing
the cores), in microseconds (plain) and milliseconds (unroll).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bilevel.optim import adagrad, adam, rmsprop, sgd


def _mlp(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(128, 64, generator=g) * 0.1,
        "b1": torch.zeros(128),
        "w2": torch.randn(10, 128, generator=g) * 0.1,
        "b2": torch.zeros(10),
    }


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"], y)


def _median_times(
    fns: Mapping[str, Callable[..., Any]], repeats: int, inner: int
) -> dict[str, float]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            for _ in range(inner):
                f()
            times[k].append((time.process_time() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "sgd": lambda **k: sgd(lr=0.1, **k),
    "sgd_momentum": lambda **k: sgd(lr=0.1, momentum=0.9, **k),
    "adam": lambda **k: adam(lr=1e-3, **k),
    "rmsprop": lambda **k: rmsprop(lr=1e-3, **k),
    "adagrad": lambda **k: adagrad(lr=1e-2, **k),
}


def bench_plain(repeats: int) -> None:
    params = _mlp()
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    print("plain step (no grad), us per step   loop   foreach  speed-up")
    for name, make in OPTIMIZERS.items():
        fns: dict[str, Callable[..., Any]] = {}
        for foreach in (False, True):
            opt = make(foreach=foreach)
            state = opt.init(params)
            state = opt.step(params, grads, state)[1]  # past the first-step special cases

            def f(opt: Any = opt, state: Any = state) -> Any:
                with torch.no_grad():
                    return opt.step(params, grads, state)

            fns["foreach" if foreach else "loop"] = f
        t = _median_times(fns, repeats, 200)
        print(
            f"  {name:14s} {t['loop'] * 1e6:8.1f} {t['foreach'] * 1e6:8.1f}   "
            f"{t['loop'] / t['foreach']:5.2f}x"
        )


def _hand_unroll(kind: str, steps: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same unroll written directly in PyTorch (the overhead-free reference)."""
    lr = torch.tensor(0.1 if kind.startswith("sgd") else 1e-3, requires_grad=True)
    ps = [p.requires_grad_() for p in _mlp().values()]
    names = ["w1", "b1", "w2", "b2"]
    bufs: list[torch.Tensor] = []
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t in range(steps):
        gs = torch.autograd.grad(_loss(dict(zip(names, ps)), x, y), ps, create_graph=True)
        if kind == "sgd":
            ps = [p - lr * g for p, g in zip(ps, gs)]
        elif kind == "sgd_momentum":
            bufs = list(gs) if t == 0 else [0.9 * b + g for b, g in zip(bufs, gs)]
            ps = [p - lr * b for p, b in zip(ps, bufs)]
        else:  # adam
            k = t + 1
            ms = [0.9 * m + 0.1 * g for m, g in zip(ms, gs)]
            vs = [0.999 * v + 0.001 * g * g for v, g in zip(vs, gs)]
            c1, c2 = 1 - 0.9**k, (1 - 0.999**k) ** 0.5
            ps = [p - (lr / c1) * m / (v.sqrt() / c2 + 1e-8) for p, m, v in zip(ps, ms, vs)]
    _loss(dict(zip(names, ps)), x, y).backward()
    return lr.grad  # type: ignore[return-value]


def _lib_unroll(
    make: Callable[..., Any],
    foreach: bool,
    steps: int,
    x: torch.Tensor,
    y: torch.Tensor,
    lr0: float,
) -> torch.Tensor:
    lr = torch.tensor(lr0, requires_grad=True)
    opt = make(foreach=foreach)
    params = {k: v.requires_grad_() for k, v in _mlp().items()}
    state = opt.init(params)
    hparams = {"lr": lr}
    for _ in range(steps):
        gs = torch.autograd.grad(_loss(params, x, y), list(params.values()), create_graph=True)
        params, state = opt.step(params, dict(zip(params, gs)), state, hparams)
    _loss(params, x, y).backward()
    return lr.grad  # type: ignore[return-value]


def bench_unroll(steps: int, repeats: int, batch: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    print(
        f"differentiable unroll T={steps}, batch {batch}, ms   hand    loop  foreach  loop/hand foreach/hand"
    )
    cases = {
        "sgd": (lambda **k: sgd(momentum=0, **k), 0.1),
        "sgd_momentum": (lambda **k: sgd(momentum=0.9, **k), 0.1),
        "adam": (lambda **k: adam(**k), 1e-3),
    }
    for name, (make, lr0) in cases.items():
        fns: dict[str, Callable[..., Any]] = {
            "hand": lambda name=name: _hand_unroll(name, steps, x, y),
            "loop": lambda make=make, lr0=lr0: _lib_unroll(make, False, steps, x, y, lr0),
            "foreach": lambda make=make, lr0=lr0: _lib_unroll(make, True, steps, x, y, lr0),
        }
        ref = fns["hand"]()
        for k in ("loop", "foreach"):
            got = fns[k]()
            assert torch.allclose(got, ref, rtol=1e-3, atol=1e-6), (name, k, got, ref)
        t = _median_times(fns, repeats, 1)
        print(
            f"  {name:14s} {t['hand'] * 1e3:7.2f} {t['loop'] * 1e3:7.2f} {t['foreach'] * 1e3:7.2f}"
            f"   {t['loop'] / t['hand']:6.3f}    {t['foreach'] / t['hand']:6.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32")
    bench_plain(args.repeats)
    bench_unroll(args.steps, args.repeats, args.batch)


if __name__ == "__main__":
    main()
