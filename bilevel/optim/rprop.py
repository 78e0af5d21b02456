"""Differentiable Rprop (the semantics of :class:`torch.optim.Rprop`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt
from bilevel.optim.hparams import pick
from bilevel.optim.validation import NON_NEGATIVE, Range


def rprop(
    lr: HyperParameter = None,
    etas: tuple[HyperParameter, HyperParameter] | None = None,
    step_sizes: tuple[HyperParameter, HyperParameter] | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> Rprop:
    """Differentiable Rprop with the semantics of :class:`torch.optim.Rprop`.

    Each update (``g`` the gradient, negated when ``maximize``; ``s = lr`` everywhere and
    ``prev = 0`` before a parameter's first update)::

        f = etaplus where g * prev > 0 | etaminus where g * prev < 0 | 1
        s = clamp(s * f, step_size_min, step_size_max)
        g = 0 where g * prev < 0
        p = p - sign(g) * s;   prev = g

    ``etas = (etaminus, etaplus)`` with ``0 < etaminus < 1 < etaplus`` and ``step_sizes =
    (step_size_min, step_size_max)`` are pairs of hyperparameters of any kind; the
    hypergradient reaches them through ``s``. Kernels are per tensor (``foreach`` is
    accepted and ignored). Defaults as torch: ``lr=1e-2, etas=(0.5, 1.2),
    step_sizes=(1e-6, 50)``.

    Example:
        >>> import torch, bilevel
        >>> etaplus = torch.tensor(1.2, requires_grad=True)
        >>> opt = bilevel.optim.rprop(lr=0.1, etas=(0.5, etaplus))
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, {"w": params["w"]}, state)
        >>> params["w"].detach()
        tensor([ 0.7800, -0.7800])
        >>> torch.autograd.grad(params["w"][0], etaplus)
        (tensor(-0.1000),)
    """
    return Rprop(lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize, foreach=foreach)


class Rprop(Optimizer):
    """Functional Rprop; build it with :func:`rprop`."""

    name = "rprop"
    defaults: dict[str, Any] = {
        "lr": 1e-2,
        "etas": (0.5, 1.2),
        "step_sizes": (1e-6, 50.0),
        "maximize": False,
    }
    flags = ("maximize",)
    pairs = ("etas", "step_sizes")
    ranges = {
        "lr": NON_NEGATIVE,
        "etas[0]": Range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
        "etas[1]": Range(1.0, low_inclusive=False),
    }

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        return {
            "prev": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "step_size": {n: p.new_zeros(p.shape) for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, fresh = at.index, at.count == 0
        names, ps, gs = self._lists(params, grads)
        prevs = self._buffers(state, "prev", names, like=ps, fresh=fresh)
        sizes = None if fresh else self._buffers(state, "step_size", names)
        maximize = self.flag("maximize", hparams)
        etas, bounds = self.raw("etas", hparams), self.raw("step_sizes", hparams)
        new_p: Params = {}
        buffers: State = {"prev": {}, "step_size": {}}
        for i, (n, p, g) in enumerate(zip(names, ps, gs)):
            if maximize:
                g = -g
            etaminus, etaplus = (self._entry(etas, j, "etas", t, n, p) for j in (0, 1))
            lo, hi = (self._entry(bounds, j, "step_sizes", t, n, p) for j in (0, 1))
            if sizes is None:
                lr = self.hparam("lr", hparams, t, n, p)
                size = (
                    torch.full_like(g, lr)
                    if not isinstance(lr, Tensor)
                    else torch.zeros_like(g) + lr
                )
            else:
                size = sizes[i]
            s = g.mul(prevs[i]).sign()
            factor = torch.where(s > 0, etaplus, torch.where(s < 0, etaminus, torch.ones_like(s)))
            if isinstance(lo, Tensor) != isinstance(hi, Tensor):  # clamp takes two of a kind
                lo, hi = (torch.as_tensor(b, dtype=p.dtype, device=p.device) for b in (lo, hi))
            size = size.mul(factor).clamp(lo, hi)
            g = torch.where(s < 0, torch.zeros_like(g), g)
            new_p[n] = torch.addcmul(p, g.sign(), size, value=-1)
            buffers["prev"][n], buffers["step_size"][n] = g, size
        return new_p, buffers

    def _entry(self, pair: Any, j: int, setting: str, t: int, n: str, p: Tensor) -> Any:
        return pick(pair[j], t, n, p, f"{setting}[{j}]")
