"""Effective rank (Roy & Vetterli, 2007) of weights, activations and gradients.

For a 2-D matrix with singular values σ_i, p_i = σ_i / Σσ and

    ER  = exp(-Σ p_i ln p_i)          (1 <= ER <= min(m, n); zero singular values contribute 0·ln 0 = 0)
    PER = ER / min(m, n)              ("proportional" effective rank, 0 < PER <= 1)

This is what the paper's analysis code computes (PAPER.md §3). Unlike that code we also report the FFN
matrices (gate/up/down), give every layer its own numbers, and take gradients of the real next-token loss
with RoPE left on (PAPER.md §5 item 9). The paper's single number per checkpoint is the mean ER / PER over
all attention q/k/v/o matrices of all layers (`attn_mean_er`, `attn_mean_per`).

An all-zero matrix has no spectrum to normalise; its ER and PER are reported as 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from metalm.eval.layers import ATTN_KINDS, MLP_KINDS, block_matrices, layer_outputs



def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """float64 singular values (on CPU in float64; on a GPU in float32 there, which is far faster for the
    large matrices and accurate to ~1e-6 relative in ER)."""
    if matrix.dim() != 2:
        raise ValueError(f"effective rank needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    m = matrix.detach()
    if m.is_cuda:
        return torch.linalg.svdvals(m.float()).double().cpu()
    return torch.linalg.svdvals(m.to(torch.float64))


def effective_rank_from_singular_values(s: torch.Tensor) -> float:
    s = s.to(torch.float64)
    total = s.sum()
    if not torch.isfinite(total):
        raise ValueError("effective rank of a matrix with non-finite entries is undefined")
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the Shannon entropy (nats) of the normalised singular values."""
    return effective_rank_from_singular_values(singular_values(matrix))


def er_and_per(matrix: torch.Tensor) -> dict:
    """{"er": the effective rank, "per": the proportional effective rank ER / min(m, n)}."""
    er = effective_rank(matrix)
    return {"er": er, "per": er / min(matrix.shape)}


def _summarise(layers: list[dict[str, dict]]) -> dict:
    """Per-layer {kind: {er, per}} plus the aggregates (means over matrices)."""
    out: dict = {"layers": layers}

    def mean(kinds: Iterable[str], key: str) -> float:
        vals = [layer[k][key] for layer in layers for k in kinds]
        return sum(vals) / len(vals)

    out["attn_mean_er"], out["attn_mean_per"] = mean(ATTN_KINDS, "er"), mean(ATTN_KINDS, "per")
    out["mlp_mean_er"], out["mlp_mean_per"] = mean(MLP_KINDS, "er"), mean(MLP_KINDS, "per")
    for layer in layers:
        layer["attn_mean_er"] = sum(layer[k]["er"] for k in ATTN_KINDS) / len(ATTN_KINDS)
        layer["attn_mean_per"] = sum(layer[k]["per"] for k in ATTN_KINDS) / len(ATTN_KINDS)
    return out


@torch.no_grad()
def weight_ranks(model) -> dict:
    """ER/PER of every q/k/v/o/gate/up/down weight, per layer, plus the paper's attention mean."""
    layers = []
    for i in range(len(model.model.layers)):
        layers.append({k: er_and_per(w) for k, w in block_matrices(model, i).items()})
    return _summarise(layers)


@torch.no_grad()
def activation_ranks(model, input_ids: torch.Tensor) -> dict:
    """ER/PER of each layer's residual-stream output on a fixed batch, as a (B·T, d_model) matrix."""
    layers = [er_and_per(h) for h in layer_outputs(model, input_ids)]
    return {
        "layers": layers,
        "mean_er": sum(x["er"] for x in layers) / len(layers),
        "mean_per": sum(x["per"] for x in layers) / len(layers),
    }


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) token batch (inputs batch[:, :-1], targets batch[:, 1:])."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a (B, T+1) token batch with T >= 1, got shape {tuple(batch.shape)}")
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def gradient_ranks(model, batch: torch.Tensor) -> dict:
    """ER/PER of ∂(LM loss)/∂W for every q/k/v/o/gate/up/down weight, on a fixed (B, T+1) batch.

    The loss is the model's ordinary next-token cross-entropy with RoPE on; gradients are taken with
    torch.autograd.grad, so the parameters' `.grad` fields are left untouched. Eval mode (no dropout).
    """
    was_training = model.training
    model.eval()
    try:
        names, params = [], []
        for i in range(len(model.model.layers)):
            for k, w in block_matrices(model, i).items():
                names.append((i, k))
                params.append(w)
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = lm_loss(model, batch)
                grads = torch.autograd.grad(loss, params)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
    finally:
        model.train(was_training)
    layers: list[dict] = [dict() for _ in range(len(model.model.layers))]
    for (i, k), g in zip(names, grads):
        layers[i][k] = er_and_per(g)
    out = _summarise(layers)
    out["loss"] = float(loss.detach())
    return out


def flatten(prefix: str, result: dict) -> dict[str, float]:
    """{"rank/weight/attn_mean_er": ..., "rank/weight/L0/q_proj/er": ...} for logging."""
    flat: dict[str, float] = {}
    for key, val in result.items():
        if key == "layers":
            for i, layer in enumerate(val):
                for k2, v2 in layer.items():
                    if isinstance(v2, dict):
                        for k3, v3 in v2.items():
                            flat[f"{prefix}/L{i}/{k2}/{k3}"] = float(v3)
                    else:
                        flat[f"{prefix}/L{i}/{k2}"] = float(v2)
        elif isinstance(val, (int, float)):
            flat[f"{prefix}/{key}"] = float(val)
    return flat
