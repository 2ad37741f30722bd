"""A background uploader for the checkpoints a run saves locally, to a bucket (`metalm.checkpoint.CheckpointStore`
does the listing, uploading and pruning there).

A checkpoint is uploaded file by file (each object appears complete or not at all), the COMPLETE marker after
every other file, `latest` after the marker; a marker already there (the same step saved again, by a resumed run)
is deleted first. So a reader that waits for the marker, the evaluator or a resume on another machine, never sees
a partial checkpoint. After each upload the remote keeps the newest checkpoint.keep_last_k complete checkpoints
(never the one `latest` names): an old one loses its marker first, then its files.

The uploader runs in one thread of rank 0 (the run directory is shared by the ranks). `submit` takes a
snapshot of the finished checkpoint by hard links into RUN/.uploads/ (milliseconds; the local prune can then
delete the checkpoint without disturbing its upload) and returns; at most checkpoint.upload_queue snapshots
wait, and when one more arrives the oldest waiting one is superseded (a warning says so). A failed file upload is
retried with backoff; a checkpoint that still fails is reported (stderr, metrics.jsonl), stays staged, and is
tried again after the next checkpoint and when the run ends, where a failure stops the run with an error: an
upload is never dropped in silence. Snapshots left by a killed run are uploaded at the next start.

The final wait (`drain`) has a deadline and ends early on a stop request; what is then still staged is named by
`pending()`. Each request to the bucket is bounded by the store's timeout (`metalm.storage.Limits`), so a bucket
that accepts connections and never answers fails an upload attempt instead of hanging it.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from collections.abc import Callable

from metalm.checkpoint import MARKER, STEP_RE, CheckpointStore
from metalm.console import warn
from metalm.storage import describe, retry


def _say(text: str) -> None:
    print(f"metalm: {text}", flush=True)




class Uploader:
    """Uploads staged checkpoints in a background thread (see the module doc)."""

    def __init__(self, remote: CheckpointStore, staging: Path, keep_last_k: int, queue_size: int = 2,
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

    def drain(self, timeout: float | None = None, stop: Callable[[], bool] | None = None) -> dict[str, str]:
        """Wait until every staged checkpoint is uploaded or has failed once more, at most `timeout` seconds, and
        no longer once `stop()` is true (polled every 0.2 s); {name: why} of the failed. After a timeout or a stop,
        `pending()` names what is still staged."""
        with self.cond:
            self._requeue_failed()
            self.cond.notify_all()
        self._ensure_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.waiting or self.current is not None:
                if stop is not None and stop():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.cond.wait(min(0.2, left) if left is not None else 0.2)
            return dict(self.failed)

    def pending(self) -> list[str]:
        """The checkpoints staged and not uploaded (waiting, being uploaded, or failed), oldest first."""
        with self.cond:
            names = set(self.waiting) | set(self.failed) | ({self.current} if self.current else set())
        return sorted(names)

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
