"""A linear-chain CRF: forward algorithm (log-partition), sequence score, Viterbi decoding.

Score of tags y_1..y_n for emissions e (n, C):

    s(y) = start[y_1] + Σ_t e_t[y_t] + Σ_{t>1} trans[y_{t-1}, y_t] + end[y_n]

and p(y | e) = exp(s(y)) / Σ_y' exp(s(y')). Masks are left-aligned: mask[b, :len_b] is True, the rest False,
and every sequence has length >= 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LinearChainCRF(nn.Module):
    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        # zero init: before training, decoding is the per-position argmax of the emissions
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.trans = nn.Parameter(torch.zeros(num_tags, num_tags))  # trans[i, j]: tag i followed by tag j

    @staticmethod
    def _check(emissions: torch.Tensor, mask: torch.Tensor) -> None:
        if emissions.dim() != 3 or mask.shape != emissions.shape[:2]:
            raise ValueError(f"emissions (B,T,C) and mask (B,T) expected, got {tuple(emissions.shape)} and "
                             f"{tuple(mask.shape)}")
        if not bool(mask[:, 0].all()):
            raise ValueError("every sequence needs at least one position (mask[:, 0] must be True)")

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s(y) per sequence, (B,)."""
        self._check(emissions, mask)
        T = emissions.shape[1]
        m = mask.to(emissions.dtype)
        tags = tags.clamp(min=0)  # padded positions may carry -100; they are masked out below
        emit = emissions.gather(-1, tags.unsqueeze(-1)).squeeze(-1)  # (B,T)
        s = self.start[tags[:, 0]] + (emit * m).sum(1)
        if T > 1:
            s = s + (self.trans[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = mask.long().sum(1) - 1
        s = s + self.end[tags.gather(1, last.unsqueeze(1)).squeeze(1)]
        return s

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Σ_y exp(s(y)) per sequence, (B,), by the forward algorithm."""
        self._check(emissions, mask)
        alpha = self.start + emissions[:, 0]  # (B,C)
        for t in range(1, emissions.shape[1]):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + self.trans.unsqueeze(0), dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t].unsqueeze(1), nxt, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood over the batch."""
        return (self.log_partition(emissions, mask) - self.score(emissions, tags, mask)).mean()

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi: the highest-scoring tag sequence of each item, trimmed to its length."""
        self._check(emissions, mask)
        B, T, C = emissions.shape
        delta = self.start + emissions[:, 0]
        back = []
        for t in range(1, T):
            cand = delta.unsqueeze(2) + self.trans.unsqueeze(0)  # (B, prev, next)
            best, arg = cand.max(dim=1)
            nxt = best + emissions[:, t]
            keep = mask[:, t].unsqueeze(1)
            delta = torch.where(keep, nxt, delta)
            # past a sequence's end, point each tag at itself so backtracking passes through unchanged
            ident = torch.arange(C, device=emissions.device).expand(B, C)
            back.append(torch.where(keep, arg, ident))
        last = (delta + self.end).argmax(dim=1)
        lengths = mask.long().sum(1).tolist()
        paths = [[int(last[b])] for b in range(B)]
        for t in range(T - 2, -1, -1):
            last = back[t].gather(1, last.unsqueeze(1)).squeeze(1)
            for b in range(B):
                paths[b].append(int(last[b]))
        return [list(reversed(p))[: lengths[b]] for b, p in enumerate(paths)]
