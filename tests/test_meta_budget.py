"""The meta-gradient budget (metalm.meta.budget): the combination against hand-computed vectors, the ratio's
schedule against hand-computed values, the budgeted loss on a real module against a plain two-backward
reference in float64, and, through the DeepSpeed engine, a backbone gradient whose meta part scales exactly with
meta.grad_ratio while the head's gradient does not move."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from procs import cpu_run_env

from metalm.config import ConfigError, MetaConfig, load_config
from metalm.meta.budget import budgeted_loss, combine, ratio_at
from metalm.meta.tasks import sample_episode

MASK = 50280


def test_combine_projects_then_scales_to_the_ratio_hand_computed():
    # g_ar = (3, 0 | 4) has norm 5; g_m = (-1, 0 | none): <g_m, g_ar> = -3, cosine -0.6.
    g_ar = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    g_m = [torch.tensor([-1.0, 0.0]), None]
    out, st = combine(g_ar, g_m, ratio=0.5, project=True)
    # projection: g_m - (-3/25) g_ar = (-0.64, 0 | 0.48), norm 0.8 (it reaches the tensor without a meta gradient);
    # budget: x 0.5 * 5 / 0.8 = 3.125 -> (-2, 0 | 1.5); plus g_ar
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0])) and torch.allclose(out[1], torch.tensor([5.5]))
    assert float(st["grad_cos"]) == pytest.approx(-0.6)
    assert float(st["grad_ratio_raw"]) == pytest.approx(0.2)
    assert float(st["grad_ratio"]) == pytest.approx(0.5)
    # without projection: (-1, 0) x 0.5 * 5 / 1 = (-2.5, 0); the tensor without a meta gradient keeps g_ar
    out, st = combine(g_ar, g_m, ratio=0.5, project=False)
    assert torch.allclose(out[0], torch.tensor([0.5, 0.0])) and out[1] is g_ar[1]
    assert float(st["grad_ratio"]) == pytest.approx(0.5)
    # a meta gradient that agrees with the AR one is not projected
    out, _ = combine(g_ar, [torch.tensor([1.0, 0.0]), None], ratio=None, project=True, weight=2.0)
    assert torch.allclose(out[0], torch.tensor([5.0, 0.0])) and torch.allclose(out[1], torch.tensor([4.0]))
    # no budget: the meta part times the weight
    out, st = combine(g_ar, g_m, ratio=None, project=False, weight=0.3)
    assert torch.allclose(out[0], torch.tensor([2.7, 0.0])) and float(st["grad_ratio"]) == pytest.approx(0.06)


def test_ratio_schedule_hand_computed():
    m = MetaConfig(grad_ratio=0.2, grad_ratio_start=10, grad_ratio_warmup=20, grad_ratio_final=0.25)
    assert ratio_at(m, 1, 130) == 0.0 and ratio_at(m, 10, 130) == 0.0
    assert ratio_at(m, 15, 130) == pytest.approx(0.2 * 5 / 20)
    assert ratio_at(m, 30, 130) == pytest.approx(0.2)
    # cosine from step 30 (0.2) to step 130 (0.25 x 0.2): halfway at step 80
    assert ratio_at(m, 80, 130) == pytest.approx(0.2 * (0.25 + 0.75 * 0.5))
    assert ratio_at(m, 130, 130) == pytest.approx(0.05) and ratio_at(m, 500, 130) == pytest.approx(0.05)
    assert ratio_at(MetaConfig(grad_ratio=0.3), 1, 10) == 0.3 == ratio_at(MetaConfig(grad_ratio=0.3), 10, 10)
    assert ratio_at(MetaConfig(grad_ratio=0.0), 5, 10) == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["meta.grad_ratio=0.1", "meta.objective=replace"], "meta.grad_ratio"),
    (["meta.grad_ratio=0", "meta.project=true", "meta.objective=replace"], "meta.project"),
    (["meta.grad_ratio=0.1", "meta.loss_weight=0.5"], "meta.loss_weight"),
    (["meta.grad_ratio=0.1", "meta.feature_grad_clip=0.1"], "meta.feature_grad_clip"),
    (["meta.grad_ratio=0", "meta.grad_ratio_warmup=10"], "meta.grad_ratio"),
    (["meta.grad_ratio_final=1.5"], "meta.grad_ratio_final"),
    (["meta.grad_ratio=-1"], "meta.grad_ratio"),
    (["meta.grad_ratio=0.1", "train.zero_stage=3"], "meta.grad_ratio"),
])
def test_keys_the_budget_makes_inert_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


TINY = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=32",
        "model.max_seq_len=32", "model.vocab_size=50304", "train.seq_len=32", "meta.n_way=4", "meta.k_shot=2",
        "meta.q_queries=2", "meta.window=8", "meta.head.dropout=0.0", "meta.head.layers=2", "meta.head.hidden=8",
        "model.kernels=torch", "train.micro_batch=4", "train.global_batch=4", "train.precision=fp32"]


def _batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (4, 33), generator=gen)  # few token types: every class has occurrences


def _episode(batch):
    return sample_episode(batch[:, :-1], n_way=4, k_shot=2, q_queries=2, mask_id=MASK, sampler="smlmt",
                          generator=torch.Generator().manual_seed(1), readout="prev", window=8)


@pytest.mark.parametrize("ratio, project", [(0.25, False), (0.25, True), (0.0, True)])
def test_budgeted_loss_matches_a_plain_two_backward_reference(ratio, project):
    from metalm.train.module import PretrainModule

    cfg = load_config(None, [*TINY, f"meta.grad_ratio={ratio}", f"meta.project={str(project).lower()}"])
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg).double()
    batch, ep = _batch(), _episode(_batch())
    losses, _ = module(batch, episode=ep)
    loss, stats = budgeted_loss(losses["ar"], losses["meta"], module.backbone_parameters(),
                                module.head_parameters(), ratio=ratio or None, project=project)
    assert float(loss.detach()) == pytest.approx(float(losses["ar"].detach() + losses["meta"].detach()), rel=1e-12)
    loss.backward()
    got = [p.grad.clone() if p.grad is not None else None for p in module.parameters()]

    # reference: each loss backward on its own, combined by hand over the whole backbone as one vector
    ref = PretrainModule.from_config(cfg).double()
    ref.load_state_dict(module.state_dict())
    ref_losses, _ = ref(batch, episode=ep)
    bb = ref.backbone_parameters()
    g_ar = torch.autograd.grad(ref_losses["ar"], bb, allow_unused=True)
    g_all = torch.autograd.grad(ref_losses["meta"], list(ref.parameters()), allow_unused=True)
    flat = lambda gs, ps: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, ps)])
    a = flat(g_ar, bb)
    index = {id(p): i for i, p in enumerate(ref.parameters())}
    m = flat([g_all[index[id(p)]] for p in bb], bb)
    cos = float(a @ m / (a.norm() * m.norm()))
    if project and a @ m < 0:
        m = m - (a @ m) / (a @ a) * a
    if ratio > 0:
        m = m * ratio * a.norm() / m.norm()
    want_bb = a + m
    got_bb = flat([got[index[id(p)]] for p in bb], bb)
    assert torch.allclose(got_bb, want_bb, rtol=1e-10, atol=1e-14)
    for p in ref.head_parameters():  # the head keeps the query loss's own (FOMAML) gradient
        g_ref, g_got = g_all[index[id(p)]], got[index[id(p)]]
        assert (g_ref is None and g_got is None) or torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-14)
    assert float(stats["grad_cos"]) == pytest.approx(cos, rel=1e-8)
    if ratio > 0:
        assert float(stats["grad_ratio"]) == pytest.approx(ratio, rel=1e-8)


def _engine_meta_step(ratio: float, start: int, project: bool = False):
    """One meta step through the real DeepSpeed engine (ZeRO 0, one process): the backbone's and the head's
    gradients as the optimizer would see them (captured by the step's before_update hook). Runs in the worker
    process (a process group of one there, never in the test process)."""
    from metalm.meta.step import MetaStep
    from metalm.train.dist import Collectives
    from metalm.train.engine import Engine, init_distributed
    from metalm.train.module import PretrainModule
    from metalm.train.step import HybridStep

    cfg = load_config(None, [*TINY, "train.zero_stage=0", "meta.hybrid_ratio=1.0", "optim.grad_clip=0",
                             f"meta.grad_ratio={ratio}", f"meta.grad_ratio_start={start}",
                             f"meta.project={str(project).lower()}", "train.device=cpu"])
    dist = init_distributed(cfg.train)  # a process group of one (plain python), as the launcher makes it
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    engine = Engine(module, cfg.optim, cfg.train, dist)
    meta = MetaStep(cfg.meta, 0, {"mask": MASK}, cfg.model.vocab_size)
    captured = {}

    def capture(step, totals):
        captured["bb"] = torch.cat([p.grad.reshape(-1).clone() for p in engine.module.backbone_parameters()])
        captured["head"] = [p.grad.clone() if p.grad is not None else None for p in engine.module.head_parameters()]
        return True  # skip the update: only the gradient is looked at

    step = HybridStep(cfg, engine, Collectives(dist), meta, 1, before_update=capture)
    out = step(iter([_batch()]), 0)
    captured["meta_n"], captured["skipped"] = out.totals.meta_n, out.skipped
    engine.destroy()
    return captured


def _worker(out: str) -> None:
    torch.save({"ar_only": _engine_meta_step(0.1, start=5), "one": _engine_meta_step(0.1, start=0),
                "two": _engine_meta_step(0.2, start=0)}, out)


def test_backbone_gradient_scales_with_grad_ratio_through_the_engine(tmp_path):
    out = tmp_path / "grads.pt"
    res = subprocess.run([sys.executable, __file__, "WORKER", str(out)], env=cpu_run_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    ar_only, one, two = got["ar_only"], got["one"], got["two"]  # before grad_ratio_start the meta part is zero
    assert all(g["meta_n"] == 1 and g["skipped"] for g in (ar_only, one, two))
    g_ar = ar_only["bb"]
    part1, part2 = one["bb"] - g_ar, two["bb"] - g_ar
    assert float(part1.norm()) == pytest.approx(0.1 * float(g_ar.norm()), rel=1e-4)
    # fp32 differences of gradients: compared as vectors, to a relative 1e-4 of their norm
    assert float((part2 - 2 * part1).norm()) <= 1e-4 * float(part2.norm())
    for h1, h2, h0 in zip(one["head"], two["head"], ar_only["head"]):  # the head's gradient does not scale
        assert (h1 is None and h2 is None) or (torch.equal(h1, h2) and torch.equal(h1, h0))
    assert math.isfinite(float(g_ar.norm())) and float(g_ar.norm()) > 0


if __name__ == "__main__" and sys.argv[1:2] == ["WORKER"]:
    _worker(sys.argv[2])
