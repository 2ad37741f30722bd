"""First-order MAML on subset-masked LM tasks: episodes, the head, the meta loss and the branch schedule."""
from __future__ import annotations

from metalm.meta.fomaml import HEAD_INITS, meta_loss, meta_loss_with_stats
from metalm.meta.head import build_head
from metalm.meta.schedule import MetaSchedule, episode_generator
from metalm.meta.tasks import SAMPLERS, Episode, EpisodeError, sample_episode

__all__ = [
    "HEAD_INITS",
    "SAMPLERS",
    "Episode",
    "EpisodeError",
    "MetaSchedule",
    "build_head",
    "episode_generator",
    "meta_loss",
    "meta_loss_with_stats",
    "sample_episode",
]
