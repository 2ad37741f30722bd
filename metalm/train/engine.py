"""The DeepSpeed adapter: process-group set-up and the one surface the training loop, the checkpointer and the
benchmarks use (forward, backward, step(skip), save, load, gather_for_export).

This module and metalm/train/universal.py (the universal-checkpoint conversion and load) are the only ones that
touch DeepSpeed's internals. Each workaround says which DeepSpeed version it
was written against (0.19.x, pinned in constraints.txt); on an upgrade, check the ones marked here and nothing
else.
"""
from __future__ import annotations

import importlib
import os
import socket
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch

from metalm.checkpoint import DS_DIR, CheckpointError
from metalm.config import OptimConfig, TrainConfig, grad_accum
from metalm.device import resolve_device
from metalm.train.dist import Dist
from metalm.train.lr_schedule import lr_lambda
from metalm.train.universal import load_weights_only, repair_stage3_universal_load, weights_only_torch_load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_build() -> None:
    """DeepSpeed 0.19: on CPU, `deepspeed.comm.torch` JIT-compiles a shared-memory all-reduce at init (about a
    minute, needs a C++ toolchain) through its module-level `build_shm_op`. gloo is adequate for the small CPU
    runs we do, so we replace that function unless METALM_DS_SHM=1."""
    if os.environ.get("METALM_DS_SHM") == "1":
        return
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def _collective_timeout(seconds: float) -> timedelta:
    """train.collective_timeout for every process group of the run. The default group and its store (the
    rendezvous of env:// at init, TCPStore waits) get it from init_process_group, through DeepSpeed's
    init_distributed. DeepSpeed 0.19 runs ZeRO's collectives on groups of its own (utils/groups.py: a clone of
    the world group, made by `new_group(ranks)` without a timeout), and torch 2.13 gives such groups its own
    default (30 minutes for gloo, 10 for NCCL), not the default group's: so the defaults that `new_group` reads
    are set to the same value first."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(distributed_c10d, name):  # an upgrade renamed them: fail here, not hang in a collective
            raise RuntimeError(f"torch.distributed.distributed_c10d.{name} is gone: see _collective_timeout")
        setattr(distributed_c10d, name, timeout)
    return timeout


def init_distributed(train: TrainConfig) -> Dist:
    """Initialise torch.distributed through DeepSpeed (works under deepspeed, torchrun and plain python)."""
    device_type = resolve_device(train.device, "train.device")
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_shm_build()
    if "RANK" not in os.environ:  # plain `python launchers/pretrain.py`: a single process group of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = _collective_timeout(train.collective_timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device)


def deepspeed_config(optim: OptimConfig, train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config, derived from the optim and train sections and the world size (never written by
    hand)."""
    accum = grad_accum(train, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": train.micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": {"stage": int(train.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
    if train.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never norms or biases (1-D parameters)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextmanager
def _instance_patch(obj: Any, **attrs: Any) -> Iterator[None]:
    """Set attributes on one object for the duration of a block, then restore exactly what was there."""
    saved = {name: (name in vars(obj), vars(obj).get(name)) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, (had, value) in saved.items():
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


@contextmanager
def update_suppressed(optimizer) -> Iterator[None]:
    """Inside this block `optimizer.step()` does nothing.

    DeepSpeed 0.19: its wrappers (ZeRO 1/2/3, bf16/fp16) reduce, clip and clear the gradients and advance their
    counters in `engine.step()`, and call the basic optimizer (`engine.basic_optimizer`, our AdamW) to change
    the fp32 master weights: that call is what is suppressed. So parameters (whose 16-bit copies are re-derived
    from the unchanged masters) and the AdamW state (moments, step count) stay exactly as they were.
    """
    had = "step" in vars(optimizer)  # torch's LR scheduler wraps `step` on the instance: keep its wrapper
    previous = vars(optimizer).get("step")
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had:
            optimizer.step = previous
        else:
            del optimizer.step


@contextmanager
def deferred_io_errors(ds_engine, errors: list) -> Iterator[None]:
    """Inside this block, a failed write of DeepSpeed's `save_checkpoint` is appended to `errors` instead of
    raised, and later writes of the same save are skipped.

    DeepSpeed 0.19's save runs collectives (a barrier after creating the directory, a tag check, a barrier at
    the end) between its writes, through `checkpoint_engine.save/makedirs` and `_copy_recovery_script`. If one
    rank raised on a full disk, the others would wait in the next collective forever; recording the error lets
    every rank go through the same collectives, after which the checkpointer agrees on the outcome.
    """
    def guarded(fn):
        def call(*args, **kwargs):
            if errors:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
                errors.append(e)
                return None
        return call

    ce = ds_engine.checkpoint_engine
    with _instance_patch(ce, save=guarded(ce.save), makedirs=guarded(ce.makedirs)), \
            _instance_patch(ds_engine, _copy_recovery_script=guarded(ds_engine._copy_recovery_script)):
        yield


@contextmanager
def safe_deepspeed_load(ds_engine) -> Iterator[None]:
    """Make DeepSpeed's `load_checkpoint` read its files with torch.load(weights_only=True): tensors, plain
    containers and the few DeepSpeed records universal.py allows, never arbitrary pickled objects (DeepSpeed 0.19 itself
    passes weights_only=False to `checkpoint_engine.load`, which runs whatever code a tampered file carries).
    A file holding anything else raises CheckpointError naming it."""
    def load(path: str, map_location=None):
        return load_weights_only(torch.load, path, map_location)

    with _instance_patch(ds_engine.checkpoint_engine, load=load):
        yield


class Engine:
    """One DeepSpeed engine around the PretrainModule, with a client AdamW and LambdaLR (both in its
    checkpoints), built from the optim and train sections and the process group (its DeepSpeed JSON is
    `deepspeed_config(optim, train, dist.world_size)`). `module` is the wrapped PretrainModule (its parameters
    are ZeRO-3 partitions at stage 3)."""

    TAG = DS_DIR  # the DeepSpeed state's subdirectory in a checkpoint

    def __init__(self, module: torch.nn.Module, optim: OptimConfig, train: TrainConfig, dist: Dist):
        import deepspeed

        self.zero_stage = train.zero_stage
        self.dist = dist
        optimizer = torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr,
                                      betas=tuple(optim.betas), eps=optim.eps,
                                      fused=(dist.device.type == "cuda") or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, train.max_steps))
        self.ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                config=deepspeed_config(optim, train, dist.world_size))
        head = getattr(module, "head", None)
        if self.zero_stage == 3 and head is not None:
            # The meta step reads the head's parameters directly (functional inner loop), outside the head
            # submodules' own forward: tell ZeRO-3 to gather them for the whole forward of the wrapper.
            for p in head.parameters():
                deepspeed.zero.register_external_parameter(module, p)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, batch: torch.Tensor, episode=None):
        return self.ds(batch, episode=episode)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; before the last micro-batch of a step DeepSpeed's `step()` only counts
        it (DeepSpeed 0.19 needs that call after every backward), the update happens in `step`."""
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def step(self, skip: bool) -> bool:
        """The optimizer step at the accumulation boundary: reduce, clip, update, clear the gradients, advance
        the LR schedule. skip=True does all of it but the update. Returns whether an update was applied."""
        sched = self.ds.lr_scheduler
        before = sched.last_epoch
        with update_suppressed(self.ds.basic_optimizer) if skip else nullcontext():
            self.ds.step()
        if sched.last_epoch == before:
            sched.step()  # DeepSpeed skipped on its own (fp16 overflow): the LR stays a function of the step
        if self.zero_stage == 3:
            # DeepSpeed 0.19's ZeRO-3 keeps every parameter's gradient partition in one flat buffer that it
            # overwrites only for parameters that receive a gradient in the first micro-batch of a step. A
            # parameter without one (the meta head in an AR step, the LM head in a meta step) would be updated
            # with its gradient from an earlier step, and a NaN from a skipped step would stay there.
            flat = getattr(self.ds.optimizer, "grad_partitions_flat_buffer", None)
            if flat is not None:
                flat.zero_()
        return not skip and self.ds.was_step_applied()

    def full_gradients(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Collective at ZeRO 1-3 (every rank iterates it whole, in the same order): each parameter's name and its
        whole gradient as the optimizer will receive it, between the step's last backward and `step` (reduced
        over ranks, not yet clipped); None for a parameter without one. DeepSpeed 0.19's `safe_get_full_grad`
        assembles it from the partitions (an all-reduce per parameter at ZeRO 1/2, an all-gather at ZeRO 3)."""
        from deepspeed.utils import safe_get_full_grad

        for name, p in self.ds.module.named_parameters():
            if p.requires_grad:
                yield name, safe_get_full_grad(p)

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self.ds.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.ds.train()

    def save(self, directory: str, errors: list) -> None:
        """Collective: write the DeepSpeed state under `directory`/ds. A failed write is appended to `errors`
        (see deferred_io_errors) so that every rank still reaches DeepSpeed's collectives."""
        with deferred_io_errors(self.ds, errors):
            self.ds.save_checkpoint(directory, tag=self.TAG, save_latest=False)

    def load(self, directory: str, universal: bool = False) -> None:
        """Collective: model, optimizer and LR-scheduler state from `directory`/ds, read without unpickling
        code. universal=True: `directory`/ds is in DeepSpeed's universal format (`to_universal`), loaded into this
        run's world size and ZeRO stage."""
        flag = self.ds._config.load_universal_checkpoint  # DeepSpeed 0.19 reads it at load time only
        self.ds._config.load_universal_checkpoint = universal
        try:
            with safe_deepspeed_load(self.ds), weights_only_torch_load() if universal else nullcontext():
                path, _ = self.ds.load_checkpoint(directory, tag=self.TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            self.ds._config.load_universal_checkpoint = flag
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {directory}/{self.TAG}")
        if universal and self.zero_stage == 3:
            saved = Path(directory) / self.TAG / "zero" / "optimizer_state.pt"
            repair_stage3_universal_load(self.ds.basic_optimizer, saved)

    @contextmanager
    def gather_for_export(self) -> Iterator[torch.nn.Module | None]:
        """Collective: the full (unpartitioned) module on rank 0 for the duration of the block (None on the other
        ranks); under ZeRO-3 the partitions are gathered first."""
        module = self.ds.module
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module if self.dist.rank == 0 else None
        else:
            yield module if self.dist.rank == 0 else None

    def destroy(self) -> None:
        self.ds.destroy()
