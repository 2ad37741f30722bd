"""Per-layer gradient norms during training (train.grad_stats_every): the groups and norms by hand, and the
norms the engine assembles at ZeRO 0-3 over two CPU processes against a plain autograd computation of the same
step's gradient; the trainer logs them into metrics.jsonl every N steps and never with 0."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from procs import cpu_run_env, free_port

from metalm.config import load_config
from metalm.train.grad_stats import GradStats, grad_norms, group_of

REPO = Path(__file__).resolve().parents[1]
# two processes x micro 2 x accum 2; all-AR steps (hybrid_ratio 0) on a model with a meta head, which then gets
# no gradient
OVERRIDES = ["train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=2",
             "train.global_batch=8", "optim.grad_clip=0", "meta.hybrid_ratio=0.0", "meta.grad_ratio=0",
             "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "logging.wandb=false", "logging.progress=false",
             "train.log_every=1", "train.val_every=0", "checkpoint.every=1000", "data.prepare_if_missing=false",
             "train.device=cpu"]
STAGES = (0, 1, 2, 3)


def test_groups_and_norms_by_hand():
    assert group_of("lm.model.layers.3.self_attn.k_proj.weight") == "L3/attn"
    assert group_of("lm.model.layers.3.input_layernorm.weight") == "L3/attn"
    assert group_of("lm.model.layers.0.post_attention_layernorm.weight") == "L0/mlp"
    assert group_of("lm.model.embed_tokens.weight") == "embed" and group_of("head.9.bias") == "meta_head"
    assert group_of("lm.model.norm.weight") == "final_norm" and group_of("lm.lm_head.weight") == "lm_head"
    with pytest.raises(ValueError, match="lm.extra.weight"):
        group_of("lm.extra.weight")
    got = grad_norms([("lm.model.layers.0.self_attn.q_proj.weight", torch.full((2, 2), 3.0)),  # 4 x 9
                      ("lm.model.layers.0.mlp.up_proj.weight", torch.tensor([[4.0]])),
                      ("lm.model.embed_tokens.weight", torch.tensor([0.0, -12.0])), ("head.0.bias", None)])
    assert got == {"grad_norm/L0/attn": 6.0, "grad_norm/L0/mlp": 4.0, "grad_norm/L0": math.sqrt(52.0),
                   "grad_norm/embed": 12.0, "grad_norm/meta_head": 0.0, "grad_norm/total": 14.0}


class _Grads:
    def full_gradients(self):
        yield "lm.model.norm.weight", torch.tensor([1.0])


def test_a_negative_interval_is_refused_naming_the_key():
    from metalm.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.grad_stats_every=-1: expected >= 0"):
        load_config(None, ["train.grad_stats_every=-1"])


def test_every_n_steps_on_rank_zero_only():
    logged: list[dict] = []
    hook = GradStats(3, _Grads(), 0, logged.append)
    for step in range(1, 8):
        hook(step)
    assert [r["step"] for r in logged] == [3, 6] and logged[0]["grad_norm/final_norm"] == 1.0
    other: list[dict] = []
    for step in range(1, 8):
        GradStats(3, _Grads(), 1, other.append)(step)
        GradStats(0, _Grads(), 0, other.append)(step)
    assert other == []


def _batches(vocab: int = 1000) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, 65), generator=g) for _ in range(4)]  # (micro, seq_len + 1)


def _worker(out: str, shards: str, run_dir: str) -> None:
    """Under torchrun, 2 ranks: one step at each ZeRO stage (rank r takes micro-batches 2r and 2r+1), its norms
    as GradStats logs them; then two short trainer runs (grad_stats_every 2 and 0)."""
    from metalm.train.dist import Collectives
    from metalm.train.engine import Engine, init_distributed
    from metalm.train.loop import Trainer
    from metalm.train.module import PretrainModule
    from metalm.train.step import HybridStep

    base = [*OVERRIDES, f"data.shards={shards}"]
    cfg0 = load_config(REPO / "configs" / "cpu-tiny.yaml", base)
    dist = init_distributed(cfg0.train)
    got = {}
    for zero in STAGES:
        cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", [*base, f"train.zero_stage={zero}"])
        torch.manual_seed(0)
        engine = Engine(PretrainModule.from_config(cfg), cfg.optim, cfg.train, dist)
        logged: list[dict] = []
        step = HybridStep(cfg, engine, Collectives(dist), None, 2, before_update=lambda s, t: True,
                          on_gradients=GradStats(1, engine, dist.rank, logged.append))
        step(iter(_batches()[2 * dist.rank: 2 * dist.rank + 2]), 0)
        got[zero] = logged
        engine.destroy()
    for every, steps in ((2, 4), (0, 1)):
        cfg = load_config(REPO / "configs" / "cpu-tiny.yaml",
                          [*base, f"train.run_dir={run_dir}-{every}", f"train.max_steps={steps}",
                           f"train.grad_stats_every={every}"])
        Trainer(cfg, dist).run()
    if dist.rank == 0:
        torch.save(got, out)
    torch.distributed.barrier()  # neither rank leaves while the other still talks to it
    torch.distributed.destroy_process_group()


def _reference(cfg) -> dict[str, float]:
    """The same step's gradient with plain autograd: the mean over the 4 micro-batches of the next-token
    cross-entropy of the bare transformer, from the same initial weights; norms per group written out here."""
    from metalm.train.module import PretrainModule

    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    lm = module.lm
    loss = 0.0
    for b in _batches():
        logits = lm(b[:, :-1])
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1)) / 4
    loss.backward()

    def norm(params) -> float:
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))

    ref = {"grad_norm/embed": norm([lm.model.embed_tokens.weight]),
           "grad_norm/final_norm": norm([lm.model.norm.weight]),
           "grad_norm/meta_head": norm(module.head.parameters()), "grad_norm/total": norm(module.parameters())}
    for i, block in enumerate(lm.model.layers):
        attn = [block.input_layernorm.weight, *block.self_attn.parameters()]
        mlp = [block.post_attention_layernorm.weight, *block.mlp.parameters()]
        ref.update({f"grad_norm/L{i}/attn": norm(attn), f"grad_norm/L{i}/mlp": norm(mlp),
                    f"grad_norm/L{i}": norm(attn + mlp)})
    return ref


@pytest.mark.slow
def test_norms_at_every_zero_stage_match_plain_autograd_and_the_trainer_logs_them(tmp_path, shards):
    out = tmp_path / "norms.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, "WORKER", str(out), str(shards), str(tmp_path / "run")]
    res = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    ref = _reference(load_config(REPO / "configs" / "cpu-tiny.yaml", [*OVERRIDES, f"data.shards={shards}"]))
    assert ref["grad_norm/meta_head"] == 0.0 and ref["grad_norm/L1/mlp"] > 0
    for zero in STAGES:
        assert [r["step"] for r in got[zero]] == [1], zero
        norms = {k: v for k, v in got[zero][0].items() if k != "step"}
        assert norms.keys() == ref.keys(), zero
        for k, v in ref.items():
            assert norms[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (zero, k)
    rows = [json.loads(line) for line in (tmp_path / "run-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "grad_norm/total" in r] == [2, 4]
    assert all(r["grad_norm/L1"] > 0 for r in rows if "grad_norm/total" in r)
    rows = [json.loads(line) for line in (tmp_path / "run-0" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("grad_norm/") for r in rows for k in r)


if __name__ == "__main__" and sys.argv[1:2] == ["WORKER"]:
    _worker(*sys.argv[2:5])
