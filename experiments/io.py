"""Atomic file writes and checkpoints for experiment runs.

Every file an experiment leaves is written to a temporary file in the same folder and then
moved over the target with :func:`os.replace`, so a crash or a kill never leaves a half-written
``summary.json``, plot or checkpoint behind: a reader sees the old file or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600


TMP_SUFFIX = ".tmp"


class CheckpointError(Exception):
    """A checkpoint file cannot be read back (truncated, not a checkpoint, wrong format)."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write_bytes(p, b"abc"); p.read_bytes()
        b'abc'
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data, target)
        os.chmod(tmp, _MODE)
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        # name the file being written, not the temporary that was its first draft
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _write_all(f: Any, data: bytes, target: Path) -> None:
    """Write, flush and fsync: the one place bytes reach the disk (tests inject faults here)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Delete the temporaries (``.NAME.*.tmp``) that a killed writer left in ``folder``.

    Only call it while holding the folder's lock: another writer's temporary is not stale.
    Returns the names removed.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / ".checkpoint.pt.x1.tmp").write_bytes(b"")
        0
        >>> remove_stale_temporaries(d)
        ['.checkpoint.pt.x1.tmp']
    """
    removed = []
    for entry in sorted(Path(folder).glob(f".*{TMP_SUFFIX}")):
        if entry.is_file():
            _remove_quietly(str(entry))
            removed.append(entry.name)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and tuples to plain JSON types; non-finite floats to None.

    Example:
        >>> to_jsonable({"a": torch.tensor([1.5, float("nan")]), "b": (1, 2)})
        {'a': [1.5, None], 'b': [1, 2]}
    """
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # numpy scalars
        return to_jsonable(obj.item())
    if hasattr(obj, "tolist"):  # numpy arrays
        return to_jsonable(obj.tolist())
    return str(obj)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (tensors become lists, NaN becomes null)."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _serialize(obj: Any) -> bytes:
    # in memory first: torch.save on a full disk raises a RuntimeError about zip offsets
    # ("unexpected pos ..."), while a plain write raises OSError(ENOSPC) that names the cause
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (a plain torch file, e.g. final weights).

    ``obj`` must hold only what ``torch.load(..., weights_only=True)`` reads back: tensors,
    numbers, strings, None, and dicts / lists / tuples of them.
    """
    atomic_write_bytes(path, _serialize(obj))


VERIFIED_FORMAT = "bilevel-checkpoint-sha256"


def save_verified_checkpoint(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Save ``obj`` with the SHA-256 of its serialized bytes, in one atomically written file.

    The file is a torch file holding ``{"format", "sha256", "payload"}``, ``payload`` being
    the bytes of ``torch.save(obj)`` as a uint8 tensor: the hash and the content it covers
    are written (and replaced) together, so they cannot disagree after a crash. Read it
    back with :func:`load_verified_checkpoint`, which refuses a modified file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
        >>> save_verified_checkpoint(p, {"w": torch.ones(2)})
        >>> load_verified_checkpoint(p)["w"]
        tensor([1., 1.])
    """
    payload = _serialize(obj)
    digest = hashlib.sha256(payload).hexdigest()
    wrapper = {
        "format": VERIFIED_FORMAT,
        "sha256": digest,
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    atomic_write_bytes(path, _serialize(wrapper))


def _load(path: str | os.PathLike[str] | io.BytesIO, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {what}") from None
    except Exception as exc:  # torch raises many types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {what} is unreadable or malformed ({first[:120]})"
        ) from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        CheckpointError: the file is missing, truncated, not a torch checkpoint, or holds
            something other than a dict.
    """
    obj = _load(path, str(path))
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} is malformed: expected a dict, got {type(obj).__name__}"
        )
    return obj


def load_verified_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_verified_checkpoint`, checking its hash.

    Raises:
        CheckpointError: the file is missing, unreadable, not a verified checkpoint, or its
            content does not match the SHA-256 recorded with it (modified or damaged).
    """
    wrapper = load_checkpoint(path)
    payload = wrapper.get("payload")
    digest = wrapper.get("sha256")
    if (
        wrapper.get("format") != VERIFIED_FORMAT
        or not isinstance(digest, str)
        or not isinstance(payload, torch.Tensor)
        or payload.dtype != torch.uint8
    ):
        raise CheckpointError(
            f"checkpoint {path} is malformed: not a checkpoint written by this program "
            "(no content hash)"
        )
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint {path} fails its content check (SHA-256 mismatch): it was modified "
            "or damaged after it was written"
        )
    obj = _load(io.BytesIO(data), str(path))
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} is malformed: expected a dict, got {type(obj).__name__}"
        )
    return obj


_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file-size limit was reached (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def describe_os_error(exc: OSError) -> str:
    """One line saying which file could not be written or read, and why.

    Example:
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/x/a.json"))
        'cannot write runs/x/a.json: No space left on device (the disk is full)'
    """
    name = exc.filename if exc.filename is not None else "a file of the run folder"
    cause = _CAUSES.get(exc.errno or -1)
    text = exc.strerror or str(exc)
    return f"cannot write {name}: {text}" + (f" ({cause})" if cause else "")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
