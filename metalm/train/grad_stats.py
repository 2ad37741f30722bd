"""Per-layer gradient norms during training, every `train.grad_stats_every` optimizer steps.

The gradient measured is the step's whole gradient as the optimizer receives it: accumulated over the step's
micro-batches (their mean, DeepSpeed's scaling), averaged over ranks, before clipping, and under fp16 before the
loss scale is divided out (DeepSpeed unscales inside the optimizer step; bf16 and fp32 have no loss scale). Each
group's number is the L2 norm of the gradients of its parameters together:

    grad_norm/L{i}/attn   layer i's input norm and q/k/v/o projections
    grad_norm/L{i}/mlp    layer i's post-attention norm and gate/up/down projections
    grad_norm/L{i}        layer i as a whole (sqrt(attn² + mlp²))
    grad_norm/embed       the token embeddings (the LM head too when model.tie_embeddings)
    grad_norm/lm_head     an untied LM head
    grad_norm/final_norm  the final RMSNorm
    grad_norm/meta_head   the meta-learning head (meta.enabled; zero on a step without a meta micro-batch)
    grad_norm/total       every parameter

Under ZeRO 1-3 each rank holds only a partition of the gradient: the whole gradient of each parameter is
assembled from the partitions through the engine (`Engine.full_gradients`, one collective per parameter), on
every rank, and rank 0 logs the record. That costs a collective per parameter on the steps measured, which is
why it is off by default (0).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|input_layernorm|mlp|post_attention_layernorm)\.")
_PART = {"self_attn": "attn", "input_layernorm": "attn", "mlp": "mlp", "post_attention_layernorm": "mlp"}


def group_of(name: str) -> str:
    """The group of a PretrainModule parameter name (see the module doc)."""
    m = _LAYER_RE.search(name)
    if m:
        return f"L{m.group(1)}/{_PART[m.group(2)]}"
    if name.startswith("head."):
        return "meta_head"
    if ".embed_tokens." in name:
        return "embed"
    if ".lm_head." in name:
        return "lm_head"
    if name.endswith("model.norm.weight"):
        return "final_norm"
    raise ValueError(f"parameter {name!r} belongs to no gradient-norm group (grad_stats knows layers, embed, "
                     f"lm_head, final_norm, meta_head)")


def grad_norms(named_grads: Iterable[tuple[str, torch.Tensor | None]], prefix: str = "grad_norm") -> dict[str, float]:
    """{f"{prefix}/{group}": L2 norm} for every group, each layer as a whole, and the total. A parameter without
    a gradient (None) counts as zero."""
    sq: dict[str, float] = {}
    for name, g in named_grads:
        group = group_of(name)
        sq[group] = sq.get(group, 0.0) + (float(g.detach().float().pow(2).sum()) if g is not None else 0.0)
    layers: dict[str, float] = {}
    for group, v in sq.items():
        if group.startswith("L"):
            layer = group.split("/")[0]
            layers[layer] = layers.get(layer, 0.0) + v
    out = {f"{prefix}/{k}": math.sqrt(v) for k, v in {**sq, **layers}.items()}
    out[f"{prefix}/total"] = math.sqrt(sum(sq.values()))
    return out


class GradStats:
    """The HybridStep's `on_gradients` hook: at optimizer steps that are multiples of `every` (0: never), the
    per-layer gradient norms of `engine`'s module, handed to `log` on rank 0 as {"step": step, "grad_norm/...":
    ...}. Collective under ZeRO: every rank calls it at every step."""

    def __init__(self, every: int, engine, rank: int, log: Callable[[dict], None]):
        self.every, self.engine, self.rank, self.log = every, engine, rank, log

    def __call__(self, step: int) -> None:
        if not self.every or step % self.every:
            return
        norms = grad_norms(self.engine.full_gradients())
        if self.rank == 0:
            self.log({"step": step, **norms})
