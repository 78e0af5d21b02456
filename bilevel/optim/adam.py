"""Differentiable Adam and AdamW (the semantics of :class:`torch.optim.Adam` / ``AdamW``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.optim.base import (
    HParams,
    HyperParameter,
    Optimizer,
    Params,
    Resolved,
    State,
    StepAt,
    hmap,
)
from bilevel.optim.validation import NON_NEGATIVE, UNIT_OPEN

# torch.optim.Adam / AdamW / Adamax / NAdam / RAdam reject the same values.
ADAM_RANGES = {
    "lr": NON_NEGATIVE,
    "eps": NON_NEGATIVE,
    "betas[0]": UNIT_OPEN,
    "betas[1]": UNIT_OPEN,
    "weight_decay": NON_NEGATIVE,
}


def adam(
    lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    amsgrad: bool | None = None,
    maximize: bool | None = None,
    decoupled_weight_decay: bool | None = None,
    *,
    foreach: bool | None = None,
) -> Adam:
    """Differentiable Adam with the semantics of :class:`torch.optim.Adam`.

    Each update ``k = 1, 2, ...`` of a parameter (``g`` the gradient, negated when
    ``maximize``)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v)                                   (amsgrad; then v := vmax)
        p = p - lr / (1 - beta1**k) * m / (sqrt(v) / sqrt(1 - beta2**k) + eps)

    ``betas`` is a pair whose two entries are hyperparameters of any kind (number, 0-d
    tensor, schedule, per-parameter mapping). The bias corrections use the Python-int step
    count. Where ``v`` is exactly 0 (a gradient entry that has always been 0) the
    derivative of ``sqrt`` is taken as 0, so hypergradients stay finite. With
    ``decoupled_weight_decay=True`` the weight decay is AdamW's (``p = p * (1 - lr *
    weight_decay)`` before the update, the gradient left alone).
    Defaults as torch: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0``.

    Example:
        >>> import torch, bilevel
        >>> beta1 = torch.tensor(0.9, requires_grad=True)
        >>> opt = bilevel.optim.adam(lr=0.1, betas=(beta1, 0.999))
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(3):
        ...     grads = {"w": 2 * params["w"]}
        ...     params, state = opt.step(params, grads, state)
        >>> params["w"].detach()
        tensor([ 0.7016, -0.7016])
        >>> torch.autograd.grad(params["w"][0], beta1)
        (tensor(-0.0110),)
    """
    return Adam(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        foreach=foreach,
    )


def adamw(
    lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    amsgrad: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> AdamW:
    """Differentiable AdamW with the semantics of :class:`torch.optim.AdamW`.

    As :func:`adam`, but the weight decay is decoupled: ``p = p * (1 - lr * weight_decay)``
    before the Adam update, and the gradient is left alone. Default ``weight_decay=1e-2``.

    Example:
        >>> import torch, bilevel
        >>> wd = torch.tensor(0.1, requires_grad=True)
        >>> opt = bilevel.optim.adamw(lr=0.1, weight_decay=wd)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state)
        >>> params["w"].detach()  # w * (1 - 0.1 * 0.1) - 0.1
        tensor([0.8900, 1.8800])
        >>> torch.autograd.grad(params["w"].sum(), wd)  # -lr * sum(w)
        (tensor(-0.3000),)
    """
    return AdamW(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=foreach,
    )


class Adam(Optimizer):
    """Functional Adam; build it with :func:`adam`."""

    name = "adam"
    defaults: dict[str, Any] = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    flags = ("amsgrad", "maximize", "decoupled_weight_decay")
    pairs = ("betas",)
    ranges = ADAM_RANGES

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        amsgrad = self.flag("amsgrad", hparams)
        return {
            "exp_avg": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "exp_avg_sq": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "max_exp_avg_sq": {n: p.new_zeros(p.shape) for n, p in params.items()}
            if amsgrad
            else None,
        }

    def _moments(
        self,
        ops: Any,
        state: State,
        hparams: HParams,
        at: StepAt,
        names: list[str],
        ps: list[Tensor],
        gs: list[Tensor],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor], Resolved]:
        """New ``m, v, vmax`` and the update's ``denom`` and first bias correction."""
        t, k = at.index, at.count + 1
        b1, b2 = self.resolve_pair("betas", hparams, t, names, ps)
        eps = self.resolve("eps", hparams, t, names, ps)
        m = ops.lerp(self._buffers(state, "exp_avg", names), gs, hmap(lambda b: 1 - b, b1))
        v = ops.addcmul(
            ops.mul(self._buffers(state, "exp_avg_sq", names), b2),
            gs,
            gs,
            hmap(lambda b: 1 - b, b2),
        )
        vmax = None
        vv = v
        if self.flag("amsgrad", hparams):
            old = self._buffers(state, "max_exp_avg_sq", names, like=ps, fresh=at.count == 0)
            vmax = ops.maximum(old, v)
            vv = vmax
        bc1 = hmap(lambda b: 1 - b**k, b1)
        bc2_sqrt = hmap(lambda b: (1 - b**k) ** 0.5, b2)
        denom = ops.add(ops.div(ops.sqrt(vv), bc2_sqrt), eps)
        return m, v, vmax, denom, bc1

    def _decay(
        self,
        ops: Any,
        hparams: HParams,
        at: StepAt,
        names: list[str],
        ps: list[Tensor],
        gs: list[Tensor],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``maximize`` and weight decay (L2 on the gradient, or decoupled on the params)."""
        if self.flag("maximize", hparams):
            gs = ops.neg(gs)
        if self.is_active("weight_decay", hparams):
            wd = self.resolve("weight_decay", hparams, at.index, names, ps)
            if self.flag("decoupled_weight_decay", hparams):
                lr = self.resolve("lr", hparams, at.index, names, ps)
                ps = ops.mul(ps, hmap(lambda a, w: 1 - a * w, lr, wd))
            else:
                gs = ops.axpy(gs, ps, wd)
        return ps, gs

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        ps, gs = self._decay(ops, hparams, at, names, ps, gs)
        m, v, vmax, denom, bc1 = self._moments(ops, state, hparams, at, names, ps, gs)
        lr = self.resolve("lr", hparams, at.index, names, ps)
        step_size = hmap(lambda a, c: a / c, lr, bc1)
        new_params = dict(zip(names, ops.addcdiv(ps, m, denom, step_size, -1)))
        buffers: State = {
            "exp_avg": dict(zip(names, m)),
            "exp_avg_sq": dict(zip(names, v)),
            "max_exp_avg_sq": dict(zip(names, vmax)) if vmax is not None else None,
        }
        return new_params, buffers


class AdamW(Adam):
    """Functional AdamW; build it with :func:`adamw`."""

    name = "adamw"
    defaults: dict[str, Any] = {
        **Adam.defaults,
        "weight_decay": 1e-2,
        "decoupled_weight_decay": True,
    }
