"""Sums of one optimizer step and of one logging interval, kept on the device (no host sync per step), and the
metrics record made from an interval with one all-reduce at its end."""
from __future__ import annotations

import time

import torch

from metalm.meta.budget import BUDGET_KEYS
from metalm.meta.step import STAT_KEYS
from metalm.train.dist import Collectives

META_KEYS = (*STAT_KEYS, *BUDGET_KEYS)  # BUDGET_KEYS only from budgeted meta micro-batches (meta.grad_ratio/project)
LOSS_KEYS = ("ar_loss", "meta_loss", *META_KEYS)


class StepTotals:
    """One optimizer step's micro-batches: summed losses and meta stats, counts, and non-finite losses seen."""

    def __init__(self, device: torch.device):
        z = lambda: torch.zeros((), device=device)
        self.sums = {k: z() for k in LOSS_KEYS}
        self.nonfinite = z()
        self.ar_n = self.meta_n = self.fallback = 0

    def add(self, loss: torch.Tensor, stats: dict, meta: bool) -> None:
        """One micro-batch's loss; a meta micro-batch of meta.objective=add counts as AR (its "ar_loss") and
        meta (its query loss) at once."""
        value = loss.detach().float()
        self.nonfinite += (~torch.isfinite(value)).float()
        if meta:
            if "ar_loss" in stats:
                self.sums["ar_loss"] += stats["ar_loss"]
                self.ar_n += 1
                value = stats["query_loss"]
            self.sums["meta_loss"] += value
            self.meta_n += 1
            for k in META_KEYS:
                if k in stats:
                    self.sums[k] += stats[k].detach().float()
        else:
            self.sums["ar_loss"] += value
            self.ar_n += 1


class Interval:
    """The steps since the last metrics record. Skipped steps (non-finite loss) are counted, not averaged."""

    def __init__(self, device: torch.device, step: int, tokens: int, flops: float):
        self.device = device
        self.t0, self.tokens0, self.flops0 = time.time(), tokens, flops
        z = lambda: torch.zeros((), device=device)
        self.sums = {k: z() for k in LOSS_KEYS}
        self.ar_n = self.meta_n = self.fallback = self.skipped = 0

    def add(self, totals: StepTotals, skipped: bool, applied: bool) -> None:
        self.fallback += totals.fallback
        if not applied:
            self.skipped += 1
        if not skipped:
            for k in LOSS_KEYS:
                self.sums[k] += totals.sums[k]
            self.ar_n += totals.ar_n
            self.meta_n += totals.meta_n

    def record(self, comm: Collectives, step: int, tokens: int, flops: float, lr: float,
               peak_flops: float | None, ratio_target: float | None = None) -> dict:
        """Collective: the interval's metrics record, means over all ranks' micro-batches."""
        vals = comm.reduce([*(self.sums[k] for k in LOSS_KEYS), self.ar_n, self.meta_n, self.fallback])
        sums, (ar_n, meta_n, fallback) = dict(zip(LOSS_KEYS, vals[:-3])), vals[-3:]
        elapsed = max(time.time() - self.t0, 1e-9)
        flops_s = (flops - self.flops0) / elapsed
        rec = {
            "step": step, "tokens": tokens, "flops": flops,
            "ar_loss": sums["ar_loss"] / ar_n if ar_n else None,
            "meta_loss": sums["meta_loss"] / meta_n if meta_n else None,
            "meta_microbatches": int(meta_n), "ar_microbatches": int(ar_n),
            "meta_fallbacks": int(fallback), "nonfinite_skipped": self.skipped,
            "lr": lr, "tokens_per_s": (tokens - self.tokens0) / elapsed, "time": time.time(),
            "mfu": flops_s / (peak_flops * comm.dist.world_size) if peak_flops else None,
        }
        if meta_n:
            rec.update({f"meta/{k}": sums[k] / meta_n for k in STAT_KEYS})
            if ratio_target is not None:  # the budget: the achieved ratio beside its target
                rec.update({f"meta/{k}": sums[k] / meta_n for k in BUDGET_KEYS})
                rec["meta/grad_ratio_target"] = ratio_target
        return rec
