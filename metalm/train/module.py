"""The module DeepSpeed trains: the decoder plus (when meta-learning is on) the meta head.

Both objectives run inside this module's forward, so every parameter the meta step touches is in
ZeRO's view (partitioned, gathered, reduced and stepped by the one optimizer), and gradient accumulation
and clipping apply to AR and meta steps alike.
"""
from __future__ import annotations


import torch
import torch.nn as nn

import kernels
from metalm.config import Config, MetaConfig, ModelConfig
from metalm.model import build_model


class PretrainModule(nn.Module):
    """Built from its sections: the model's, the meta section's (None: no meta head, AR only) and whether the
    blocks run compiled (train.compile). `from_config(cfg)` is that wiring for a whole config."""

    def __init__(self, model: ModelConfig, meta: MetaConfig | None = None, compile: bool = False):
        super().__init__()
        self.model_cfg, self.meta_cfg = model, meta
        self.lm = build_model(model)
        if compile:
            # Per-block, in place (state-dict names unchanged): the meta branch's data-dependent episode
            # shapes stay eager, while every block (the bulk of AR and meta FLOPs) runs compiled.
            for block in self.lm.model.layers:
                block.compile()
        self.head: nn.Module | None = None
        if meta is not None:
            from metalm.meta.head import build_head

            self.head = build_head(meta, model.d_model, model.vocab_size)

    @classmethod
    def from_config(cls, cfg: Config) -> PretrainModule:
        return cls(cfg.model, cfg.meta if cfg.meta.enabled else None, compile=cfg.train.compile)

    def ar_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token CE over a (B, T+1) batch: inputs batch[:, :-1], targets batch[:, 1:]."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        backend = self.model_cfg.kernels
        if self.model_cfg.fused_linear_ce:
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

        query, stats = meta_step_loss(self.meta_cfg, self.lm.hidden_states, self.head, episode)
        losses = {"meta": query}
        if self.meta_cfg.objective == "add":
            losses["ar"] = self.ar_loss(batch)
        return losses, stats

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lm.parameters() if p.requires_grad]

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad] if self.head is not None else []
