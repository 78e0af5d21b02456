"""higher's API on bilevel's functional core: port by changing the import.

Code written for the archived ``higher`` library runs with::

    from bilevel import stateful as higher

    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x_support), y_support))
        F.mse_loss(fmodel(x_query), y_query).backward()

Entry points as in higher: :func:`innerloop_ctx`, :func:`monkeypatch` (also
``patch.monkeypatch``), :func:`get_diff_optim`, :func:`create_diff_optim`,
:func:`register_optim`, the :mod:`~bilevel.stateful.optim` family
(``DifferentiableSGD``, ``DifferentiableAdam``, ...) and :mod:`~bilevel.stateful.utils`.

Unlike higher, nothing is monkeypatched: the functional model calls a structural copy of
the module with ``torch.func.functional_call``, so the user's module is never modified
(shared and tied weights included), weight norm and parametrizations work, and only the
fast weights something still needs are kept alive. The update of every optimizer is its
``torch.optim`` namesake's (where higher deviated, this follows torch.optim).

Example:
    >>> import torch
    >>> from bilevel import stateful as higher
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> inner_opt = torch.optim.SGD(model[2].parameters(), lr=0.1)   # adapt only the head
    >>> with higher.innerloop_ctx(model, inner_opt) as (fmodel, diffopt):
    ...     _ = diffopt.step(fmodel(torch.ones(5, 2)).pow(2).mean())
    ...     changed = [not torch.equal(a, b) for a, b in zip(fmodel.parameters(), model.parameters())]
    >>> changed
    [False, False, True, True]
"""

from bilevel.stateful import optim, patch, utils
from bilevel.stateful.context import innerloop_ctx
from bilevel.stateful.module import FunctionalModule
from bilevel.stateful.optim import (
    create_diff_optim,
    get_diff_optim,
    register_optim,
)
from bilevel.stateful.patch import monkeypatch

__all__ = [
    "FunctionalModule",
    "create_diff_optim",
    "get_diff_optim",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]
