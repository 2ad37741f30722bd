"""Where the evaluator finds checkpoints: a local directory or an fsspec URL (s3://, gs://, ...).

A source lists the complete checkpoints under its root (those with a COMPLETE marker) and snapshots the files
an evaluation reads into a local directory (hard links for local checkpoints, downloads for URLs), so that a
checkpoint pruned by the trainer mid-evaluation is still evaluated from its snapshot. The snapshot includes the
marker, so the evaluation verifies the very files it reads against the sizes and sha256s recorded at save time.

A file missing from a snapshot means one of two things. The checkpoint is gone (pruned: the trainer renames a
checkpoint out of the way before deleting it): `Vanished`, and it is skipped. Or the directory and its marker
are still there, and still so `recheck_s` seconds later: the checkpoint is broken (a file deleted or never
written), a `CheckpointError` naming it and the file, which the watcher records once.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from metalm.checkpoint import MARKER, STEP_RE, CheckpointError

REQUIRED_FILES = (MARKER, "trainer_state.json", "config.yaml", "model.safetensors")
OPTIONAL_FILES = ("tokenizer.json",)


class Vanished(RuntimeError):
    """The checkpoint disappeared (e.g. pruned by keep_last_k) before it could be snapshotted."""


RECHECK_S = 1.0  # how long a checkpoint missing a file must stay so (its marker still there) to count as broken


def _broken(where: str, name: str) -> CheckpointError:
    return CheckpointError(f"{where} is not a usable checkpoint: {name} is missing, although its {MARKER} "
                           f"marker is there (deleted after the save, or never written)")


@dataclass(frozen=True)
class Ref:
    name: str  # step_XXXXXXXX
    step: int
    location: str  # local path or URL of the checkpoint directory


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


class LocalSource:
    """A run directory or its checkpoints/ directory (which may not exist yet when the watcher starts)."""

    def __init__(self, root: str):
        self.given = Path(root[len("file://"):] if root.startswith("file://") else root)
        self.recheck_s = RECHECK_S

    def exists(self) -> bool:
        """The directory given exists (the run, or its checkpoints/ directory)."""
        return self.given.is_dir()

    @property
    def root(self) -> Path:
        sub = self.given / "checkpoints"
        return sub if self.given.name != "checkpoints" and sub.is_dir() else self.given

    @property
    def run_dir(self) -> Path:
        return self.given.parent if self.given.name == "checkpoints" else self.given

    def __str__(self) -> str:
        return str(self.root)

    def list(self) -> list[tuple[str, str]]:
        root = self.root
        if not root.is_dir():
            return []
        return sorted((p.name, str(p)) for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir())

    def complete(self, location: str) -> bool:
        """The save finished: the COMPLETE marker (written last) is there. Whether the files it records are
        too is the snapshot's and the evaluation's question."""
        return (Path(location) / MARKER).is_file()

    def snapshot(self, ref: Ref, dest: Path) -> None:
        src = Path(ref.location)
        if not self.complete(ref.location):
            raise Vanished(f"{src} is no longer a complete checkpoint")
        dest.mkdir(parents=True)
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            s = src / name
            try:
                try:
                    os.link(s, dest / name)  # a hard link survives the checkpoint being pruned
                except OSError as e:
                    if isinstance(e, FileNotFoundError):
                        raise
                    shutil.copy2(s, dest / name)  # other filesystem / no link support
            except FileNotFoundError:
                if name in OPTIONAL_FILES and (src / MARKER).is_file():
                    continue
                if self._stays_missing(src, name):
                    raise _broken(str(src), name) from None
                raise Vanished(f"{src} disappeared while being snapshotted ({name} missing)") from None

    def _stays_missing(self, src: Path, name: str) -> bool:
        """`name` is missing while the checkpoint and its marker are still there, and still so after recheck_s
        (a prune renames the directory away first, so it is not one in progress)."""
        for wait in (0.0, self.recheck_s):
            time.sleep(wait)
            if not (src / MARKER).is_file() or (src / name).exists():
                return False
        return True


class FsspecSource:
    """Any fsspec URL (s3://, gs://, memory://, ...); complete checkpoints are downloaded before reading."""

    def __init__(self, url: str):
        from metalm.storage import filesystem

        self.fs, path = filesystem(url)  # StorageError naming a missing package; listings are never cached
        self.given = path.rstrip("/")
        self.url = url
        self.recheck_s = RECHECK_S

    def exists(self) -> bool:
        return bool(self.fs.isdir(self.given))

    @property
    def path(self) -> str:
        sub = self.given + "/checkpoints"
        return sub if not self.given.endswith("/checkpoints") and self.fs.isdir(sub) else self.given

    def __str__(self) -> str:
        return self.url

    def list(self) -> list[tuple[str, str]]:
        path = self.path
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e).rstrip("/").rsplit("/", 1)[-1]
            if STEP_RE.match(name):
                out.append((name, f"{path}/{name}"))
        return sorted(out)

    def complete(self, location: str) -> bool:
        return self.fs.exists(f"{location}/{MARKER}")

    def snapshot(self, ref: Ref, dest: Path) -> None:
        if not self.complete(ref.location):
            raise Vanished(f"{ref.location} is no longer a complete checkpoint")
        dest.mkdir(parents=True)
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            remote = f"{ref.location}/{name}"
            try:
                self.fs.get_file(remote, str(dest / name))
            except FileNotFoundError:
                if name in OPTIONAL_FILES and self.fs.exists(f"{ref.location}/{MARKER}"):
                    continue
                if self._stays_missing(ref.location, name):
                    raise _broken(ref.location, name) from None
                raise Vanished(f"{ref.location} disappeared while being downloaded ({name} missing)") from None

    def _stays_missing(self, location: str, name: str) -> bool:
        for wait in (0.0, self.recheck_s):
            time.sleep(wait)
            self.fs.invalidate_cache(location)
            if not self.fs.exists(f"{location}/{MARKER}") or self.fs.exists(f"{location}/{name}"):
                return False
        return True


def make_source(root: str):
    return FsspecSource(root) if _is_url(root) else LocalSource(root)
