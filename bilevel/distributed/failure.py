"""Failure handling: an exception on one rank ends every rank promptly (no hang until the
collective timeout)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from bilevel.distributed.process import is_distributed, rank, world_size


@contextlib.contextmanager
def fail_fast(
    exit_code: int = 1, *, expected: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Make an exception on one rank end every rank promptly instead of hanging.

    In a distributed run, an exception escaping the block prints its traceback with the
    rank and exits the process at once (``os._exit``), which closes its connections: the
    other ranks' pending or next collective fails (and their own ``fail_fast`` exits them),
    so the whole job ends with an error rather than waiting for the collective timeout.
    In a single process the exception propagates normally.

    Args:
        exit_code: the exit status of a failed rank.
        expected: exception types that propagate normally, for conditions every rank
            meets at the same point (a step limit, a usage error decided on rank 0 and
            shared); ``SystemExit`` with status 0 always propagates.

    Example:
        >>> with fail_fast():
        ...     x = 1 + 1
    """
    try:
        yield
    except SystemExit as err:
        if not is_distributed() or err.code in (0, None) or isinstance(err, expected):
            raise
        _die(err, err.code if isinstance(err.code, int) else exit_code)
    except BaseException as err:  # noqa: BLE001 - every failure must end the rank
        if not is_distributed() or isinstance(err, expected):
            raise
        _die(err, exit_code)


def _die(err: BaseException, exit_code: int) -> None:
    try:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        # the traceback's last line, again, prefixed: with several ranks' outputs
        # interleaved on one console, each rank's own error stays attributable
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        sys.stderr.write(
            f"[rank {rank()}/{world_size()}] {type(err).__name__}"
            + (f": {text[:300]}" if text else "")
            + "; exiting so that the other ranks stop\n"
        )
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(exit_code)
