"""Hypergradient descent (Baydin et al. 2018, "Online learning rate adaptation with
hypergradient descent"): SGD-HD and Adam-HD.

The learning rate lives in the optimizer state and is moved at every step along its
one-step hypergradient. With ``u`` the previous update direction (``p_t = p_{t-1} -
lr * u``), the derivative of the loss at ``p_t`` w.r.t. the learning rate used for
that update is ``-<g_t, u>``, so a gradient step on the learning rate is::

    lr = lr + hypergrad_lr * <g_t, u>

Both are offered as functional optimizers (:func:`sgd_hd`, :func:`adam_hd`, pure and
differentiable like the others) and as :class:`torch.optim.Optimizer` subclasses
(:class:`SGDHD`, :class:`AdamHD`) built on the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.adam import Adam
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, hmap
from bilevel.optim.sgd import SGD


class _HDMixin(Optimizer):
    """The learning-rate state shared by the HD optimizers."""

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
        if t == 0:
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

    def init(self, params: Params, hparams: HParams | None = None) -> State:
        hparams = hparams or {}
        state = SGD.init(self, params, hparams)
        state["lr"] = self._init_lr(params, hparams)
        state["prev_direction"] = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return state

    def _check_combination(self, hparams: HParams) -> None:
        SGD._check_combination(self, hparams)
        self._check_hd_kinds(hparams)

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
        prev = self._buffers(state, "prev_direction", names, like=ps)
        lr = self._adapted_lr(ops, state, hparams, gs, prev)
        new_state: State = {"step": t + 1, "momentum_buffer": None}
        d = gs
        if self.is_active("momentum", hparams):
            mu = self.resolve("momentum", hparams, t, names, ps)
            if t == 0:
                bufs = gs
            else:
                old = self._buffers(state, "momentum_buffer", names)
                if self.is_active("dampening", hparams):
                    scale = hmap(lambda a: 1 - a, self.resolve("dampening", hparams, t, names, ps))
                    bufs = ops.axpy(ops.mul(old, mu), gs, scale)
                else:
                    bufs = ops.axpy(gs, old, mu)
            new_state["momentum_buffer"] = dict(zip(names, bufs))
            d = ops.axpy(gs, bufs, mu) if self.flag("nesterov", hparams) else bufs
        new_state["lr"] = lr
        new_state["prev_direction"] = dict(zip(names, d))
        return dict(zip(names, ops.axpy(ps, d, lr, -1))), new_state


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

    def init(self, params: Params, hparams: HParams | None = None) -> State:
        hparams = hparams or {}
        state = Adam.init(self, params, hparams)
        state["lr"] = self._init_lr(params, hparams)
        state["prev_direction"] = {n: p.new_zeros(p.shape) for n, p in params.items()}
        return state

    def _check_combination(self, hparams: HParams) -> None:
        self._check_hd_kinds(hparams)

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
        prev = self._buffers(state, "prev_direction", names, like=ps)
        lr = self._adapted_lr(ops, state, hparams, gs, prev)
        m, v, vmax, denom, bc1 = self._moments(ops, state, hparams, t, names, ps, gs)
        u = ops.div(ops.div(m, denom), bc1)
        new_state: State = {
            "step": t + 1,
            "exp_avg": dict(zip(names, m)),
            "exp_avg_sq": dict(zip(names, v)),
            "max_exp_avg_sq": dict(zip(names, vmax)) if vmax is not None else None,
            "lr": lr,
            "prev_direction": dict(zip(names, u)),
        }
        return dict(zip(names, ops.axpy(ps, u, lr, -1))), new_state


# -- torch.optim front ends ---------------------------------------------------------------

_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "prev_direction")


class _TorchHD(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` running a functional HD optimizer per param group.

    ``group["lr"]`` holds the adapted learning rate as a 0-d tensor (on the params'
    device, so no host synchronisation); per-parameter state holds the buffers and the
    step count.
    """

    _settings: tuple[str, ...] = ()

    def _functional(self, group: dict[str, Any]) -> Optimizer:
        raise NotImplementedError  # pragma: no cover - abstract

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        ref = group["params"][0]
        if not isinstance(lr, Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=ref.dtype, device=ref.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step for every param group (parameters without ``.grad`` are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            names = [str(i) for i in range(len(ps))]
            params = dict(zip(names, ps))
            grads = {n: p.grad for n, p in zip(names, ps)}
            opt = self._functional(group)
            first = self.state[ps[0]]
            if "step" not in first:
                fstate = opt.init(params)
            else:
                fstate = {"step": first["step"], "lr": group["lr"]}
                for key in _BUFFERS:
                    if key in first:
                        fstate[key] = {
                            n: self.state[p][key] if key in self.state[p] else torch.zeros_like(p)
                            for n, p in params.items()
                        }
                    else:
                        fstate[key] = None
            new_params, new_state = opt.step(params, grads, fstate)
            torch._foreach_copy_(ps, [new_params[n] for n in names])
            # A new tensor, not an in-place update: a state_dict taken earlier (or a
            # scheduler's initial_lr) must not change under it.
            group["lr"] = new_state["lr"]
            for n, p in params.items():
                pstate = self.state[p]
                pstate["step"] = new_state["step"]
                for key in _BUFFERS:
                    if new_state.get(key) is not None:
                        pstate[key] = new_state[key][n]
        return loss


class SGDHD(_TorchHD):
    """SGD with hypergradient descent on the learning rate, as a ``torch.optim`` optimizer.

    Same update as :func:`sgd_hd`; ``param_groups[i]["lr"]`` is the adapted learning rate
    (a 0-d tensor), one per group.

    Example:
        >>> import torch, bilevel
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = bilevel.optim.SGDHD([w], lr=0.1, hypergrad_lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (0.5 * w**2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"]
        tensor(0.1162)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        hypergrad_lr: float = 1e-6,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _functional(self, group: dict[str, Any]) -> Optimizer:
        return sgd_hd(
            lr=group["lr"],
            hypergrad_lr=group["hypergrad_lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )


class AdamHD(_TorchHD):
    """Adam with hypergradient descent on the learning rate, as a ``torch.optim`` optimizer.

    Same update as :func:`adam_hd`; ``param_groups[i]["lr"]`` is the adapted learning rate
    (a 0-d tensor), one per group.

    Example:
        >>> import torch, bilevel
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = bilevel.optim.AdamHD([w], lr=0.1, hypergrad_lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (0.5 * w**2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"]
        tensor(0.1534)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        hypergrad_lr: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _functional(self, group: dict[str, Any]) -> Optimizer:
        return adam_hd(
            lr=group["lr"],
            hypergrad_lr=group["hypergrad_lr"],
            betas=tuple(group["betas"]),  # type: ignore[arg-type]
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )
