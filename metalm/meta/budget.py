"""The meta-gradient budget: how strongly the meta objective may pull on the backbone, relative to the language
model's own gradient, on each meta micro-batch (`meta.grad_ratio`, `meta.project`, and the ratio's schedule).

On a meta micro-batch with meta.objective=add the loss is AR + query. Its two gradients over the backbone are
taken apart (two `autograd.grad` calls, as cheap as the one combined backward they replace):

    g_ar = dL_ar/dθ,   g_m = dL_q/dθ                       over the backbone's parameters θ
    project (one-sided PCGrad): if <g_m, g_ar> < 0,  g_m ← g_m − <g_m, g_ar> / |g_ar|² · g_ar
    budget:   g_m ← ρ(step) · |g_ar| / |g_m| · g_m           so |g_m| = ρ |g_ar| exactly, on this micro-batch
    backbone gradient = g_ar + g_m;   head gradient = dL_q/dφ (the FOMAML gradient, unscaled)

With ρ = 0 (no budget) the meta part keeps its natural size times `meta.loss_weight`, as the weighted objective
would give it. The result goes back to the caller as a loss whose value is L_ar + L_q and whose gradient is the
combined one (`sum(p · g)` with the gradients detached, shifted to that value), so DeepSpeed's backward, gradient
accumulation, ZeRO 1-2 reduction and clipping treat it like any loss. The parameters must be whole on every rank
(not ZeRO-3 partitions); the configuration refuses the budget there.

Everything stays on the device: the norms and the scale are 0-d tensors, never read on the host.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metalm.config import MetaConfig

BUDGET_KEYS = ("grad_ratio", "grad_ratio_raw", "grad_cos")  # per meta micro-batch stats of the budgeted path


def uses_budget(meta: MetaConfig) -> bool:
    """Whether meta micro-batches take their gradients apart (budget or projection) instead of one weighted loss."""
    return meta.grad_ratio > 0 or meta.project


def ratio_at(meta: MetaConfig, step: int, max_steps: int) -> float:
    """ρ(step), the budget's target |g_m| / |g_ar| at optimizer step `step` (1-based): 0 up to
    meta.grad_ratio_start, then a linear ramp over meta.grad_ratio_warmup steps to meta.grad_ratio, then a cosine
    from there to meta.grad_ratio_final x meta.grad_ratio at `max_steps`."""
    rho = meta.grad_ratio
    since = step - meta.grad_ratio_start
    if rho <= 0 or since <= 0:
        return 0.0
    warm = meta.grad_ratio_warmup
    if since <= warm:
        return rho * since / warm
    span = max_steps - meta.grad_ratio_start - warm
    progress = min(max((since - warm) / span, 0.0), 1.0) if span > 0 else 1.0
    final = meta.grad_ratio_final
    return rho * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """sum <a_i, b_i>, accumulated in float32 at least (float64 gradients stay float64)."""
    total = torch.zeros((), dtype=_acc(like), device=like.device)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.to(total.dtype) * y.to(total.dtype)).sum()
    return total


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def combine(g_ar: Sequence[torch.Tensor | None], g_meta: Sequence[torch.Tensor | None], *, ratio: float | None,
            project: bool, weight: float = 1.0) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """The backbone's gradient g_ar + g_m from its two parts (lists aligned with the backbone's parameters, None
    where a parameter got no gradient), with the projection and the budget of the module docstring; `ratio` 0
    scales the meta part by `weight` instead. Returns the gradients and detached 0-d stats: grad_ratio (|g_m| /
    |g_ar| as applied), grad_ratio_raw (before projection and scaling) and grad_cos (cosine of the raw parts)."""
    like = next(g for g in (*g_ar, *g_meta) if g is not None)
    ar_sq, meta_sq, dot = _dot(g_ar, g_ar, like), _dot(g_meta, g_meta, like), _dot(g_meta, g_ar, like)
    ar_norm, meta_norm = ar_sq.sqrt(), meta_sq.sqrt()
    raw_ratio = meta_norm / ar_norm.clamp_min(1e-30)
    cos = dot / (ar_norm * meta_norm).clamp_min(1e-30)
    coef = torch.zeros_like(dot)
    if project:
        coef = torch.where(dot < 0, dot / ar_sq.clamp_min(1e-30), coef)  # the opposing component's coefficient
        meta_norm = (meta_sq - coef * dot).clamp_min(0.0).sqrt()  # |g_m - c g_ar|^2 = |g_m|^2 - c <g_m, g_ar>
    if ratio is not None:
        scale = torch.where(meta_norm > 0, ratio * ar_norm / meta_norm.clamp_min(1e-30), torch.zeros_like(meta_norm))
    else:
        scale = torch.full_like(meta_norm, weight)
    out: list[torch.Tensor | None] = []
    for a, m in zip(g_ar, g_meta):
        if m is None and (a is None or not project):
            out.append(a)
            continue
        ref = m if m is not None else a
        acc = _acc(ref)
        part = m.to(acc) if m is not None else torch.zeros_like(a, dtype=acc)
        if a is not None:  # the projection moves every component, also where the meta gradient is zero
            part = part - coef * a.to(acc)
        total = scale * part + (a.to(acc) if a is not None else 0.0)
        out.append(total.to(ref.dtype))
    stats = {"grad_ratio": (scale * meta_norm / ar_norm.clamp_min(1e-30)).detach(),
             "grad_ratio_raw": raw_ratio.detach(), "grad_cos": cos.detach()}
    return out, stats


def budgeted_loss(ar_loss: torch.Tensor, query_loss: torch.Tensor, backbone: Sequence[torch.Tensor],
                  head: Sequence[torch.Tensor], *, ratio: float | None, project: bool, weight: float = 1.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss with the value ar_loss + query_loss whose gradient is the combined one: the backbone's from
    `combine`, the head's (and any parameter only the query loss reaches) the query loss's own, times `weight`
    when there is no budget (`ratio` None). Consumes both losses' graphs."""
    backbone, head = list(backbone), list(head)
    g_ar = torch.autograd.grad(ar_loss, backbone, allow_unused=True)
    g_q = torch.autograd.grad(query_loss, backbone + head, allow_unused=True)
    g_bb, stats = combine(g_ar, g_q[:len(backbone)], ratio=ratio, project=project, weight=weight)
    head_scale = 1.0 if ratio is not None else weight
    g_head = [g * head_scale if g is not None and head_scale != 1.0 else g for g in g_q[len(backbone):]]
    linear = sum((p * g.detach()).sum() for p, g in zip(backbone + head, g_bb + g_head) if g is not None)
    value = ar_loss.detach() + query_loss.detach()
    return linear - linear.detach() + value, stats
