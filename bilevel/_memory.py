"""How much memory a device has left, and byte counts people can read.

psutil is not a dependency: on Linux the CPU figure is ``MemAvailable`` from
``/proc/meminfo`` (what the kernel could hand out without swapping), elsewhere the free
physical pages from ``os.sysconf``; on a GPU, ``torch.cuda.mem_get_info`` of the device.
"""

from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``, or None when unknown.

    Example:
        >>> n = available_bytes("cpu")
        >>> n is None or n > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes with a binary unit.

    Example:
        >>> format_bytes(3.5 * 2**30)
        '3.5 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover - the loop returns
