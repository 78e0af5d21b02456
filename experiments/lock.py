"""An exclusive lock on a run folder, so that two runs never write the same ``--out``.

The lock is the file ``.lock`` in the run folder, holding the owner's pid, and an ``flock``
on it. The kernel drops an ``flock`` when its process dies, however it dies (SIGKILL
included), so a lock file left by a dead process is stale by construction and is simply
taken over; the pid in it only serves to name the owner in the error message. In a
``torchrun`` launch rank 0 takes the lock for the whole job and the other ranks never
write the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class FolderBusy(Exception):
    """Another live process holds the run folder's lock."""


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolderLock:
    """Hold ``folder/.lock`` exclusively while the block runs.

    Args:
        folder: the run folder (created if missing; removed again on release when the
            lock was all this process put in it).

    Raises:
        FolderBusy: on entry, when a live process holds the lock; the message names its pid.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunFolderLock(d):
        ...     try:
        ...         RunFolderLock(d).acquire()
        ...     except FolderBusy as exc:
        ...         print("busy")
        busy
        >>> d.exists()  # nothing else was written, so the folder is gone again
        False
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> RunFolderLock:
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._try_lock(fd):
                os.close(fd)
                raise FolderBusy(
                    f"{self.folder} is in use by another run (pid {_owner(self.path)}); wait for "
                    "it to end or choose another --out"
                )
            # the previous owner may have deleted the file between our open and our lock:
            # then we hold a lock on a file nobody else can see; start again
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _try_lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        # no flock: trust the recorded pid (a stale file from a dead process is taken over)
        text = _owner(self.path)
        return not (text.isdigit() and int(text) != os.getpid() and _pid_alive(int(text)))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        if self._created_folder:
            try:
                self.folder.rmdir()  # only succeeds when empty
            except OSError:
                pass

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
