"""Atomic, verifiable, resumable checkpoints.

Layout of one checkpoint, `RUN/checkpoints/step_00000100/`:
    ds/                    DeepSpeed state: model, optimizer (ZeRO partitions), LR scheduler
    rank_00000.pt          per-rank state: data-loader position, RNG states (read with weights_only=True)
    trainer_state.json     step, tokens, world size, batch geometry, tokenizer hash, guard state
    config.yaml            the resolved config of the run
    model.safetensors      consolidated weights of the Transformer (HF Llama names), for evaluation/export
    meta_head.safetensors  the meta-learning head (when meta is enabled)
    tokenizer.json         the tokenizer the run trained with (when known)
    COMPLETE               completion marker, written last: JSON with the size (and, with checkpoint.checksums,
                           the sha256) of every other file

Everything is written under `.tmp-step_00000100/`, fsynced, recorded in the marker and renamed into place;
`latest` (a text file naming the directory) is replaced atomically after that. A crash at any point leaves
either the previous checkpoint or the new complete one as `latest`, never a half-written one. A checkpoint
whose files no longer match its marker (truncated, bit-rotted) is not complete: resuming skips it with a
warning naming it and the file, and falls back to the previous complete one.

DeepSpeed's own checkpoint files are pickles; we make DeepSpeed read them with `weights_only=True` too
(`safe_deepspeed_load`), so resuming never runs code from a file.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from metalm.fsutil import file_sha256, fsync_dir, write_atomic

log = logging.getLogger("metalm.checkpoint")

MARKER = "COMPLETE"
MARKER_FORMAT = "metalm-checkpoint"
STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(path: Path) -> Optional[dict]:
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


def checkpoint_problem(path: Path, checksums: bool = False, only: Optional[tuple[str, ...]] = None) -> Optional[str]:
    """Why `path` is not a usable checkpoint (None when it is): no marker, a file missing or of another size
    than the marker records, or (checksums=True) a sha256 that differs. `only` restricts the file checks to
    the files a reader uses (the evaluator's snapshot carries the weights, not the DeepSpeed state)."""
    path = Path(path)
    files = read_marker(path)
    if files is None:
        return f"no {MARKER} marker (its save was interrupted)"
    if only is not None:
        files = {rel: rec for rel, rec in files.items() if rel in only}
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json"
    for rel, rec in sorted(files.items()):
        f = path / rel
        try:
            size = f.stat().st_size
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


def find_latest(root: Path, verify: bool = False) -> Optional[Path]:
    """The checkpoint `latest` names if it is complete, else the newest complete one (or None).

    verify=True also checks every file's sha256 against the marker; a checkpoint that fails is skipped with
    a warning naming it and the file, and the previous complete one is tried.
    """
    root = Path(root)
    candidates: list[Path] = []
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if STEP_RE.match(name):
            candidates.append(root / name)
        else:
            log.warning("checkpoint pointer %s names %r, not a checkpoint directory", pointer, name)
    newest_first = list(reversed(list_checkpoints(root, warn=False)))
    candidates += [p for p in newest_first if p not in candidates]
    for cand in candidates:
        problem = checkpoint_problem(cand, checksums=verify) if cand.is_dir() else "it does not exist"
        if problem is None:
            return cand
        log.warning("ignoring checkpoint %s: %s; falling back to the previous complete one", cand, problem)
    return None


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/trainer_state.json is unreadable: {e}") from None


def resume_mismatch(state: dict, now: dict) -> Optional[str]:
    """Why a run with `now` (world_size, global_batch, micro_batch, seq_len, tokenizer_hash) cannot resume
    from a checkpoint whose trainer_state is `state`; None when it can. A key the checkpoint lacks is not
    compared (checkpoints from before it was recorded)."""
    geometry = ("world_size", "global_batch", "micro_batch", "seq_len")
    saved = tuple(state.get(k) for k in geometry)
    have = tuple(now.get(k) for k in geometry)
    if saved != have:
        return (f"it was written with world_size, global_batch, micro_batch, seq_len = {saved}, this run has "
                f"{have}; start a new train.run_dir or match the original geometry")
    old, new = state.get("tokenizer_hash"), now.get("tokenizer_hash")
    if old and new and old != new:
        return (f"tokenizer mismatch: the checkpoint was trained with tokenizer {old[:16]}..., the shards in "
                f"data.shards were made with {new[:16]}...; point data.shards at shards made with the run's "
                f"tokenizer (its tokenizer.json is in the checkpoint)")
    return None


def clean_stale_tmp(root: Path) -> None:
    """Remove temporary directories left by a save that crashed (rank 0, before training)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-step_") and p.is_dir():
                log.warning("removing %s, left by an interrupted save", p)
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last_k: int, keep: Optional[Path] = None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last_k`, never `keep` (the one `latest` names)."""
    ckpts = list_checkpoints(root, warn=False)
    keep = keep if keep is not None else find_latest(root)
    for p in ckpts[:-keep_last_k] if keep_last_k > 0 else []:
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(tmp_dir: Path, rank: int, data_state: dict, extra: dict | None = None) -> None:
    payload = {"data": json.dumps(data_state), "rng": rng_state(), "extra": json.dumps(extra or {})}
    buf = io.BytesIO()
    torch.save(payload, buf)  # to memory first: a full disk then raises OSError (with errno) in write_atomic
    write_atomic(tmp_dir / f"rank_{rank:05d}.pt", buf.getvalue())


def load_rank_state(ckpt: Path, rank: int) -> dict:
    path = Path(ckpt) / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written with a different world size?")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {"data": json.loads(payload["data"]), "rng": payload["rng"], "extra": json.loads(payload["extra"])}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Consolidated fp32 safetensors of `module` (tied tensors stored once)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in module.state_dict(keep_vars=False).items():
        ptr = p.data_ptr()
        if ptr in seen and p.numel() > 0:
            continue
        seen.add(ptr)
        tensors[name] = p.detach().to(torch.float32).cpu().contiguous()
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_model(ckpt: Path, device: str | torch.device = "cpu"):
    """(Transformer, Config) from a complete checkpoint's config.yaml and model.safetensors."""
    from safetensors.torch import load_file

    from metalm.config import load_config
    from metalm.model import build_model

    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt, only=("config.yaml", "model.safetensors"))
    if problem is not None:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {problem}")
    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg.model)
    weights = load_file(str(ckpt / "model.safetensors"))
    if cfg.model.tie_embeddings:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match the config: missing {missing}, "
                              f"unexpected {unexpected}")
    return model.to(device), cfg


def load_meta_head(ckpt: Path, cfg, device: str | torch.device = "cpu"):
    from safetensors.torch import load_file

    from metalm.meta.head import build_head

    head = build_head(cfg.meta, cfg.model.d_model, cfg.model.vocab_size)
    head.load_state_dict(load_file(str(Path(ckpt) / "meta_head.safetensors")))
    return head.to(device)


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
    """Rank 0, after every rank has written (and fsynced) its part: marker, rename, pointer, prune."""
    marker = {"format": MARKER_FORMAT, "version": 1, "step": step, "files": files or {}}
    write_atomic(tmp_dir / MARKER, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    fsync_dir(tmp_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(root)
    write_atomic(root / "latest", (final_dir.name + "\n").encode())
    prune(root, keep_last_k, keep=final_dir)


# ---------------------------------------------------------------------------------------- DeepSpeed file I/O


@contextmanager
def _instance_patch(obj: Any, **attrs: Any) -> Iterator[None]:
    """Set attributes on one object for the duration of a block, then restore exactly what was there."""
    saved = {name: (name in vars(obj), vars(obj).get(name)) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, (had, value) in saved.items():
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


@contextmanager
def deferred_io_errors(engine, errors: list) -> Iterator[None]:
    """Inside this block, a failed write of DeepSpeed's `save_checkpoint` is appended to `errors` instead of
    raised, and later writes of the same save are skipped.

    DeepSpeed's save runs collectives (a barrier after creating the directory, a tag check, a barrier at the
    end) between its writes. If one rank raised on a full disk, the others would wait in the next collective
    forever; recording the error lets every rank go through the same collectives, after which the loop
    agrees on the outcome (all ranks see the failure, the half-written checkpoint is discarded).
    """
    def guarded(fn):
        def call(*args, **kwargs):
            if errors:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
                errors.append(e)
                return None
        return call

    ce = engine.checkpoint_engine
    with _instance_patch(ce, save=guarded(ce.save), makedirs=guarded(ce.makedirs)), \
            _instance_patch(engine, _copy_recovery_script=guarded(engine._copy_recovery_script)):
        yield


def _deepspeed_safe_globals() -> list:
    """The only non-container classes DeepSpeed pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16): plain
    data records (an enum, a dataclass, loss-scaler settings). Unpickling them cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_deepspeed_load(engine) -> Iterator[None]:
    """Make DeepSpeed's `load_checkpoint` read its files with torch.load(weights_only=True): tensors, plain
    containers and the few DeepSpeed records above, never arbitrary pickled objects (DeepSpeed itself passes
    weights_only=False, which runs whatever code a tampered file carries). A file holding anything else
    raises CheckpointError naming it."""
    import pickle

    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), str(e)[:300])
            raise CheckpointError(f"{path}: refusing to unpickle it: {detail}") from None

    with _instance_patch(engine.checkpoint_engine, load=load):
        yield
