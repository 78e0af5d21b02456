"""Finite-difference checks of hypergradients, in the spirit of ``torch.autograd.gradcheck``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


class HypergradCheckError(AssertionError):
    """Raised by :func:`hypergradcheck` with ``raise_exception=True`` when a check fails."""

    def __init__(self, report: HypergradReport) -> None:
        super().__init__(f"hypergradient check failed:\n{report}")
        self.report = report


@dataclass
class HypergradEntry:
    """The check of one hyperparameter tensor.

    ``analytic`` and ``numeric`` are per element (``kind == "elements"``) or directional
    derivatives along random unit directions (``kind == "directions"``).
    """

    name: str
    kind: str
    analytic: Tensor
    numeric: Tensor
    abs_error: float
    rel_error: float
    passed: bool


@dataclass
class HypergradReport:
    """Result of :func:`hypergradcheck`; ``bool(report)`` is whether every entry passed."""

    entries: list[HypergradEntry] = field(default_factory=list)
    eps: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    dtype: torch.dtype = torch.float64

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.entries)

    @property
    def max_rel_error(self) -> float:
        return max((e.rel_error for e in self.entries), default=0.0)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [
            f"hypergradcheck (central differences, eps={self.eps:g}, atol={self.atol:g}, "
            f"rtol={self.rtol:g}): {'passed' if self.passed else 'FAILED'}",
            f"  {'hyperparameter':<20} {'checked':<14} {'abs error':>10} {'rel error':>10}  result",
        ]
        for e in self.entries:
            checked = f"{e.analytic.numel()} {e.kind}"
            lines.append(
                f"  {e.name:<20} {checked:<14} {e.abs_error:>10.2e} {e.rel_error:>10.2e}  "
                f"{'ok' if e.passed else 'FAIL'}"
            )
            if not e.passed:
                n = min(4, e.analytic.numel())
                lines.append(f"    analytic[:{n}] = {e.analytic.flatten()[:n].tolist()}")
                lines.append(f"    numeric[:{n}]  = {e.numeric.flatten()[:n].tolist()}")
        if not self.passed and self.dtype != torch.float64:
            lines.append(
                f"  hint: in {str(self.dtype).replace('torch.', '')} central differences carry "
                f"relative errors of about {_tolerances(self.dtype)[2]:.0e}, so a correct "
                "hypergradient can fail here; rerun the check in float64 (.double() the model, "
                "the data and the hyperparameters)"
            )
        return "\n".join(lines)


def _tolerances(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(eps, atol, rtol)`` for central differences in ``dtype``.

    The step balances truncation (eps^2) against rounding (u / eps): eps ~ u^(1/3), where
    the relative error is about u^(2/3) of the loss; float64 keeps the tighter, tested
    defaults.
    """
    if dtype == torch.float64:
        return 1e-6, 1e-8, 1e-6
    u = torch.finfo(dtype).eps
    return u ** (1 / 3), u ** (2 / 3), 2 * u ** (1 / 3)


def hypergradcheck(
    fn: Callable[[dict[str, Tensor]], Tensor],
    hparams: Mapping[str, Tensor],
    *,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_elements: int = 16,
    n_directions: int = 4,
    seed: int = 0,
    raise_exception: bool = False,
) -> HypergradReport:
    """Compare the autograd hypergradient of ``fn(hparams)`` with central finite differences.

    ``fn`` maps a dict of hyperparameter tensors to the outer loss, re-running the inner
    problem each call (an unroll, an argmin, ...). A tensor with at most ``max_elements``
    elements is checked element by element; a larger one along ``n_directions`` random unit
    directions ``d``, comparing ``grad . d`` with ``(fn(h + eps d) - fn(h - eps d)) / 2 eps``.
    An entry passes when ``|analytic - numeric| <= atol + rtol * |numeric|`` everywhere.
    The step and tolerances not given follow the least precise hyperparameter's dtype:
    ``eps=1e-6, atol=1e-8, rtol=1e-6`` in float64; in float32 ``eps`` ~ 5e-3 (the cube root
    of the machine epsilon, which balances truncation and rounding), ``atol`` ~ 2e-5 and
    ``rtol`` ~ 1e-2. Prefer float64: a float32 report that fails says so and suggests it.

    Args:
        fn: the outer loss as a function of the hyperparameters.
        hparams: the point at which to check, a dict of floating tensors.
        eps: the finite-difference step (default: from the dtype).
        atol, rtol: the tolerances (default: from the dtype).
        max_elements: tensors larger than this are checked along random directions.
        n_directions: how many random directions for a large tensor.
        seed: the seed of the random directions (the global RNG is left untouched).
        raise_exception: raise :class:`HypergradCheckError` when a check fails.

    Returns:
        A :class:`HypergradReport`; ``print(report)`` shows a table.

    Example:
        >>> import torch, bilevel
        >>> def outer(h):
        ...     result = bilevel.unroll(lambda p, h: ((p["w"] - 1) ** 2).sum(),
        ...                             {"w": torch.zeros(3, dtype=torch.float64)}, h,
        ...                             bilevel.optim.sgd(), steps=5)
        ...     return (result.params["w"] ** 2).sum()
        >>> report = bilevel.hypergradcheck(outer, {"lr": torch.tensor(0.1, dtype=torch.float64)})
        >>> report.passed
        True
    """
    if not isinstance(hparams, Mapping) or not hparams:
        raise TypeError("hparams must be a non-empty dict of tensors")
    for name, h in hparams.items():
        if not isinstance(h, Tensor) or not h.is_floating_point():
            raise TypeError(f"hparams[{name!r}] must be a floating-point tensor, got {h!r:.60}")
    lowest = max((h.dtype for h in hparams.values()), key=lambda d: torch.finfo(d).eps)
    default_eps, default_atol, default_rtol = _tolerances(lowest)
    eps = default_eps if eps is None else eps
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    point = {k: v.detach().clone() for k, v in hparams.items()}

    def evaluate(values: dict[str, Tensor]) -> Tensor:
        out = fn(values)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(f"fn must return a scalar tensor, got {out!r:.60}")
        return out.reshape(())

    leaves = {k: v.clone().requires_grad_() for k, v in point.items()}
    grads = torch.autograd.grad(evaluate(leaves), list(leaves.values()), allow_unused=True)
    analytic_full = {
        k: torch.zeros_like(v) if g is None else g.detach()
        for (k, v), g in zip(leaves.items(), grads)
    }

    generator = torch.Generator().manual_seed(seed)
    report = HypergradReport(eps=eps, atol=atol, rtol=rtol, dtype=lowest)
    for name, value in point.items():
        if value.numel() <= max_elements:
            kind = "elements"
            directions = torch.eye(value.numel(), dtype=value.dtype).reshape(-1, *value.shape)
        else:
            kind = "directions"
            d = torch.randn((n_directions, value.numel()), generator=generator, dtype=value.dtype)
            directions = (d / d.norm(dim=1, keepdim=True)).reshape(-1, *value.shape)
        directions = directions.to(value.device)
        numeric, analytic = [], []
        for d in directions:
            # the differences need no graph (and an unroll told nothing requires grad warns)
            with torch.no_grad():
                plus = {**point, name: value + eps * d}
                minus = {**point, name: value - eps * d}
                numeric.append((evaluate(plus) - evaluate(minus)).detach() / (2 * eps))
            analytic.append((analytic_full[name] * d).sum())
        num, ana = torch.stack(numeric), torch.stack(analytic)
        diff = (ana - num).abs()
        report.entries.append(
            HypergradEntry(
                name=name,
                kind=kind,
                analytic=ana,
                numeric=num,
                abs_error=float(diff.max()),
                rel_error=float((diff / num.abs().clamp_min(1e-300)).max()),
                passed=bool((diff <= atol + rtol * num.abs()).all()),
            )
        )
    if raise_exception and not report.passed:
        raise HypergradCheckError(report)
    return report
