"""The measuring harness of ``python -m experiments bench``: timing, agreement, memory, tables.

Every problem builds, for one configuration, a list of :class:`Impl` (one per
implementation: bilevel, the plain-PyTorch floor, the peers), each a function that computes
the hypergradient from scratch and returns it. :func:`measure` then

1. runs each once and compares its hypergradient with the reference implementation's
   (relative error ``||g - g_ref|| / ||g_ref||``): a disagreement is recorded in the row,
   never hidden, and the bench exits non-zero;
2. warms each up, then times ``repeats`` rounds in which the implementations run
   interleaved (the starting one rotates each round), so that drifts of the machine's speed
   hit all of them alike; the row reports the median and the spread (IQR / median).

Memory: :func:`saved_bytes` counts the peak of the bytes autograd holds for backward
(unique storages of saved tensors, through ``torch.autograd.graph.saved_tensors_hooks``);
:func:`cuda_peak` the CUDA allocator's peak; the peak RSS of a fresh process is measured by
:mod:`.children` (one subprocess per configuration).
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    """One implementation of a configuration's hypergradient.

    Attributes:
        name: the row label, e.g. ``"bilevel reverse"`` or ``"higher"``.
        fn: computes the hypergradient from scratch (forward and backward); returns it as a
            tensor or a sequence of tensors (flattened and concatenated for comparisons).
        check: compare the result with the reference (False for methods that are biased by
            design, e.g. truncated back-propagation: their error is shown, not judged).
        max_seconds: a budget for the timed repeats of slow methods (dense Hessians, finite
            differences): fewer repeats are run when one call is slower than this budget.
        note: a short remark printed in the table (e.g. which code path of a peer ran).
    """

    name: str
    fn: Callable[[], Any]
    check: bool = True
    max_seconds: float | None = None
    note: str = ""


@dataclass
class Result:
    """What :func:`measure` found for one implementation."""

    name: str
    times: list[float] = field(default_factory=list)
    value: Tensor | None = None
    rel_error: float | None = None
    agree: bool | None = None
    failed: str | None = None
    note: str = ""
    reference: bool = False
    checked: bool = True

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float | None:
        """Interquartile range over median (0 with fewer than 4 repeats' worth of quartiles)."""
        if len(self.times) < 2 or not self.median:
            return None
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q[2] - q[0]) / self.median


def flat(value: Any) -> Tensor:
    """A hypergradient (tensor, sequence or dict of tensors) as one detached float64 vector."""
    if isinstance(value, Tensor):
        return value.detach().reshape(-1).to(torch.float64).cpu()
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    return torch.cat([flat(v) for v in value]) if len(value) else torch.zeros(0)


def rel_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` (absolute when the reference is zero)."""
    if value.shape != reference.shape:
        return math.inf
    num = float(torch.linalg.vector_norm(value - reference))
    den = float(torch.linalg.vector_norm(reference))
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe_error(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {line}"[:160]


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    gc.collect()
    # as timeit: no cyclic garbage collection inside the timed region (it would land on
    # whichever implementation happens to cross the threshold)
    enabled = gc.isenabled()
    gc.disable()
    try:
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return time.perf_counter() - t0, out
    finally:
        if enabled:
            gc.enable()


def measure(
    impls: Sequence[Impl],
    *,
    reference: str | Tensor | None,
    rtol: float,
    repeats: int,
    warmup: int,
    device: torch.device,
    verbose: bool = False,
) -> dict[str, Result]:
    """Check, warm up and time ``impls`` (see the module docstring).

    ``reference`` is the name of the implementation whose hypergradient is the reference,
    a tensor (an exact answer computed elsewhere) or None (no comparison). ``rtol`` is the
    relative error under which two hypergradients agree.
    """
    results = {
        impl.name: Result(
            impl.name,
            note=impl.note,
            checked=impl.check,
            reference=isinstance(reference, str) and impl.name == reference,
        )
        for impl in impls
    }
    alive: list[Impl] = []
    for impl in impls:
        res = results[impl.name]
        try:
            seconds, out = _timed(impl.fn, device)
            res.value = flat(out)
            if not torch.isfinite(res.value).all():
                res.failed = "non-finite hypergradient"
            else:
                alive.append(impl)
                if impl.max_seconds is not None and seconds > impl.max_seconds:
                    res.times.append(seconds)  # the check run is the only timing of a slow one
        except Exception as exc:  # a peer's failure is reported, not fatal
            res.failed = _describe_error(exc)
            if verbose:
                traceback.print_exc(file=sys.stderr)

    ref_value: Tensor | None = None
    if isinstance(reference, Tensor):
        ref_value = flat(reference)
    elif isinstance(reference, str):
        ref = results.get(reference)
        ref_value = ref.value if ref is not None and ref.failed is None else None
    for impl in impls:
        res = results[impl.name]
        if res.value is None or ref_value is None:
            continue
        res.rel_error = rel_error(res.value, ref_value)
        if impl.check and not (isinstance(reference, str) and impl.name == reference):
            res.agree = res.rel_error <= rtol

    timed = [impl for impl in alive if not results[impl.name].times]
    for impl in timed:
        for _ in range(warmup):
            _timed(impl.fn, device)
    for r in range(repeats):
        order = timed[r % len(timed) :] + timed[: r % len(timed)] if timed else []
        for impl in order:
            res = results[impl.name]
            if impl.max_seconds is not None and sum(res.times) > impl.max_seconds and res.times:
                continue
            seconds, _ = _timed(impl.fn, device)
            res.times.append(seconds)
    return results


# --------------------------------------------------------------------------- memory


class SavedBytes:
    """Peak bytes held by autograd for backward, counting each storage once.

    Saved tensors are wrapped at pack time; the wrapper's release (when autograd frees the
    node) lowers the live count, so recomputation (checkpointing) is counted at its peak,
    not summed.
    """

    def __init__(self) -> None:
        self.refs: dict[tuple[Any, int], int] = {}
        self.sizes: dict[tuple[Any, int], int] = {}
        self.live = 0
        self.peak = 0

    def add(self, t: Tensor) -> tuple[Any, int] | None:
        if t.layout != torch.strided:
            return None
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        n = self.refs.get(key, 0)
        if n == 0:
            size = storage.nbytes()
            self.sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
        self.refs[key] = n + 1
        return key

    def release(self, key: tuple[Any, int]) -> None:
        n = self.refs[key] - 1
        if n == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)
        else:
            self.refs[key] = n


class _Packed:
    __slots__ = ("counter", "key", "tensor")

    def __init__(self, tensor: Tensor, counter: SavedBytes) -> None:
        self.tensor = tensor
        self.counter = counter
        self.key = counter.add(tensor)

    def __del__(self) -> None:
        if self.key is not None:
            self.counter.release(self.key)


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Run ``fn`` (forward and backward) and return the peak bytes saved for backward."""
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: _Packed(t, counter), lambda p: p.tensor
    ):
        out = fn()
    del out
    gc.collect()
    return counter.peak


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """The CUDA allocator's peak while ``fn`` runs, above what was allocated before."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux it is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a fresh child would report its parent's peak at the time of the fork.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes
    return int(kb if sys.platform == "darwin" else kb * 1024)


# --------------------------------------------------------------------------- formatting


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_err(err: float | None) -> str:
    if err is None:
        return "-"
    if err == 0:
        return "0"
    return f"{err:.1e}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Rows of strings as an aligned text table (numbers right-aligned)."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def right(text: str) -> bool:
        return bool(text) and (text[0].isdigit() or text[0] in "-+.<>≤") and text != "-"

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if right(v) else v.ljust(w) for v, w in zip(vals, widths)
        ).rstrip()

    out = [title] if title else []
    out.append(line(list(columns)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


# --------------------------------------------------------------------------- peers and machine


@dataclass
class Peer:
    """An optional peer library: whether it imported, its version, and what ran."""

    name: str
    available: bool
    version: str = ""
    note: str = ""

    def describe(self) -> str:
        if not self.available:
            return f"{self.name}: missing ({self.note})" if self.note else f"{self.name}: missing"
        return f"{self.name} {self.version}" + (f" ({self.note})" if self.note else "")


_PEERS: dict[str, Peer] = {}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def peer(name: str) -> Peer:
    """Detect the peer ``higher``, ``torchopt`` or ``jaxopt`` once (import errors become a
    note; ``jaxopt`` is missing when either it or ``jax`` does not import)."""
    if name in _PEERS:
        return _PEERS[name]
    try:
        __import__(name)
    except Exception as exc:
        found = Peer(name, False, note=_describe_error(exc))
    else:
        found = Peer(name, True, _version(name))
        if name == "torchopt":
            found.note = _torchopt_backend()
        elif name == "jaxopt":
            found.note = f"jax {_version('jax')}, jaxlib {_version('jaxlib')}; jit, x64"
    _PEERS[name] = found
    return found


def _torchopt_backend() -> str:
    """Which of TorchOpt's code paths runs: its C++/CUDA ops or the pure-Python fallback."""
    try:
        import torchopt._C  # noqa: F401  (the compiled extension)
    except Exception as exc:
        reason = _describe_error(exc)
        if "undefined symbol" in reason:
            reason = "ImportError: undefined symbol (built against another torch)"
        return f"C++ extension not loaded: {reason}; its pure-Python code ran"
    return "C++ extension loaded (only used by Adam with use_accelerated_op=True)"


def machine(device: torch.device) -> str:
    """A one-line description of the device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} logical CPUs"
