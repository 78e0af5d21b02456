"""Differentiable SGD (the semantics of :class:`torch.optim.SGD`, step for step)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt, hmap
from bilevel.optim.validation import NON_NEGATIVE


def sgd(
    lr: HyperParameter = None,
    momentum: HyperParameter = None,
    dampening: HyperParameter = None,
    weight_decay: HyperParameter = None,
    nesterov: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> SGD:
    """Differentiable SGD with the semantics of :class:`torch.optim.SGD`.

    Each step (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p
        buf = g (the parameter's first update) | momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) | buf
        p = p - lr * g

    Every hyperparameter can be a number, a 0-d tensor, a per-step schedule (1-D tensor
    or function of the step) or a mapping ``{param_name: value}`` (per tensor / per
    element); settings left ``None`` are read from ``hparams`` by name, else they take
    torch's defaults (``lr=1e-3``, the rest 0 / False). A Python ``0`` momentum means no
    momentum buffer.

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.sgd(momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state, {"lr": lr})
        >>> params["w"].detach()
        tensor([0.9000, 0.9000])
        >>> torch.autograd.grad(params["w"].sum(), lr)
        (tensor(-2.),)
    """
    return SGD(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        foreach=foreach,
    )


class SGD(Optimizer):
    """Functional SGD; build it with :func:`sgd`."""

    name = "sgd"
    defaults: dict[str, Any] = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    flags = ("nesterov", "maximize")
    ranges = {"lr": NON_NEGATIVE, "momentum": NON_NEGATIVE, "weight_decay": NON_NEGATIVE}

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        buf = None
        if self.is_active("momentum", hparams):
            # Overwritten by the gradient at the first step (torch.optim semantics: buf = g).
            buf = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return {"momentum_buffer": buf}

    def _check_constructed(self) -> None:
        # torch.optim.SGD rejects these when built; a setting left to hparams waits for step 1
        if self.settings.get("nesterov"):
            momentum, damp = self.settings.get("momentum"), self.settings.get("dampening")
            if isinstance(momentum, (int, float)) and momentum == 0:
                raise ValueError("sgd: nesterov=True needs a momentum (momentum is 0)")
            if isinstance(damp, (int, float)) and damp != 0:
                raise ValueError(f"sgd: nesterov=True needs dampening 0, got dampening={damp}")

    def _check_combination(self, hparams: HParams) -> None:
        if self.flag("nesterov", hparams):
            if not self.is_active("momentum", hparams):
                raise ValueError("sgd: nesterov=True needs a momentum (momentum is 0)")
            damp = self.raw("dampening", hparams)
            if isinstance(damp, (int, float)) and damp != 0:
                raise ValueError(f"sgd: nesterov=True needs dampening 0, got dampening={damp}")

    def _direction(
        self,
        ops: Any,
        state: State,
        hparams: HParams,
        at: StepAt,
        names: list[str],
        ps: list[Tensor],
        gs: list[Tensor],
    ) -> tuple[list[Tensor], list[Tensor], State]:
        """The gradient after weight decay, the update direction, and the new buffers."""
        t = at.index
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            gs = ops.axpy(gs, ps, self.resolve("weight_decay", hparams, t, names, ps))
        buffers: State = {"momentum_buffer": None}
        d = gs
        if self.is_active("momentum", hparams):
            mu = self.resolve("momentum", hparams, t, names, ps)
            if at.count == 0:
                bufs = gs
            else:
                old = self._buffers(state, "momentum_buffer", names)
                damp = self.resolve("dampening", hparams, t, names, ps)
                # buf * momentum + (1 - dampening) * g, in torch's order of operations
                bufs = ops.axpy(ops.mul(old, mu), gs, hmap(lambda a: 1 - a, damp))
            buffers["momentum_buffer"] = dict(zip(names, bufs))
            d = ops.axpy(gs, bufs, mu) if self.flag("nesterov", hparams) else bufs
        return gs, d, buffers

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        _, d, buffers = self._direction(ops, state, hparams, at, names, ps, gs)
        lr = self.resolve("lr", hparams, at.index, names, ps)
        return dict(zip(names, ops.axpy(ps, d, lr, -1))), buffers
