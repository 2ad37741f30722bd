"""The pretraining entry point: `metalm-train`, and `launchers/pretrain.py` (a thin wrapper around this module).

    deepspeed launchers/pretrain.py --config configs/570m.yaml [key=value ...]     # GPUs, one or many nodes
    torchrun --nproc_per_node=2 launchers/pretrain.py --config configs/cpu-tiny.yaml
    metalm-train --config configs/cpu-tiny.yaml train.max_steps=50                  # one process
    metalm-train --config configs/570m.yaml --print-config --world-size 8           # what a run would use
    metalm-train --config configs/570m.yaml --dry-run                               # + model, memory, data

Without --config the built-in defaults of configs/cpu-tiny.yaml are used (in a source checkout). Re-running
the same command resumes from the run directory's latest complete checkpoint.

Both entry points (this console script and launchers/pretrain.py) first apply `keep_freed_memory`, the glibc
allocator setting that keeps a CPU step's temporaries from being page-faulted in anew every micro-batch.

Console output: an upstream deprecation warning that DeepSpeed's communication layer triggers on every
collective (torch's `all_gather_into_tensor` / `reduce_scatter_tensor`) is filtered by its message, and W&B's
own console lines are off (WANDB_SILENT=true) unless you set WANDB_SILENT yourself.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "cpu-tiny.yaml"

# Upstream warnings, filtered by message: torch 2.13 deprecates the collectives DeepSpeed 0.19's comm layer
# (deepspeed/comm/torch.py) calls on every ZeRO step; nothing a metalm user can act on.
UPSTREAM_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


def quiet_upstream() -> None:
    """Install the warning filters (before DeepSpeed is imported) and keep W&B's console output to its
    warnings and errors unless the user set WANDB_SILENT."""
    for message in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    os.environ.setdefault("WANDB_SILENT", "true")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="metalm pretraining (AR + FOMAML meta steps) on DeepSpeed",
        epilog="Overrides are key=value pairs, e.g. train.max_steps=100 meta.enabled=false. Every key with its "
               "type, default and meaning: docs/configuration.md (generated from metalm/config.py).")
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO)} "
                   f"of a source checkout)")
    show = p.add_mutually_exclusive_group()
    show.add_argument("--print-config", action="store_true",
                      help="print the resolved config, the world geometry (world size, micro batch, accumulation, "
                           "global batch) and the DeepSpeed JSON, then exit without starting anything")
    show.add_argument("--dry-run", action="store_true",
                      help="--print-config, and build the model (on the meta device: no memory), count its "
                           "parameters, estimate a step's memory and read the data manifest; no training")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --print-config / --dry-run: the number of processes to derive the geometry for "
                        "(default: WORLD_SIZE from the launcher, else 1)")
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


def _parent_of(pid: int) -> int | None:
    """The parent pid of a live process (Linux /proc), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, then ppid
    except (OSError, ValueError, IndexError):
        return None


def _stop_with_deepspeed_runner() -> None:
    """Under the `deepspeed` runner: SIGTERM this rank when the runner dies.

    The runner starts a per-node launcher, which starts the ranks. A SIGTERM to the runner's PID alone (`kill PID`,
    a supervisor that signals only the process it started) kills the runner, but its launcher and the ranks train
    on, unseen. A watcher thread checks once a second that the launcher (this rank's parent) still has the runner
    as its parent; when it has not, this rank stops as for a first SIGTERM (StopRequest.LAUNCHER_GONE):
    checkpoint at the next step boundary, exit 0. (The launcher is recognised by the CROSS_RANK variable it
    sets; Linux only.)
    """
    if "CROSS_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    from metalm.train.guards import StopRequest
    import threading
    import time

    launcher = os.getppid()
    runner = _parent_of(launcher)
    if runner is None or runner <= 1:
        return

    def watch() -> None:
        while _parent_of(launcher) == runner:
            time.sleep(1.0)
        os.kill(os.getpid(), StopRequest.LAUNCHER_GONE)  # a stop request, never the "second signal" of a Ctrl-C

    threading.Thread(target=watch, name="metalm-runner-watch", daemon=True).start()


class _NoDistEnv(ValueError):
    pass


def _derive_world(env: dict) -> dict:
    """The launcher's or Slurm's RANK/WORLD_SIZE/... (a no-op outside both)."""
    from metalm import dist_env

    try:
        return dist_env.derive(env)
    except dist_env.DistEnvError as e:
        raise _NoDistEnv(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    quiet_upstream()
    _stop_with_launcher()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from metalm.config import ConfigError, load_config

    preview = args.print_config or args.dry_run
    try:
        if args.world_size is not None and not preview:
            raise ConfigError("--world-size only previews a geometry (with --print-config or --dry-run); a run takes "
                              "its world size from the launcher (torchrun --nproc_per_node, deepspeed --num_gpus)")
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"--world-size {args.world_size}: expected a positive number of processes")
        config = args.config
        if config is None:
            if not DEFAULT_CONFIG.is_file():
                raise ConfigError(f"no --config given, and the default {DEFAULT_CONFIG} is not there (an installed "
                                  f"metalm-train has no configs/ folder); pass --config FILE")
            config = str(DEFAULT_CONFIG)
        os.environ.update(_derive_world(dict(os.environ)))  # under srun: RANK/WORLD_SIZE/... from SLURM_*
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(config, args.overrides, world_size=world)
    except (ConfigError, _NoDistEnv) as e:
        print(f"metalm: configuration error: {e}", file=sys.stderr)
        return 2
    if preview:
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher: rank 0 reports
            from metalm.cli.preview import dry_run, print_config

            source = f"{config}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
            origin = ("--world-size" if args.world_size is not None else "WORLD_SIZE from the launcher"
                      if "WORLD_SIZE" in os.environ else "not under a launcher; --world-size N previews N processes")
            print_config(cfg, world, source, origin)
            if args.dry_run:
                dry_run(cfg, world)
        return 0
    return _train(cfg)


def _train(cfg) -> int:
    _stop_with_deepspeed_runner()
    from metalm.checkpoint import CheckpointError
    from metalm.config import ConfigError
    from metalm.data.errors import DataError
    from metalm.device import DeviceError
    from metalm.train.engine import init_distributed
    from metalm.train.errors import TrainingError
    from metalm.train.loop import Trainer

    from torch.distributed import DistError

    from metalm.train.dist import collective_failure, rendezvous_error

    try:
        dist = init_distributed(cfg.train)
    except DeviceError as e:
        print(f"metalm: error: {e}", file=sys.stderr)
        return 2
    except DistError as e:  # DistNetworkError (no connection), DistStoreError (not every rank came in time)
        rank = os.environ.get("RANK", "0")
        line = rendezvous_error(e, dict(os.environ), cfg.train.collective_timeout)
        sys.stderr.write(f"metalm: error (rank {rank}): {line}\n")
        return 1
    _log_warnings(dist.rank if dist.world_size > 1 else None)
    try:
        return Trainer(cfg, dist).run()
    except (DataError, CheckpointError, ConfigError, TrainingError) as e:
        sys.stderr.write(f"metalm: error (rank {dist.rank}): {e}\n")  # one write: ranks' lines stay whole
        sys.stderr.flush()
        return 1
    except RuntimeError as e:  # torch's DistError types are RuntimeErrors too
        lost = collective_failure(e, cfg.train.collective_timeout) if dist.world_size > 1 else None
        if lost is None:
            raise
        sys.stderr.write(f"metalm: error (rank {dist.rank}): {lost}\n")
        sys.stderr.flush()
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down here rather than in the interpreter's exit-time destructors."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _log_warnings(rank: int | None) -> None:
    """metalm's warnings (an ignored incomplete checkpoint, a skipped episode, ...) as one stderr line each, in the
    console format (`metalm: warning (rank N): ...`; without the rank in a single-process run)."""
    from metalm.console import LOGGER, console_handler

    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        logger.addHandler(console_handler("metalm", rank))
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


def console_main() -> None:
    """The `metalm-train` console script and `python launchers/pretrain.py`: the allocator setting, then the run."""
    keep_freed_memory()
    exit_now(main())


if __name__ == "__main__":
    console_main()
