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

    def forward(self, batch: torch.Tensor, episode=None) -> tuple[dict[str, torch.Tensor], dict]:
        """The micro-batch's losses by name and the meta step's stats: {"ar"} for an AR micro-batch; {"meta"} (the
        episode's query loss) for a meta one, with "ar" as well under meta.objective=add. How they combine into
        the loss to back-propagate is the hybrid step's business (metalm.train.step)."""
        if episode is None:
            return {"ar": self.ar_loss(batch)}, {}
        from metalm.meta.step import meta_step_loss

        query, stats = meta_step_loss(self.cfg.meta, self.lm.hidden_states, self.head, episode)
        losses = {"meta": query}
        if self.cfg.meta.objective == "add":
            losses["ar"] = self.ar_loss(batch)
        return losses, stats

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lm.parameters() if p.requires_grad]

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad] if self.head is not None else []
