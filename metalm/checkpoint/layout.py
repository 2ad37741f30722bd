"""Checkpoint directories, their COMPLETE marker, the `latest` pointer and the trainer-state schema.

Everything here is plain file I/O on one filesystem path: which checkpoints exist, whether one is complete
(every file the marker records is there with its recorded size, and optionally its sha256), which is the
latest, how a finished temporary directory becomes a checkpoint, and how old ones are removed without ever
leaving a half-deleted directory that looks complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalm.fsutil import file_sha256, fsync_dir, write_atomic

log = logging.getLogger("metalm.checkpoint")

# the names of a checkpoint's files and of the pointer beside them, here and nowhere else
MARKER = "COMPLETE"
MARKER_FORMAT = "metalm-checkpoint"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
HEAD_FILE = "meta_head.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DS_DIR = "ds"  # DeepSpeed's state (its tag directory)
DS_POINTER = "latest"  # inside a checkpoint: DeepSpeed's own pointer to its tag, where zero_to_fp32.py looks
POINTER = "latest"  # beside the checkpoints: names the newest complete one
RANK_STATE = "rank_{rank:05d}.pt"
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-step_"  # a save in progress
DELETE_PREFIX = ".tmp-delete-"  # a checkpoint being pruned: renamed first, so it never looks complete
MAX_STATE_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the directory or file and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------------- trainer state


@dataclass
class TrainerState:
    """trainer_state.json: where a run stands and what it must match to continue. Keys that older checkpoints
    lack take the defaults below (None: not compared on resume)."""

    step: int
    tokens: int = 0
    flops: float = 0.0
    world_size: int | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    grad_accum: int | None = None
    tokenizer_hash: str | None = None
    special_ids: dict = field(default_factory=dict)  # token ids of bos/eos/pad/mask the run trained with
    data_shards: str | None = None  # absolute path or URL of the shards the run read
    guards: dict = field(default_factory=dict)  # the run-time guards' state (non-finite counts, spike windows)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainerState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, found {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("step"), int) or isinstance(values.get("step"), bool) or values["step"] < 0:
            raise CheckpointError(f"{where}: 'step' must be a non-negative integer, found {data.get('step')!r}")
        for name in ("tokens", "world_size", "global_batch", "micro_batch", "seq_len", "grad_accum"):
            v = values.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise CheckpointError(f"{where}: {name!r} must be an integer, found {v!r}")
        for name in ("special_ids", "guards"):
            if not isinstance(values.get(name, {}), dict):
                raise CheckpointError(f"{where}: {name!r} must be an object, found {values[name]!r}")
        if not isinstance(values.get("flops", 0.0), (int, float)):
            raise CheckpointError(f"{where}: 'flops' must be a number, found {values['flops']!r}")
        return cls(**values)


def write_state(directory: Path, state: TrainerState) -> None:
    write_atomic(Path(directory) / STATE_FILE, state.to_json())


def read_state(path: Path) -> TrainerState:
    f = Path(path) / STATE_FILE
    try:
        if f.stat().st_size > MAX_STATE_BYTES:
            raise CheckpointError(f"{f}: {f.stat().st_size:,} bytes, more than a trainer state can be "
                                  f"({MAX_STATE_BYTES:,}); not a metalm checkpoint")
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is unreadable: {e}") from None
    return TrainerState.from_json(text, str(f))


def resume_mismatch(state: TrainerState, now: dict) -> str | None:
    """Why a run with `now` (seq_len, tokenizer_hash) cannot resume from a checkpoint whose trainer state is
    `state`; None when it can. The number of processes, the micro-batch and the global batch may change (the
    DeepSpeed state is converted, the data continues from its global position). A field the checkpoint lacks is
    not compared (checkpoints from before it was recorded)."""
    if state.seq_len is not None and state.seq_len != now.get("seq_len"):
        return (f"it was written with train.seq_len={state.seq_len}, this run has {now.get('seq_len')}; start a new "
                f"train.run_dir or resume with train.seq_len={state.seq_len}")
    old, new = state.tokenizer_hash, now.get("tokenizer_hash")
    if old and new and old != new:
        return (f"tokenizer mismatch: the checkpoint was trained with tokenizer {old[:16]}..., the shards in "
                f"data.shards were made with {new[:16]}...; point data.shards at shards made with the run's "
                f"tokenizer (its tokenizer.json is in the checkpoint)")
    return None


# ---------------------------------------------------------------------------------------------- the marker


def read_marker(path: Path) -> dict | None:
    """The marker's file records ({relative path: {"bytes", "sha256"?}}); {} for a legacy marker without
    records; None when there is no marker."""
    try:
        text = (Path(path) / MARKER).read_text()
    except (OSError, UnicodeDecodeError):  # missing, unreadable or garbled: no usable marker
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}  # "ok\n": written before markers carried file records
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def checkpoint_problem(path: Path, checksums: bool = False, only: tuple[str, ...] | None = None) -> str | None:
    """Why `path` is not a usable checkpoint (None when it is): no marker, a file missing or of another size
    than the marker records, or (checksums=True) a sha256 that differs. `only` restricts the file checks to
    the files a reader uses (the evaluator's snapshot carries the weights, not the DeepSpeed state)."""
    path = Path(path)
    files = read_marker(path)
    if files is None:
        return f"no {MARKER} marker (its save was interrupted)"
    if only is not None:
        files = {rel: rec for rel, rec in files.items() if rel in only}
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    for rel, rec in sorted(files.items()):
        try:
            size = (path / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if isinstance(rec, dict) and rec.get("bytes") is not None and size != rec["bytes"]:
            return f"{rel} has {size} bytes, the {MARKER} marker records {rec['bytes']} (truncated or modified)"
    if checksums:
        for rel, rec in sorted(files.items()):
            want = rec.get("sha256") if isinstance(rec, dict) else None
            if want and file_sha256(path / rel) != want:
                return f"{rel}: sha256 differs from the {MARKER} marker (corrupted on disk)"
    return None


def is_complete(path: Path) -> bool:
    """The marker exists and every file it records is there with its recorded size (cheap: no hashing)."""
    return checkpoint_problem(path, checksums=False) is None


# ------------------------------------------------------------------------------------------ finding them


def list_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Incomplete ones are skipped (with a warning)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or not STEP_RE.match(p.name):
            continue
        problem = checkpoint_problem(p)
        if problem is None:
            found.append(p)
        elif warn:
            log.warning("ignoring incomplete checkpoint %s: %s", p, problem)
    return found


def _pointer_target(root: Path) -> str | None:
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if STEP_RE.match(name):
        return name
    log.warning("checkpoint pointer %s names %r, not a checkpoint directory", pointer, name)
    return None


def find_latest(root: Path, verify: bool = False) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one (or None).

    verify=True also checks every file's sha256 against the marker; a checkpoint that fails is skipped with
    a warning naming it and the file, and the previous complete one is tried.
    """
    root = Path(root)
    candidates: list[Path] = []
    name = _pointer_target(root)
    if name is not None:
        candidates.append(root / name)
    newest_first = list(reversed(list_checkpoints(root, warn=False)))
    candidates += [p for p in newest_first if p not in candidates]
    for cand in candidates:
        problem = checkpoint_problem(cand, checksums=verify) if cand.is_dir() else "it does not exist"
        if problem is None:
            return cand
        log.warning("ignoring checkpoint %s: %s; falling back to the previous complete one", cand, problem)
    return None


# ------------------------------------------------------------------------------------------ writing them


def checkpoint_files(tmp_dir: Path) -> list[str]:
    """Every file of a checkpoint being written, as sorted relative paths (the marker excluded)."""
    tmp_dir = Path(tmp_dir)
    return sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file() and p.name != MARKER)


def record_files(root: Path, relpaths: list[str], checksums: bool) -> dict[str, dict]:
    """fsync each file (so the marker never outlives its data after a power cut) and record its size and,
    with `checksums`, its sha256. Ranks call this on disjoint shares of a checkpoint's files."""
    out: dict[str, dict] = {}
    for rel in relpaths:
        path = Path(root) / rel
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        rec: dict[str, Any] = {"bytes": size}
        if checksums:
            rec["sha256"] = file_sha256(path)
        out[rel] = rec
    return out


def finalize(tmp_dir: Path, final_dir: Path, root: Path, keep_last_k: int, files: dict | None = None,
             step: int | None = None) -> None:
    """After every writer has written (and fsynced) its part: marker, rename, pointer, prune."""
    marker = {"format": MARKER_FORMAT, "version": 1, "step": step, "files": files or {}}
    write_atomic(tmp_dir / MARKER, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    fsync_dir(tmp_dir)
    if final_dir.exists():
        _remove(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(root)
    write_atomic(root / POINTER, (final_dir.name + "\n").encode())
    prune(root, keep_last_k, keep=final_dir)


# ---------------------------------------------------------------------------------------- removing them


def _remove(path: Path) -> None:
    """Rename `path` out of the checkpoint namespace first (one atomic step), then delete it: a crash during
    the deletion leaves a `.tmp-delete-` directory that `clean_stale` sweeps, never a half-deleted
    checkpoint that still carries its marker."""
    doomed = path.with_name(f"{DELETE_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep_last_k: int, keep: Path | None = None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last_k`, never `keep` (the one `latest` names)."""
    ckpts = list_checkpoints(root, warn=False)
    keep = keep if keep is not None else find_latest(root)
    for p in ckpts[:-keep_last_k] if keep_last_k > 0 else []:
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        _remove(p)


def clean_stale(root: Path) -> None:
    """Before training (one writer): remove what interrupted saves and prunes left behind: temporary save
    directories, directories being deleted, and incomplete step directories older than the one `latest`
    names (a newer incomplete one is left alone and reported: it is no save of this run's lineage)."""
    root = Path(root)
    if not root.is_dir():
        return
    latest = _pointer_target(root)
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith((TMP_PREFIX, DELETE_PREFIX)):
            log.warning("removing %s, left by an interrupted save or prune", p)
            shutil.rmtree(p, ignore_errors=True)
        elif STEP_RE.match(p.name) and latest is not None and p.name < latest:
            problem = checkpoint_problem(p)
            if problem is not None:
                log.warning("removing incomplete checkpoint %s (%s), older than the latest %s", p, problem, latest)
                _remove(p)
