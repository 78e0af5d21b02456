"""Differentiable RAdam (the semantics of :class:`torch.optim.RAdam`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.optim import _ops
from bilevel.optim.adam import ADAM_RANGES
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt
from bilevel.optim.hparams import pick


def radam(
    lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    decoupled_weight_decay: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> RAdam:
    """Differentiable RAdam (rectified Adam) with the semantics of :class:`torch.optim.RAdam`.

    Each update ``k`` of a parameter (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p       (or p = p * (1 - lr * weight_decay), decoupled)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        rho_inf = 2 / (1 - beta2) - 1;     rho = rho_inf - 2 k beta2**k / (1 - beta2**k)
        p = p - lr * m / (1 - beta1**k) * r * sqrt(1 - beta2**k) / (sqrt(v) + eps)  (rho > 5)
        p = p - lr * m / (1 - beta1**k)                                             (else)

    with ``r = sqrt((rho - 4)(rho - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho))``. With
    a tensor ``beta2`` the branch is a ``torch.where`` (no device synchronisation). Kernels
    are per tensor (``foreach`` is accepted and ignored). Defaults as torch: ``lr=1e-3,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0``.

    Example:
        >>> import torch, bilevel
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> opt = bilevel.optim.radam(lr=lr)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, 2.0])}, state)
        >>> params["w"].detach()  # rho <= 5 at first: an SGD-with-momentum step
        tensor([0.9000, 1.8000])
        >>> torch.autograd.grad(params["w"].sum(), lr)
        (tensor(-3.),)
    """
    return RAdam(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        foreach=foreach,
    )


class RAdam(Optimizer):
    """Functional RAdam; build it with :func:`radam`."""

    name = "radam"
    defaults: dict[str, Any] = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "maximize": False,
    }
    flags = ("decoupled_weight_decay", "maximize")
    pairs = ("betas",)
    ranges = ADAM_RANGES

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        return {
            "exp_avg": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "exp_avg_sq": {n: p.new_zeros(p.shape) for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, k = at.index, at.count + 1
        names, ps, gs = self._lists(params, grads)
        exact = self.ops(ps) is _ops.EXACT_LOOP
        ms = self._buffers(state, "exp_avg", names)
        vs = self._buffers(state, "exp_avg_sq", names)
        maximize = self.flag("maximize", hparams)
        decay = self.is_active("weight_decay", hparams)
        decoupled = self.flag("decoupled_weight_decay", hparams)
        betas = self.raw("betas", hparams)
        new_p: Params = {}
        buffers: State = {"exp_avg": {}, "exp_avg_sq": {}}
        loop = _ops.LOOP
        for i, (n, p, g) in enumerate(zip(names, ps, gs)):
            lr = self.hparam("lr", hparams, t, n, p)
            eps = self.hparam("eps", hparams, t, n, p)
            b1, b2 = (self._beta(betas, j, t, n, p) for j in (0, 1))
            if maximize:
                g = -g
            if decay:
                wd = self.hparam("weight_decay", hparams, t, n, p)
                if decoupled:
                    p = p.mul(1 - lr * wd)
                else:
                    g = loop.axpy([g], [p], wd)[0]
            m = loop.lerp([ms[i]], [g], 1 - b1)[0]
            v = loop.addcmul(loop.mul([vs[i]], b2), [g], [g], 1 - b2)[0]
            bc1, bc2 = 1 - b1**k, 1 - b2**k
            bce = m / bc1
            rho_inf = 2 / (1 - b2) - 1
            rho = rho_inf - 2 * k * (b2**k) / bc2
            if isinstance(rho, Tensor):
                on = rho > 5.0
                # rho_inf > rho > 5 where the rectification applies; elsewhere evaluate it
                # at a harmless 6 so that no inf/NaN reaches the backward of the where
                six = torch.full_like(rho, 6.0)
                rt, ri = torch.where(on, rho, six), torch.where(on, rho_inf, six)
                ratio = (rt - 4) * (rt - 2) * ri / ((ri - 4) * (ri - 2) * rt)
                rect = torch.where(on, ratio, torch.ones_like(ratio)).sqrt()
                adaptive = (bc2**0.5) / (_ops.sqrt(v, exact) + eps)
                update = torch.where(on, rect * adaptive, torch.ones_like(adaptive))
                p = p.add(bce * lr * update, alpha=-1.0)
            elif rho > 5.0:
                rect = (
                    (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
                ) ** 0.5
                adaptive = (bc2**0.5) / (_ops.sqrt(v, exact) + eps)
                p = p.add(bce * lr * adaptive * rect, alpha=-1.0)
            else:
                p = p.add(bce * lr, alpha=-1.0)
            new_p[n] = p
            buffers["exp_avg"][n], buffers["exp_avg_sq"][n] = m, v
        return new_p, buffers

    @staticmethod
    def _beta(betas: Any, j: int, t: int, n: str, p: Tensor) -> Any:
        return pick(betas[j], t, n, p, f"betas[{j}]")
