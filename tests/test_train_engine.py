"""The DeepSpeed adapter's workarounds (metalm.train.engine), on stand-ins for the DeepSpeed objects they patch."""
from __future__ import annotations

import pytest
import torch

from metalm.config import load_config
from metalm.train import engine as ds_engine

def test_update_suppressed_restores_the_schedulers_step_wrapper():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    wrapped = vars(opt).get("step")
    p.grad = torch.ones(3)
    with ds_engine.update_suppressed(opt):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state
    assert vars(opt).get("step") is wrapped
    opt.step()
    sched.step()
    assert not torch.equal(p, torch.ones(3)) and opt.state[p]["step"] == 1





class FakeCheckpointEngine:
    def __init__(self):
        self.calls = []

    def save(self, state, path):
        self.calls.append(path)
        if path == "a":
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    def makedirs(self, path, exist_ok=False):
        self.calls.append(f"mkdir {path}")


class FakeEngine:
    def __init__(self):
        self.checkpoint_engine = FakeCheckpointEngine()
        self.barriers = 0

    def _copy_recovery_script(self, path):
        self.checkpoint_engine.calls.append(f"copy {path}")

    def save_checkpoint(self):
        self.checkpoint_engine.makedirs("d")
        self.barriers += 1  # DeepSpeed's collectives, which every rank must reach
        self.checkpoint_engine.save({}, "a")
        self.checkpoint_engine.save({}, "b")
        self._copy_recovery_script("d")
        self.barriers += 1


def test_deepspeed_write_errors_are_recorded_and_every_collective_still_runs():
    engine = FakeEngine()
    errors: list = []
    with ds_engine.deferred_io_errors(engine, errors):
        engine.save_checkpoint()
    assert engine.barriers == 2 and len(errors) == 1 and "unexpected pos" in str(errors[0])
    assert engine.checkpoint_engine.calls == ["mkdir d", "a"]  # later writes of the failed save are skipped
    assert "save" not in vars(engine.checkpoint_engine) and "_copy_recovery_script" not in vars(engine)
    with pytest.raises(RuntimeError):
        engine.checkpoint_engine.save({}, "a")  # outside the block errors raise again


def test_deepspeed_config_is_derived_from_the_optim_and_train_sections():
    cfg = load_config(None, ["train.global_batch=64", "train.micro_batch=4", "train.zero_stage=3",
                             "train.precision=bf16", "optim.grad_clip=0.5", "meta.grad_ratio=0"], world_size=2)
    ds = ds_engine.deepspeed_config(cfg.optim, cfg.train, 2)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5 and "fp16" not in ds
