"""Differentiable averaged SGD (the semantics of :class:`torch.optim.ASGD`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.optim import _ops
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt
from bilevel.optim.hparams import contains_tensor
from bilevel.optim.validation import NON_NEGATIVE


def asgd(
    lr: HyperParameter = None,
    lambd: HyperParameter = None,
    alpha: HyperParameter = None,
    t0: HyperParameter = None,
    weight_decay: HyperParameter = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> ASGD:
    """Differentiable ASGD with the semantics of :class:`torch.optim.ASGD`.

    Each update ``k = 1, 2, ...`` of a parameter (``g`` the gradient, negated when
    ``maximize``; ``eta = lr`` and ``mu = 1`` before the first update)::

        g = g + weight_decay * p
        p = p * (1 - lambd * eta) - eta * g
        ax = p (mu == 1) | ax + mu * (p - ax)
        eta = lr / (1 + lambd * lr * k) ** alpha;   mu = 1 / max(1, k - t0)

    ``state["ax"]`` is the running average of the iterates. ``eta`` and ``mu`` are kept
    in the state, as torch keeps them: Python numbers, rounded as torch stores them
    (float32 unless the default dtype is float64), while every setting involved is a
    number; 0-d tensors (differentiable, the parameters' dtype) otherwise. Settings are
    hyperparameters of any kind; the kernels are per tensor (``foreach`` is accepted and
    ignored). Defaults as torch: ``lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6``.

    Example:
        >>> import torch, bilevel
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> opt = bilevel.optim.asgd(lr=lr, t0=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, {"w": params["w"]}, state)
        >>> params["w"].detach(), state["ax"]["w"].detach()
        (tensor([0.8100]), tensor([0.8100]))
    """
    return ASGD(
        lr=lr,
        lambd=lambd,
        alpha=alpha,
        t0=t0,
        weight_decay=weight_decay,
        maximize=maximize,
        foreach=foreach,
    )


class ASGD(Optimizer):
    """Functional ASGD; build it with :func:`asgd`."""

    name = "asgd"
    defaults: dict[str, Any] = {
        "lr": 1e-2,
        "lambd": 1e-4,
        "alpha": 0.75,
        "t0": 1e6,
        "weight_decay": 0.0,
        "maximize": False,
    }
    flags = ("maximize",)
    ranges = {"lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE}

    def _tensor_eta(self, hparams: HParams) -> bool:
        return any(contains_tensor(self.raw(s, hparams)) for s in ("lr", "lambd", "alpha"))

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        eta_t = self._tensor_eta(hparams)
        mu_t = contains_tensor(self.raw("t0", hparams))
        # Placeholders of the right kind: each parameter's first update sets eta = lr.
        return {
            "eta": {n: p.new_zeros(()) if eta_t else 0.0 for n, p in params.items()},
            "mu": {n: p.new_ones(()) if mu_t else 1.0 for n, p in params.items()},
            "ax": {n: p.new_zeros(p.shape) for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, k, fresh = at.index, at.count + 1, at.count == 0
        names, ps, gs = self._lists(params, grads)
        ax_old = self._buffers(state, "ax", names, like=ps, fresh=fresh)
        maximize = self.flag("maximize", hparams)
        decay = self.is_active("weight_decay", hparams)
        shrink = self.is_active("lambd", hparams)
        new_p: Params = {}
        buffers: State = {"eta": {}, "mu": {}, "ax": {}}
        for i, (n, p, g) in enumerate(zip(names, ps, gs)):
            h = {s: self.hparam(s, hparams, t, n, p) for s in ("lr", "lambd", "alpha", "t0")}
            lr = h["lr"]
            if maximize:
                g = -g
            if decay:
                g = _ops.LOOP.axpy([g], [p], self.hparam("weight_decay", hparams, t, n, p))[0]
            if fresh:
                eta = lr if isinstance(lr, Tensor) else _ops.as_scalar(lr)
                mu = 1.0
            else:
                eta, mu = state["eta"][n], state["mu"][n]
            mu_next: Any
            if shrink:
                p = p.mul(1 - h["lambd"] * eta)
            p = _ops.LOOP.axpy([p], [g], eta, -1)[0]
            if isinstance(mu, Tensor):
                ax = torch.where(mu == 1, p, ax_old[i] + (p - ax_old[i]) * mu)
            else:
                ax = ax_old[i].add(p.sub(ax_old[i]).mul(mu)) if mu != 1 else p
            eta = lr / ((1 + h["lambd"] * lr * k) ** h["alpha"])
            if isinstance(h["t0"], Tensor):
                mu_next = 1 / torch.clamp_min(k - h["t0"], 1)
            else:
                mu_next = _ops.as_scalar(1 / max(1, k - h["t0"]))
            if not isinstance(eta, Tensor):
                eta = _ops.as_scalar(eta)
            new_p[n] = p
            buffers["eta"][n], buffers["mu"][n], buffers["ax"][n] = eta, mu_next, ax
        return new_p, buffers
