"""A ``higher``-style stateful API for ``nn.Module`` users, on bilevel's functional core.

Code written for the archived ``higher`` library ports by changing its import::

    from bilevel import stateful as higher

    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x_support), y_support))
        F.mse_loss(fmodel(x_query), y_query).backward()

Unlike ``higher``, nothing is monkeypatched: the functional model calls
``torch.func.functional_call`` on the original module with a dict of fast weights, so weight
norm and parametrizations keep working, manually set weights are respected, and only the
current fast weights are held (autograd keeps what the backward pass needs, nothing more).
Buffers (BatchNorm statistics) are copied: the module's own buffers are never written to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel import optim as _optim
from bilevel.optim.base import Optimizer, Params, State

_TORCH_TO_FUNCTIONAL = {
    "SGD": "sgd",
    "Adam": "adam",
    "AdamW": "adamw",
    "RMSprop": "rmsprop",
    "Adagrad": "adagrad",
    "Adadelta": "adadelta",
    "Adamax": "adamax",
    "ASGD": "asgd",
    "Rprop": "rprop",
    "RAdam": "radam",
    "NAdam": "nadam",
}


class FunctionalModel:
    """Calls a module with explicit fast weights; ``higher``'s ``fmodel``.

    Example:
        >>> import torch
        >>> from bilevel.stateful import FunctionalModel
        >>> fmodel = FunctionalModel(torch.nn.Linear(2, 1))
        >>> fmodel(torch.ones(4, 2)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        module: nn.Module,
        params: Mapping[str, Tensor] | None = None,
        copy_initial_weights: bool = True,
    ) -> None:
        self.module = module
        if params is None:
            params = dict(module.named_parameters())
            if copy_initial_weights:
                params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
            else:
                # frozen parameters still need a gradient for the inner step
                params = {
                    k: v if v.requires_grad else v.detach().requires_grad_()
                    for k, v in params.items()
                }
        self.params: Params = dict(params)
        self.buffers: dict[str, Tensor] = {k: v.clone() for k, v in module.named_buffers()}

    def __call__(
        self,
        *args: Any,
        params: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        weights = self.params if params is None else self._as_dict(params)
        return functional_call(self.module, {**weights, **self.buffers}, args, kwargs)

    forward = __call__

    def _as_dict(self, params: Sequence[Tensor] | Mapping[str, Tensor]) -> Params:
        if isinstance(params, Mapping):
            return dict(params)
        params = list(params)
        if len(params) != len(self.params):
            raise ValueError(
                f"params has {len(params)} tensors but the model has {len(self.params)} parameters"
            )
        return dict(zip(self.params, params))

    def update_params(self, params: Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        """Replace the fast weights (a list in ``named_parameters`` order, or a dict)."""
        self.params = self._as_dict(params)

    def parameters(self) -> Iterator[Tensor]:
        """The current fast weights, in ``named_parameters`` order."""
        return iter(self.params.values())

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.params.items())

    @property
    def fast_params(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> FunctionalModel:
        self.module.train(mode)
        return self

    def eval(self) -> FunctionalModel:
        return self.train(False)


def functional_optimizer(
    opt: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[Optimizer, dict[str, Any]]:
    """Translate a ``torch.optim`` optimizer's settings into a functional optimizer.

    Returns the functional optimizer and the hyperparameters read from its param groups
    (a number where every group agrees, else ``{param_name: value}``). ``names`` maps
    ``id(parameter)`` to its name.

    Example:
        >>> import torch
        >>> from bilevel.stateful import functional_optimizer
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> names = {id(p): n for n, p in model.named_parameters()}
        >>> fopt, hparams = functional_optimizer(opt, names)
        >>> hparams["lr"], hparams["momentum"]
        (0.1, 0.9)
    """
    kind = type(opt).__name__
    if kind not in _TORCH_TO_FUNCTIONAL:
        raise TypeError(
            f"no differentiable counterpart for torch.optim.{kind}; supported: "
            f"{sorted(_TORCH_TO_FUNCTIONAL)}"
        )
    factory = getattr(_optim, _TORCH_TO_FUNCTIONAL[kind])
    flags: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    probe = factory()
    for key in probe.defaults:
        per_param: dict[str, Any] = {}
        for group in opt.param_groups:
            if key not in group:
                continue
            for p in group["params"]:
                if id(p) in names:
                    per_param[names[id(p)]] = group[key]
        if not per_param:
            continue
        values = list(per_param.values())
        same = all(_same(v, values[0]) for v in values)
        if isinstance(values[0], bool) or key in probe.flags:
            if not same:
                raise ValueError(f"setting {key!r} differs between param groups; not supported")
            flags[key] = values[0]
        elif isinstance(values[0], tuple):
            if not same:
                raise ValueError(f"setting {key!r} differs between param groups; not supported")
            hparams[key] = values[0]
        else:
            hparams[key] = values[0] if same else per_param
    return factory(**flags), hparams


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return bool(a == b)


class DifferentiableOptimizer:
    """``higher``'s ``diffopt``: ``step(loss)`` updates the functional model's fast weights
    differentiably (the new weights depend on the old ones, the gradient and every setting)."""

    def __init__(
        self,
        optimizer: Optimizer,
        fmodel: FunctionalModel,
        hparams: Mapping[str, Any],
        override: Mapping[str, Any] | None = None,
        track_higher_grads: bool = True,
        group_of: Mapping[str, int] | None = None,
        trainable: set[str] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.fmodel = fmodel
        self.group_of = dict(group_of or {})
        # torch.optim steps only the parameters it holds that require grad
        self.trainable = set(fmodel.params) if trainable is None else set(trainable)
        self.hparams: dict[str, Any] = dict(hparams)
        if override:
            self.hparams.update(self._expand(override))
        self.track_higher_grads = track_higher_grads
        self.state: State = optimizer.init(fmodel.params, self.hparams)

    def _expand(self, override: Mapping[str, Any]) -> dict[str, Any]:
        """``higher`` overrides give one value, or a list with one value per param group."""
        out: dict[str, Any] = {}
        for key, value in override.items():
            if isinstance(value, (list, tuple)) and key != "betas":
                if len(value) == 1:
                    out[key] = value[0]
                else:
                    out[key] = {name: value[g] for name, g in self.group_of.items()}
            else:
                out[key] = value
        return out

    def step(
        self,
        loss: Tensor,
        params: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None,
    ) -> list[Tensor]:
        """Take one differentiable step on ``loss``; returns the new fast weights.

        ``override`` changes settings for this step only (e.g. ``{"lr": lr_tensor}``, or
        a list of one value per param group); ``grad_callback`` may transform the gradients.
        """
        current = self.fmodel.params if params is None else self.fmodel._as_dict(params)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError("loss must be a 0-d tensor")
        names = [n for n, p in current.items() if n in self.trainable and p.requires_grad]
        grads = torch.autograd.grad(
            loss,
            [current[n] for n in names],
            create_graph=self.track_higher_grads,
            allow_unused=True,
        )
        # None where the loss does not use a parameter or it is not trained: the optimizer
        # leaves it (and its state) alone, as torch.optim does
        by_name = dict(zip(names, grads))
        grad_list = [by_name.get(n) for n in current]
        if grad_callback is not None:
            grad_list = list(grad_callback(grad_list))
        hp = dict(self.hparams)
        if override:
            hp.update(self._expand(override))
        new, self.state = self.optimizer.step(
            current, dict(zip(current, grad_list)), self.state, hp
        )
        if not self.track_higher_grads:
            new = {k: v.detach().requires_grad_() for k, v in new.items()}
        self.fmodel.update_params(new)
        return list(new.values())


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModel, DifferentiableOptimizer]]:
    """A functional model and a differentiable optimizer for an inner loop (``higher`` API).

    With ``copy_initial_weights=True`` the fast weights start as detached copies (no
    gradient reaches the module's parameters); with ``False`` they start as the module's
    parameters themselves, so the outer loss differentiates the initialization (MAML).
    The optimizer starts from a fresh state (no momentum carried over from ``opt``).

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> model = torch.nn.Linear(3, 1)
        >>> inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, do):
        ...     for _ in range(3):
        ...         _ = do.step(torch.nn.functional.mse_loss(fm(x), y))
        ...     torch.nn.functional.mse_loss(fm(x), y).backward()
        >>> model.weight.grad is not None
        True
    """
    if device is not None:
        raise ValueError(
            "device= is not supported: move the model first (the fast weights live where the "
            "module's parameters are)"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    group_of = {
        names[id(p)]: g
        for g, group in enumerate(opt.param_groups)
        for p in group["params"]
        if id(p) in names
    }
    fopt, hparams = functional_optimizer(opt, names)
    fmodel = FunctionalModel(model, copy_initial_weights=copy_initial_weights)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n in group_of}
    diffopt = DifferentiableOptimizer(
        fopt,
        fmodel,
        hparams,
        override=override,
        track_higher_grads=track_higher_grads,
        group_of=group_of,
        trainable=trainable,
    )
    yield fmodel, diffopt
