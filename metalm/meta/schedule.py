"""Which steps are meta steps, and the random stream of each episode: stateless and identical on every rank.

Each decision is a hash of (seed, step, micro), so every rank computes the same answer with no communication,
and a resumed run needs no saved RNG state (the paper's code broadcast a ``torch.rand`` from rank 0 per
micro-batch instead). The hash is SplitMix64's finaliser chained over the inputs.
"""
from __future__ import annotations

import torch

from metalm.config import META_BRANCHES as BRANCHES

_M64 = (1 << 64) - 1
_TAG_BRANCH = 0x4D455441  # distinct streams for the branch draw and the episode seeds
_TAG_EPISODE = 0x45504953


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _hash(*parts: int) -> int:
    h = 0
    for p in parts:
        h = _mix(h ^ (p & _M64))
    return h


def _check_index(**kw: int) -> None:
    for k, v in kw.items():
        if v < 0:
            raise ValueError(f"{k}={v}: expected >= 0")


def uniform(seed: int, *parts: int) -> float:
    """A deterministic draw in [0, 1) (53 random bits) for the given key."""
    return (_hash(seed, *parts) >> 11) * 2.0**-53


class MetaSchedule:
    """``is_meta(step, micro)``: whether micro-batch ``micro`` of optimizer step ``step`` takes the meta branch.

    ``per_step``: one Bernoulli(ratio) per optimizer step, shared by all its micro-batches (``micro`` is
    ignored), so a step's gradient is all-AR or all-meta. ``per_microbatch``: an independent draw per
    micro-batch, so one step may mix both, as in the paper's code.
    """

    def __init__(self, seed: int, ratio: float, branch: str = "per_step"):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio={ratio}: expected a probability in [0, 1]")
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r}: expected one of {', '.join(BRANCHES)}")
        self.seed, self.ratio, self.branch = int(seed), float(ratio), branch

    def is_meta(self, step: int, micro: int = 0) -> bool:
        _check_index(step=step, micro=micro)
        if self.branch == "per_step":
            return uniform(self.seed, _TAG_BRANCH, step) < self.ratio
        return uniform(self.seed, _TAG_BRANCH, step, micro) < self.ratio

    def episode_generator(self, step: int, micro: int, rank: int) -> torch.Generator:
        return episode_generator(self.seed, step, micro, rank)

    def __repr__(self) -> str:
        return f"MetaSchedule(seed={self.seed}, ratio={self.ratio}, branch={self.branch!r})"


def episode_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro, rank): each rank samples its own episode from its own
    data, reproducibly, and a resumed run redraws exactly the same episodes."""
    _check_index(step=step, micro=micro, rank=rank)
    g = torch.Generator()
    g.manual_seed(_hash(seed, _TAG_EPISODE, step, micro, rank) >> 1)
    return g
