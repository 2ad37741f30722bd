"""DeepSpeed's universal checkpoint: converting a checkpoint saved at any world size and ZeRO stage into the
format any other can load (`to_universal`, on resume), and what DeepSpeed 0.19 needs around it to load exactly
and safely: weights-only unpickling (`weights_only_torch_load`, `deepspeed_safe_globals`) and the repair of its
ZeRO-3 universal load (`repair_stage3_universal_load`). Written against DeepSpeed 0.19.x (constraints.txt); on an
upgrade, run tests/test_rescale.py first.
"""
from __future__ import annotations

import argparse
import io
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch

from metalm.checkpoint import CheckpointError


def deepspeed_safe_globals() -> list:
    """DeepSpeed 0.19: the only non-container classes it pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16):
    plain data records (an enum, a dataclass, loss-scaler settings). Unpickling them cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(load, f, map_location=None):
    """`load` (torch.load) of file `f` with weights_only=True and the DeepSpeed records above allowed; a file
    holding anything else raises CheckpointError naming it and the first unsupported global."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), str(e)[:300])
        raise CheckpointError(f"{f}: refusing to unpickle it: {detail}") from None


@contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Inside this block every `torch.load` reads with weights_only=True (and the DeepSpeed records above).

    DeepSpeed 0.19's universal-checkpoint code (`ds_to_universal` and the ZeRO optimizers' universal loaders) calls
    `torch.load(..., weights_only=False)` itself, not through the checkpoint engine: this keeps a tampered
    checkpoint from running code during a conversion or a universal load too."""
    real = torch.load

    def load(f, map_location=None, **_: Any):
        return load_weights_only(real, f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def to_universal(ds_dir: Path, out_dir: Path, zero_stage: int) -> None:
    """Convert DeepSpeed's state of a checkpoint (`ds_dir`: ZeRO 1, 2 or 3 partitions of any world size) into its
    universal format in `out_dir` (one file per parameter and state, no partitions), for an engine at
    `zero_stage` to load, with DeepSpeed's own `ds_to_universal` run in this process. Its progress output is kept
    and shown only in the CheckpointError raised when it fails. DeepSpeed 0.19 wants a `universal_checkpoint_info`
    record in the checkpoint, which only tensor- or pipeline-parallel models need to fill in: inject_missing_state
    adds its version-only form."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with weights_only_torch_load(), redirect_stdout(chatter), redirect_stderr(chatter):
            ds_to_universal.main(args)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DeepSpeed's converter raises AssertionError, KeyError, ...
        tail = " | ".join(chatter.getvalue().strip().splitlines()[-3:])
        raise CheckpointError(f"{ds_dir}: DeepSpeed's ds_to_universal could not convert it: {type(e).__name__}: "
                              f"{str(e)[:300]}{f' (its last output: {tail[:300]})' if tail else ''}") from None
    try:
        with weights_only_torch_load():
            _one_universal_layout(out_dir, zero_stage)
    except (OSError, KeyError, IndexError, StopIteration, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{out_dir}: not the universal checkpoint DeepSpeed 0.19 writes ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None


def _one_universal_layout(out_dir: Path, zero_stage: int) -> None:
    """DeepSpeed 0.19's converter writes the universal format in one of two forms, after the stage that saved the
    checkpoint, and each stage's loader reads only its own: ZeRO-1/2's wants every state file as {"param": tensor},
    a step.pt per parameter and `ds_version` in zero/optimizer_state.pt; ZeRO-3's wants the step in that file's
    optimizer_state_dict.state[0]. The model-states file is named after the stage (ZeRO-3: zero_pp_rank_0_mp_rank_00_
    model_states.pt; else mp_rank_00_model_states.pt); a universal load reads only metadata there (LR schedule,
    step counters; the weights come from zero/). Each form is completed here from the other, with the same
    values, so that an engine at `zero_stage` loads it."""
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS

    stage3_name, other_name = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"
    want, have = (stage3_name, other_name) if zero_stage == 3 else (other_name, stage3_name)
    if not (out_dir / want).is_file():
        shutil.copyfile(out_dir / have, out_dir / want)
    zero = out_dir / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = torch.load(optim_path, weights_only=True)
    # a parameter with optimizer state (a tied one, e.g. the LM head, has only the weights it shares)
    params = sorted(p for p in zero.iterdir() if (p / "exp_avg.pt").is_file())
    if OPTIMIZER_STATE_DICT in optim:
        step = optim[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    else:
        step = torch.load(next(p for p in params if (p / "step.pt").is_file()) / "step.pt", weights_only=True)
        optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: optim[PARAM_GROUPS]}
    optim.setdefault(DS_VERSION, torch.load(out_dir / want, weights_only=True)[DS_VERSION])
    torch.save(optim, optim_path)
    for param in params:
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param / f"{state}.pt"
            value = torch.load(f, weights_only=True) if f.is_file() else None
            if torch.is_tensor(value):
                torch.save({PARAM: value}, f)
        if not (param / "step.pt").is_file():
            torch.save(step, param / "step.pt")


def repair_stage3_universal_load(optimizer, optimizer_state: Path) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) leaves two
    things unlike the checkpointed optimizer, put right here:
    - every parameter group gets the hyperparameters of the first one (the norms and biases would get the
      matrices' weight decay): each group takes those of the saved group it was, as the other loads do;
    - every group's state shares one `step` tensor, which AdamW increments in place once per group and step
      (the second group's bias correction would run ahead): each gets its own copy.
    `optimizer` is the engine's own (DeepSpeed's basic_optimizer) after the load; `optimizer_state` the converted
    checkpoint's zero/optimizer_state.pt."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    with weights_only_torch_load():
        saved = torch.load(optimizer_state, weights_only=True)[PARAM_GROUPS]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"{optimizer_state}: {len(saved)} optimizer parameter groups, this run has "
                              f"{len(optimizer.param_groups)}")
    for group, old in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
