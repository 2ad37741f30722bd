"""Pretraining entry point for launchers that start a script (deepspeed, torchrun, srun, python).

    deepspeed launchers/pretrain.py --config configs/570m.yaml [key=value ...]     # GPUs, one or many nodes
    torchrun --nproc_per_node=2 launchers/pretrain.py --config configs/cpu-tiny.yaml
    python launchers/pretrain.py --config configs/cpu-tiny.yaml train.max_steps=50  # one process
    python launchers/pretrain.py --config configs/570m.yaml --dry-run              # what it would use, no run

The same program as the `metalm-train` console script: everything lives in metalm/cli/train.py (part of the
installed package; launchers/ is not). `python launchers/pretrain.py --help` lists the options.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # after launchers/ (sys.path[0]), where dist_env.py is

from metalm.cli.train import exit_now, main  # noqa: E402

__all__ = ["exit_now", "main"]


def keep_freed_memory() -> None:
    """glibc gives blocks above its (adaptive) mmap threshold back to the kernel at free() and trims the heap
    top, so a CPU step's gradient- and optimizer-sized temporaries were page-faulted in (zeroed by the kernel)
    anew every micro-batch: system time. Keep blocks up to 32 MB (glibc's maximum threshold) in the heap and
    the heap untrimmed below 1 GB free. MALLOC_* variables or GLIBC_TUNABLES set by the user win."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ or any(
            k.startswith("MALLOC_") for k in os.environ):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


if __name__ == "__main__":
    keep_freed_memory()
    exit_now(main())
