"""Consolidated safetensors weights of a checkpoint: writing them, and loading a checkpoint's model after
verifying the files it reads against the COMPLETE marker (sizes, and sha256 where the marker has them)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from metalm.checkpoint.layout import CONFIG_FILE, MODEL_FILE, CheckpointError, checkpoint_problem


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Consolidated fp32 safetensors of `module` (tied tensors stored once), written to a `.part` file and
    renamed. safetensors creates files 0600; they get the mode the umask gives any new file (0644 under the
    usual 022), so colleagues and an evaluator running as another user can read them."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in module.state_dict(keep_vars=False).items():
        ptr = p.data_ptr()
        if ptr in seen and p.numel() > 0:
            continue
        seen.add(ptr)
        tensors[name] = p.detach().to(torch.float32).cpu().contiguous()
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(ckpt: Path, device: str | torch.device = "cpu", verify: bool = True):
    """(Transformer, Config) from a complete checkpoint's config.yaml and model.safetensors.

    Both files are checked against the marker first (their sha256 too, with `verify`): a corrupted or
    modified file is a CheckpointError naming it, never a model with wrong weights."""
    from metalm.config import ConfigError, load_config
    from metalm.model import build_model

    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt, checksums=verify, only=(CONFIG_FILE, MODEL_FILE))
    if problem is not None:
        raise CheckpointError(f"{ckpt} is not a usable checkpoint: {problem}")
    try:
        cfg = load_config(ckpt / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/config.yaml: {e}") from None
    model = build_model(cfg.model)
    weights = load_safetensors(ckpt / MODEL_FILE)
    if cfg.model.tie_embeddings and "model.embed_tokens.weight" in weights:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape that differs from the config
        raise CheckpointError(f"{ckpt}/model.safetensors does not match config.yaml: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match the config: missing {missing}, "
                              f"unexpected {unexpected}")
    return model.to(device), cfg
