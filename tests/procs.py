"""Helpers of the tests that start processes: training runs (torchrun, the deepspeed runner), launchers."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port that was free a moment ago, for a rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_run_env() -> dict:
    """The environment of a CPU training process: DeepSpeed on CPU, one thread a rank, W&B offline, and no
    Triton interpreter (on CPU tensors the kernels then dispatch to their torch references: these tests check
    the training loop; tests/test_kernels*.py check the kernels)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def no_launcher_env(**extra: str) -> dict:
    """The current environment without any launcher or Slurm variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith(("SLURM_", "SRUN_"))}
    env.update(extra)
    return env
