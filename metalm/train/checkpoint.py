"""Atomic, resumable checkpoints.

Layout of one checkpoint, `RUN/checkpoints/step_00000100/`:
    ds/                    DeepSpeed state: model, optimizer (ZeRO partitions), LR scheduler
    rank_00000.pt          per-rank state: data-loader position, RNG states (read with weights_only=True)
    trainer_state.json     step, tokens, world size, batch geometry
    config.yaml            the resolved config of the run
    model.safetensors      consolidated weights of the Transformer (HF Llama names), for evaluation/export
    meta_head.safetensors  the meta-learning head (when meta is enabled)
    tokenizer.json         the tokenizer the run trained with (when known)
    COMPLETE               completion marker, written last

Everything is written under `.tmp-step_00000100/` and renamed into place once complete; `latest` (a text
file naming the directory) is replaced atomically after that. A crash at any point leaves either the
previous checkpoint or the new complete one as `latest`, never a half-written one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("metalm.checkpoint")

MARKER = "COMPLETE"
STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / "trainer_state.json").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Incomplete ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or not STEP_RE.match(p.name):
            continue
        if is_complete(p):
            found.append(p)
        else:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
    return found


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names if it is complete, else the newest complete one (or None)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = root / name
        if STEP_RE.match(name) and is_complete(cand):
            return cand
        log.warning("checkpoint pointer %s names %r, which is not a complete checkpoint; "
                    "falling back to the newest complete one", pointer, name)
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/trainer_state.json is unreadable: {e}") from None


def clean_stale_tmp(root: Path) -> None:
    """Remove temporary directories left by a save that crashed (rank 0, before training)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-step_") and p.is_dir():
                log.warning("removing %s, left by an interrupted save", p)
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last_k: int) -> None:
    ckpts = list_checkpoints(root)
    latest = find_latest(root)
    for p in ckpts[:-keep_last_k] if keep_last_k > 0 else []:
        if latest is not None and p.resolve() == latest.resolve():
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
    path = tmp_dir / f"rank_{rank:05d}.pt"
    tmp = path.with_name(path.name + ".part")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {MARKER} marker)")
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


def finalize(tmp_dir: Path, final_dir: Path, root: Path, keep_last_k: int) -> None:
    """Rank 0, after every rank has written its part: marker, rename, pointer, prune."""
    write_atomic(tmp_dir / MARKER, b"ok\n")
    _fsync_dir(tmp_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(root)
    write_atomic(root / "latest", (final_dir.name + "\n").encode())
    prune(root, keep_last_k)
