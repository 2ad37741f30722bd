"""Process-group and DeepSpeed engine set-up: the one place that knows about ranks and devices."""
from __future__ import annotations

import importlib
import logging
import math
import os
import socket
from dataclasses import dataclass

import torch

from metalm.config import Config, deepspeed_config

log = logging.getLogger("metalm.engine")


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce at init (about a minute, needs a C++
    toolchain). gloo is adequate for the small CPU runs we do there, so we skip it unless METALM_DS_SHM=1."""
    if os.environ.get("METALM_DS_SHM") == "1":
        return
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def resolve_device(cfg: Config) -> str:
    want = cfg.train.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return want


def init_distributed(cfg: Config) -> Dist:
    """Initialise torch.distributed through DeepSpeed (works under deepspeed, torchrun and plain python)."""
    device_type = resolve_device(cfg)
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_build()
    if "RANK" not in os.environ:  # plain `python launchers/pretrain.py`: a single process group of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = "nccl" if device_type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device)


def lr_lambda(cfg: Config):
    """Multiplier on optim.lr: linear warm-up, then cosine/linear decay to min_lr_ratio, or constant."""
    o, total = cfg.optim, cfg.train.max_steps
    warm = o.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if o.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return f


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never norms or biases (1-D parameters)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, module: torch.nn.Module, dist: Dist):
    """deepspeed.initialize with a client AdamW and LambdaLR (both saved in DeepSpeed checkpoints)."""
    import deepspeed

    o = cfg.optim
    use_fused = dist.device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  eps=o.eps, fused=use_fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dist.world_size))
    if cfg.train.zero_stage == 3 and getattr(module, "head", None) is not None:
        # The meta step reads the head's parameters directly (functional inner loop), outside the head
        # submodules' own forward: tell ZeRO-3 to gather them for the whole forward of the wrapper.
        for p in module.head.parameters():
            deepspeed.zero.register_external_parameter(module, p)
    return engine
