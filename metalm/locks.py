"""File locks that say who holds them: the run directory's (one trainer per run), the evaluator's results
directory's (one watcher per results) and the shards directory's (one preparer at a time).

Each is an exclusive `filelock.FileLock` (flock underneath: the kernel releases it when its holder exits, however
it exits, kill -9 included, so a stale lock file never blocks anyone). The holder writes one JSON line into the
lock file, {"host", "pid", "since"} (`since`: when it took the lock, UTC), and `HeldLock.holder` reads it back
for the message of whoever finds the lock taken: "host H, pid P, since T". flock is per host on most network
filesystems: two processes on different machines sharing a directory over NFS are not excluded by it.

No torch import: the data-preparation processes use this module too.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import filelock


class LockBusy(RuntimeError):
    """The lock is held by another process; the message names the holder."""


def holder_record() -> bytes:
    """What a holder writes into its lock file."""
    since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode() + b"\n"


class HeldLock:
    """An exclusive lock on `path` that records its holder. `acquire()` fails at once (LockBusy, the message from
    `busy(holder)`), or with wait=True waits for it (after `waiting(holder)` is called once). The lock is held
    until `release()` or until this object is garbage-collected: keep a reference while it must hold."""

    def __init__(self, path: str | os.PathLike, busy: Callable[[str], str]):
        self.path = Path(path)
        self.busy = busy
        self._lock = filelock.FileLock(str(self.path), timeout=0, on_acquired=self._record, thread_local=False)

    @staticmethod
    def _record(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_record(), 0)
        os.fsync(fd)

    def holder(self) -> str:
        """"host H, pid P, since T" of the lock file's last holder; "holder unknown" when it cannot be read."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def acquire(self, wait: bool = False, waiting: Callable[[str], None] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
            return
        except filelock.Timeout:
            if not wait:
                raise LockBusy(self.busy(self.holder())) from None
        if waiting is not None:
            waiting(self.holder())
        self._lock.acquire(timeout=-1)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked
