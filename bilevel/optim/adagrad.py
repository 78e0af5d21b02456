"""Differentiable Adagrad (the semantics of :class:`torch.optim.Adagrad`)."""

from __future__ import annotations

from typing import Any

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt, hmap
from bilevel.optim.validation import NON_NEGATIVE


def adagrad(
    lr: HyperParameter = None,
    lr_decay: HyperParameter = None,
    weight_decay: HyperParameter = None,
    initial_accumulator_value: HyperParameter = None,
    eps: HyperParameter = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> Adagrad:
    """Differentiable Adagrad with the semantics of :class:`torch.optim.Adagrad`.

    Each update ``t = 0, 1, ...`` of a parameter (``g`` the gradient, negated when
    ``maximize``)::

        g = g + weight_decay * p
        s = initial_accumulator_value (t = 0) | s;   s = s + g * g
        p = p - lr / (1 + t * lr_decay) * g / (sqrt(s) + eps)

    The accumulator is seeded from ``initial_accumulator_value`` by the first update (so it
    can come from ``hparams`` and be differentiated). Defaults as torch: ``lr=1e-2,
    eps=1e-10``, the rest 0.

    Example:
        >>> import torch, bilevel
        >>> acc0 = torch.tensor(3.0, requires_grad=True)
        >>> opt = bilevel.optim.adagrad(lr=0.5, initial_accumulator_value=acc0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0])}, state)
        >>> params["w"].detach()
        tensor([0.7500])
        >>> torch.autograd.grad(params["w"].sum(), acc0)
        (tensor(0.0312),)
    """
    return Adagrad(
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
        maximize=maximize,
        foreach=foreach,
    )


class Adagrad(Optimizer):
    """Functional Adagrad; build it with :func:`adagrad`."""

    name = "adagrad"
    defaults: dict[str, Any] = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
    }
    flags = ("maximize",)
    ranges = {
        "lr": NON_NEGATIVE,
        "lr_decay": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "initial_accumulator_value": NON_NEGATIVE,
        "eps": NON_NEGATIVE,
    }

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        # Zeros; the first update adds initial_accumulator_value (so it can come from
        # hparams and be differentiated), then the squared gradient, as torch does.
        return {"sum": {n: p.new_zeros(p.shape) for n, p in params.items()}}

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
        s = self._buffers(state, "sum", names, like=ps, fresh=at.count == 0)
        if at.count == 0 and self.is_active("initial_accumulator_value", hparams):
            s = ops.add(s, self.resolve("initial_accumulator_value", hparams, t, names, ps))
        s = ops.addcmul(s, gs, gs, 1)
        std = ops.add(ops.sqrt(s), self.resolve("eps", hparams, t, names, ps))
        clr = self.resolve("lr", hparams, t, names, ps)
        if at.count > 0 and self.is_active("lr_decay", hparams):
            decay = self.resolve("lr_decay", hparams, t, names, ps)
            clr = hmap(lambda a, d: a / (1 + at.count * d), clr, decay)
        new_ps = ops.addcdiv(ps, gs, std, clr, -1)
        return dict(zip(names, new_ps)), {"sum": dict(zip(names, s))}
