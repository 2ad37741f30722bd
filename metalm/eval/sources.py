"""Where the evaluator finds checkpoints: a run directory, its checkpoints/ directory, or either as a URL (s3://,
gs://, ...), through `metalm.checkpoint.CheckpointStore`.

A source lists the checkpoints under its root and snapshots the files an evaluation reads into a local directory
(hard links for local checkpoints, downloads for URLs), so that a checkpoint pruned by the trainer mid-evaluation
is still evaluated from its snapshot. The snapshot includes the marker, so the evaluation verifies the very files
it reads against the sizes and sha256s recorded at save time.

A file missing from a snapshot means one of two things. The checkpoint is gone (pruned: the trainer renames a
checkpoint out of the way before deleting it): `Vanished`, and it is skipped. Or the directory and its marker
are still there, and still so `recheck_s` seconds later: the checkpoint is broken (a file deleted or never
written), a `CheckpointError` naming it and the file, which the watcher records once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from metalm.checkpoint import (CONFIG_FILE, MARKER, MODEL_FILE, STATE_FILE, TOKENIZER_FILE, CheckpointError,
                               CheckpointStore)
from metalm.checkpoint.store import RUN_SUBDIR
from metalm.storage import join, local_path

REQUIRED_FILES = (MARKER, STATE_FILE, CONFIG_FILE, MODEL_FILE)
OPTIONAL_FILES = (TOKENIZER_FILE,)


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


class Source:
    """A run directory or its checkpoints/ directory, local or a URL (which may not exist yet when the watcher
    starts). A URL whose scheme needs a missing package is a StorageError now."""

    def __init__(self, given: str):
        self.given = str(given).rstrip("/") or str(given)
        self.base = CheckpointStore(self.given)
        self.local = self.base.store.local
        self.recheck_s = RECHECK_S

    def exists(self) -> bool:
        """The directory given exists (the run, or its checkpoints/ directory)."""
        return self.base.store.path().is_dir() if self.local else self.base.exists()

    def not_a_directory(self) -> bool:
        """A local path that exists and is not a directory."""
        return self.local and self.base.store.path().exists() and not self.base.store.path().is_dir()

    @property
    def checkpoints(self) -> CheckpointStore:
        """The store of the checkpoints: given/checkpoints when the given directory is a run's (it has one)."""
        if self.given.rsplit("/", 1)[-1] != RUN_SUBDIR and self.base.store.exists(RUN_SUBDIR):
            return CheckpointStore(join(self.given, RUN_SUBDIR))
        return self.base

    @property
    def run_dir(self) -> Path:
        """The run directory (local sources)."""
        path = local_path(self.given)
        return path.parent if path.name == RUN_SUBDIR else path

    def __str__(self) -> str:
        return str(self.checkpoints)

    def list(self) -> list[tuple[str, str]]:
        """(name, location) of every step directory, complete or not, oldest first."""
        store = self.checkpoints
        return [(name, store.where(name)) for name in store.names()]

    @staticmethod
    def _split(location: str) -> tuple[CheckpointStore, str]:
        head, _, name = location.rstrip("/").rpartition("/")
        return CheckpointStore(head or "."), name

    def complete(self, location: str) -> bool:
        """The save finished: the COMPLETE marker (written last) is there. Whether the files it records are
        too is the snapshot's and the evaluation's question."""
        store, name = self._split(location)
        return store.has_marker(name)

    def snapshot(self, ref: Ref, dest: Path) -> None:
        store, name = self._split(ref.location)
        if not store.has_marker(name):
            raise Vanished(f"{ref.location} is no longer a complete checkpoint")
        dest.mkdir(parents=True)
        for rel in REQUIRED_FILES + OPTIONAL_FILES:
            try:
                store.fetch(name, dest, [rel])
            except FileNotFoundError:
                (dest / rel).unlink(missing_ok=True)
                if rel in OPTIONAL_FILES and store.has_marker(name):
                    continue
                if self._stays_missing(store, name, rel):
                    raise _broken(ref.location, rel) from None
                raise Vanished(f"{ref.location} disappeared while being snapshotted ({rel} missing)") from None

    def _stays_missing(self, store: CheckpointStore, name: str, rel: str) -> bool:
        """`rel` is missing while the checkpoint and its marker are still there, and still so after recheck_s
        (a prune renames the directory away first, so it is not one in progress)."""
        for wait in (0.0, self.recheck_s):
            time.sleep(wait)
            if not store.has_marker(name) or store.store.exists(f"{name}/{rel}"):
                return False
        return True
