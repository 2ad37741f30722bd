"""Per-layer matrix statistics of weights and activations (the `stats` metric): condition number, Frobenius and
nuclear norms, Gini and Hoyer sparsity.

For a matrix W (m x n) with singular values σ_1 >= ... >= σ_k (k = min(m, n)) and its entries w_1..w_N as one
vector x (N = m·n):

    cond  = σ_1 / σ_k                               (inf when σ_k = 0; an all-zero matrix: nan)
    fro   = ||W||_F = sqrt(Σ w_i²)
    nuc   = ||W||_* = Σ σ_i
    hoyer = (sqrt(N) - ||x||_1 / ||x||_2) / (sqrt(N) - 1)      (Hoyer, 2004: 0 for a constant vector, 1 for a
                                                               one-hot one; an all-zero vector: 0)
    gini  = 1 - 2 Σ_k (c_k / ||c||_1) (N - k + 1/2) / N        (Hurley & Rickard, 2009: c = |x| sorted ascending,
                                                               k = 1..N; 0 when all |x_i| are equal, 1 - 1/N for
                                                               a one-hot vector; an all-zero vector: 0)

Weights: every q/k/v/o/gate/up/down matrix of every layer, plus the per-layer and model means of each statistic
over those matrices. Activations: each layer's residual-stream output on the fixed probe batch as one
(B·T, d_model) matrix, as for the effective rank (metalm/eval/rank.py).
"""
from __future__ import annotations

import math

import torch

from metalm.eval.layers import KINDS, block_matrices, layer_outputs
from metalm.eval.rank import singular_values

STATS = ("cond", "fro", "nuc", "gini", "hoyer")


def _flat_abs(x: torch.Tensor) -> torch.Tensor:
    v = x.detach().reshape(-1).to(torch.float64).abs()
    if v.numel() == 0:
        raise ValueError("sparsity of an empty tensor is undefined")
    if not torch.isfinite(v).all():
        raise ValueError("sparsity of a tensor with non-finite entries is undefined")
    return v


def hoyer(x: torch.Tensor) -> float:
    """Hoyer sparsity of all entries of `x` in [0, 1] (a single entry: 1)."""
    v = _flat_abs(x)
    n = v.numel()
    l2 = float(v.norm())
    if l2 == 0.0:
        return 0.0
    if n == 1:
        return 1.0
    root = math.sqrt(n)
    return (root - float(v.sum()) / l2) / (root - 1.0)


def gini(x: torch.Tensor) -> float:
    """Gini index of the magnitudes of all entries of `x` in [0, 1 - 1/N]."""
    c, _ = torch.sort(_flat_abs(x))
    total = float(c.sum())
    if total == 0.0:
        return 0.0
    n = c.numel()
    k = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    return 1.0 - 2.0 * float(((c / total) * ((n - k + 0.5) / n)).sum())


def condition_number(s: torch.Tensor) -> float:
    """σ_max / σ_min from singular values `s` (any order)."""
    hi, lo = float(s.max()), float(s.min())
    if hi == 0.0:
        return math.nan
    return math.inf if lo == 0.0 else hi / lo


def matrix_stats(matrix: torch.Tensor) -> dict[str, float]:
    """{cond, fro, nuc, gini, hoyer} of a 2-D matrix."""
    s = singular_values(matrix)
    return {"cond": condition_number(s), "fro": float(matrix.detach().to(torch.float64).norm()),
            "nuc": float(s.sum()), "gini": gini(matrix), "hoyer": hoyer(matrix)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def weight_stats(model) -> dict:
    """Per layer {kind: stats} for every q/k/v/o/gate/up/down matrix and the layer's `mean` of each statistic
    over them; the model's `mean` of each statistic over all those matrices."""
    layers = []
    for i in range(len(model.model.layers)):
        layer = {k: matrix_stats(w) for k, w in block_matrices(model, i).items()}
        layer["mean"] = {s: _mean([layer[k][s] for k in KINDS]) for s in STATS}
        layers.append(layer)
    return {"layers": layers, "mean": {s: _mean([layer[k][s] for layer in layers for k in KINDS]) for s in STATS}}


@torch.no_grad()
def activation_stats(model, input_ids: torch.Tensor) -> dict:
    """Per layer the stats of its residual-stream output on `input_ids` as a (B·T, d_model) matrix, and their
    means over layers."""
    layers = [matrix_stats(h) for h in layer_outputs(model, input_ids)]
    return {"layers": layers, "mean": {s: _mean([layer[s] for layer in layers]) for s in STATS}}


def flatten(prefix: str, result: dict) -> dict[str, float]:
    """{"stats/weight/L0/q_proj/cond": ..., "stats/weight/L0/cond": (layer mean), "stats/weight/cond": (model
    mean)} for logging; activations have no kind level."""
    flat = {f"{prefix}/{s}": float(v) for s, v in result["mean"].items()}
    for i, layer in enumerate(result["layers"]):
        for key, val in layer.items():
            if isinstance(val, dict):
                where = f"{prefix}/L{i}" if key == "mean" else f"{prefix}/L{i}/{key}"
                flat.update({f"{where}/{s}": float(v) for s, v in val.items()})
            else:
                flat[f"{prefix}/L{i}/{key}"] = float(val)
    return flat
