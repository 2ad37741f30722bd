"""The module DeepSpeed trains: the decoder plus (when meta-learning is on) the meta head.

Both objectives run inside this module's forward, so every parameter the meta step touches is in
ZeRO's view (partitioned, gathered, reduced and stepped by the one optimizer), and gradient accumulation
and clipping apply to AR and meta steps alike.
"""
from __future__ import annotations


import torch
import torch.nn as nn

import kernels
from metalm.config import Config
from metalm.model import build_model


class PretrainModule(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.lm = build_model(cfg.model)
        if cfg.train.compile:
            # Per-block, in place (state-dict names unchanged): the meta branch's data-dependent episode
            # shapes stay eager, while every block (the bulk of AR and meta FLOPs) runs compiled.
            for block in self.lm.model.layers:
                block.compile()
        self.head: nn.Module | None = None
        if cfg.meta.enabled:
            from metalm.meta.head import build_head

            self.head = build_head(cfg.meta, cfg.model.d_model, cfg.model.vocab_size)

    def ar_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token CE over a (B, T+1) batch: inputs batch[:, :-1], targets batch[:, 1:]."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        backend = self.cfg.model.kernels
        if self.cfg.model.fused_linear_ce:
            h = self.lm.hidden_states(inputs)
            return kernels.linear_cross_entropy(h, self.lm.lm_head.weight, targets, backend=backend)
        logits = self.lm(inputs)
        return kernels.masked_cross_entropy(logits, targets, backend=backend)

    def forward(self, batch: torch.Tensor, episode=None):
        """AR step: returns (loss, {}). Meta step (episode given): returns (query loss, stats); with
        meta.objective=add, (AR loss + meta.loss_weight x query loss, stats + {"ar_loss"})."""
        if episode is None:
            return self.ar_loss(batch), {}
        from metalm.meta.step import meta_step_loss

        m = self.cfg.meta
        loss, stats = meta_step_loss(m, self.lm.hidden_states, self.head, episode)
        if m.objective == "add":
            ar = self.ar_loss(batch)
            stats = {**stats, "ar_loss": ar.detach().float()}
            loss = ar + m.loss_weight * loss
        return loss, stats
