"""The per-rank state file of a checkpoint, `rank_XXXXX.pt`: the data loader's position and the RNG states.

Written by each rank of a save; read back with `torch.load(weights_only=True)`, so a tampered file can hold
tensors and plain containers but never run code: anything else is a CheckpointError naming the file.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from metalm.checkpoint.layout import RANK_STATE, CheckpointError
from metalm.fsutil import write_atomic


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / RANK_STATE.format(rank=rank)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(directory: Path, rank: int, data_state: dict) -> None:
    payload = {"data": json.dumps(data_state), "rng": rng_state()}
    buf = io.BytesIO()
    torch.save(payload, buf)  # to memory first: a full disk then raises OSError (with errno) in write_atomic
    write_atomic(rank_file(directory, rank), buf.getvalue())


def load_rank_state(ckpt: Path, rank: int) -> dict:
    """{"data": the loader state, "rng": the RNG states}; CheckpointError naming the file for anything else."""
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint lacks the data position and RNG state of a rank "
                              f"that wrote it (copied in part?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), "not plain data")
        raise CheckpointError(f"{path}: refusing to unpickle it: {detail}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: torch raises RuntimeError and others
        raise CheckpointError(f"{path} is unreadable: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    try:
        data = json.loads(payload["data"])
        rng = payload["rng"]
        if not isinstance(data, dict) or not isinstance(rng, dict) or not torch.is_tensor(rng.get("torch")):
            raise TypeError("unexpected layout")
    except (TypeError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a metalm rank state ({e})") from None
    return {"data": data, "rng": rng}
