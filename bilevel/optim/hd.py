"""Hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation with
hypergradient descent"): SGD-HD and Adam-HD.

The learning rate lives in the optimizer state and is moved at every step along its
one-step hypergradient. With ``u`` the previous update direction (``p_t = p_{t-1} -
lr * u``), the derivative of the loss at ``p_t`` w.r.t. the learning rate used for
that update is ``-<g_t, u>``, so a gradient step on the learning rate is::

    lr = lr + hypergrad_lr * <g_t, u>

Both are offered as functional optimizers here (:func:`sgd_hd`, :func:`adam_hd`, pure
and differentiable like the others) and as :class:`torch.optim.Optimizer` subclasses
built on the same code (:mod:`bilevel.optim.hd_torch`). The learning rate is one for all
parameters, so the step count is global (``per_parameter_counts = False``): a parameter
whose gradient is ``None`` is skipped, and ``<g, u>`` sums over the others.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.optim.adam import Adam
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt
from bilevel.optim.sgd import SGD


class _HDMixin(Optimizer):
    """The learning-rate state shared by the HD optimizers."""

    per_parameter_counts = False

    def _check_hd_kinds(self, hparams: HParams) -> None:
        for setting in ("lr", "hypergrad_lr"):
            value = self.raw(setting, hparams)
            if not (
                isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.ndim == 0)
            ):
                raise TypeError(
                    f"{self.name}: hyperparameter {setting!r} must be a number or a 0-d tensor "
                    f"(hypergradient descent adapts one global learning rate), got "
                    f"{type(value).__name__}"
                    + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
                )

    def _init_lr(self, params: Params, hparams: HParams) -> Tensor:
        ref = next(iter(params.values()))
        lr = self.raw("lr", hparams)
        if isinstance(lr, Tensor):
            return lr
        return ref.new_full((), float(lr) if isinstance(lr, (int, float)) else 0.0)

    def _adapted_lr(
        self, ops: Any, state: State, hparams: HParams, gs: list[Tensor], prev: list[Tensor]
    ) -> Tensor:
        """The learning rate of this step: the previous one plus ``hypergrad_lr * <g, u>``."""
        t = state["step"]
        if t == 0 or state.get("lr") is None:
            # The learning rate is seeded from the setting (so it can come from hparams and
            # be differentiated); the previous direction is 0, so there is no update yet.
            lr = self.raw("lr", hparams)
            return lr if isinstance(lr, Tensor) else gs[0].new_full((), float(lr))
        lr = state["lr"]
        if not self.is_active("hypergrad_lr", hparams):
            return lr
        beta = self.raw("hypergrad_lr", hparams)
        return lr + beta * ops.dot(gs, prev)


def sgd_hd(
    lr: HyperParameter = None,
    hypergrad_lr: HyperParameter = None,
    momentum: HyperParameter = None,
    dampening: HyperParameter = None,
    weight_decay: HyperParameter = None,
    nesterov: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> SGDHDFunctional:
    """Functional SGD-HD: SGD whose learning rate adapts online by hypergradient descent.

    Each step computes the SGD direction ``d`` (:func:`sgd`, with momentum, dampening,
    nesterov, weight decay, maximize as torch), then::

        lr = lr + hypergrad_lr * <g, d_prev>        (g after weight decay; d_prev = 0 at first)
        p = p - lr * d;   d_prev = d

    ``lr`` is the initial learning rate (a number or a 0-d tensor; differentiable when a
    tensor) and the adapted one is ``state["lr"]``. ``hypergrad_lr`` (default 1e-6) is a
    number or a 0-d tensor; other settings are any kind of hyperparameter.

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.sgd_hd(lr=0.1, hypergrad_lr=0.01)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(3):
        ...     params, state = opt.step(params, {"w": params["w"]}, state)
        >>> state["lr"]  # 0.1 -> 0.109 -> 0.1162: the gradients agree, lr grows
        tensor(0.1162)
    """
    return SGDHDFunctional(
        lr=lr,
        hypergrad_lr=hypergrad_lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        foreach=foreach,
    )


class SGDHDFunctional(_HDMixin, SGD):
    """Functional SGD-HD; build it with :func:`sgd_hd`."""

    name = "sgd_hd"
    defaults: dict[str, Any] = {**SGD.defaults, "hypergrad_lr": 1e-6}

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        state = SGD._init_buffers(self, params, hparams)
        state["lr"] = self._init_lr(params, hparams)
        state["prev_direction"] = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return state

    def _check_combination(self, hparams: HParams) -> None:
        SGD._check_combination(self, hparams)
        self._check_hd_kinds(hparams)

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        gs, d, buffers = self._direction(ops, state, hparams, at, names, ps, gs)
        prev = self._buffers(state, "prev_direction", names, like=ps, fresh=True)
        lr = self._adapted_lr(ops, state, hparams, gs, prev)
        buffers["lr"] = lr
        buffers["prev_direction"] = dict(zip(names, d))
        return dict(zip(names, ops.axpy(ps, d, lr, -1))), buffers


def adam_hd(
    lr: HyperParameter = None,
    hypergrad_lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    amsgrad: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> AdamHDFunctional:
    """Functional Adam-HD: Adam whose learning rate adapts online by hypergradient descent.

    Each step computes Adam's direction ``u = m_hat / (sqrt(v_hat) + eps)`` (:func:`adam`,
    with L2 weight decay, amsgrad, maximize as torch), then::

        lr = lr + hypergrad_lr * <g, u_prev>        (u_prev = 0 at the first step)
        p = p - lr * u;   u_prev = u

    ``lr`` (default 1e-3) is the initial learning rate (a number or a 0-d tensor) and
    the adapted one is ``state["lr"]``; ``hypergrad_lr`` defaults to 1e-8.

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.adam_hd(lr=0.1, hypergrad_lr=0.01)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> for _ in range(3):
        ...     params, state = opt.step(params, {"w": params["w"]}, state)
        >>> state["lr"]  # grew: successive gradients agree
        tensor(0.1534)
    """
    return AdamHDFunctional(
        lr=lr,
        hypergrad_lr=hypergrad_lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=foreach,
    )


class AdamHDFunctional(_HDMixin, Adam):
    """Functional Adam-HD; build it with :func:`adam_hd`."""

    name = "adam_hd"
    defaults: dict[str, Any] = {**Adam.defaults, "hypergrad_lr": 1e-8}

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        state = Adam._init_buffers(self, params, hparams)
        state["lr"] = self._init_lr(params, hparams)
        state["prev_direction"] = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return state

    def _check_combination(self, hparams: HParams) -> None:
        self._check_hd_kinds(hparams)

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        names, ps, gs = self._lists(params, grads)
        ops = self.ops(ps)
        ps, gs = self._decay(ops, hparams, at, names, ps, gs)
        prev = self._buffers(state, "prev_direction", names, like=ps, fresh=True)
        lr = self._adapted_lr(ops, state, hparams, gs, prev)
        m, v, vmax, denom, bc1 = self._moments(ops, state, hparams, at, names, ps, gs)
        u = ops.div(ops.div(m, denom), bc1)
        buffers: State = {
            "exp_avg": dict(zip(names, m)),
            "exp_avg_sq": dict(zip(names, v)),
            "max_exp_avg_sq": dict(zip(names, vmax)) if vmax is not None else None,
            "lr": lr,
            "prev_direction": dict(zip(names, u)),
        }
        return dict(zip(names, ops.axpy(ps, u, lr, -1))), buffers
