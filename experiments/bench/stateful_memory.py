"""Memory of a long MAML inner loop: ``bilevel.stateful`` against ``higher`` (higher#37).

``python -m experiments.bench.stateful_memory [--steps 100] [--width 512]`` runs the same
``innerloop_ctx`` loop (SGD, ``copy_initial_weights=False``, an MLP 64-W-W-1 whose weights
dominate the activations) with each library and counts the bytes of the tensors alive
(every storage any op creates while the loop runs, through a ``TorchDispatchMode``; the
model's own parameters are not counted), after some inner steps, before the outer
backward, and after it while the functional model is still referenced (the leak pattern
of higher#37: higher keeps every step's fast weights, the graph does not need them).
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                known = self._storages.get(key)
                if known is None or known[0].expired():
                    self._storages[key] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live(self, collect: bool = True) -> int:
        if collect:  # a full collection costs ~0.5 s with torch imported
            gc.collect()
        alive = {k: v for k, v in self._storages.items() if not v[0].expired()}
        self._storages = alive
        return sum(n for _, n in alive.values())


def mlp(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def run(
    lib: Any, steps: int, width: int, track: bool = True, collect_each_step: bool = True
) -> dict[str, Any]:
    """One inner loop of ``steps`` SGD steps and an outer backward, with live-byte samples
    (after a garbage collection, optionally skipped for the per-step samples)."""
    model = mlp(width)
    inner_opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 64, generator=g), torch.randn(10, 1, generator=g)
    xq, yq = torch.randn(10, 64, generator=g), torch.randn(10, 1, generator=g)
    samples: dict[int, int] = {}
    tracker = LiveBytes()
    with tracker:
        with lib.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, track_higher_grads=track
        ) as (fmodel, diffopt):
            for t in range(1, steps + 1):
                diffopt.step(F.mse_loss(fmodel(x), y))
                if t in (1, 10, steps // 2, steps):
                    samples[t] = tracker.live(collect_each_step)
            loss = F.mse_loss(fmodel(xq), yq)
            before = tracker.live()
            if loss.requires_grad:
                loss.backward()
            del loss
            after = tracker.live()  # fmodel and diffopt still referenced
        del fmodel, diffopt
        released = tracker.live()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "steps": samples,
        "before_backward": before,
        "after_backward": after,
        "after_release": released,
        "param_bytes": params,
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def report(steps: int, width: int, libs: dict[str, Any], out: Callable[[str], None]) -> None:
    for track in (True, False):
        out(f"track_higher_grads={track}, {steps} steps, MLP 64-{width}-{width}-1 (MiB alive)")
        rows = {name: run(lib, steps, width, track) for name, lib in libs.items()}
        some = next(iter(rows.values()))
        cols = [f"step {t}" for t in some["steps"]] + ["pre-backward", "post-backward"]
        out(f"  {'':18s}" + "".join(f"{c:>15s}" for c in cols))
        for name, r in rows.items():
            vals = list(r["steps"].values()) + [r["before_backward"], r["after_backward"]]
            out(f"  {name:18s}" + "".join(f"{_mb(v):>15s}" for v in vals))
        out(f"  (one copy of the weights: {_mb(some['param_bytes']).strip()} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.stateful_memory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.width < 1:
        parser.error("--steps must be >= 2 and --width >= 1")
    from bilevel import stateful

    libs: dict[str, Any] = {"bilevel.stateful": stateful}
    try:
        import higher

        libs["higher"] = higher
    except ImportError:
        print("higher is not installed: bilevel.stateful only")
    report(args.steps, args.width, libs, print)


if __name__ == "__main__":
    main()
