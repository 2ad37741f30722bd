"""Pretraining entry point for launchers that start a script (deepspeed, torchrun, srun, python).

    deepspeed launchers/pretrain.py --config configs/570m.yaml [key=value ...]     # GPUs, one or many nodes
    torchrun --nproc_per_node=2 launchers/pretrain.py --config configs/cpu-tiny.yaml
    python launchers/pretrain.py --config configs/cpu-tiny.yaml train.max_steps=50  # one process
    python launchers/pretrain.py --config configs/570m.yaml --dry-run              # what it would use, no run

The same program as the `metalm-train` console script: everything lives in metalm/cli/train.py (part of the
installed package; launchers/ is not). `python launchers/pretrain.py --help` lists the options.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # after launchers/ (sys.path[0]), where dist_env.py is

from metalm.cli.train import console_main, exit_now, main  # noqa: E402

__all__ = ["exit_now", "main"]


if __name__ == "__main__":
    console_main()  # the allocator setting, then the run: the same as the metalm-train console script
