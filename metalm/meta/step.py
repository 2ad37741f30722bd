"""The meta step as the training loop sees it, built from `MetaConfig`: which micro-batches are meta steps,
the episode each one trains on, the loss the module computes from it, its FLOPs, the names of its stats, and
the diagnostics that say whether it learns anything.

The loop asks `is_meta(step, micro)`, then `episode(batch, ...)`; the module's forward calls `meta_step_loss`;
every `meta.diag_every` steps the loop asks `gradient_diagnostics`, and at each report `inert_warnings`. The
maths lives in fomaml.py, the sampling in tasks.py, the branch schedule in schedule.py.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from metalm.config import MetaConfig
from metalm.meta.fomaml import meta_loss_with_stats
from metalm.meta.schedule import MetaSchedule, episode_generator
from metalm.meta.tasks import Episode, EpisodeError, sample_episode

log = logging.getLogger("metalm.meta")

# Per-episode statistics returned with the loss (detached 0-d tensors), averaged over meta micro-batches.
STAT_KEYS = ("support_acc_before", "support_acc_after", "query_acc", "inner_grad_norm", "support_cos",
             "support_cos_raw")
COLLAPSED_COSINE = 0.99  # support features this aligned leave the head nothing to tell apart
NO_GAIN = 0.01  # an inner loop that moves support accuracy by less than this adapts nothing


def meta_step_loss(meta: MetaConfig, hidden_fn: Callable[[torch.Tensor], torch.Tensor], head: nn.Sequential,
                   episode: Episode) -> tuple[torch.Tensor, dict]:
    """The query loss of one episode and its stats (STAT_KEYS), with the inner loop `meta` configures."""
    return meta_loss_with_stats(hidden_fn, head, episode, inner_steps=meta.inner_steps, inner_lr=meta.inner_lr,
                                head_init=meta.head_init, second_order=meta.second_order,
                                feature_norm=meta.feature_norm, feature_grad_clip=meta.feature_grad_clip)


def head_flops(meta: MetaConfig, d_model: int, micro_batch: int) -> float:
    """FLOPs of one episode's head work on one rank: T inner SGD steps over the support positions plus the
    query forward/backward, each 6 x (active head params) per position; the output layer is N rows."""
    dims = [d_model] + [meta.head.hidden] * (meta.head.layers - 1)
    active = sum(a * b for a, b in itertools.pairwise(dims)) + dims[-1] * meta.n_way
    n_support = meta.n_way * meta.k_shot if meta.sampler == "smlmt" else micro_batch * meta.k_shot
    n_query = meta.n_way * meta.q_queries if meta.sampler == "smlmt" else micro_batch
    return 6.0 * active * (meta.inner_steps * n_support + n_query)


def backbone_tokens(meta: MetaConfig, micro_batch: int, seq_len: int) -> tuple[int, int]:
    """(support, query) tokens the backbone runs on in one episode: two masked copies of the micro-batch for
    readout=mask, one window per occurrence otherwise."""
    if meta.readout == "mask" or meta.sampler != "smlmt":
        return micro_batch * seq_len, micro_batch * seq_len
    window = min(meta.window, seq_len)
    return meta.n_way * meta.k_shot * window, meta.n_way * meta.q_queries * window


def word_start_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """A bool tensor over token ids: True for tokens that begin a word (decoded, they start with a space and a
    letter), the classes of meta.classes=word_start."""
    ok = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        ok[i] = len(text) >= 2 and text[0] == " " and text[1].isalpha()
    return ok


class MetaStep:
    """Episodes for the meta micro-batches of a run. `special_ids` are the tokenizer's (mask, eos, pad, ...):
    the mask id replaces the chosen occurrences, and no special token is ever a class; `allowed` (bool over
    token ids) restricts the classes further (meta.classes=word_start)."""

    def __init__(self, meta: MetaConfig, seed: int, special_ids: dict, vocab_size: int,
                 allowed: torch.Tensor | None = None):
        self.cfg, self.seed, self.vocab_size, self.allowed = meta, int(seed), vocab_size, allowed
        self.schedule = MetaSchedule(seed, meta.hybrid_ratio, meta.branch)
        self.mask_id = int(special_ids["mask"])
        self.exclude = tuple(int(v) for v in special_ids.values() if v is not None)

    def is_meta(self, step: int, micro: int) -> bool:
        return self.schedule.is_meta(step, micro)

    def episode(self, batch: torch.Tensor, step: int, micro: int, rank: int) -> Episode | None:
        """The episode of micro-batch `micro` of step `step` on `rank`, sampled on the host from the (B, T+1)
        batch's inputs; None (with a warning) when the batch cannot supply one."""
        m = self.cfg
        try:
            return sample_episode(batch[:, :-1], n_way=m.n_way, k_shot=m.k_shot, q_queries=m.q_queries,
                                  mask_id=self.mask_id, sampler=m.sampler,
                                  generator=episode_generator(self.seed, step, micro, rank),
                                  min_freq=m.min_token_freq, max_freq=m.max_token_freq, exclude_ids=self.exclude,
                                  vocab_size=self.vocab_size, allowed=self.allowed, readout=m.readout,
                                  readout_offset=m.readout_offset, window=m.window)
        except EpisodeError as e:
            log.warning("rank %d step %d: no episode from this batch (%s); all ranks take an AR micro-batch",
                        rank, step, e)
            return None

    def diagnose(self, step: int) -> bool:
        return bool(self.cfg.diag_every) and step % self.cfg.diag_every == 0


def gradient_diagnostics(module, batch: torch.Tensor, episode: Episode, mask_id: int) -> dict[str, float]:
    """How the meta gradient meets the backbone, on one micro-batch: the norms of the meta (query) loss's and
    the AR loss's gradients over the backbone's parameters, their cosine and ratio, the norm of the meta
    gradient on the query states (after meta.feature_grad_clip), and the share (of the squared norm) of the
    meta gradient's embedding part that lands on the mask token's row.

    `module` is the PretrainModule (parameters not partitioned); gradients are taken with autograd.grad, so
    nothing is accumulated into `.grad` and the training step is not affected."""
    params = [p for p in module.lm.parameters() if p.requires_grad]
    emb = module.lm.model.embed_tokens.weight
    states: list[torch.Tensor] = []

    def hidden_fn(ids: torch.Tensor) -> torch.Tensor:
        h = module.lm.hidden_states(ids)
        states.append(h)  # the support states (no grad), then the query states
        return h

    meta_loss, _ = meta_step_loss(module.meta_cfg, hidden_fn, module.head, episode)
    g_meta = torch.autograd.grad(meta_loss, [*params, states[-1]], allow_unused=True)
    g_feat, g_meta = g_meta[-1], g_meta[:-1]
    g_ar = torch.autograd.grad(module.ar_loss(batch), params, allow_unused=True)

    def flat(gs):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                          for g, p in zip(gs, params)])

    gm, ga = flat(g_meta), flat(g_ar)
    nm, na = torch.linalg.vector_norm(gm), torch.linalg.vector_norm(ga)
    out = {"meta/diag/meta_grad_norm": float(nm), "meta/diag/ar_grad_norm": float(na),
           "meta/diag/grad_ratio": float(nm / na.clamp_min(1e-12)),
           "meta/diag/grad_cos": float(gm @ ga / (nm * na).clamp_min(1e-12)),
           "meta/diag/feature_grad_norm": float(torch.linalg.vector_norm(g_feat.float())) if g_feat is not None
           else 0.0}
    ge = next((g for g, p in zip(g_meta, params) if p is emb), None)
    if ge is not None:
        total = ge.float().pow(2).sum()
        out["meta/diag/emb_mask_share"] = float(ge[mask_id].float().pow(2).sum() / total.clamp_min(1e-30))
    return out


def inert_warnings(record: dict, n_way: int) -> list[tuple[str, str]]:
    """(kind, one line) for each sign, in a metrics record, that the meta objective learns nothing; kinds are
    "collapse" and "no_gain"."""
    out = []
    at = f"meta objective looks inert at step {record['step']}"
    cos = record.get("meta/support_cos")
    if cos is not None and cos > COLLAPSED_COSINE:
        out.append(("collapse", f"{at}: the head's support inputs have collapsed (mean pairwise cosine {cos:.4f} > "
                                f"{COLLAPSED_COSINE}); try meta.feature_norm=standardize or meta.readout=after"))
    before, after = record.get("meta/support_acc_before"), record.get("meta/support_acc_after")
    if before is not None and after is not None and abs(after - before) < NO_GAIN:
        out.append(("no_gain", f"{at}: the inner loop does not adapt (support accuracy {before:.3f} -> {after:.3f}, "
                               f"chance {1 / n_way:.3f}); raise meta.inner_lr or change meta.feature_norm / "
                               f"meta.head_init"))
    return out
