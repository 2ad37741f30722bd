"""One optimizer step of hybrid AR / meta training, as one object (`HybridStep`).

It owns everything a step is made of: for each of the step's micro-batches the branch (the meta step's seeded
schedule, then the ranks' agreement that every one of them has an episode: ZeRO reduces gradients in lock-step,
so all ranks take the same branch), the episode, the forward through the engine, the loss to back-propagate
(the AR loss; the weighted meta objective; or, with the meta-gradient budget, the combined gradient of
metalm.meta.budget), the backward, the step's sums, the FLOPs (`micro_batch_flops`, the one formula the
benchmarks use too) and the gradient diagnostics every meta.diag_every steps. The loop only sequences: it hands
the step its batches, and hooks decide what the step does not know: `before_update(step, totals)` whether to
skip the update (the guards, with their collective), `on_record(record)` where diagnostics go,
`on_microbatch(step, micro, seconds)` a heartbeat for slow steps, and `on_gradients(step)` what looks at the
step's complete gradient before the update (the per-layer gradient norms of metalm.train.grad_stats).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from metalm.config import Config
from metalm.meta.budget import budgeted_loss, ratio_at, uses_budget
from metalm.meta.step import MetaStep, backbone_tokens, gradient_diagnostics, head_flops
from metalm.model import flops_per_token
from metalm.train.dist import Collectives
from metalm.train.interval import StepTotals


def micro_batch_flops(cfg: Config, world_size: int) -> tuple[float, float]:
    """(AR, meta) model FLOPs of one micro-batch over all ranks. The AR step: forward and backward of the
    decoder and the LM head (`metalm.model.flops_per_token`). The meta step: the backbone's support forward (no
    backward) and query forward + backward on the episode's tokens, the head's inner and outer loop, and with
    meta.objective=add the AR step as well."""
    t, m = cfg.train, cfg.meta
    tokens = t.micro_batch * t.seq_len * world_size
    ar = flops_per_token(cfg.model, t.seq_len) * tokens
    if not m.enabled:
        return ar, 0.0
    seq = t.seq_len if m.readout == "mask" else min(m.window, t.seq_len)
    s_tok, q_tok = backbone_tokens(m, t.micro_batch, t.seq_len)
    body = flops_per_token(cfg.model, seq, lm_head=False, backward=False) * s_tok \
        + flops_per_token(cfg.model, seq, lm_head=False) * q_tok
    meta = (body + head_flops(m, cfg.model.d_model, t.micro_batch)) * world_size
    return ar, meta + (ar if m.objective == "add" else 0.0)


class EagerEngine:
    """The engine's surface for a HybridStep without DeepSpeed (plain autograd, no optimizer): what
    benchmarks/meta_cost.py times and unit tests drive, so that they run the step that ships."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, batch: torch.Tensor, episode=None):
        return self.module(batch, episode=episode)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> bool:
        return False


@dataclass
class StepOutcome:
    totals: StepTotals
    skipped: bool  # the hooks asked to skip the update
    applied: bool  # the optimizer applied it (DeepSpeed may also drop one, e.g. on fp16 overflow)
    tokens: int  # data-stream tokens drawn, whichever branch
    flops: float


class HybridStep:
    """`step(batches, step)` runs optimizer step `step + 1`: `accum` micro-batches from the `batches` iterator
    (host tensors, (B, T+1)), then the update unless `before_update` says skip."""

    def __init__(self, cfg: Config, engine, comm: Collectives, meta: MetaStep | None, accum: int, *,
                 before_update: Callable[[int, StepTotals], bool] = lambda step, totals: False,
                 on_record: Callable[[dict], None] = lambda record: None,
                 on_microbatch: Callable[[int, int, float], None] = lambda step, micro, seconds: None,
                 on_gradients: Callable[[int], None] = lambda step: None):
        self.cfg, self.engine, self.comm, self.meta, self.accum = cfg, engine, comm, meta, accum
        self.device = comm.dist.device
        self.before_update, self.on_record, self.on_microbatch = before_update, on_record, on_microbatch
        self.on_gradients = on_gradients
        self.tokens_per_micro = cfg.train.micro_batch * cfg.train.seq_len * comm.dist.world_size
        self.ar_flops, self.meta_flops = micro_batch_flops(cfg, comm.dist.world_size)
        self.budgeted = meta is not None and uses_budget(cfg.meta)

    def __call__(self, batches: Iterator[torch.Tensor], step: int) -> StepOutcome:
        totals, flops = StepTotals(self.device), 0.0
        for micro in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)  # on the host: episodes are sampled there, without device syncs
            wants_meta = self.meta is not None and self.meta.is_meta(step, micro)
            episode = self._episode(batch, step, micro) if wants_meta else None
            totals.fallback += int(wants_meta and episode is None)
            batch = batch.to(self.device, non_blocking=True)
            if episode is not None and micro == 0 and self.meta.diagnose(step + 1):
                self._diagnose(batch, episode, step)
            loss, stats = self._loss(batch, episode, step)
            self.engine.backward(loss)
            totals.add(loss, stats, meta=episode is not None)
            flops += self.meta_flops if episode is not None else self.ar_flops
            self.on_microbatch(step, micro, time.perf_counter() - t0)
        self.on_gradients(step + 1)
        skip = self.before_update(step + 1, totals)
        applied = self.engine.step(skip)
        return StepOutcome(totals, skip, applied, self.accum * self.tokens_per_micro, flops)

    def ratio_target(self, step: int) -> float:
        """The budget's ρ at optimizer step `step` (1-based); 0 without a budget."""
        return ratio_at(self.cfg.meta, step, self.cfg.train.max_steps) if self.budgeted else 0.0

    def _episode(self, batch: torch.Tensor, step: int, micro: int):
        """This micro-batch's episode, or None when any rank could not build one (then all take an AR one)."""
        ep = self.meta.episode(batch, step, micro, self.comm.dist.rank)
        if not self.comm.all_true(ep is not None):
            return None
        return ep.to(self.device, non_blocking=True)

    def _loss(self, batch: torch.Tensor, episode, step: int) -> tuple[torch.Tensor, dict]:
        """The loss to back-propagate and the stats: the AR loss; the meta objective (query loss, or AR +
        meta.loss_weight x query loss); or the budgeted loss, whose gradient is metalm.meta.budget's combination."""
        # The budget takes the two gradients apart with autograd.grad, which DeepSpeed's forward hooks would take
        # for a backward of their own: it runs the module itself (parameters whole under ZeRO 0-2) and hands the
        # engine only the combined loss.
        forward = self.engine.module if self.budgeted and episode is not None else self.engine
        losses, stats = forward(batch, episode=episode)
        if episode is None:
            return losses["ar"], stats
        m, query = self.cfg.meta, losses["meta"]  # stats carry "query_loss" already (metalm.meta.fomaml)
        if "ar" not in losses:  # objective=replace
            return query, stats
        stats = {**stats, "ar_loss": losses["ar"].detach().float()}
        if not self.budgeted:
            return losses["ar"] + m.loss_weight * query, stats
        module = self.engine.module
        loss, budget = budgeted_loss(losses["ar"], query, module.backbone_parameters(), module.head_parameters(),
                                     ratio=self.ratio_target(step + 1) if m.grad_ratio > 0 else None,
                                     project=m.project, weight=m.loss_weight)
        return loss, {**stats, **budget}

    def _diagnose(self, batch: torch.Tensor, episode, step: int) -> None:
        """Rank 0: the meta vs AR gradient diagnostics on this micro-batch, handed to `on_record` with the step
        and the budget's target. The RNG state is restored afterwards, so the diagnostics change nothing in
        training. (Not under ZeRO-3, whose parameters are partitions.)"""
        if self.comm.dist.rank != 0 or self.cfg.train.zero_stage == 3:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            diag = gradient_diagnostics(self.engine.module, batch, episode, self.meta.mask_id)
        if self.budgeted:
            diag["meta/diag/grad_ratio_target"] = self.ratio_target(step + 1)
        self.on_record({"step": step + 1, **diag})
