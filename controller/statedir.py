"""The state directory's lock: one controller process per state directory.

A controller holds an exclusive `fcntl.flock` on `<state_dir>/controller.lock` for its whole
life, so a second controller on the same directory gets a clear error instead of sharing the
database. The lock belongs to the open file: the kernel drops it when the process dies, so a
crashed controller never leaves a stale lock behind. A standby controller (`--standby`)
waits on the same lock: it takes over the moment the holder's process is gone, and never
while it lives.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .states import StoreError

LOCK_NAME = "controller.lock"


class StateDirLockedError(StoreError):
    """Another process holds the state directory's lock."""


class StateDirLock:
    """An exclusive flock on `<state_dir>/controller.lock`, holding this process's pid.

    The lock belongs to the open file: it is released by `release()`, or by the kernel when the
    process dies, so a crashed controller never leaves a stale lock behind.
    """

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock; without `wait`, only if it is free now.

        Args:
            wait: block until the holder releases it or dies (a standby controller).

        Raises:
            StateDirLockedError: without `wait`, another process (or another StateDirLock)
                holds it.
        """
        if self._fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLockedError(
                f"state directory {str(self.state_dir)!r} is locked by another controller "
                f"(pid {holder}); stop it first or choose another --state-dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the pid stays in the file for diagnostics; harmless)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
