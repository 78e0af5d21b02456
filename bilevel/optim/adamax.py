"""Differentiable Adamax (the semantics of :class:`torch.optim.Adamax`)."""

from __future__ import annotations

from typing import Any

from bilevel.optim.adam import ADAM_RANGES
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt, hmap


def adamax(
    lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> Adamax:
    """Differentiable Adamax with the semantics of :class:`torch.optim.Adamax`.

    Each update ``k`` of a parameter (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        u = max(beta2 * u, |g| + eps)
        p = p - lr / (1 - beta1**k) * m / u

    ``betas`` is a pair of hyperparameters of any kind. Defaults as torch: ``lr=2e-3,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0``.

    Example:
        >>> import torch, bilevel
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> opt = bilevel.optim.adamax(lr=lr)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -2.0])}, state)
        >>> params["w"].detach()
        tensor([ 0.9000, -1.9000])
        >>> torch.autograd.grad(params["w"].sum(), lr)
        (tensor(0.),)
    """
    return Adamax(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach
    )


class Adamax(Optimizer):
    """Functional Adamax; build it with :func:`adamax`."""

    name = "adamax"
    defaults: dict[str, Any] = {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "maximize": False,
    }
    flags = ("maximize",)
    pairs = ("betas",)
    ranges = ADAM_RANGES

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        return {
            "exp_avg": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "exp_inf": {n: p.new_zeros(p.shape) for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, k = at.index, at.count + 1
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            gs = ops.axpy(gs, ps, self.resolve("weight_decay", hparams, t, names, ps))
        b1, b2 = self.resolve_pair("betas", hparams, t, names, ps)
        eps = self.resolve("eps", hparams, t, names, ps)
        m = ops.lerp(self._buffers(state, "exp_avg", names), gs, hmap(lambda b: 1 - b, b1))
        u = ops.maximum(
            ops.mul(self._buffers(state, "exp_inf", names), b2), ops.add(ops.abs(gs), eps)
        )
        lr = self.resolve("lr", hparams, t, names, ps)
        clr = hmap(lambda a, b: a / (1 - b**k), lr, b1)
        new_ps = ops.addcdiv(ps, m, u, clr, -1)
        return dict(zip(names, new_ps)), {
            "exp_avg": dict(zip(names, m)),
            "exp_inf": dict(zip(names, u)),
        }
