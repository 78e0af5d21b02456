"""Preconditioners of :func:`cg` and :func:`minres`: a user's ``M^-1``, a diagonal, or Jacobi
from a Hutchinson estimate of the operator's diagonal (reused across solves when remembered).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.linalg._vec import Vec
from bilevel.linalg.base import _check_same, _check_tree, _Iterative, _Operator

Preconditioner = Callable[[Vec], Vec]


class Jacobi:
    """Jacobi preconditioning from a Hutchinson estimate of ``diag(A)`` (see :func:`jacobi`)."""

    def __init__(self, probes: int, every: int | None, floor: float, seed: int) -> None:
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 1:
            raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.probes = probes
        self.every = every
        self.floor = float(floor)
        self.seed = seed

    def __repr__(self) -> str:
        return f"jacobi(probes={self.probes}, every={self.every}, floor={self.floor:g}, seed={self.seed})"


def jacobi(probes: int = 16, every: int | None = 10, floor: float = 1e-6, seed: int = 0) -> Jacobi:
    """Jacobi preconditioning, ``M^-1 v = v / d``, with ``d`` a Hutchinson estimate of ``diag(A)``.

    ``d = mean_k z_k * (A z_k)`` over ``probes`` Rademacher vectors ``z_k`` (entries +-1),
    computed with one batched product (``torch.func.vmap`` of the operator, or
    ``torch.autograd.grad(..., is_grads_batched=True)`` on the implicit layers' reused graph
    on a GPU; a loop of products where the operator cannot be batched, and for the reused
    graph on the CPU, where the loop is faster). The estimate is unbiased; its
    standard error per entry is ``sqrt(sum_{i != j} A_ij^2 / probes)``. It is then made
    positive, as a symmetric positive definite preconditioner must be: ``|d|`` clamped below
    at ``floor`` times its largest entry.

    Estimating costs ``probes`` products. When the solve remembers the estimate (the implicit
    layers' :class:`bilevel.WarmStart`, or ``memory=`` of a direct call) it is reused for
    ``every`` solves and then estimated afresh (``None``: never, until
    :meth:`PreconditionerMemory.refresh`), so an outer loop pays for it once in ``every``
    steps. Without memory each solve estimates it.

    Args:
        probes: Rademacher probes per estimate.
        every: re-estimate after this many solves with one estimate (None: only on request).
        floor: the smallest entry of ``d`` relative to its largest, in ``(0, 1)``.
        seed: seed of the probes (the estimate is reproducible).

    Example:
        >>> from bilevel.linalg import cg
        >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
        >>> x, info = cg(preconditioner=jacobi(probes=4))(lambda v: A @ v, torch.ones(3, dtype=torch.float64))
        >>> info.iterations, info.preconditioner
        (1, 'jacobi (Hutchinson, 4 probes, estimated)')
    """
    return Jacobi(probes, every, floor, seed)


@dataclasses.dataclass
class PreconditionerMemory:
    """What a solve remembers about its preconditioner for the next solves.

    Attributes:
        diagonal: the latest estimate of the operator's diagonal (leaf list), or None.
        uses: solves that used ``diagonal`` so far.
        estimates: how many times the diagonal was estimated.

    Example:
        >>> from bilevel.linalg import cg
        >>> A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> memory, solver = PreconditionerMemory(), cg(preconditioner="jacobi")
        >>> for _ in range(3):
        ...     x, info = solver(lambda v: A @ v, torch.ones(2, dtype=torch.float64), memory=memory)
        >>> memory.estimates, memory.uses, info.preconditioner
        (1, 3, 'jacobi (Hutchinson, 16 probes, reused 2 times)')
    """

    diagonal: list[Tensor] | None = None
    uses: int = 0
    estimates: int = 0

    def refresh(self) -> None:
        """Estimate the diagonal afresh at the next solve."""
        self.diagonal = None
        self.uses = 0


def check_preconditioner(spec: Any) -> Any:
    """Validate a ``preconditioner=`` argument early; returns its normal form.

    None, ``"jacobi"`` (defaults of :func:`jacobi`), a :class:`Jacobi`, a callable ``M^-1``
    (``v -> M^-1 v`` on trees shaped like ``b``), or a diagonal of ``A``: a tensor (or a tree
    of tensors shaped like ``b``) of positive, finite entries. In the implicit layers'
    backward solves (``argmin``, ``root``, ...) ``b`` is the list of the unknowns' leaves in
    ``tree_flatten`` order, so a callable receives and returns such a list (one tensor
    unknown: a list of one tensor); a diagonal is then one tensor for one tensor unknown,
    else that list.
    """
    if spec is None or isinstance(spec, Jacobi):
        return spec
    if isinstance(spec, str):
        if spec != "jacobi":
            raise ValueError(
                f"preconditioner must be 'jacobi', a bilevel.linalg.jacobi(...), a callable "
                f"v -> M^-1 v, or a tensor diagonal of A; got the string {spec!r}"
            )
        return jacobi()
    leaves, _ = tree_flatten(spec)
    if isinstance(spec, Tensor) or (leaves and all(isinstance(t, Tensor) for t in leaves)):
        if isinstance(spec, Tensor):
            leaves = [spec]
        for t in leaves:
            if not t.is_floating_point():
                raise TypeError(
                    f"preconditioner: a diagonal must be a floating-point tensor, got {t.dtype}"
                )
        # one host read, at construction: a wrong sign would silently ruin the solve
        bad = torch.stack([~((t > 0) & torch.isfinite(t)).all() for t in leaves]).any()
        if bool(bad):
            raise ValueError(
                "preconditioner: a diagonal of A must have positive, finite entries (a symmetric "
                "positive definite preconditioner); take abs() and clamp it away from zero, or "
                "use preconditioner='jacobi'"
            )
        return spec
    if callable(spec):
        return spec
    raise TypeError(
        "preconditioner must be None, 'jacobi', a bilevel.linalg.jacobi(...), a callable "
        f"v -> M^-1 v, or a tensor diagonal of A; got {type(spec).__name__}"
    )


_SIGNS_PER_DRAW = 32  # probes' signs taken from the 32 low bits of one random draw per entry


def _rademacher(b: Vec, probes: int, seed: int) -> Callable[[int], list[Tensor]]:
    """``probe(k)``: the ``k``-th of ``probes`` sign vectors (leaves shaped like ``b``),
    from a seeded generator.

    One random 32-bit draw per entry gives the signs of 32 probes (bit ``k`` of the draw),
    so the random numbers cost a 32nd of one draw per sign (at p = 1e6 the draws of 16
    probes took longer than their 16 products). Drawn outside functorch transforms: under
    ``vmap`` a random op would raise, and the probes do not depend on the batch element.
    """
    with torch._C._DisableFuncTorch():
        gen = torch.Generator(device=b[0].device).manual_seed(seed)
        draws = [
            [torch.randint(0, 2**32, t.shape, generator=gen, device=t.device) for t in b]
            for _ in range(-(-probes // _SIGNS_PER_DRAW))
        ]

    def probe(k: int) -> list[Tensor]:
        bits = draws[k // _SIGNS_PER_DRAW]
        shift = k % _SIGNS_PER_DRAW
        # 2 * bit - 1, in the leaf's dtype
        return [((d >> shift) & 1).to(t.dtype).mul_(2).sub_(1) for d, t in zip(bits, b)]

    return probe


def _estimate(A: Any, b: Vec, probes: int, seed: int) -> list[Tensor]:
    """``mean_k z_k * (A z_k)`` (damping included) over Rademacher probes ``z_k``.

    One batched call: ``matvec.batched`` when the operator offers it (the implicit layers'
    reused graph, ``autograd.grad(..., is_grads_batched=True)``), else ``vmap(matvec)``. On
    the CPU the reused graph's products run one by one instead (there its batched backward
    was measured 4x slower than a loop: p = 1e6, 16 probes), accumulating the sum probe by
    probe, so no stack of probes is held.
    """
    probe = _rademacher(b, probes, seed)
    matvec, spec, damping = A.matvec, A.spec, A.damping
    # the reused graph's batched products (reverse-mode HVPs), or the plain backward's matmat
    batched = getattr(matvec, "batched", None) or getattr(matvec, "matmat", None)
    if batched is None or b[0].device.type != "cpu":
        Z = [torch.stack(leaves) for leaves in zip(*(probe(k) for k in range(probes)))]
        try:
            if batched is not None:
                AZ = tree_flatten(batched(tree_unflatten(list(Z), spec)))[0]
            else:
                AZ = tree_flatten(torch.func.vmap(matvec)(tree_unflatten(list(Z), spec)))[0]
        except RuntimeError:
            if batched is not None:
                raise
            # an operator vmap cannot see through (autograd.grad on a retained graph, a
            # host read): one product per probe
        else:
            AZ = _damped(AZ, Z, damping)
            return [(z * az).mean(0) for z, az in zip(Z, AZ)]
    total: list[Tensor] | None = None
    for k in range(probes):
        z = probe(k)
        az = _damped(tree_flatten(matvec(tree_unflatten(list(z), spec)))[0], z, damping)
        if total is None:
            total = [zi * ai for zi, ai in zip(z, az)]
        else:
            total = [torch.addcmul(t, zi, ai) for t, zi, ai in zip(total, z, az)]
    assert total is not None
    return [t / probes for t in total]


def _damped(out: list[Tensor], v: list[Tensor], damping: Any) -> list[Tensor]:
    if isinstance(damping, Tensor) or damping != 0:
        return [o + damping * vi for o, vi in zip(out, v)]
    return out


def hutchinson_diagonal(
    matvec: Callable[[Tree], Tree], like: Tree, probes: int = 16, seed: int = 0
) -> Tree:
    """Hutchinson's unbiased estimate of ``diag(A)``: ``mean_k z_k * (A z_k)``, Rademacher ``z_k``.

    ``like`` gives the tree structure, shapes, dtype and device. The products run as one
    ``torch.func.vmap`` of ``matvec`` (a loop when it cannot be vmapped). The standard error
    of entry ``j`` is ``sqrt(sum_{i != j} A_ij^2 / probes)``: exact for a diagonal ``A``.

    Example:
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
        >>> d = hutchinson_diagonal(lambda v: A @ v, torch.zeros(2, dtype=torch.float64), probes=4000)
        >>> bool(torch.allclose(d, torch.tensor([2.0, 3.0], dtype=torch.float64), atol=0.05))
        True
    """
    leaves, spec = _check_tree(like, "like")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    return tree_unflatten(_estimate(_Operator(matvec, like, 0.0), leaves, probes, seed), spec)


def _positive(d: list[Tensor], floor: float) -> list[Tensor]:
    """``|d|`` clamped below at ``floor * max |d|`` (an all-zero estimate becomes ones)."""
    mags = [t.abs() for t in d]
    top = torch.stack([m.max() for m in mags]).max()
    top = torch.where(top > 0, top, torch.ones_like(top))
    return [torch.maximum(m, floor * top) for m in mags]


class Diagonal:
    """``M^-1 v = v / d`` for a positive diagonal ``d`` (leaf list): ``into`` writes it into
    given buffers (the in-place CG loop), a call allocates."""

    def __init__(self, diagonal: list[Tensor]) -> None:
        self.inverse = [1.0 / t for t in diagonal]

    def __call__(self, v: Vec) -> Vec:
        return [vi * di for vi, di in zip(v, self.inverse)]

    def into(self, v: Vec, out: Vec) -> Vec:
        for vi, di, oi in zip(v, self.inverse, out):
            torch.mul(vi, di, out=oi)
        return out


def _user(fn: Callable[[Tree], Tree], b: Vec, spec: Any) -> Preconditioner:
    template = tree_unflatten(list(b), spec)
    checked = [False]

    def apply(v: Vec) -> Vec:
        out = fn(tree_unflatten(list(v), spec))
        if not checked[0]:
            try:
                _check_same(out, template, "the output of the preconditioner")
            except ValueError as e:
                raise ValueError(
                    f"{e} (preconditioner(v) must return M^-1 v, shaped like b)"
                ) from None
            checked[0] = True
        return tree_flatten(out)[0]

    return apply


def _matches(diagonal: list[Tensor] | None, b: Vec) -> bool:
    if diagonal is None or len(diagonal) != len(b):
        return False
    return all(
        d.shape == t.shape and d.dtype == t.dtype and d.device == t.device
        for d, t in zip(diagonal, b)
    )


def resolve(
    spec: Any, A: Any, b: Vec, memory: PreconditionerMemory | None
) -> tuple[Preconditioner | None, str]:
    """The function ``v -> M^-1 v`` of one solve and its description for the info record."""
    if spec is None:
        return None, ""
    if isinstance(spec, Jacobi):
        what = f"jacobi (Hutchinson, {spec.probes} probes"
        if memory is not None and _matches(memory.diagonal, b):
            stale = spec.every is not None and memory.uses >= spec.every
            if not stale:
                assert memory.diagonal is not None
                n = memory.uses
                memory.uses += 1
                return Diagonal(memory.diagonal), f"{what}, reused {n} time{'s' if n != 1 else ''})"
        seed = spec.seed + (0 if memory is None else memory.estimates)
        diagonal = _positive(_estimate(A, b, spec.probes, seed), spec.floor)
        if memory is not None:
            memory.diagonal = [t.detach() for t in diagonal]
            memory.uses = 1
            memory.estimates += 1
        return Diagonal(diagonal), f"{what}, estimated)"
    if callable(spec) and not isinstance(spec, Tensor):
        return _user(spec, b, A.spec), "user M^-1"
    # one tensor for one unknown tensor, also when the solve sees it as a list of one leaf
    # (the implicit layers' backward solves take their right-hand sides as leaf lists)
    like = b[0] if isinstance(spec, Tensor) and len(b) == 1 else tree_unflatten(list(b), A.spec)
    _check_same(spec, like, "preconditioner (a diagonal of A)")
    diagonal = [t.to(b[i].dtype) for i, t in enumerate(tree_flatten(spec)[0])]
    damping = A.damping
    if isinstance(damping, Tensor) or damping != 0:
        diagonal = [t + damping for t in diagonal]
    return Diagonal(diagonal), "diagonal (given)"


class _Preconditioned(_Iterative):
    """An iterative solver that takes ``preconditioner=`` (cg and minres)."""

    def __init__(
        self,
        tol: float,
        atol: float,
        maxiter: int | None,
        damping: float | Tensor,
        check_every: int | None,
        preconditioner: Any = None,
    ) -> None:
        super().__init__(tol, atol, maxiter, damping, check_every)
        self.preconditioner = check_preconditioner(preconditioner)

    def _options(self) -> dict[str, Any]:
        opts = super()._options()
        if self.preconditioner is not None:
            opts["preconditioner"] = self.preconditioner
        return opts
