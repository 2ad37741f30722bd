"""The checkpoints under one location, a local directory or a URL: list them, find the latest complete one,
verify, fetch, upload and prune them, through `metalm.storage` (so the same code serves `runs/x/checkpoints`
and `s3://bucket/run/checkpoints`).

The layout is the same everywhere (`metalm.checkpoint.layout`): LOCATION/step_XXXXXXXX/<files>,
LOCATION/step_XXXXXXXX/COMPLETE, LOCATION/latest. A checkpoint is complete when its COMPLETE marker is there and
every file the marker records is there with its recorded size (and, when asked, its recorded sha256; for a URL the
sha256s are checked on the fetched copy). An upload sends the marker after every other file and `latest` after the
marker, and a prune removes a checkpoint's marker before its files, so a reader that trusts the marker never sees
a partial checkpoint. The local writer's side (temporary directory, rename, local prune) is in `layout`.

`locate` turns what a user names (a run directory, its checkpoints/ directory, `latest`, or one checkpoint
directory) into a store and the name of the checkpoint meant: the newest complete one unless a step is named.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from metalm.checkpoint.layout import (MARKER, POINTER, STATE_FILE, STEP_RE, CheckpointError, checkpoint_problem,
                                      find_latest)
from metalm.fsutil import fsync_dir, write_atomic
from metalm.storage import Limits, describe, join, open_store, retry

DOWNLOAD_PREFIX = ".tmp-download-"
RUN_SUBDIR = "checkpoints"  # a run directory keeps its checkpoints here


class CheckpointStore:
    """The checkpoints under `location` (a local path or a URL). Whole-operation retries (`retries` more tries,
    exponential backoff from `backoff` s) are this class's; `limits` bound each request of an object store."""

    def __init__(self, location: str | os.PathLike, *, retries: int = 4, backoff: float = 1.0,
                 limits: Limits | None = None):
        self.url = str(location).rstrip("/") or str(location)
        self.store = open_store(self.url, limits)  # a missing package or an unknown scheme: an error now
        self.retries, self.backoff = retries, backoff

    def __str__(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        """The local path or URL of checkpoint `name`."""
        return self.store.url(name)

    def _retry(self, fn, what: str):
        return retry(fn, attempts=self.retries + 1, what=what, backoff=self.backoff,
                     give_up_on=(FileNotFoundError, PermissionError))

    def exists(self) -> bool:
        return self.store.exists()

    # -- reading
    def names(self) -> list[str]:
        """step_XXXXXXXX entries (complete or not), oldest first."""
        return sorted(n for n in self.store.list() if STEP_RE.match(n))

    def has_marker(self, name: str) -> bool:
        """The save finished (its marker, written last, is there); whether its files still are is `problem`'s."""
        return self.store.exists(f"{name}/{MARKER}")

    def marker_files(self, name: str) -> dict | None:
        """The marker's file records; {} for a marker without them; None without a marker."""
        try:
            data = json.loads(self.store.read_bytes(f"{name}/{MARKER}"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}

    def problem(self, name: str, checksums: bool = False, only: tuple[str, ...] | None = None) -> str | None:
        """Why checkpoint `name` is not usable (None when it is). For a URL, sizes are checked (sha256s are
        checked on what is fetched)."""
        if self.store.local:
            return checkpoint_problem(self.store.path(name), checksums=checksums, only=only)
        files = self.marker_files(name)
        if files is None:
            return f"no {MARKER} marker (its save was interrupted)"
        if not self.store.exists(f"{name}/{STATE_FILE}"):
            return f"no {STATE_FILE}"
        for rel, rec in sorted(files.items()):
            if only is not None and rel not in only:
                continue
            try:
                size = self.store.size(f"{name}/{rel}")
            except FileNotFoundError:
                return f"{rel} is missing"
            if isinstance(rec, dict) and rec.get("bytes") is not None and size != rec["bytes"]:
                return f"{rel} has {size} bytes, the {MARKER} marker records {rec['bytes']} (truncated or modified)"
        return None

    def completed(self) -> list[str]:
        """The complete checkpoints, oldest first."""
        return [n for n in self.names() if self.problem(n) is None]

    def latest(self, verify: bool = False) -> str | None:
        """The checkpoint `latest` names if it is complete, else the newest complete one (None: there is none).
        verify=True checks sha256s too (local checkpoints)."""
        if self.store.local:
            found = find_latest(self.store.path(), verify=verify)
            return found.name if found is not None else None
        try:
            name = self.store.read_bytes(POINTER).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            name = ""
        if STEP_RE.match(name) and self.problem(name) is None:
            return name
        done = self.completed()
        return done[-1] if done else None

    def fetch(self, name: str, dest: Path, files: list[str]) -> None:
        """Copy the files `files` of checkpoint `name` into directory `dest` (hard links for a local store: they
        survive the checkpoint being pruned). FileNotFoundError names the first file missing."""
        dest.mkdir(parents=True, exist_ok=True)
        for rel in files:
            if rel.startswith("/") or ".." in rel.split("/"):
                raise CheckpointError(f"{self.where(name)}/{MARKER}: file {rel!r} leaves the checkpoint directory")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if self.store.local:
                try:
                    os.link(self.store.path(f"{name}/{rel}"), target)
                    continue
                except FileNotFoundError:
                    raise
                except OSError:  # another filesystem, or no link support: a copy
                    pass
            self._retry(lambda rel=rel, target=target: self.store.get_file(f"{name}/{rel}", target),
                        f"{self.where(name)}/{rel}")

    def download(self, name: str, root: Path, checksums: bool) -> Path:
        """Fetch checkpoint `name` into root/name (through a temporary directory, checked against its marker:
        sizes, and sha256s with `checksums`) and point root/latest at it."""
        where = self.where(name)
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
            try:
                self.fetch(name, tmp, sorted(files))
            except OSError as e:
                raise CheckpointError(f"{where}: download failed: {describe(e)}") from None
            write_atomic(tmp / MARKER, marker)
            problem = checkpoint_problem(tmp, checksums=checksums)
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
    def probe(self, who: str) -> None:
        """Write and delete a small object: credentials and permissions work (before any training)."""
        name = f".metalm-probe-{who}-{os.getpid()}"
        self.store.write_bytes(name, b"probe\n")
        self.store.remove(name)

    def upload(self, local: Path, name: str, done: set) -> int:
        """Upload checkpoint directory `local` as `name`; files already in `done` (an earlier attempt of the same
        upload) are not sent again. Returns the bytes sent."""
        if not done and self.has_marker(name):
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
        """Delete checkpoints with a marker beyond the newest keep_last_k (never `keep`), and ones without a marker
        older than `keep` (uploads a killed run left); returns the names deleted."""
        names = self.names()
        done = [n for n in names if self.has_marker(n)]
        doomed = [n for n in (done[:-keep_last_k] if keep_last_k > 0 else []) if n != keep]
        doomed += [n for n in names if n not in done and n < keep]
        for n in doomed:
            self.store.remove(f"{n}/{MARKER}")  # first: from here on no reader takes it for complete
            self.store.remove(n, recursive=True)
        return doomed


def locate(given: str, limits: Limits | None = None) -> tuple[CheckpointStore, str]:
    """(store, checkpoint name) for what a user names: a checkpoint directory (…/step_XXXXXXXX, or any directory
    holding a checkpoint's marker or trainer state) is that one; a run directory, its checkpoints/ directory, or
    the `latest` pointer in it means the newest complete checkpoint there. CheckpointError when there is none,
    naming the location and what was looked for."""
    text = str(given).rstrip("/")
    head, _, tail = text.rpartition("/")
    if STEP_RE.match(tail):
        return CheckpointStore(head or ".", limits=limits), tail
    base = (head or ".") if tail == POINTER else text
    root = CheckpointStore(base, limits=limits)
    if tail != POINTER and (root.store.exists(MARKER) or root.store.exists(STATE_FILE)):
        return CheckpointStore(head or ".", limits=limits), tail  # a checkpoint directory under another name
    if tail != RUN_SUBDIR and root.store.exists(RUN_SUBDIR):  # a run directory
        root = CheckpointStore(join(base, RUN_SUBDIR), limits=limits)
    if not root.exists():
        raise CheckpointError(f"{given}: no such directory (expected a checkpoint directory step_XXXXXXXX, a run "
                              f"directory, its {RUN_SUBDIR}/ directory or its {POINTER} pointer)")
    name = root.latest()
    if name is None:
        found = root.names()
        raise CheckpointError(f"{given}: no complete checkpoint in {root}" + (
            f" ({len(found)} step directories, none with a {MARKER} marker whose files are all there)" if found
            else " (no step_XXXXXXXX directory)"))
    return root, name
