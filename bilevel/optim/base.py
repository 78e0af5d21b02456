"""The functional optimizer protocol and hyperparameter resolution.

An optimizer is a pair of pure functions over dicts of tensors::

    state = opt.init(params)
    params, state = opt.step(params, grads, state, hparams)

Nothing is modified in place, so every output is differentiable w.r.t. params,
grads, state and every hyperparameter. ``state["step"]`` is a Python int (the
number of steps taken), so bias corrections and schedules never read a tensor
back from the device. The state is a pytree of dicts of tensors, ints and ``None``;
when ``init(params, hparams)`` sees the same ``hparams`` as the steps, its structure
is the same before and after every step (an optional buffer left out by ``init``
because the setting that needs it comes only later from ``hparams`` is created by the
first step). Buffers that torch seeds from the first gradient (SGD momentum) or from
a setting (Adagrad's ``initial_accumulator_value``) are seeded by the first step.

A setting given to the constructor wins; a setting left as ``None`` is read from
``hparams`` by name, else it takes the ``torch.optim`` default.

A hyperparameter value can be

* a number or a 0-d tensor (shared by every parameter, every step);
* a 1-D tensor: a per-step schedule, indexed by the step count;
* a callable ``fn(step) -> value``: a schedule given as a function;
* a mapping ``{param_name: value}``: one value per parameter tensor, where each
  value is a number, a 0-d tensor, a tensor shaped like the parameter (per
  element), a tensor of shape ``(T, *param.shape)`` or ``(T,)`` (a per-step
  schedule of that parameter), or a callable of the step.

A value shaped exactly like its parameter is read as per-element, never as a
schedule. A Python number equal to zero switches a feature off structurally (no
buffer, no work); a tensor never does, whatever its value, so the code path
never depends on a tensor's value (no device synchronisation).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.optim import _ops

Params = dict[str, Tensor]
State = dict[str, Any]
HParams = Mapping[str, Any]
HyperParameter = Any  # number | Tensor | Mapping[str, ...] | Callable[[int], ...] | None

# A hyperparameter resolved for one step: a number or a 0-d tensor shared by every
# parameter tensor, or a list with one value (number / tensor) per parameter tensor.
Resolved = Any


def _is_fn(value: Any) -> bool:
    return callable(value) and not isinstance(value, Tensor)


def _index(value: Tensor, step: int, setting: str, where: str = "") -> Tensor:
    if step >= value.shape[0]:
        raise ValueError(
            f"hyperparameter {setting!r}{where} is a schedule of length {value.shape[0]} but "
            f"step {step} was requested; give at least {step + 1} values"
        )
    return value[step]


def _pick(value: Any, step: int, param_name: str, param: Tensor, setting: str) -> Any:
    """Resolve one hyperparameter value for one parameter tensor at one step."""
    if _is_fn(value):
        value = value(step)
    if isinstance(value, Mapping):
        if param_name not in value:
            raise ValueError(
                f"hyperparameter {setting!r} is given per parameter tensor but has no entry for "
                f"parameter {param_name!r} (has {sorted(value)})"
            )
        value = value[param_name]
        if _is_fn(value):
            value = value(step)
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape != param.shape:
            return _index(value, step, setting, f"[{param_name!r}]")
        return value
    if isinstance(value, Tensor) and value.ndim > 0:
        return _index(value, step, setting)
    return value


def resolve(
    value: Any, setting: str, step: int, names: list[str], params: list[Tensor]
) -> Resolved:
    """Resolve a raw hyperparameter value for all parameter tensors at one step.

    Returns the shared value (number or 0-d tensor) when the value is not given per
    parameter tensor, else a list aligned with ``names``.
    """
    t = type(value)
    if t is float or t is int:  # the common case first, without ABC checks
        return value
    if isinstance(value, Tensor):
        return _index(value, step, setting) if value.ndim > 0 else value
    if _is_fn(value):
        value = value(step)
        if isinstance(value, Tensor) and value.ndim > 0:
            raise ValueError(
                f"hyperparameter {setting!r} is a function of the step that returned a tensor "
                f"of shape {tuple(value.shape)}; it must return a number, a 0-d tensor or a "
                "mapping {param_name: value}"
            )
    if t is dict or isinstance(value, Mapping):
        return [_pick(value, step, n, p, setting) for n, p in zip(names, params)]
    return value


def hmap(fn: Callable[..., Any], *values: Resolved) -> Resolved:
    """Apply ``fn`` to resolved hyperparameters, once if all are shared, else per parameter."""
    n = -1
    for v in values:
        if type(v) is list:
            n = len(v)
            break
    if n < 0:
        return fn(*values)
    return [fn(*(v[i] if type(v) is list else v for v in values)) for i in range(n)]


def _foreach_allowed() -> bool:
    # The foreach kernels have no batching rule: under vmap fall back to per-tensor ops.
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return True
    vmap = torch._C._functorch.TransformType.Vmap
    return all(i.key() != vmap for i in stack)


class Optimizer:
    """Base class of the differentiable functional optimizers.

    Subclasses declare ``defaults`` (the ``torch.optim`` default of every setting,
    structural flags included), ``flags`` (the settings that must be Python bools),
    and implement :meth:`init` and ``_update``.

    ``foreach`` picks the kernels: ``True`` uses ``torch._foreach_*`` ops (one call for
    all parameter tensors), ``False`` a per-tensor loop, ``None`` (default) foreach
    for steps taken without a graph (plain training, forward mode, checkpoint
    forwards), the loop where autograd records the step (foreach add/sub save their
    operands for backward) and under ``torch.func.vmap`` (no foreach batching rules).
    """

    name: str = "optimizer"
    defaults: dict[str, Any] = {}
    flags: tuple[str, ...] = ()

    def __init__(self, *, foreach: bool | None = None, **settings: Any) -> None:
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(
                f"{self.name}() got unknown setting(s) {sorted(unknown)}; "
                f"its settings are {sorted(self.defaults)}"
            )
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"{self.name}(): foreach must be True, False or None, got {foreach!r}")
        self.foreach = foreach
        self.settings: dict[str, Any] = dict(settings)

    # -- public protocol ---------------------------------------------------------
    def init(self, params: Params, hparams: HParams | None = None) -> State:
        """The initial state for ``params``.

        Buffers of optional features (momentum, AMSGrad, centering) are allocated when
        the feature is on given the constructor settings and ``hparams``; pass the same
        ``hparams`` as to :meth:`~bilevel.optim.Optimizer.step` to keep the state's
        structure fixed across steps (without them such a buffer is created by the first
        step).
        """
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
        hparams = hparams if hparams is not None else {}
        if state["step"] == 0:
            # Once, at the first step: cheap, and gives early errors to direct users.
            self.validate(params, hparams)
        return self._update(params, grads, state, hparams)

    def replace(self, **settings: Any) -> Optimizer:
        """A copy of this optimizer with some settings changed."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        merged = dict(self.settings)
        merged.update(settings)
        Optimizer.__init__(new, foreach=self.foreach, **merged)
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

    def resolve(
        self, setting: str, hparams: HParams, step: int, names: list[str], params: list[Tensor]
    ) -> Resolved:
        """The value of ``setting`` at one step: shared, or a list aligned with ``names``."""
        return resolve(self.raw(setting, hparams), setting, step, names, params)

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

    def flag(self, setting: str, hparams: HParams) -> bool:
        """A structural switch (``nesterov``, ``amsgrad``, ``centered``, ``maximize``)."""
        return bool(self.raw(setting, hparams))

    def ops(self) -> Any:
        """The kernels for this call: foreach, or the per-tensor loop."""
        if self.foreach is False or not _foreach_allowed():
            return _ops.LOOP
        if self.foreach is None and torch.is_grad_enabled():
            # torch._foreach_add/_sub save both operands for backward where torch.add saves
            # none: in a differentiable unroll that is +30% saved memory (reverse mode, SGD),
            # for no measurable speed-up, so a step that builds a graph uses the loop.
            return _ops.LOOP
        return _ops.FOREACH

    # -- validation --------------------------------------------------------------
    def validate(
        self, params: Params, hparams: HParams | None = None, steps: int | None = None
    ) -> None:
        """Check the settings against the params before any work is done.

        Raises a ``ValueError`` or ``TypeError`` naming the setting when a value has an
        unsupported type, a number is out of range, a tensor is on another device or of
        another dtype than the params, a schedule is shorter than ``steps``, or a
        per-parameter mapping misses a parameter or names an unknown one.
        """
        hparams = hparams if hparams is not None else {}
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"{self.name}: params must be a non-empty dict of tensors")
        for name, p in params.items():
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{self.name}: params[{name!r}] is a {type(p).__name__}, expected a tensor"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"{self.name}: params[{name!r}] has dtype {p.dtype}; expected a real "
                    "floating-point tensor"
                )
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"{self.name}: steps must be a positive int, got {steps!r}")
        ref = next(iter(params.values()))
        for setting in self.defaults:
            value = self.raw(setting, hparams)
            if setting in self.flags:
                if not isinstance(value, bool):
                    raise TypeError(
                        f"{self.name}: setting {setting!r} must be a Python bool (it changes "
                        f"the structure of the update), got {value!r}"
                    )
                continue
            self._check_kind(setting, value, params, ref, steps)
        self._check_combination(hparams)

    def _check_combination(self, hparams: HParams) -> None:
        """Subclass hook: constraints between settings."""

    def _number_range(self, setting: str) -> tuple[float, float, bool] | None:
        """Subclass hook: ``(low, high, high_inclusive)`` for Python-number values."""
        return (0.0, math.inf, True)

    def _check_number(self, setting: str, label: str, value: Any, where: str = "") -> None:
        if isinstance(value, bool):
            raise TypeError(f"{self.name}: hyperparameter {label!r}{where} is a bool")
        if math.isnan(value):
            raise ValueError(f"{self.name}: hyperparameter {label!r}{where} is NaN")
        bounds = self._number_range(setting)
        if bounds is None:
            return
        low, high, inclusive = bounds
        if value < low or value > high or (value == high and not inclusive):
            interval = f"[{low}, {high}{']' if inclusive else ')'}"
            raise ValueError(
                f"{self.name}: hyperparameter {label!r}{where} = {value} is outside {interval}"
            )

    def _check_kind(
        self, setting: str, value: Any, params: Params, ref: Tensor, steps: int | None
    ) -> None:
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                self._check_value(f"{setting}[{i}]", setting, v, params, ref, steps, "", None)
            return
        self._check_value(setting, setting, value, params, ref, steps, "", None)

    def _check_value(
        self,
        label: str,
        setting: str,
        value: Any,
        params: Params,
        ref: Tensor,
        steps: int | None,
        where: str,
        param: Tensor | None,
    ) -> None:
        if _is_fn(value):
            last = steps - 1 if steps is not None else 0
            for s in sorted({0, last}):
                try:
                    v = value(s)
                except Exception as e:  # the user's schedule failed: say which one
                    raise ValueError(
                        f"{self.name}: hyperparameter {label!r}{where} is a function of the step "
                        f"and raised {type(e).__name__}: {e} at step {s}"
                    ) from e
                if _is_fn(v):
                    raise TypeError(
                        f"{self.name}: hyperparameter {label!r}{where} is a function returning "
                        "a function"
                    )
                if (
                    isinstance(v, Tensor)
                    and v.ndim > 0
                    and (param is None or v.shape != param.shape)
                ):
                    raise ValueError(
                        f"{self.name}: hyperparameter {label!r}{where} is a function of the step "
                        f"that returned a tensor of shape {tuple(v.shape)}; it must return a "
                        "number, a 0-d tensor, a per-element tensor or a mapping"
                    )
                # A schedule's value is the value at that step: no further schedule.
                self._check_value(label, setting, v, params, ref, None, where, param)
            return
        if isinstance(value, Mapping):
            if param is not None:
                raise TypeError(
                    f"{self.name}: hyperparameter {label!r}{where} is a nested mapping; give one "
                    "value per parameter tensor"
                )
            missing = [n for n in params if n not in value]
            if missing:
                raise ValueError(
                    f"{self.name}: hyperparameter {label!r} is given per parameter tensor but "
                    f"misses parameter(s) {missing}"
                )
            extra = [n for n in value if n not in params]
            if extra:
                raise ValueError(
                    f"{self.name}: hyperparameter {label!r} is given per parameter tensor but "
                    f"names unknown parameter(s) {extra}; the params are {list(params)}"
                )
            for name, v in value.items():
                self._check_value(
                    label, setting, v, params, ref, steps, f"[{name!r}]", params[name]
                )
            return
        if isinstance(value, Tensor):
            self._check_tensor(label, value, ref, steps, where, param)
            return
        if isinstance(value, numbers.Real):
            self._check_number(setting, label, value, where)
            return
        raise TypeError(
            f"{self.name}: hyperparameter {label!r}{where} is a {type(value).__name__}; expected "
            "a number, a tensor, a mapping {param_name: value} or a function of the step"
        )

    def _check_tensor(
        self,
        label: str,
        t: Tensor,
        ref: Tensor,
        steps: int | None,
        where: str,
        param: Tensor | None,
    ) -> None:
        if t.device != ref.device:
            raise ValueError(
                f"{self.name}: hyperparameter {label!r}{where} is on {t.device} but the params are "
                f"on {ref.device}; move it with .to({str(ref.device)!r})"
            )
        if t.is_complex() or (t.is_floating_point() and t.dtype != ref.dtype):
            raise ValueError(
                f"{self.name}: hyperparameter {label!r}{where} has dtype {t.dtype} but the params "
                f"have {ref.dtype}; cast it with .to({ref.dtype})"
            )
        if t.ndim == 0:
            return
        if param is None:
            if t.ndim > 1:
                raise ValueError(
                    f"{self.name}: hyperparameter {label!r} has shape {tuple(t.shape)}: a tensor "
                    "outside a per-parameter mapping must be 0-d (a constant) or 1-D (a per-step "
                    "schedule); give per-element values as {param_name: tensor}"
                )
        elif t.shape == param.shape:
            return  # per element
        elif t.ndim > 1 and t.shape[1:] != param.shape:
            raise ValueError(
                f"{self.name}: hyperparameter {label!r}{where} has shape {tuple(t.shape)}: expected "
                f"{tuple(param.shape)} (per element), (T,) or (T, *{tuple(param.shape)}) (a "
                "schedule)"
            )
        if steps is not None and t.shape[0] < steps:
            raise ValueError(
                f"{self.name}: hyperparameter {label!r}{where} is a schedule of length "
                f"{t.shape[0]} but {steps} steps are run; give at least {steps} values"
            )

    # -- helpers for subclasses -----------------------------------------------------
    @staticmethod
    def _lists(params: Params, grads: Params) -> tuple[list[str], list[Tensor], list[Tensor]]:
        names = list(params)
        return names, [params[n] for n in names], [grads[n] for n in names]

    @staticmethod
    def _buffers(
        state: State, key: str, names: list[str], like: list[Tensor] | None = None
    ) -> list[Tensor]:
        """The buffers ``state[key]`` as a list aligned with ``names``.

        A missing buffer (``None``: the feature was off at ``init``) is zeros at the first
        step and an error later.
        """
        buf = state.get(key)
        if buf is None:
            if like is not None and state["step"] == 0:
                return [torch.zeros_like(p) for p in like]
            raise ValueError(
                f"optimizer state has no {key!r} buffers but the setting that needs them is on; "
                "build the state with opt.init(params, hparams) using the same hparams"
            )
        try:
            return [buf[n] for n in names]
        except KeyError as e:
            raise ValueError(
                f"optimizer state {key!r} has no buffer for parameter {e.args[0]!r}; build the "
                "state with opt.init(params) for the same params"
            ) from None

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams
    ) -> tuple[Params, State]:
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if v is not None)
        return f"{self.name}({inner})"


# Kept importable from here for code written against the first skeleton.
from bilevel.optim.sgd import SGD, sgd  # noqa: E402

__all__ = [
    "HParams",
    "HyperParameter",
    "Optimizer",
    "Params",
    "Resolved",
    "SGD",
    "State",
    "hmap",
    "resolve",
    "sgd",
]
