"""Rank, world size and rendezvous of a launcher's or a Slurm task's environment, for shell scripts:

    eval "$(python launchers/dist_env.py --export)"      # inside an srun task
    python launchers/dist_env.py --json | --rdzv-endpoint

The logic lives in metalm/dist_env.py (standard library only, part of the installed package); this file runs it
from a source checkout without installing anything.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalm.dist_env import main

if __name__ == "__main__":
    sys.exit(main())
