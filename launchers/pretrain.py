"""Pretraining entry point.

    deepspeed launchers/pretrain.py --config configs/570m.yaml [key=value ...]     # GPUs, one or many nodes
    torchrun --nproc_per_node=2 launchers/pretrain.py --config configs/cpu-tiny.yaml
    python launchers/pretrain.py --config configs/cpu-tiny.yaml train.max_steps=50  # one process

Without --config the built-in defaults of configs/cpu-tiny.yaml are used. Re-running the same command
resumes from the run directory's latest complete checkpoint.
"""
from __future__ import annotations

import argparse
import logging
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


def _stop_with_launcher() -> None:
    """Under torchrun: SIGTERM this rank when torchrun dies.

    torchrun starts every rank in a session of its own, so when torchrun itself is killed (kill -9, the OOM
    killer) the ranks are not: they would train on as orphans, and a restarted job would write the same run
    directory beside them. With the parent-death signal they stop as for any SIGTERM: checkpoint at the next
    step boundary, exit. (Only under torchrun: the signal follows the *thread* that started the process, and
    other launchers keep their ranks in their own process group.)
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # torchrun died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    _stop_with_launcher()
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
    from metalm.checkpoint import CheckpointError
    from metalm.data.errors import DataError
    from metalm.train.engine import DeviceError, init_distributed
    from metalm.train.errors import TrainingError
    from metalm.train.loop import Trainer

    try:
        dist = init_distributed(cfg.train)
    except DeviceError as e:
        print(f"metalm: error: {e}", file=sys.stderr)
        return 2
    _log_warnings(dist.rank)
    try:
        return Trainer(cfg, dist).run()
    except (DataError, CheckpointError, ConfigError, TrainingError) as e:
        sys.stderr.write(f"metalm: error (rank {dist.rank}): {e}\n")  # one write: ranks' lines stay whole
        sys.stderr.flush()
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down here rather than in the interpreter's exit-time destructors."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _log_warnings(rank: int) -> None:
    """metalm's warnings (an ignored incomplete checkpoint, a skipped episode, ...) as one stderr line each."""
    logger = logging.getLogger("metalm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"metalm: %(levelname)s (rank {rank}): %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def exit_now(status: int) -> None:
    """Leave without running C++ static destructors. At the exit of CPU runs one of torch/gloo/DeepSpeed's
    threads is sometimes still joinable, and the process dies with SIGABRT ("terminate called without an
    active exception") after a run that finished and checkpointed fine, so the launcher reports a failure
    (about 1 run in 10 with 2 CPU processes, before these changes too). Everything of ours is written and
    closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
