"""Differentiable RMSprop (the semantics of :class:`torch.optim.RMSprop`)."""

from __future__ import annotations

from typing import Any

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt, hmap
from bilevel.optim.validation import NON_NEGATIVE


def rmsprop(
    lr: HyperParameter = None,
    alpha: HyperParameter = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    momentum: HyperParameter = None,
    centered: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> RMSprop:
    """Differentiable RMSprop with the semantics of :class:`torch.optim.RMSprop`.

    Each step (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        a = alpha * a + (1 - alpha) * g                     (centered)
        d = sqrt(v - a * a) (centered) | sqrt(v), then d = d + eps
        buf = momentum * buf + g / d;  p = p - lr * buf     (momentum)
        p = p - lr * g / d                                  (no momentum)

    Defaults as torch: ``lr=1e-2, alpha=0.99, eps=1e-8``, no weight decay, no momentum.

    Example:
        >>> import torch, bilevel
        >>> alpha = torch.tensor(0.9, requires_grad=True)
        >>> opt = bilevel.optim.rmsprop(lr=0.01, alpha=alpha, momentum=0.5)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, 2.0])}, state)
        >>> params["w"].detach()
        tensor([0.9684, 1.9684])
    """
    return RMSprop(
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        maximize=maximize,
        foreach=foreach,
    )


class RMSprop(Optimizer):
    """Functional RMSprop; build it with :func:`rmsprop`."""

    name = "rmsprop"
    defaults: dict[str, Any] = {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
    }
    flags = ("centered", "maximize")
    ranges = {
        "lr": NON_NEGATIVE,
        "eps": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "alpha": NON_NEGATIVE,
    }

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        def zeros() -> Params:
            return {n: p.new_zeros(p.shape) for n, p in params.items()}

        return {
            "square_avg": zeros(),
            "grad_avg": zeros() if self.flag("centered", hparams) else None,
            "momentum_buffer": zeros() if self.is_active("momentum", hparams) else None,
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, fresh = at.index, at.count == 0
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            gs = ops.axpy(gs, ps, self.resolve("weight_decay", hparams, t, names, ps))
        alpha = self.resolve("alpha", hparams, t, names, ps)
        one_minus = hmap(lambda a: 1 - a, alpha)
        sq = ops.addcmul(
            ops.mul(self._buffers(state, "square_avg", names), alpha), gs, gs, one_minus
        )
        new_state: State = {
            "square_avg": dict(zip(names, sq)),
            "grad_avg": None,
            "momentum_buffer": None,
        }
        if self.flag("centered", hparams):
            ga = ops.lerp(
                self._buffers(state, "grad_avg", names, like=ps, fresh=fresh), gs, one_minus
            )
            new_state["grad_avg"] = dict(zip(names, ga))
            avg = ops.sqrt(ops.addcmul(sq, ga, ga, 1, -1))
        else:
            avg = ops.sqrt(sq)
        avg = ops.add(avg, self.resolve("eps", hparams, t, names, ps))
        lr = self.resolve("lr", hparams, t, names, ps)
        if self.is_active("momentum", hparams):
            mu = self.resolve("momentum", hparams, t, names, ps)
            old = self._buffers(state, "momentum_buffer", names, like=ps, fresh=fresh)
            buf = ops.addcdiv(ops.mul(old, mu), gs, avg, 1)
            new_state["momentum_buffer"] = dict(zip(names, buf))
            new_ps = ops.axpy(ps, buf, lr, -1)
        else:
            new_ps = ops.addcdiv(ps, gs, avg, lr, -1)
        return dict(zip(names, new_ps)), new_state
