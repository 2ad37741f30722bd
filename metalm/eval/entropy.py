"""Attention entropy per layer and head (metric version 1).

For head h of a layer, query position i (0-based) attends causally over i+1 keys with probabilities a_ij:

    H_i   = -Σ_j a_ij ln a_ij                     (nats; 0·ln 0 = 0)
    Hn_i  = H_i / ln(i + 1)                       (normalised to [0, 1]: 1 = uniform over the visible keys)

Position 0 sees exactly one key, so H_0 = 0 always and Hn_0 is 0/0. Position 0 is therefore EXCLUDED from
both means: a head's `raw` and `norm` are means over query positions 1..T-1 (and over the batch), so the raw
and normalised numbers average over the same positions. Sequences need T >= 2.

Probabilities come from `Transformer.attention_probs` (explicit softmax of the causal scores, fp32), because
the fused SDPA path never materialises them.
"""
from __future__ import annotations

import math

import torch

VERSION = 1


def entropy_per_position(probs: torch.Tensor) -> torch.Tensor:
    """(B,H,T,T) attention probabilities -> (B,H,T) entropies in nats (masked keys have probability 0)."""
    p = probs.to(torch.float64)
    return -torch.special.xlogy(p, p).sum(-1)


def head_entropies(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, normalised) per head, each (H,): means over batch and query positions 1..T-1."""
    T = probs.shape[-1]
    if T < 2:
        raise ValueError("attention entropy needs sequences of at least 2 tokens (position 0 is excluded)")
    ent = entropy_per_position(probs)[..., 1:]  # (B,H,T-1)
    n_keys = torch.arange(2, T + 1, dtype=torch.float64, device=ent.device)
    raw = ent.mean(dim=(0, 2))
    norm = (ent / n_keys.log()).mean(dim=(0, 2))
    return raw, norm


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std(unbiased=False)) if x.numel() > 1 else 0.0


@torch.no_grad()
def attention_entropy(model, input_ids: torch.Tensor) -> dict:
    """Per layer: per-head raw/normalised entropies and their mean/std across heads; plus model means."""
    was_training = model.training
    model.eval()
    try:
        all_probs = model.attention_probs(input_ids)
    finally:
        model.train(was_training)
    layers = []
    for probs in all_probs:
        raw, norm = head_entropies(probs)
        raw_mean, raw_std = _mean_std(raw)
        norm_mean, norm_std = _mean_std(norm)
        layers.append({
            "raw": [float(v) for v in raw], "norm": [float(v) for v in norm],
            "raw_mean": raw_mean, "raw_std": raw_std, "norm_mean": norm_mean, "norm_std": norm_std,
        })
    T = input_ids.shape[1]
    return {
        "version": VERSION,
        "layers": layers,
        "raw_mean": sum(x["raw_mean"] for x in layers) / len(layers),
        "norm_mean": sum(x["norm_mean"] for x in layers) / len(layers),
        # the raw entropy of a uniform head, averaged over the same positions: a scale for `raw_mean`
        "uniform_raw": sum(math.log(i + 1) for i in range(1, T)) / (T - 1),
    }


def flatten(prefix: str, result: dict) -> dict[str, float]:
    flat = {f"{prefix}/raw_mean": result["raw_mean"], f"{prefix}/norm_mean": result["norm_mean"]}
    for i, layer in enumerate(result["layers"]):
        for key in ("raw_mean", "raw_std", "norm_mean", "norm_std"):
            flat[f"{prefix}/L{i}/{key}"] = layer[key]
        for h, v in enumerate(layer["norm"]):
            flat[f"{prefix}/L{i}/H{h}/norm"] = v
    return flat
