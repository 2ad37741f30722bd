"""The learning-rate multiplier of optimizer step `step`: linear warm-up, then cosine / linear decay to
optim.min_lr_ratio, or constant. A pure function of the step, so a resumed run continues it exactly."""
from __future__ import annotations

import math
from typing import Callable

from metalm.config import OptimConfig


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    warm = optim.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        if optim.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    return f
