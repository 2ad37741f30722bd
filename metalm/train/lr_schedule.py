"""The learning-rate multiplier of optimizer step `step`: linear warm-up, then one of

    cosine    cosine decay to optim.min_lr_ratio at train.max_steps
    linear    linear decay to optim.min_lr_ratio at train.max_steps
    constant  1.0
    wsd       warmup-stable-decay: 1.0 until the last optim.decay_fraction of the post-warm-up steps, then a
              linear decay to optim.min_lr_ratio at train.max_steps (the decay length is rounded to whole steps)

A pure function of the step, so a resumed run continues it exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from metalm.config import OptimConfig


def wsd_decay_start(optim: OptimConfig, max_steps: int) -> int:
    """The first step of the wsd schedule's decay (its multiplier is still 1.0; the next one is lower)."""
    post = max(0, max_steps - optim.warmup_steps)
    return max_steps - round(optim.decay_fraction * post)


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    warm = optim.warmup_steps
    low = optim.min_lr_ratio
    decay_start = wsd_decay_start(optim, max_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "wsd":
            if step < decay_start:
                return 1.0
            span = max_steps - decay_start
            progress = 1.0 if span <= 0 else min(1.0, (step - decay_start) / span)
            return low + (1.0 - low) * (1.0 - progress)
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        if optim.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return low + (1.0 - low) * shape

    return f
