"""Declarative experiment options: one table gives the CLI flags, the defaults and ``--quick``.

Each experiment lists its options once::

    OPTIONS = [
        Option("outer_steps", 200, quick=8, type=positive_int, help="outer (hyper) steps"),
        Option("modes", "reverse,forward", type=choice_list(MODES), help="unroll modes"),
    ]

The flag is ``--outer-steps``; when not given it takes ``quick`` under ``--quick`` and
``default`` otherwise. Parse errors become a one-line CLI error (exit code 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_SAME = object()


@dataclass(frozen=True)
class Option:
    """One experiment option.

    Attributes:
        name: python name (``outer_steps``); the flag is ``--outer-steps``.
        default: the value of a full run (already parsed, e.g. an int or a list).
        quick: the value under ``--quick`` (default: same as ``default``).
        type: parses the command-line string; raise ``argparse.ArgumentTypeError`` on bad input.
        help: one line for ``--help``.
    """

    name: str
    default: Any
    quick: Any = _SAME
    type: Callable[[str], Any] = str
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, given: Any, quick: bool) -> Any:
        if given is not None:
            return given
        if quick and self.quick is not _SAME:
            return self.quick
        return self.default


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add one flag per option (default ``None``, resolved later by :func:`resolve`)."""
    group = parser.add_argument_group("experiment options")
    for opt in options:
        shown = _show(opt.default)
        quick = "" if opt.quick is _SAME else f"; --quick: {_show(opt.quick)}"
        group.add_argument(
            opt.flag,
            dest=opt.name,
            type=opt.type,
            default=None,
            help=f"{opt.help} (default: {shown}{quick})",
        )


def resolve(args: argparse.Namespace, options: Sequence[Option], quick: bool) -> dict[str, Any]:
    """The value of every option: given on the command line, else quick or full default."""
    return {opt.name: opt.value(getattr(args, opt.name, None), quick) for opt in options}


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


# -- parsers ---------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """Parse an int > 0.

    Example:
        >>> positive_int("3")
        3
    """
    value = _parse(int, text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """Parse an int >= 0."""
    value = _parse(int, text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite float > 0."""
    value = _parse(float, text, "a positive number")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """Parse a float in [0, 1)."""
    value = _parse(float, text, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def choice(choices: Sequence[str]) -> Callable[[str], str]:
    """A parser accepting one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A parser of a comma-separated, non-empty list drawn from ``choices``.

    Example:
        >>> choice_list(["a", "b"])("b,a")
        ['b', 'a']
    """

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return items

    return parse


def int_list(text: str) -> list[int]:
    """A comma-separated list of non-negative ints."""
    items = [nonneg_int(t.strip()) for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers, got {text!r}"
        )
    return items


def _parse(kind: type, text: str, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
