"""The meta step as the training loop sees it, built from `MetaConfig`: which micro-batches are meta steps,
the episode each one trains on, the loss the module computes from it, its FLOPs and the names of its stats.

The loop asks `is_meta(step, micro)`, then `episode(batch, ...)`; the module's forward calls `loss(...)`;
the maths lives in fomaml.py, the sampling in tasks.py, the branch schedule in schedule.py.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn as nn

from metalm.config import MetaConfig
from metalm.meta.fomaml import meta_loss_with_stats
from metalm.meta.schedule import MetaSchedule, episode_generator
from metalm.meta.tasks import Episode, EpisodeError, sample_episode

log = logging.getLogger("metalm.meta")

# Per-episode statistics returned with the loss (detached 0-d tensors), averaged over meta micro-batches.
STAT_KEYS = ("support_acc_before", "support_acc_after", "query_acc", "inner_grad_norm")


def meta_step_loss(meta: MetaConfig, hidden_fn: Callable[[torch.Tensor], torch.Tensor], head: nn.Sequential,
                   episode: Episode) -> tuple[torch.Tensor, dict]:
    """The query loss of one episode and its stats (STAT_KEYS), with the inner loop `meta` configures."""
    return meta_loss_with_stats(hidden_fn, head, episode, inner_steps=meta.inner_steps, inner_lr=meta.inner_lr,
                                head_init=meta.head_init, second_order=meta.second_order)


def head_flops(meta: MetaConfig, d_model: int, micro_batch: int) -> float:
    """FLOPs of one episode's head work on one rank: T inner SGD steps over the support positions plus the
    query forward/backward, each 6 x (active head params) per position; the output layer is N rows."""
    dims = [d_model] + [meta.head.hidden] * (meta.head.layers - 1)
    active = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * meta.n_way
    n_support = meta.n_way * meta.k_shot if meta.sampler == "smlmt" else micro_batch * meta.k_shot
    n_query = meta.n_way * meta.q_queries if meta.sampler == "smlmt" else micro_batch
    return 6.0 * active * (meta.inner_steps * n_support + n_query)


class MetaStep:
    """Episodes for the meta micro-batches of a run. `special_ids` are the tokenizer's (mask, eos, pad, ...):
    the mask id replaces the chosen occurrences, and no special token is ever a class."""

    def __init__(self, meta: MetaConfig, seed: int, special_ids: dict, vocab_size: int):
        self.cfg, self.seed, self.vocab_size = meta, int(seed), vocab_size
        self.schedule = MetaSchedule(seed, meta.hybrid_ratio, meta.branch)
        self.mask_id = int(special_ids["mask"])
        self.exclude = tuple(int(v) for v in special_ids.values() if v is not None)

    def is_meta(self, step: int, micro: int) -> bool:
        return self.schedule.is_meta(step, micro)

    def episode(self, batch: torch.Tensor, step: int, micro: int, rank: int) -> Optional[Episode]:
        """The episode of micro-batch `micro` of step `step` on `rank`, sampled on the host from the (B, T+1)
        batch's inputs; None (with a warning) when the batch cannot supply one."""
        m = self.cfg
        try:
            return sample_episode(batch[:, :-1], n_way=m.n_way, k_shot=m.k_shot, q_queries=m.q_queries,
                                  mask_id=self.mask_id, sampler=m.sampler,
                                  generator=episode_generator(self.seed, step, micro, rank),
                                  min_freq=m.min_token_freq, max_freq=m.max_token_freq, exclude_ids=self.exclude,
                                  vocab_size=self.vocab_size)
        except EpisodeError as e:
            log.warning("rank %d step %d: no episode from this batch (%s); all ranks take an AR micro-batch",
                        rank, step, e)
            return None
