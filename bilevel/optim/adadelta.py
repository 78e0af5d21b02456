"""Differentiable Adadelta (the semantics of :class:`torch.optim.Adadelta`)."""

from __future__ import annotations

from typing import Any

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt, hmap
from bilevel.optim.validation import NON_NEGATIVE, UNIT_CLOSED


def adadelta(
    lr: HyperParameter = None,
    rho: HyperParameter = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> Adadelta:
    """Differentiable Adadelta with the semantics of :class:`torch.optim.Adadelta`.

    Each step (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p
        v = rho * v + (1 - rho) * g * g
        d = sqrt(u + eps) / sqrt(v + eps) * g
        u = rho * u + (1 - rho) * d * d
        p = p - lr * d

    Every setting is a hyperparameter of any kind (see ``bilevel.optim.hparams``).
    Defaults as torch: ``lr=1.0, rho=0.9, eps=1e-6, weight_decay=0``.

    Example:
        >>> import torch, bilevel
        >>> rho = torch.tensor(0.9, requires_grad=True)
        >>> opt = bilevel.optim.adadelta(rho=rho)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -2.0])}, state)
        >>> params["w"].detach()
        tensor([ 0.9968, -1.9968])
        >>> torch.autograd.grad(params["w"][0], rho)
        (tensor(-0.0158),)
    """
    return Adadelta(
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach
    )


class Adadelta(Optimizer):
    """Functional Adadelta; build it with :func:`adadelta`."""

    name = "adadelta"
    defaults: dict[str, Any] = {
        "lr": 1.0,
        "rho": 0.9,
        "eps": 1e-6,
        "weight_decay": 0.0,
        "maximize": False,
    }
    flags = ("maximize",)
    ranges = {
        "lr": NON_NEGATIVE,
        "rho": UNIT_CLOSED,
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
    }

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        return {
            "square_avg": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "acc_delta": {n: p.new_zeros(p.shape) for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t = at.index
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            gs = ops.axpy(gs, ps, self.resolve("weight_decay", hparams, t, names, ps))
        rho = self.resolve("rho", hparams, t, names, ps)
        one_minus = hmap(lambda r: 1 - r, rho)
        eps = self.resolve("eps", hparams, t, names, ps)
        sq = ops.addcmul(ops.mul(self._buffers(state, "square_avg", names), rho), gs, gs, one_minus)
        std = ops.sqrt(ops.add(sq, eps))
        acc = self._buffers(state, "acc_delta", names)
        delta = ops.mul(ops.div(ops.sqrt(ops.add(acc, eps)), std), gs)
        acc = ops.addcmul(ops.mul(acc, rho), delta, delta, one_minus)
        lr = self.resolve("lr", hparams, t, names, ps)
        new_ps = ops.axpy(ps, delta, lr, -1)
        buffers: State = {"square_avg": dict(zip(names, sq)), "acc_delta": dict(zip(names, acc))}
        return dict(zip(names, new_ps)), buffers
