"""The functional optimizer protocol.

An optimizer is a pair of pure functions over dicts of tensors::

    state = opt.init(params[, hparams])
    params, state = opt.step(params, grads, state, hparams)

Nothing is modified in place, so every output is differentiable w.r.t. params,
grads, state and every hyperparameter.

Gradients that are ``None`` (a parameter the loss does not use): as ``torch.optim``
(``if p.grad is None: continue``), that parameter is returned unchanged and its
state does not advance: no weight decay, no momentum, and its step count stays.

Step counts are Python ints, so bias corrections and schedules never read a tensor
back from the device: ``state["step"]`` counts the calls to :meth:`Optimizer.step`
(it indexes per-step schedules, as a learning-rate scheduler stepped once per
optimizer step would), ``state["param_steps"]`` maps each parameter to the number of
updates it has had (what ``torch.optim`` keeps as ``state[p]["step"]``; bias
corrections and decays use it). A state without ``"param_steps"`` (built by hand, or
by an older version) counts ``state["step"]`` updates for every parameter.

The state is a pytree of dicts of tensors, ints, floats and ``None``; when
``init(params, hparams)`` sees the same ``hparams`` as the steps, its structure is
the same before and after every step (an optional buffer left out by ``init``
because the setting that needs it comes only later from ``hparams`` is created by the
first step). Buffers that torch seeds from the first gradient (SGD momentum) are
seeded by each parameter's first update.

A setting given to the constructor wins over the torch default; a setting left as
``None`` is read from ``hparams`` by name, else it takes the ``torch.optim`` default;
a setting given both to the constructor and in ``hparams`` raises (which one was
meant?). Kinds of values: see ``bilevel.optim.hparams``. Valid ranges: each
optimizer's ``ranges`` (``bilevel.optim.validation``). A Python number equal to
zero switches a feature off structurally (no buffer, no work); a tensor never does,
whatever its value, so the code path never depends on a tensor's value (no device
synchronisation).

Kernels: with ``foreach=None`` (default) a step taken without a graph uses the kernels
``torch.optim`` picks by default on that device (the per-tensor loop on CPU, the
``torch._foreach_*`` kernels on CUDA), a step that autograd records uses the
per-tensor loop (foreach add/sub save both operands for backward), and so does a step
under ``torch.func.vmap`` (no foreach batching rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from bilevel.optim import _ops
from bilevel.optim.hparams import Resolved, hmap, pick, resolve
from bilevel.optim.validation import (
    Checker,
    Range,
    _Where,
    check_given_twice,
    check_numbers,
    check_params,
)

Params = dict[str, Tensor]
State = dict[str, Any]
HParams = Mapping[str, Any]
HyperParameter = Any  # number | Tensor | Mapping[str, ...] | Callable[[int], ...] | None

try:  # the devices torch.optim gives foreach kernels by default
    from torch.optim.optimizer import _get_foreach_kernels_supported_devices

    _FOREACH_DEVICES = frozenset(_get_foreach_kernels_supported_devices())
except ImportError:  # pragma: no cover - older torch
    _FOREACH_DEVICES = frozenset({"cuda", "xpu"})


def _transforms_active() -> bool:
    return bool(torch._C._functorch.get_interpreter_stack())


def _under_vmap() -> bool:
    stack = torch._C._functorch.get_interpreter_stack()
    if not stack:
        return False
    vmap = torch._C._functorch.TransformType.Vmap
    return any(i.key() == vmap for i in stack)


@dataclass(frozen=True)
class StepAt:
    """Which step an update is: ``index`` indexes schedules (calls to ``step`` before this
    one), ``count`` is the number of updates the parameters being updated had before
    (torch's per-parameter ``state["step"]`` minus one)."""

    index: int
    count: int


class Optimizer:
    """Base class of the differentiable functional optimizers.

    Subclasses declare ``defaults`` (the ``torch.optim`` default of every setting,
    structural flags included), ``flags`` (the settings that must be Python bools),
    ``pairs`` (settings given as a pair, such as ``betas``), ``ranges`` (valid values),
    and implement ``_init_buffers`` and ``_update``.
    """

    name: str = "optimizer"
    defaults: dict[str, Any] = {}
    flags: tuple[str, ...] = ()
    pairs: tuple[str, ...] = ()
    ranges: dict[str, Range] = {}
    # Whether torch keeps a step count per parameter (every torch.optim optimizer does;
    # the hypergradient-descent ones adapt one learning rate for all parameters).
    per_parameter_counts: bool = True

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
        for setting, value in self.settings.items():
            if value is not None and setting not in self.flags:
                self._check_numbers(setting, value)
        self._check_constructed()

    def _check_constructed(self) -> None:
        """Subclass hook: constraints between constructor settings ``torch.optim`` checks."""

    # -- public protocol ---------------------------------------------------------
    def init(self, params: Params, hparams: HParams | None = None) -> State:
        """The initial state for ``params``.

        Buffers of optional features (momentum, AMSGrad, centering) are allocated when
        the feature is on given the constructor settings and ``hparams``; pass the same
        ``hparams`` as to :meth:`step` to keep the state's structure fixed across steps
        (without them such a buffer is created by the first step).
        """
        self._check_given_twice(hparams or {})
        state = {"step": 0, "param_steps": dict.fromkeys(params, 0)}
        state.update(self._init_buffers(params, hparams or {}))
        return state

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        """Subclass hook: the state's buffers (everything but the step counts)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def step(
        self,
        params: Params,
        grads: Mapping[str, Tensor | None],
        state: State,
        hparams: HParams | None = None,
    ) -> tuple[Params, State]:
        """One optimizer step; returns new ``(params, state)`` without touching the inputs.

        A parameter whose gradient is ``None`` is returned as it is and its state does not
        change (``torch.optim``'s semantics).
        """
        if params.keys() != grads.keys():
            raise ValueError(
                f"params and grads must have the same keys; params has {sorted(params)}, "
                f"grads has {sorted(grads)}"
            )
        hparams = hparams if hparams is not None else {}
        t = state["step"]
        if t == 0:
            # Once, at the first step: cheap, and gives early errors to direct users.
            self.validate(params, hparams)
        counts: dict[str, int] = state.get("param_steps") or dict.fromkeys(params, t)  # type: ignore[assignment]
        groups: dict[int, list[str]] = {}
        for n in params:
            if grads[n] is not None:
                groups.setdefault(counts[n] if self.per_parameter_counts else t, []).append(n)
        new_params = dict(params)
        new_state: State = {"step": t + 1, "param_steps": None}
        new_state.update(
            (k, dict(v) if isinstance(v, dict) else v)
            for k, v in state.items()
            if k not in ("step", "param_steps")
        )
        everything = len(groups) == 1 and len(next(iter(groups.values()))) == len(params)
        for count, names in groups.items():
            if everything:
                sub_p, sub_g, sub_s = params, grads, state
            else:
                sub_p = {n: params[n] for n in names}
                sub_g = {n: grads[n] for n in names}
                sub_s = {
                    k: {n: v[n] for n in names if n in v} if isinstance(v, dict) else v
                    for k, v in state.items()
                }
            stepped, buffers = self._update(sub_p, sub_g, sub_s, hparams, StepAt(t, count))  # type: ignore[arg-type]
            new_params.update(stepped)
            for key, value in buffers.items():
                old = new_state.get(key)
                if isinstance(value, dict):
                    merged = dict(old) if isinstance(old, dict) and not everything else {}
                    merged.update(value)
                    new_state[key] = merged
                elif value is not None or key not in new_state:
                    new_state[key] = value
        new_state["param_steps"] = {
            n: counts[n] + (1 if grads[n] is not None else 0) for n in params
        }
        return new_params, new_state

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        """Subclass hook: update ``params`` (all with a gradient and the same count).

        Returns the new params and the new buffers (``{key: {name: value}}``, or ``None``
        for a buffer the settings switch off); the base merges them into the state.
        """
        raise NotImplementedError  # pragma: no cover - abstract

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
        return pick(self.raw(setting, hparams), step, param_name, param, setting)

    def resolve(
        self, setting: str, hparams: HParams, step: int, names: list[str], params: list[Tensor]
    ) -> Resolved:
        """The value of ``setting`` at one step: shared, or a list aligned with ``names``."""
        return resolve(self.raw(setting, hparams), setting, step, names, params)

    def resolve_pair(
        self, setting: str, hparams: HParams, step: int, names: list[str], params: list[Tensor]
    ) -> tuple[Resolved, Resolved]:
        """Both entries of a pair setting (``betas``, ``etas``, ``step_sizes``) at one step."""
        a, b = self.raw(setting, hparams)
        return (
            resolve(a, f"{setting}[0]", step, names, params),
            resolve(b, f"{setting}[1]", step, names, params),
        )

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

    def ops(self, params: list[Tensor] | None = None) -> Any:
        """The kernels for this call: foreach, the per-tensor loop, or its exact variant.

        The exact loop (plain ``sqrt``) runs where nothing records derivatives, so a step
        without a graph rounds as ``torch.optim``'s for-loop; with a graph ``sqrt`` is
        clamped at the smallest normal, which keeps its derivative finite at 0.
        """
        if _under_vmap() or self.foreach is False:
            return self._loop()
        if self.foreach is True:
            return _ops.FOREACH
        if torch.is_grad_enabled() or _fwad._current_level >= 0 or _transforms_active():
            # torch._foreach_add/_sub save both operands for backward where torch.add saves
            # none: in a differentiable unroll that is +30% saved memory (reverse mode, SGD),
            # for no measurable speed-up, so a step that builds a graph uses the loop.
            return _ops.LOOP
        if params and all(p.device.type in _FOREACH_DEVICES for p in params):
            return _ops.FOREACH  # torch.optim's default there
        return _ops.EXACT_LOOP

    @staticmethod
    def _loop() -> Any:
        recording = torch.is_grad_enabled() or _fwad._current_level >= 0 or _transforms_active()
        return _ops.LOOP if recording else _ops.EXACT_LOOP

    # -- validation --------------------------------------------------------------
    def _check_numbers(self, setting: str, value: Any) -> None:
        """Range checks of the Python numbers of one raw value (at construction)."""
        check_numbers(self, setting, value)

    def _check_given_twice(self, hparams: HParams) -> None:
        check_given_twice(self, hparams)

    def validate(
        self, params: Params, hparams: HParams | None = None, steps: int | None = None
    ) -> None:
        """Check the settings against the params before any work is done.

        Raises a ``ValueError`` or ``TypeError`` naming the setting when a value has an
        unsupported type, a number is out of range, a tensor is on another device or of
        another dtype than the params, a schedule is shorter than ``steps``, a 1-D
        tensor could be a schedule or per-element values, a per-parameter mapping misses a
        parameter or names an unknown one, or a setting is given both to the constructor
        and in ``hparams``.
        """
        hparams = hparams if hparams is not None else {}
        check_params(self.name, params, steps)
        self._check_given_twice(hparams)
        checker = Checker(self, params, steps)
        for setting in self.defaults:
            value = self.raw(setting, hparams)
            if setting in self.flags:
                if not isinstance(value, bool):
                    raise TypeError(
                        f"{self.name}: setting {setting!r} must be a Python bool (it changes "
                        f"the structure of the update), got {value!r}"
                    )
            elif setting in self.pairs:
                self._check_numbers(setting, value)  # the pair's shape
                for i, v in enumerate(value):
                    checker.check_value(_Where(self.name, f"{setting}[{i}]", setting), v)
            else:
                checker.check_value(_Where(self.name, setting, setting), value)
        self._check_combination(hparams)

    def _check_combination(self, hparams: HParams) -> None:
        """Subclass hook: constraints between settings."""

    # -- helpers for subclasses -----------------------------------------------------
    @staticmethod
    def _lists(params: Params, grads: Params) -> tuple[list[str], list[Tensor], list[Tensor]]:
        names = list(params)
        return names, [params[n] for n in names], [grads[n] for n in names]

    @staticmethod
    def _buffers(
        state: State,
        key: str,
        names: list[str],
        like: list[Tensor] | None = None,
        fresh: bool = False,
    ) -> list[Any]:
        """The buffers ``state[key]`` as a list aligned with ``names``.

        A missing buffer (the feature was off at ``init``) is zeros shaped like ``like``
        for parameters that have had no update yet (``fresh``), and an error otherwise.
        """
        buf = state.get(key) or {}
        out = []
        for i, n in enumerate(names):
            if n in buf and buf[n] is not None:
                out.append(buf[n])
            elif like is not None and fresh:
                out.append(torch.zeros_like(like[i]))
            else:
                raise ValueError(
                    f"optimizer state has no {key!r} buffer for parameter {n!r} but the setting "
                    "that needs it is on; build the state with opt.init(params, hparams) using "
                    "the same params and hparams"
                )
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if v is not None)
        return f"{self.name}({inner})"


# fmt: off
__all__ = ["HParams", "HyperParameter", "Optimizer", "Params", "Resolved", "State", "StepAt",
           "hmap", "resolve"]
# fmt: on
