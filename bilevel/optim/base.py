"""The functional optimizer protocol and hyperparameter resolution.

An optimizer is a pair of pure functions over dicts of tensors::

    state = opt.init(params)
    params, state = opt.step(params, grads, state, hparams)

Nothing is modified in place, so every output is differentiable w.r.t. params,
grads, state and every hyperparameter. A setting given to the constructor wins;
a setting left as ``None`` is read from ``hparams`` by name, else it takes the
``torch.optim`` default.

A hyperparameter value can be

* a number or a 0-d tensor (shared by every parameter, every step);
* a tensor with ``ndim >= 1``: a per-step schedule, indexed by the step count;
* a callable ``fn(step) -> value``: a schedule given as a function;
* a mapping ``{param_name: value}``: one value per parameter tensor, where each
  value is a number, a 0-d tensor, a tensor shaped like the parameter (per
  element), a tensor of shape ``(T, *param.shape)`` or ``(T,)`` (a per-step
  schedule of that parameter), or a callable of the step.

A value shaped exactly like its parameter is read as per-element, never as a
schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, Any]
HParams = Mapping[str, Any]
HyperParameter = Any  # number | Tensor | Mapping[str, ...] | Callable[[int], ...]


def _pick(value: Any, step: int, param_name: str, param: Tensor, setting: str) -> Any:
    """Resolve one hyperparameter value for one parameter tensor at one step."""
    if callable(value) and not isinstance(value, Tensor):
        value = value(step)
    if isinstance(value, Mapping):
        if param_name not in value:
            raise KeyError(
                f"hyperparameter {setting!r} is given per parameter tensor but has no entry for "
                f"parameter {param_name!r} (has {sorted(value)})"
            )
        value = value[param_name]
        if callable(value) and not isinstance(value, Tensor):
            value = value(step)
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape != param.shape:
            return value[step]
        return value
    if isinstance(value, Tensor) and value.ndim > 0:
        return value[step]
    return value


class Optimizer:
    """Base class of the differentiable functional optimizers.

    Subclasses declare ``defaults`` (the ``torch.optim`` defaults of every
    hyperparameter) and implement :meth:`init` and :meth:`_update`.
    """

    name: str = "optimizer"
    defaults: dict[str, Any] = {}

    def __init__(self, **settings: Any) -> None:
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(
                f"{self.name}() got unknown setting(s) {sorted(unknown)}; "
                f"its hyperparameters are {sorted(self.defaults)}"
            )
        self.settings: dict[str, Any] = dict(settings)

    # -- public protocol ---------------------------------------------------------
    def init(self, params: Params) -> State:
        raise NotImplementedError  # pragma: no cover - abstract

    def step(
        self, params: Params, grads: Params, state: State, hparams: HParams | None = None
    ) -> tuple[Params, State]:
        """One optimizer step; returns new ``(params, state)`` without touching the inputs."""
        if params.keys() != grads.keys():
            raise ValueError(
                f"params and grads must have the same keys; params has {sorted(params)}, "
                f"grads has {sorted(grads)}"
            )
        return self._update(params, grads, state, hparams or {})

    def replace(self, **settings: Any) -> Optimizer:
        """A copy of this optimizer with some settings changed."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        merged = dict(self.settings)
        merged.update(settings)
        Optimizer.__init__(new, **merged)
        return new

    def raw(self, setting: str, hparams: HParams) -> Any:
        """The unresolved value of a setting: constructor, then ``hparams``, then default."""
        value = self.settings.get(setting)
        if value is None:
            value = hparams.get(setting)
        if value is None:
            value = self.defaults[setting]
        return value

    def hparam(
        self, setting: str, hparams: HParams, step: int, param_name: str, param: Tensor
    ) -> Any:
        """The value of ``setting`` for one parameter tensor at one step."""
        return _pick(self.raw(setting, hparams), step, param_name, param, setting)

    def is_active(self, setting: str, hparams: HParams) -> bool:
        """Whether a setting can change the update (structurally; no device sync).

        A number equal to zero is inactive; any tensor, mapping or schedule is active,
        so the code path never depends on tensor values.
        """
        value = self.raw(setting, hparams)
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return value != 0
        return True

    def validate(self, params: Params, hparams: HParams | None = None, steps: int | None = None) -> None:
        """Check hyperparameters against the params before any work is done.

        Raises a ``ValueError`` naming the setting when a tensor is on another device or of
        another dtype than the params, when a schedule is shorter than ``steps``, or when a
        per-parameter mapping misses a parameter.
        """
        hparams = hparams or {}
        if not params:
            raise ValueError("params is empty: expected a dict of tensors")
        ref = next(iter(params.values()))
        for setting in self.defaults:
            value = self.raw(setting, hparams)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                self._validate_value(setting, v, params, ref, steps)

    def _validate_value(
        self, setting: str, value: Any, params: Params, ref: Tensor, steps: int | None
    ) -> None:
        def check_tensor(t: Tensor, where: str, param: Tensor | None) -> None:
            if t.device != ref.device:
                raise ValueError(
                    f"hyperparameter {setting!r}{where} is on {t.device} but the params are on "
                    f"{ref.device}; move it with .to({str(ref.device)!r})"
                )
            if t.is_floating_point() and t.dtype != ref.dtype:
                raise ValueError(
                    f"hyperparameter {setting!r}{where} has dtype {t.dtype} but the params have "
                    f"{ref.dtype}; cast it with .to({ref.dtype})"
                )
            per_element = param is not None and t.shape == param.shape
            if t.ndim > 0 and not per_element and steps is not None and t.shape[0] < steps:
                raise ValueError(
                    f"hyperparameter {setting!r}{where} is a schedule of length {t.shape[0]} but "
                    f"{steps} steps are run; give at least {steps} values"
                )
            if t.ndim > 0 and not per_element and param is not None:
                tail = t.shape[1:]
                if len(tail) > 0 and tail != param.shape:
                    raise ValueError(
                        f"hyperparameter {setting!r}{where} has shape {tuple(t.shape)}: expected "
                        f"{tuple(param.shape)} (per element), (T,) or (T, *{tuple(param.shape)}) "
                        "(a schedule)"
                    )

        if isinstance(value, Mapping):
            missing = set(params) - set(value)
            if missing:
                raise ValueError(
                    f"hyperparameter {setting!r} is given per parameter tensor but misses "
                    f"{sorted(missing)}"
                )
            for name, v in value.items():
                if isinstance(v, Tensor) and name in params:
                    check_tensor(v, f"[{name!r}]", params[name])
        elif isinstance(value, Tensor):
            check_tensor(value, "", None)
            if value.ndim > 1:
                raise ValueError(
                    f"hyperparameter {setting!r} has shape {tuple(value.shape)}: a tensor outside a "
                    "per-parameter mapping must be 0-d (a constant) or 1-D (a per-step schedule); "
                    "give per-element values as {param_name: tensor}"
                )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ValueError(f"hyperparameter {setting!r} is NaN")

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams
    ) -> tuple[Params, State]:
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{self.name}({inner})"


def sgd(
    lr: HyperParameter = None,
    momentum: HyperParameter = None,
    dampening: HyperParameter = None,
    weight_decay: HyperParameter = None,
    nesterov: bool = False,
    maximize: bool = False,
) -> Optimizer:
    """Differentiable SGD with the semantics of :class:`torch.optim.SGD`.

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.sgd(momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state, {"lr": lr})
        >>> params["w"]
        tensor([0.9000, 0.9000], grad_fn=<SubBackward0>)
    """
    return SGD(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, maximize=maximize,
    )


class SGD(Optimizer):
    name = "sgd"
    defaults = {
        "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
        "nesterov": False, "maximize": False,
    }

    def init(self, params: Params) -> State:
        # The momentum buffer is created by the first step (torch.optim semantics: buf = g).
        return {"step": 0, "momentum_buffer": None}

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams
    ) -> tuple[Params, State]:
        t = state["step"]
        use_momentum = self.is_active("momentum", hparams)
        use_wd = self.is_active("weight_decay", hparams)
        use_dampening = self.is_active("dampening", hparams)
        nesterov = bool(self.raw("nesterov", hparams))
        maximize = bool(self.raw("maximize", hparams))
        if nesterov and not use_momentum:
            raise ValueError("sgd: nesterov=True needs a momentum")
        old_bufs = state["momentum_buffer"]
        new_params: Params = {}
        new_bufs: Params = {}
        for name, p in params.items():
            g = grads[name]
            if maximize:
                g = -g
            if use_wd:
                g = g + self.hparam("weight_decay", hparams, t, name, p) * p
            if use_momentum:
                mu = self.hparam("momentum", hparams, t, name, p)
                if old_bufs is None:
                    buf = g
                else:
                    scale_g = 1 - self.hparam("dampening", hparams, t, name, p) if use_dampening else 1
                    buf = mu * old_bufs[name] + scale_g * g
                new_bufs[name] = buf
                g = g + mu * buf if nesterov else buf
            new_params[name] = p - self.hparam("lr", hparams, t, name, p) * g
        return new_params, {"step": t + 1, "momentum_buffer": new_bufs if use_momentum else None}
