"""The functional model: an ``nn.Module`` that runs the user's module on fast weights.

``fmodel(x)`` calls a structural copy of the user's module (see
:mod:`bilevel.stateful.skeleton`) through ``torch.func.functional_call`` with the current
fast weights and the model's own copies of the buffers. Submodules (``fmodel[0]``,
``fmodel.encoder``) are views sharing the same fast weights; the module's own methods
(``fmodel.encode(x)``) and attributes (``fmodel[0].weight``, a parametrized weight) are
evaluated with the fast weights bound.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from bilevel.stateful.history import History
from bilevel.stateful.skeleton import Layout, bindings, layout, skeleton, weights_dict

ParamsArg = Iterable[Tensor] | Mapping[str, Tensor]


class _Root:
    """What a functional model and all its submodule views share."""

    def __init__(self, skel: nn.Module, buffers: list[Tensor]) -> None:
        self.skeleton = skel
        self.layout: Layout = layout(skel)
        self.buffers = buffers
        self.history = History()
        self.skeleton_ids = {id(m) for m in skel.modules()}
        self._cache: dict[int, tuple[list[tuple[str, int]], list[tuple[str, int]]]] = {}

    def names_for(self, module: nn.Module) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        key = id(module)
        if key in self._cache:
            return self._cache[key]
        found = (
            bindings(module, self.layout.param_places),
            bindings(module, self.layout.buffer_places),
        )
        if key in self.skeleton_ids:  # a temporary container (a slice) is not cached
            self._cache[key] = found
        return found

    def weights(self, module: nn.Module) -> dict[str, Tensor]:
        params = self.history.latest()
        if params is None:
            raise ValueError(
                "this functional model has no fast weights yet: pass params=[...] to the call, "
                "or set fmodel.fast_params / call fmodel.update_params(params) first"
            )
        p_names, b_names = self.names_for(module)
        return {**weights_dict(p_names, params), **weights_dict(b_names, self.buffers)}

    def as_list(self, params: ParamsArg) -> list[Tensor]:
        names = self.layout.param_names
        if isinstance(params, Mapping):
            missing = [n for n in names if n not in params]
            extra = [n for n in params if n not in names]
            if missing or extra:
                raise ValueError(
                    f"params given as a dict must have exactly the model's parameter names "
                    f"{names}; missing {missing}, unknown {extra}"
                )
            return [params[n] for n in names]
        out = list(params)
        if len(out) != len(names):
            raise ValueError(
                f"params has {len(out)} tensors but the model has {len(names)} parameters "
                f"(in model.parameters() order: {names})"
            )
        for i, t in enumerate(out):
            if not isinstance(t, Tensor):
                raise TypeError(f"params[{i}] ({names[i]}) is a {type(t).__name__}, not a tensor")
        return out


class FunctionalModule(nn.Module):
    """higher's ``fmodel``: the user's module run on explicit fast weights.

    Build it with :func:`bilevel.stateful.monkeypatch` or :func:`~bilevel.stateful.innerloop_ctx`.

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> fmodel = higher.monkeypatch(model)
        >>> isinstance(fmodel, torch.nn.Module), fmodel(torch.ones(4, 2)).shape
        (True, torch.Size([4, 1]))
        >>> zeros = [torch.zeros_like(p) for p in model.parameters()]
        >>> fmodel[1](torch.ones(1, 3), params=zeros)
        tensor([[0.]])
    """

    _fm_root: _Root
    _fm_module: nn.Module

    def __init__(self, root: _Root, module: nn.Module) -> None:
        super().__init__()
        self.__dict__["_fm_root"] = root
        self.__dict__["_fm_module"] = module
        self.training = module.training

    # -- calling ---------------------------------------------------------------------
    def forward(self, *args: Any, params: ParamsArg | None = None, **kwargs: Any) -> Any:
        """Run the module; ``params`` (a list in ``parameters()`` order, or a dict by name)
        become the current fast weights first, as in higher."""
        root = self._fm_root
        if params is not None:
            self.fast_params = params
        weights = root.weights(self._fm_module)
        return functional_call(
            self._fm_module, weights, args, kwargs, tie_weights=False, strict=False
        )

    def _bound(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        root, module = self._fm_root, self._fm_module

        def call(*args: Any, **kwargs: Any) -> Any:
            with _reparametrize_module(module, root.weights(module)):
                return fn(*args, **kwargs)

        call.__name__ = getattr(fn, "__name__", "method")
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if "_fm_module" not in d or name.startswith("_fm_"):
            return super().__getattr__(name)
        module, root = d["_fm_module"], d["_fm_root"]
        try:
            # attributes (a weight, a parametrized weight, a buffer) see the fast weights
            with _reparametrize_module(module, root.weights(module)):
                value = getattr(module, name)
        except ValueError:  # no fast weights yet: plain attribute access
            value = getattr(module, name)
        if isinstance(value, nn.Module):
            return FunctionalModule(root, value)
        if inspect.ismethod(value) and value.__self__ is module:
            return self._bound(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if (
            "_fm_module" not in d
            or name.startswith("_fm_")
            or name in d
            or name == "training"
            or hasattr(type(self), name)  # fast_params, track_higher_grads (properties)
        ):
            super().__setattr__(name, value)
            return
        module, root = d["_fm_module"], d["_fm_root"]
        index = root.layout.param_places.get((id(module), name))
        if index is not None:
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"fast weight {name!r} must be a tensor, got {type(value).__name__}"
                )
            current = root.history.latest()
            if current is None:
                raise ValueError("this functional model has no fast weights to replace")
            new = list(current)
            new[index] = value
            self.update_params(new)
            return
        if (id(module), name) in root.layout.buffer_places:
            root.buffers[root.layout.buffer_places[(id(module), name)]] = value
            return
        setattr(module, name, value)

    def __getitem__(self, index: Any) -> Any:
        item = self._fm_module[index]  # type: ignore[index]
        return FunctionalModule(self._fm_root, item) if isinstance(item, nn.Module) else item

    def __len__(self) -> int:
        return len(self._fm_module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for item in self._fm_module:  # type: ignore[attr-defined]
            yield FunctionalModule(self._fm_root, item) if isinstance(item, nn.Module) else item

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._fm_module)))

    def extra_repr(self) -> str:
        return f"functional view of {type(self._fm_module).__name__}"

    # -- fast weights ----------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        """Whether this is the whole model (not a submodule view)."""
        return self._fm_module is self._fm_root.skeleton

    def _own(self, params: list[Tensor]) -> list[Tensor]:
        if self.is_root:
            return params
        p_names, _ = self._fm_root.names_for(self._fm_module)
        seen: dict[int, None] = {}
        for _, i in p_names:
            seen.setdefault(i, None)
        return [params[i] for i in seen]

    def parameters(  # type: ignore[override]
        self, recurse: bool = True, time: int | None = None
    ) -> Iterator[Tensor]:
        """The fast weights (of this submodule, for a view) after step ``time``.

        ``time=None`` or ``-1`` is the latest, ``0`` the initial weights. Steps in between
        are available while the autograd graph (or you) still hold them.
        """
        root = self._fm_root
        if root.history.latest() is None:
            raise ValueError("this functional model does not hold fast weights")
        time = -1 if time is None else time
        if not root.history.track and time not in (-1, 0):
            raise ValueError(
                "the functional model is not tracking higher gradients: only the latest fast "
                "weights are kept"
            )
        return iter(self._own(root.history.at(time)))

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """``(name, fast weight)`` pairs, names as in the module's ``named_parameters``."""
        params = self._fm_root.history.latest() or []
        dot = f"{prefix}." if prefix else ""
        p_names, _ = self._fm_root.names_for(self._fm_module)
        seen: set[int] = set()
        for name, i in p_names:
            if remove_duplicate and i in seen:
                continue
            seen.add(i)
            yield dot + name, params[i]

    def named_buffers(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """The functional model's own copies of the buffers (BatchNorm statistics)."""
        dot = f"{prefix}." if prefix else ""
        _, b_names = self._fm_root.names_for(self._fm_module)
        seen: set[int] = set()
        for name, i in b_names:
            if remove_duplicate and i in seen:
                continue
            seen.add(i)
            yield dot + name, self._fm_root.buffers[i]

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:  # type: ignore[override]
        for _, b in self.named_buffers():
            yield b

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        """Views of the direct submodules."""
        for name, m in self._fm_module.named_children():
            yield name, FunctionalModule(self._fm_root, m)

    def children(self) -> Iterator[nn.Module]:  # type: ignore[override]
        for _, m in self.named_children():
            yield m

    def named_modules(  # type: ignore[override]
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """This model and views of all its submodules."""
        for name, m in self._fm_module.named_modules(memo, prefix, remove_duplicate):
            yield name, self if m is self._fm_module else FunctionalModule(self._fm_root, m)

    def modules(self) -> Iterator[nn.Module]:  # type: ignore[override]
        for _, m in self.named_modules():
            yield m

    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The current fast weights and the buffers by name (higher's patched module gave
        its fast weights too), e.g. for ``model.load_state_dict(fmodel.state_dict())``."""
        if args:
            raise TypeError("state_dict takes keyword arguments only")
        root = self._fm_root
        params = root.history.latest() or []
        places = root.layout
        out: dict[str, Any] = {} if destination is None else destination
        # torch's order: module by module (shared ones under each name), parameters first
        for name, m in self._fm_module.named_modules(remove_duplicate=False):
            dot = f"{prefix}{name}." if name else prefix
            for attr in m._parameters:
                i = places.param_places.get((id(m), attr))
                if i is not None:
                    out[dot + attr] = params[i] if keep_vars else params[i].detach()
            for attr in m._buffers:
                i = places.buffer_places.get((id(m), attr))
                if i is not None and attr not in m._non_persistent_buffers_set:
                    b = root.buffers[i]
                    out[dot + attr] = b if keep_vars else b.detach()
        return out

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (``None`` if none were given); settable, as in higher."""
        latest = self._fm_root.history.latest()
        return None if latest is None else self._own(list(latest))

    @fast_params.setter
    def fast_params(self, value: ParamsArg) -> None:
        self._fm_root.history.record(self._fm_root.as_list(value))

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (only while tracking higher gradients)."""
        if not self.track_higher_grads:
            raise ValueError(
                "the initial fast weights are not kept when not tracking higher gradients"
            )
        return self._own(self._fm_root.history.at(0))

    def update_params(self, params: ParamsArg) -> None:
        """Make ``params`` (all the model's fast weights) the current ones."""
        self.fast_params = params

    @property
    def track_higher_grads(self) -> bool:
        """Whether every step's fast weights are part of the graph (higher's flag)."""
        return self._fm_root.history.track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        self._fm_root.history.track = value

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set the training flag of this functional model only (not of the user's module)."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {type(mode).__name__}")
        self._fm_module.train(mode)
        self.training = mode
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FunctionalModule:
        # .to(device) / .double(): applies to the fast weights and buffers this model owns
        root = self._fm_root
        latest = root.history.latest()
        if latest is not None:
            root.history.record([fn(p) for p in latest])
        root.buffers[:] = [fn(b) for b in root.buffers]
        return self


def functional_module(
    module: nn.Module,
    params: Sequence[Tensor] | None,
    device: torch.device | str | None = None,
) -> FunctionalModule:
    """A functional model over ``module`` with buffer copies and optional initial weights."""
    if isinstance(module, FunctionalModule):
        raise TypeError("module is already a functional model; pass the original nn.Module instead")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    skel = skeleton(module)
    root = _Root(skel, [])
    by_name = dict(skel.named_buffers(remove_duplicate=False))
    root.buffers = [_copy_buffer(by_name[n], device) for n in root.layout.buffer_names]
    fmodel = FunctionalModule(root, skel)
    if params is not None:
        fmodel.update_params(params)
    return fmodel


def _copy_buffer(b: Tensor, device: torch.device | str | None) -> Tensor:
    b = b.detach().clone()
    return b if device is None else b.to(device)
