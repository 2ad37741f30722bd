"""Helpers of the tests that start training processes (torchrun, the deepspeed runner)."""
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
