"""Differentiable SGD (the semantics of :class:`torch.optim.SGD`, step for step)."""

from __future__ import annotations

from typing import Any

from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, hmap


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
        buf = g (first step) | momentum * buf + (1 - dampening) * g
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

    def init(self, params: Params, hparams: HParams | None = None) -> State:
        buf = None
        if self.is_active("momentum", hparams or {}):
            # Overwritten by the gradient at the first step (torch.optim semantics: buf = g).
            buf = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return {"step": 0, "momentum_buffer": buf}

    def _check_combination(self, hparams: HParams) -> None:
        if self.flag("nesterov", hparams):
            if not self.is_active("momentum", hparams):
                raise ValueError("sgd: nesterov=True needs a momentum (momentum is 0)")
            damp = self.raw("dampening", hparams)
            if isinstance(damp, (int, float)) and damp != 0:
                raise ValueError(f"sgd: nesterov=True needs dampening 0, got dampening={damp}")

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams
    ) -> tuple[Params, State]:
        t = state["step"]
        names, ps, gs = self._lists(params, grads)
        ops = self.ops()
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            gs = ops.axpy(gs, ps, self.resolve("weight_decay", hparams, t, names, ps))
        new_state: State = {"step": t + 1, "momentum_buffer": None}
        if self.is_active("momentum", hparams):
            mu = self.resolve("momentum", hparams, t, names, ps)
            if t == 0:
                bufs = gs
            else:
                old = self._buffers(state, "momentum_buffer", names)
                if self.is_active("dampening", hparams):
                    scale = hmap(lambda d: 1 - d, self.resolve("dampening", hparams, t, names, ps))
                    bufs = ops.axpy(ops.mul(old, mu), gs, scale)
                else:
                    bufs = ops.axpy(gs, old, mu)
            new_state["momentum_buffer"] = dict(zip(names, bufs))
            gs = ops.axpy(gs, bufs, mu) if self.flag("nesterov", hparams) else bufs
        lr = self.resolve("lr", hparams, t, names, ps)
        new_params = dict(zip(names, ops.axpy(ps, gs, lr, -1)))
        return new_params, new_state
