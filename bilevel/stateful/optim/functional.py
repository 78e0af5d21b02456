"""The differentiable optimizers, one per ``torch.optim`` class, on :mod:`bilevel.optim`.

Each class is one declaration naming its torch class and its functional optimizer::

    class DifferentiableSGD(FunctionalDifferentiableOptimizer, torch_type=torch.optim.SGD,
                            functional=bilevel.optim.sgd): ...

Each group's settings (after overrides) are the functional optimizer's ``hparams``, so a
tensor setting is differentiated like any hyperparameter of :mod:`bilevel.optim`. State
dicts use torch's names (``momentum_buffer``, ``exp_avg``, ...), so the state copied from a
torch optimizer is the functional state; torch's tensor step counts become Python ints once,
at construction (no device synchronisation in the loop). Parameters that share a group and
a step count are stepped by one call; a parameter without a gradient is left out of the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from bilevel.optim.base import Optimizer
from bilevel.stateful.optim.base import DifferentiableOptimizer

Factory = Callable[..., Optimizer]

# The step counts of a functional state (not per-parameter buffers).
_COUNTS = ("step", "param_steps")

# Group entries that choose kernels or graph capture in torch, not the update's values.
_KERNEL_CHOICES = frozenset({"foreach", "fused", "capturable", "differentiable"})

# torch optimizer class -> differentiable class (filled by the class declarations below and
# by register_optim).
_opt_mapping: dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]] = {}


class FunctionalDifferentiableOptimizer(DifferentiableOptimizer):
    """A differentiable optimizer whose update is a :mod:`bilevel.optim` functional optimizer.

    Declare one with the class keywords ``torch_type`` (the ``torch.optim`` class it mirrors,
    registered for :func:`~bilevel.stateful.get_diff_optim`), ``functional`` (the factory)
    and optionally ``decoupled`` (the factory used for a group with
    ``decoupled_weight_decay=True`` when ``functional`` has no such setting).
    """

    _functional: ClassVar[Factory]
    _decoupled: ClassVar[Factory | None] = None

    def __init_subclass__(
        cls,
        torch_type: type[torch.optim.Optimizer] | None = None,
        functional: Factory | None = None,
        decoupled: Factory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if functional is not None:
            cls._functional = staticmethod(functional)  # type: ignore[assignment]
        if decoupled is not None:
            cls._decoupled = staticmethod(decoupled)  # type: ignore[assignment]
        if torch_type is not None:
            _opt_mapping[torch_type] = cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for state in self.state:
            for i, s in list(state.items()):
                _python_step(s)
                if s["step"] == 0:
                    # a state before any update (torch.optim.Adagrad builds one in its
                    # constructor) holds only what the settings say: the functional
                    # optimizer builds its own, in its own convention
                    del state[i]
        # parameters whose state has every buffer the functional optimizer reads
        self._complete: list[set[int]] = [set() for _ in self.param_groups]

    def _optimizer(self, group: dict[str, Any]) -> Optimizer:
        factory = type(self)._functional
        probe = factory()
        if (
            group.get("decoupled_weight_decay")
            and "decoupled_weight_decay" not in probe.defaults
            and not getattr(probe, "decoupled_weight_decay", False)  # AdamW already is
        ):
            if type(self)._decoupled is None:
                raise ValueError(
                    f"{type(self).__name__}: decoupled_weight_decay=True has no differentiable "
                    "counterpart here"
                )
            decoupled = type(self)._decoupled
            assert decoupled is not None
            probe = decoupled()
        for flag in probe.flags:
            if isinstance(group.get(flag), Tensor):
                raise TypeError(
                    f"{type(self).__name__}: setting {flag!r} switches the update's structure and "
                    f"must be a Python bool, got a tensor; do not override it with a tensor"
                )
        return probe

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        groups = zip(self.param_groups, grouped_grads, self.state, self._complete)
        for group, grads, state, complete in groups:
            opt = self._optimizer(group)
            hparams = {k: group[k] for k in opt.defaults if k in group}
            if group["params"]:
                hparams = _cast_settings(hparams, group["params"][0])
            cohorts: dict[int, list[int]] = {}
            for i, g in enumerate(grads):
                if g is None:
                    continue  # torch.optim: no gradient, no update, no state change
                if i not in complete:
                    _complete(state[i], _fresh_state(opt, group["params"][i], hparams))
                    complete.add(i)
                cohorts.setdefault(state[i]["step"], []).append(i)
            for step, members in cohorts.items():
                self._step_cohort(opt, group, grads, state, hparams, step, members)

    @staticmethod
    def _step_cohort(
        opt: Optimizer,
        group: dict[str, Any],
        grads: list[Tensor | None],
        state: Any,
        hparams: dict[str, Any],
        step: int,
        members: list[int],
    ) -> None:
        names = [str(i) for i in members]
        params = {n: group["params"][i] for n, i in zip(names, members)}
        grad_dict: dict[str, Tensor] = {}
        for n, i in zip(names, members):
            g = grads[i]
            assert g is not None
            grad_dict[n] = g
        keys = [k for k in state[members[0]] if k not in _COUNTS]
        fstate: dict[str, Any] = {"step": step}
        for k in keys:
            values = [state[i].get(k) for i in members]
            fstate[k] = None if all(v is None for v in values) else dict(zip(names, values))
        new_params, new_state = opt.step(params, grad_dict, fstate, hparams)
        counts = new_state.get("param_steps")
        for n, i in zip(names, members):
            group["params"][i] = new_params[n]
            s = state[i]
            # torch's per-parameter step: the functional state's per-parameter count where
            # it keeps one, else its step (every member of a cohort shares the count)
            s["step"] = counts[n] if isinstance(counts, dict) else new_state["step"]
            for k, v in new_state.items():
                if k not in _COUNTS:
                    s[k] = None if v is None else v[n]


def _cast_settings(hparams: dict[str, Any], ref: Tensor) -> dict[str, Any]:
    """0-d tensor settings in the weights' dtype and device, as torch's type promotion and
    higher's arithmetic would compute them (e.g. float32 ``get_trainable_opt_params``
    tensors with a float64 model); the cast is differentiable."""

    def cast(v: Any) -> Any:
        if (
            isinstance(v, Tensor)
            and v.is_floating_point()
            and (v.dtype != ref.dtype or v.device != ref.device)
        ):
            return v.to(dtype=ref.dtype, device=ref.device)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in hparams.items()}


def _python_step(s: dict[str, Any]) -> None:
    """torch's per-parameter step (a tensor; absent for SGD) as a Python int."""
    step = s.get("step")
    if isinstance(step, Tensor):
        s["step"] = int(step.item())  # once per parameter, at construction
    elif step is None:
        # SGD keeps no step count: a momentum buffer means it has stepped before
        s["step"] = int(any(isinstance(v, Tensor) for v in s.values()))
    else:
        s["step"] = int(step)


def _complete(s: dict[str, Any], fresh: dict[str, Any]) -> None:
    """Fill a (torch-copied) state with the buffers it lacks, in the functional layout."""
    for k, v in fresh.items():
        if k not in s:
            s[k] = v  # a fresh parameter, or torch's state without an optional buffer
        elif not isinstance(v, Tensor) and isinstance(s[k], Tensor) and s[k].ndim == 0:
            # torch keeps scalars (ASGD's eta and mu, NAdam's mu_product) as float32
            # tensors and reads them back with .item(); so does this, once per parameter
            s[k] = s[k].item()


def _fresh_state(opt: Optimizer, p: Tensor, hparams: dict[str, Any]) -> dict[str, Any]:
    """The functional optimizer's initial state of one parameter, in torch's layout."""
    init = opt.init({"p": p.detach()}, hparams)
    out: dict[str, Any] = {"step": init["step"]}
    for k, v in init.items():
        if k not in _COUNTS:
            out[k] = None if v is None else v["p"]
    return out
