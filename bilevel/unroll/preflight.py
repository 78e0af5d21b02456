"""Checks of an unroll made once, on its first step, before the loop runs.

Mistakes that every mode would otherwise turn into a silent wrong result, or into a raw torch
error far from their cause, are found by running the first inner step once eagerly, with a
graph, outside the mode's machinery, so that the message is the same in every mode:

- an ``hparams`` key that neither the optimizer nor the inner loss reads (a misspelling:
  ``"lerning_rate"`` would leave the default learning rate in place) names the closest
  known name;
- a complex inner loss, or one that does not depend on ``params``;
- in ``forward`` and ``checkpoint`` modes, a tensor that requires grad captured in a closure
  (the inner loss or a schedule function): those modes differentiate explicit inputs only,
  so its gradient would be silently missing;
- nothing that requires grad at all (a warning: the result is a constant);
- in reverse modes, a graph that will not fit: the bytes saved for backward by the first
  step, times the number of differentiated steps, against the memory available.

It also returns the tensors the step read that outlive it (data and captured tensors), whose
version counters the checkpoint mode records to detect in-place changes before backward.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bilevel._memory import available_bytes, format_bytes


class MemoryWarning(UserWarning):
    """An unroll is estimated not to fit in the available memory."""


# warn when a reverse-mode graph is estimated above this fraction of the available memory
MEMORY_FRACTION = 0.5


class RecordingHParams(Mapping):
    """A read-only view of ``hparams`` that records which keys were read.

    Example:
        >>> h = RecordingHParams({"lr": 0.1, "wd": 0.0})
        >>> h.get("lr"), sorted(h.read)
        (0.1, ['lr'])
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data
        self.read: set[str] = set()
        self.asked: set[str] = set()  # read or looked for: the names the code knows

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        value = self._data[key]
        self.read.add(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class FirstStep:
    """What :func:`check_first_step` needs: the unroll's inputs and its first batch."""

    inner_loss: Callable[..., Tensor]
    params: Mapping[str, Tensor]
    hparams: Mapping[str, Any]
    optimizer: Any
    state: Any
    buffers: Mapping[str, Tensor] | None
    batch: Any
    mode: str
    steps: int
    truncate: int | None
    call_loss: Callable[..., Tensor]
    check_hparams: bool = True


@dataclass
class FirstStepReport:
    """What the first step showed: whether anything requires grad, the bytes it saved for
    backward, and weak references to the tensors it read that outlive it."""

    differentiable: bool
    saved_bytes: int
    persistent: list[weakref.ReferenceType[Tensor]]


class _ReadLog(TorchFunctionMode):
    """Weak references to every tensor a torch function is given while active (the tensors
    the step reads, whether or not autograd saves them)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, weakref.ReferenceType[Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        for x in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(x, Tensor) and id(x) not in self.tensors:
                self.tensors[id(x)] = weakref.ref(x)
        return func(*args, **(kwargs or {}))


class _SavedLog:
    """A saved-tensors hook that only looks: sizes and weak references, values untouched."""

    def __init__(self) -> None:
        self.tensors: dict[int, weakref.ReferenceType[Tensor]] = {}
        self.bytes: dict[Any, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        try:
            self.tensors.setdefault(id(t), weakref.ref(t))
        except TypeError:  # pragma: no cover - every Tensor supports weak references
            pass
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            self.bytes[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def first_batch_cached(batch_at: Callable[[int], Any]) -> tuple[Callable[[int], Any], Any]:
    """Draw the first batch once (an iterator must not lose it to the check) and a batch
    source that hands that same batch back for step 0.

    Example:
        >>> batches = iter([1, 2, 3])
        >>> at, first = first_batch_cached(lambda t: next(batches))
        >>> first, at(0), at(1), at(2)
        (1, 1, 2, 3)
    """
    first = batch_at(0)

    def cached(t: int) -> Any:
        return first if t == 0 else batch_at(t)

    return cached, first


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


def _captured_leaf(roots: list[Tensor], known: list[Tensor]) -> Tensor | None:
    """A leaf requiring grad reached from ``roots``' graph and not among ``known``."""
    known_ids = {id(t) for t in known if t.is_leaf}
    stops = {t.grad_fn for t in known if t.grad_fn is not None}
    stack: list[Any] = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor) and id(variable) not in known_ids:
            return variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return None


# the long or other libraries' names of settings, so that a misspelling of them finds ours
ALIASES = {
    "learning_rate": "lr",
    "step_size": "lr",
    "beta1": "betas",
    "beta2": "betas",
    "decay": "weight_decay",
    "l2": "weight_decay",
    "epsilon": "eps",
    "mom": "momentum",
}


def _closest(key: str, names: set[str]) -> str:
    spellings = {a: n for a, n in ALIASES.items() if n in names}
    spellings.update({n: n for n in names})  # a real name wins over an alias
    match = difflib.get_close_matches(key, sorted(spellings), n=1, cutoff=0.6)
    return f"; did you mean {spellings[match[0]]!r}?" if match else ""


def check_first_step(first: FirstStep) -> FirstStepReport:
    """Run the first inner step once, eagerly, and raise (or warn) on the mistakes above.

    The RNG state is restored afterwards, so a dropout draw is not consumed.

    Example:
        >>> import torch, bilevel
        >>> from bilevel.unroll.preflight import FirstStep, check_first_step
        >>> first = FirstStep(lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)},
        ...                   {"lerning_rate": torch.tensor(0.1)}, bilevel.optim.sgd(), None,
        ...                   None, None, "reverse", 3, None, lambda f, p, h, b, bu: f(p, h))
        >>> try:
        ...     check_first_step(first)
        ... except ValueError as exc:
        ...     print(str(exc).split(";")[1].split("?")[0].strip())
        did you mean 'lr'
    """
    optimizer = first.optimizer
    hparams = RecordingHParams(first.hparams)
    state = first.state if first.state is not None else optimizer.init(dict(first.params))
    log = _SavedLog()
    reads = _ReadLog()
    ref = next(iter(first.params.values()))
    devices = [ref.device] if ref.is_cuda else []
    with (
        torch.random.fork_rng(devices=devices),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(log.pack, log.unpack),
        reads,
    ):
        live = {k: v.detach().requires_grad_() for k, v in first.params.items()}
        buffers = (
            None if first.buffers is None else {k: v.clone() for k, v in first.buffers.items()}
        )
        loss = first.call_loss(first.inner_loss, live, hparams, first.batch, buffers)
        if isinstance(loss, Tensor) and loss.is_complex():
            raise TypeError(
                f"inner_loss returned a complex tensor ({loss.dtype}): a loss to minimise must "
                "be real; return e.g. its .abs() ** 2 or its .real"
            )
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            return FirstStepReport(True, 0, [])  # the loop's own check names the shape
        grads = (
            torch.autograd.grad(loss, list(live.values()), create_graph=True, allow_unused=True)
            if loss.requires_grad
            else [None] * len(live)
        )
        if all(g is None for g in grads):
            raise ValueError(
                "inner_loss does not depend on params: no gradient reaches any of "
                f"{sorted(live)} (computed from detached tensors, under torch.no_grad(), or from "
                "other tensors than the params it is given?); compute it from the params argument"
            )
        filled = {
            k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(live.items(), grads)
        }
        new_params, _ = optimizer.step(live, filled, state, hparams)
    if first.check_hparams:
        _check_all_read(first.hparams, hparams, optimizer)

    hyper = _tensor_leaves((dict(first.hparams), dict(optimizer.settings)))
    explicit = [t for t in hyper if t.requires_grad]
    params_grad = any(p.requires_grad for p in first.params.values())
    roots = [loss, *new_params.values()]
    captured = _captured_leaf(roots, [*live.values(), *hyper])
    if captured is not None and first.mode in ("forward", "checkpoint", "auto", "reversible"):
        raise ValueError(
            f"inner_loss (or a schedule function) uses a tensor of shape {tuple(captured.shape)} "
            f"that requires grad and is not in hparams: mode={first.mode!r} differentiates "
            "explicit inputs only and would leave its gradient missing; pass it in hparams "
            "and read it from there"
        )
    differentiable = bool(explicit) or params_grad or captured is not None
    bytes_per_step = _step_bytes(log, first)
    del loss, grads, filled, new_params, live, buffers
    persistent = [r for r in reads.tensors.values() if r() is not None]
    return FirstStepReport(differentiable, bytes_per_step, persistent)


def _check_all_read(given: Mapping[str, Any], seen: RecordingHParams, optimizer: Any) -> None:
    unread = [k for k in given if k not in seen.read]
    if not unread:
        return
    key = unread[0]
    settings = set(getattr(optimizer, "defaults", {}))
    if key in settings:
        raise ValueError(
            f"hparams[{key!r}] is ignored: the optimizer was given {key}= in its constructor, "
            "which takes precedence; give it in one place"
        )
    raise ValueError(
        f"hparams[{key!r}] was read by neither the optimizer nor inner_loss during the first "
        f"step{_closest(key, settings | seen.asked)} (the optimizer reads {sorted(settings)}; pass "
        "check_hparams=False if inner_loss reads it only at later steps)"
    )


def _step_bytes(log: _SavedLog, first: FirstStep) -> int:
    """Bytes the step saved for backward, less the inputs every step shares (data, hparams)."""
    shared = {
        (t.device, t.untyped_storage().data_ptr())
        for t in _tensor_leaves((first.batch, dict(first.hparams), first.buffers))
        if t.layout == torch.strided
    }
    return sum(n for key, n in log.bytes.items() if key not in shared)


def warn_if_graph_will_not_fit(report: FirstStepReport, first: FirstStep) -> None:
    """Reverse / truncated: warn when T (or K) steps of saved tensors exceed the budget
    (:data:`MEMORY_FRACTION` of :func:`bilevel._memory.available_bytes`).

    Example:
        >>> first = FirstStep(None, {"w": torch.zeros(1)}, {}, None, None, None, None,
        ...                   "checkpoint", 10, None, None)
        >>> warn_if_graph_will_not_fit(FirstStepReport(True, 10**15, []), first)  # not reverse
    """
    if first.mode not in ("reverse", "truncated") or not report.differentiable:
        return
    kept = first.steps if first.mode == "reverse" else (first.truncate or first.steps)
    need = report.saved_bytes * kept
    device = next(iter(first.params.values())).device
    have = available_bytes(device)
    if have is None or need <= MEMORY_FRACTION * have:
        return
    import warnings

    warnings.warn(
        f"unroll(mode={first.mode!r}) will keep about {format_bytes(need)} for backward "
        f"({format_bytes(report.saved_bytes)} per step x {kept} steps), more than "
        f"{MEMORY_FRACTION:.0%} of the {format_bytes(have)} available on {device.type}; "
        "mode='checkpoint' keeps about sqrt(T) steps' worth, mode='forward' none "
        "(its cost grows with the number of hyperparameters instead)",
        MemoryWarning,
        stacklevel=3,
    )
