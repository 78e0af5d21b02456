"""Reproducible bi-level experiments: ``python -m experiments NAME [options]``.

In a checkout this folder is the package ``experiments``; installed, it is
``bilevel_experiments`` (console script ``bilevel-exp``), so that it cannot shadow or be
shadowed by a project's own ``experiments`` package. Imports inside it are relative.

Each experiment is a module named in :data:`EXPERIMENTS` (relative to this package, imported
only when chosen), with

* ``DESCRIPTION``: one line for ``python -m experiments --help``;
* ``OPTIONS``: a list of :class:`experiments.options.Option` (flags, defaults, ``--quick``
  values), and/or ``add_arguments(parser)`` for anything else;
* ``DTYPE``: the default ``--dtype`` (``"float32"`` when absent);
* ``validate(cfg)`` (optional): check the resolved options and input files before the run
  folder is touched; raise :class:`experiments.run.UsageError` (exit code 2);
* ``run(run, cfg) -> summary``: do the work through :class:`experiments.run.Run` phases and
  return the summary dict (``table``: list of row dicts, printed at the end; ``tables``:
  more titled tables; ``plots``: the PNG file names).

A module may instead own its command line: ``DESCRIPTION`` and ``main(argv) -> int``, which
receives every argument after NAME and returns the exit status (e.g. ``bench``, whose
options differ). Registering a new experiment of either kind is one line in
:data:`EXPERIMENTS`.
"""

EXPERIMENTS: dict[str, str] = {
    "learn-lr": ".learn_lr",
    "l2": ".l2",
    "maml": ".maml",
    "hyperclean": ".hyperclean",
    "argmin-timeseries": ".argmin_timeseries",
    "lasso": ".lasso",
    "portfolio": ".portfolio",
    "horizon": ".horizon",
}

__all__ = ["EXPERIMENTS"]
