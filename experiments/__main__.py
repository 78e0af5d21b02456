"""``python -m experiments NAME [options]``: see :mod:`experiments.cli`; ``bench``: :mod:`experiments.bench`."""

from __future__ import annotations

import sys

from .cli import main as _cli_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``bench`` (its own options: several dtypes, no run folder) or run the CLI."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(args[1:])
    return _cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
