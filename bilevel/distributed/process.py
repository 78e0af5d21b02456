"""Process setup: the default process group from ``torchrun``'s environment, this
process's rank, world size and device. Without a process group everything answers as a
single process (rank 0 of 1).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised.

    Example:
        >>> is_distributed()          # a plain Python process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without a process group).

    Example:
        >>> rank()
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """The number of processes in the default group (1 without a process group).

    Example:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def local_rank() -> int:
    """The rank within this node (``LOCAL_RANK`` set by ``torchrun``; 0 otherwise).

    Example:
        >>> isinstance(local_rank(), int)
        True
    """
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got {value!r}") from None


def is_main() -> bool:
    """True on rank 0: the process that writes files, logs and shows progress.

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


def device() -> torch.device:
    """The device this process should compute on: ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU.

    Example:
        >>> device().type in ("cpu", "cuda")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _timeout(value: float | datetime.timedelta | None) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif value is None:
        raw = os.environ.get("BILEVEL_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(
                f"BILEVEL_DIST_TIMEOUT must be a number of seconds, got {raw!r}"
            ) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"timeout must be seconds (a number) or a timedelta, got {type(value).__name__}"
        )
    if not seconds > 0:
        raise ValueError(f"timeout must be positive, got {seconds} seconds")
    return datetime.timedelta(seconds=seconds)


def init_from_env(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
) -> tuple[int, int]:
    """Initialise the default process group from the ``torchrun`` environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK``).
    Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, this is a no-op returning ``(0, 1)``:
    the same script runs as a plain single process. Calling it again returns the existing
    group's ``(rank, world_size)``.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` to pick from the device: NCCL when CUDA
            is available (and then ``torch.cuda.set_device(LOCAL_RANK)``), gloo on the CPU.
        timeout: how long a collective may wait for the other ranks before raising, in
            seconds or as a ``timedelta``; default ``BILEVEL_DIST_TIMEOUT`` from the
            environment, else 600 s. A rank that dies makes the others fail at their next
            collective instead of hanging forever.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> init_from_env()           # not launched by torchrun: nothing to do
        (0, 1)
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"backend must be 'gloo', 'nccl', 'mpi', 'ucc' or None, got {backend!r}")
    td = _timeout(timeout)
    if not dist.is_available():
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 0, 1
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if n <= 1:
        return 0, 1
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={n} but {', '.join(missing)} is not set: launch with torchrun "
            "(torchrun --nproc_per_node=N ...) or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    r = int(os.environ["RANK"])
    if not 0 <= r < n:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={n}), got {r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend, init_method="env://", rank=r, world_size=n, timeout=td)
    return r, n


def shutdown() -> None:
    """Destroy the default process group if there is one (call at the end of a script).

    Example:
        >>> shutdown()                # no group: nothing to do
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in a single process).

    Example:
        >>> barrier()
    """
    if is_distributed():
        dist.barrier()
