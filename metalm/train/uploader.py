"""Checkpoints in a bucket: a background uploader for the checkpoints a run saves locally, and the remote side of
resume and prune (list, find the latest complete one, download it, delete old ones).

The remote layout is the local one (metalm.checkpoint): URL/step_XXXXXXXX/<files>, URL/step_XXXXXXXX/COMPLETE,
URL/latest. A checkpoint is uploaded file by file (each object appears complete or not at all), the COMPLETE
marker after every other file, `latest` after the marker; a marker already there (the same step saved again, by a
resumed run) is deleted first. So a reader that waits for the marker, the evaluator or a resume on another
machine, never sees a partial checkpoint. After each upload the remote keeps the newest checkpoint.keep_last_k
complete checkpoints (never the one `latest` names): an old one loses its marker first, then its files.

The uploader runs in one thread of rank 0 (the run directory is shared by the ranks). `submit` takes a
snapshot of the finished checkpoint by hard links into RUN/.uploads/ (milliseconds; the local prune can then
delete the checkpoint without disturbing its upload) and returns; at most checkpoint.upload_queue snapshots
wait, and when one more arrives the oldest waiting one is superseded (a warning says so). A failed file upload is
retried with backoff; a checkpoint that still fails is reported (stderr, metrics.jsonl), stays staged, and is
tried again after the next checkpoint and when the run ends, where a failure stops the run with an error: an
upload is never dropped in silence. Snapshots left by a killed run are uploaded at the next start.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from collections.abc import Callable

from metalm import checkpoint as ckpt
from metalm.checkpoint import MARKER, STEP_RE, CheckpointError
from metalm.console import warn
from metalm.fsutil import fsync_dir, write_atomic
from metalm.storage import describe, open_store, retry

POINTER = "latest"
DOWNLOAD_PREFIX = ".tmp-download-"


def _say(text: str) -> None:
    print(f"metalm: {text}", flush=True)


class RemoteCheckpoints:
    """The checkpoints under a URL (or any storage location)."""

    def __init__(self, url: str, retries: int = 4, backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.store = open_store(self.url)  # a missing package or a read-only scheme: an error now
        self.retries, self.backoff = retries, backoff

    def _retry(self, fn, what: str):
        return retry(fn, attempts=self.retries + 1, what=what, backoff=self.backoff,
                     give_up_on=(FileNotFoundError, PermissionError))

    def probe(self, who: str) -> None:
        """Write and delete a small object: credentials and permissions work (before any training)."""
        name = f".metalm-probe-{who}-{os.getpid()}"
        self.store.write_bytes(name, b"probe\n")
        self.store.remove(name)

    # -- reading
    def names(self) -> list[str]:
        """step_XXXXXXXX entries (complete or not), oldest first."""
        return sorted(n for n in self.store.list() if STEP_RE.match(n))

    def complete(self, name: str) -> bool:
        return self.store.exists(f"{name}/{MARKER}")

    def completed(self) -> list[str]:
        return [n for n in self.names() if self.complete(n)]

    def latest(self) -> str | None:
        """The checkpoint `latest` names if its marker is there, else the newest one with a marker."""
        try:
            name = self.store.read_bytes(POINTER).decode("utf-8", "replace").strip()
        except OSError:
            name = ""
        if STEP_RE.match(name) and self.complete(name):
            return name
        done = self.completed()
        return done[-1] if done else None

    def download(self, name: str, root: Path, checksums: bool) -> Path:
        """Fetch checkpoint `name` into root/name (through a temporary directory, checked against its marker:
        sizes, and sha256s with `checksums`) and point root/latest at it."""
        where = f"{self.url}/{name}"
        try:
            marker = self._retry(lambda: self.store.read_bytes(f"{name}/{MARKER}"), where)
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read its {MARKER} marker: {describe(e)}") from None
        try:
            files = json.loads(marker)["files"]
            assert isinstance(files, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{where}/{MARKER}: not a metalm checkpoint marker (no file records)") from None
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{DOWNLOAD_PREFIX}{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel in sorted(files):
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise CheckpointError(f"{where}/{MARKER}: file {rel!r} leaves the checkpoint directory")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._retry(lambda rel=rel, dest=dest: self.store.get_file(f"{name}/{rel}", dest), f"{where}/{rel}")
                except OSError as e:
                    raise CheckpointError(f"{where}/{rel}: download failed: {describe(e)}") from None
            write_atomic(tmp / MARKER, marker)
            problem = ckpt.checkpoint_problem(tmp, checksums=checksums)
            if problem:
                raise CheckpointError(f"{where} downloaded, but it is not a complete checkpoint: {problem}")
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            write_atomic(root / POINTER, (name + "\n").encode())
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- writing
    def upload(self, local: Path, name: str, done: set) -> int:
        """Upload checkpoint directory `local` as `name`; files already in `done` (an earlier attempt of the same
        upload) are not sent again. Returns the bytes sent."""
        if not done and self.complete(name):
            self.store.remove(f"{name}/{MARKER}")  # the same step saved again: no reader may mix the two
        files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MARKER)
        sent = 0
        for rel in files:
            if rel in done:
                continue
            self.store.put_file(f"{name}/{rel}", local / rel)
            sent += (local / rel).stat().st_size
            done.add(rel)
        if MARKER not in done:
            self.store.put_file(f"{name}/{MARKER}", local / MARKER)
            done.add(MARKER)
        self.store.write_bytes(POINTER, (name + "\n").encode())
        return sent

    def prune(self, keep_last_k: int, keep: str) -> list[str]:
        """Delete complete checkpoints beyond the newest keep_last_k (never `keep`), and incomplete ones older
        than `keep` (uploads a killed run left); returns the names deleted."""
        names = self.names()
        done = [n for n in names if self.complete(n)]
        doomed = [n for n in (done[:-keep_last_k] if keep_last_k > 0 else []) if n != keep]
        doomed += [n for n in names if n not in done and n < keep]
        for n in doomed:
            self.store.remove(f"{n}/{MARKER}")  # first: from here on no reader takes it for complete
            self.store.remove(n, recursive=True)
        return doomed


class Uploader:
    """Uploads staged checkpoints in a background thread (see the module doc)."""

    def __init__(self, remote: RemoteCheckpoints, staging: Path, keep_last_k: int, queue_size: int = 2,
                 say: Callable[[str], None] = _say, warn: Callable[[str], None] = warn):
        self.remote, self.staging = remote, Path(staging)
        self.keep_last_k, self.queue_size = keep_last_k, queue_size
        self.say, self.warn = say, warn
        self.cond = threading.Condition()
        self.waiting: list[str] = []  # names, oldest first
        self.current: str | None = None
        self.failed: dict[str, str] = {}  # name -> why its last attempt failed (still staged)
        self.events: list[dict] = []  # for metrics.jsonl, handed to the trainer's thread by take_events()
        self.thread: threading.Thread | None = None

    # -- the trainer's side
    def submit(self, ckpt_dir: Path) -> None:
        """Stage `ckpt_dir` (hard links) and queue it; never waits for an upload."""
        name = Path(ckpt_dir).name
        self._stage(Path(ckpt_dir), name)
        with self.cond:
            self._requeue_failed()
            self._enqueue(name)
            self.cond.notify_all()
        self._ensure_thread()

    def recover(self) -> list[str]:
        """Queue the snapshots a previous run left staged (its uploads never finished); returns their names."""
        if not self.staging.is_dir():
            return []
        found = []
        for p in sorted(self.staging.iterdir()):
            if p.name.startswith(".") or not STEP_RE.match(p.name) or not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)  # a snapshot interrupted while being made
                continue
            found.append(p.name)
        with self.cond:
            for name in found:
                self._enqueue(name)
            self.cond.notify_all()
        if found:
            self._ensure_thread()
        return found

    def drain(self, timeout: float | None = None) -> dict[str, str]:
        """Wait until every staged checkpoint is uploaded or has failed once more; {name: why} of the failed."""
        with self.cond:
            self._requeue_failed()
            self.cond.notify_all()
        self._ensure_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.waiting or self.current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.cond.wait(left if left is not None else 1.0)
            return dict(self.failed)

    def take_events(self) -> list[dict]:
        with self.cond:
            out, self.events = self.events, []
        return out

    def busy(self) -> bool:
        with self.cond:
            return bool(self.waiting) or self.current is not None

    # -- internals
    def _stage(self, src: Path, name: str) -> None:
        tmp = self.staging / f".{name}-{os.getpid()}"
        final = self.staging / name
        shutil.rmtree(tmp, ignore_errors=True)
        for p in sorted(src.rglob("*")):
            dest = tmp / p.relative_to(src)
            if p.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, dest)  # the checkpoint's own bytes: survives its local prune
            except OSError:
                shutil.copy2(p, dest)
        with self.cond:
            if final.exists():
                if name in self.waiting:
                    self.waiting.remove(name)
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    def _enqueue(self, name: str) -> None:
        if name in self.waiting or name == self.current:
            return
        self.waiting.append(name)
        self.waiting.sort()
        while len(self.waiting) > self.queue_size:
            old = self.waiting.pop(0)
            self.failed.pop(old, None)
            shutil.rmtree(self.staging / old, ignore_errors=True)
            self.warn(f"upload of checkpoint {old} to {self.remote.url} skipped: {self.waiting[-1]} supersedes it "
                      f"(checkpoint.upload_queue={self.queue_size} checkpoints were waiting; uploads are slower than "
                      f"checkpoint.every)")
            self.events.append({"upload_superseded": old})

    def _requeue_failed(self) -> None:
        for name in sorted(self.failed):
            if (self.staging / name).is_dir():
                self._enqueue(name)

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="metalm-checkpoint-upload", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                name = self.current = self.waiting.pop(0)
            t0 = time.monotonic()
            ok, why, sent = self._upload(name)
            with self.cond:  # the line is printed before a drain() can return (the process may exit right after)
                if ok:
                    self.failed.pop(name, None)
                    shutil.rmtree(self.staging / name, ignore_errors=True)
                    self.events.append({"checkpoint_uploaded": f"{self.remote.url}/{name}",
                                        "upload_s": round(time.monotonic() - t0, 3), "upload_bytes": sent})
                    self.say(f"uploaded {name} to {self.remote.url} ({sent / 1e6:,.1f} MB in "
                             f"{time.monotonic() - t0:.1f} s)")
                else:
                    self.failed[name] = why
                    self.events.append({"upload_failed": f"{self.remote.url}/{name}: {why}"})
                    self.warn(f"upload of checkpoint {name} to {self.remote.url} failed after "
                              f"{self.remote.retries + 1} attempts: {why}; it stays staged in {self.staging / name} "
                              f"and is tried again after the next checkpoint and at the end of the run")
                self.current = None
                self.cond.notify_all()

    def _upload(self, name: str) -> tuple[bool, str, int]:
        local = self.staging / name
        done: set = set()
        sent = [0]

        def attempt() -> None:
            sent[0] += self.remote.upload(local, name, done)

        def on_retry(n: int, e: BaseException, wait: float) -> None:
            self.warn(f"upload of {name} to {self.remote.url}: {describe(e)}; retry {n} of {self.remote.retries} in "
                      f"{wait:.0f} s")

        try:
            retry(attempt, attempts=self.remote.retries + 1, what=name, backoff=self.remote.backoff,
                  on_retry=on_retry)
        except Exception as e:  # noqa: BLE001 - any client error: reported, the checkpoint stays staged
            return False, describe(e), sent[0]
        try:
            pruned = self.remote.prune(self.keep_last_k, keep=name)
            if pruned:
                with self.cond:
                    self.events.append({"remote_pruned": pruned})
        except Exception as e:  # noqa: BLE001 - the upload itself succeeded; the next prune tries again
            self.warn(f"pruning old checkpoints in {self.remote.url} failed: {describe(e)} (retried after the next "
                      f"upload)")
        return True, "", sent[0]
