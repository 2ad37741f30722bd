"""Pretraining entry point.

    deepspeed launchers/pretrain.py --config configs/570m.yaml [key=value ...]     # GPUs, one or many nodes
    torchrun --nproc_per_node=2 launchers/pretrain.py --config configs/cpu-tiny.yaml
    python launchers/pretrain.py --config configs/cpu-tiny.yaml train.max_steps=50  # one process

Without --config the built-in defaults of configs/cpu-tiny.yaml are used. Re-running the same command
resumes from the run directory's latest complete checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "cpu-tiny.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="metalm pretraining (AR + FOMAML meta steps) on DeepSpeed",
                                epilog="Overrides are key=value pairs, e.g. train.max_steps=100 meta.enabled=false")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from dist_env import DistEnvError, derive  # launchers/ is sys.path[0] when this file runs as a script
    from metalm.config import ConfigError, load_config

    try:
        os.environ.update(derive(os.environ))  # under srun: RANK/WORLD_SIZE/... from SLURM_*; else a no-op
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(args.config, args.overrides, world_size=world)
    except (ConfigError, DistEnvError) as e:
        print(f"metalm: configuration error: {e}", file=sys.stderr)
        return 2
    from metalm.data.errors import DataError
    from metalm.train.checkpoint import CheckpointError
    from metalm.train.engine import init_distributed
    from metalm.train.loop import Trainer

    dist = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, dist)
        trainer.setup()
        return trainer.run()
    except (DataError, CheckpointError, ConfigError) as e:
        print(f"metalm: error (rank {dist.rank}): {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
