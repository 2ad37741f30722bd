"""The meta step: first-order MAML of the classifier head on one SMLMT episode (DESIGN.md, "The meta step").

    h_s  = hidden_fn(support_ids)[support_index]            once, under no_grad (the backbone is frozen
                                                            in the inner loop, so re-running it is waste)
    phi_0 = head params, output layer restricted to the episode's class rows
    phi_{t+1} = phi_t - inner_lr * grad_phi CE(head_{phi_t}(h_s), y_s)          t = 0..T-1 (functional SGD)
    loss = CE(head_{phi'}(hidden_fn(query_ids)[query_index]), y_q),  phi' = phi_T + (phi - stopgrad(phi))

phi' has the value of phi_T and the gradient path of phi (DESIGN writes it phi - stopgrad(phi - phi_T); this
form is the same function and exact in value). One ``backward()`` of the loss therefore leaves the query-loss
gradient on the backbone and dL_q/dphi' -- exactly the first-order MAML gradient -- on the head parameters;
for the output layer it lands on the gathered class rows (rows of other token ids get zero).

Built to run inside the ``forward`` of a module owning backbone and head, under a DeepSpeed engine (any ZeRO
stage, gradient accumulation): no optimizer, no ``.grad`` buffers, no in-place change of any parameter, no
host synchronisation (stats are detached 0-dim tensors). Under ZeRO-3 the head's parameters are read outside
their own modules' forward, so they must be registered with ``deepspeed.zero.register_external_parameter``
on the owning module. The inner loop runs in float32 (or float64 for a float64 head) whatever the
parameter dtype; the gradients reach the parameters in their own dtype.

``head_init``:
  * ``persistent``: phi_0's output rows are the head's rows of the class token ids (a meta-learned init).
  * ``zero``: the episode's output layer starts at zero (the "zeroing trick", Kao et al. 2022): it is a
    per-episode tensor, so the persistent output layer gets no gradient; the hidden layers still get FOMAML
    gradients.
  * ``prototype``: output rows start at w_c = 2 m_c, b_c = -|m_c|^2, with m_c the mean support feature of
    class c through the hidden layers (Proto-MAML, Triantafillou et al. 2020, as used by Bansal et al.
    2020's LEOPARD): a squared-Euclidean prototype classifier. The init is computed without dropout and
    detached, so again the persistent output layer gets no gradient and the hidden layers get exactly
    the FOMAML gradient (no gradient through the prototypes).

``feature_norm`` (the head's inputs; the statistics come from the support features and are constants):
  * ``none``: the backbone's states as they are (the paper).
  * ``center``: minus the support mean.  ``standardize``: minus the support mean, over the support standard
    deviation per dimension (floored at 1e-4 of the mean norm). Both are applied to support and query alike.
  * ``layernorm``: the head's own learnable ``LayerNorm`` (the first module of a `build_head` head built with
    it) on every feature vector; its parameters get the query-path gradient, like the backbone.
``feature_grad_clip > 0`` bounds the norm of the query loss's gradient on the query features, i.e. of what the
meta step sends into the backbone (standardising divides by a small spread and inflates it).

``second_order=True`` keeps the inner loop's graph (``create_graph=True``) and uses phi_T itself in the
outer loss, so the head's gradient includes the second-order terms through the inner updates wrt phi. The
support features stay under no_grad by design, so the backbone's gradient is still the query-path gradient
only (no term through h_s).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from metalm.config import FEATURE_NORMS, HEAD_INITS
from metalm.meta.head import head_spec, mlp_forward, output_rows
from metalm.meta.tasks import Episode


def meta_loss(hidden_fn: Callable[[torch.Tensor], torch.Tensor], head: nn.Sequential, episode: Episode, *,
              inner_steps: int, inner_lr: float, head_init: str = "persistent",
              second_order: bool = False, feature_norm: str = "none", feature_grad_clip: float = 0.0) -> torch.Tensor:
    """The outer (query) loss of one episode; see the module docstring."""
    return meta_loss_with_stats(hidden_fn, head, episode, inner_steps=inner_steps, inner_lr=inner_lr,
                                head_init=head_init, second_order=second_order, feature_norm=feature_norm,
                                feature_grad_clip=feature_grad_clip)[0]


class _ClipGradNorm(torch.autograd.Function):
    """Identity forward; backward scales the incoming gradient down to norm `max_norm` when it is larger."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, max_norm: float) -> torch.Tensor:
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        scale = (ctx.max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
        return grad * scale.to(grad.dtype), None


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs of distinct rows of `x` (1 when they all point the same way)."""
    n = x.shape[0]
    if n < 2:
        return x.new_ones(())
    u = F.normalize(x.float(), dim=1)
    g = u @ u.T
    return (g.sum() - g.diagonal().sum()) / (n * (n - 1))


def _normalizer(feature_norm: str, h_s: torch.Tensor, norm: nn.LayerNorm | None, dtype: torch.dtype):
    """The map applied to support and query features, from the support features' statistics."""
    if feature_norm == "none":
        return lambda h: h
    if feature_norm == "layernorm":
        if norm is None:
            raise ValueError("feature_norm=layernorm: the head has no LayerNorm (build it with that feature_norm)")
        w, b = norm.weight.to(dtype), norm.bias.to(dtype)
        return lambda h: F.layer_norm(h, norm.normalized_shape, w, b, norm.eps)
    mean = h_s.mean(0)
    if feature_norm == "center":
        return lambda h: h - mean
    floor = 1e-4 * torch.linalg.vector_norm(h_s, dim=1).mean().clamp_min(1e-12)
    std = h_s.std(0, unbiased=False).clamp_min(floor)
    return lambda h: (h - mean) / std


def _class_logits(params: list[torch.Tensor], x: torch.Tensor, dropout: float, training: bool,
                  way_row: torch.Tensor | None) -> torch.Tensor:
    logits = mlp_forward(params, x, dropout, training)
    return logits if way_row is None else logits.index_select(1, way_row)


def _prototype_rows(body: list[torch.Tensor], h_s: torch.Tensor, labels: torch.Tensor,
                    way_row: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = mlp_forward(body, h_s, 0.0, False)
    if body:
        z = F.relu(z)  # the output layer reads post-activation features
    row = way_row.index_select(0, labels)
    sums = z.new_zeros(n_rows, z.shape[1]).index_add_(0, row, z)
    counts = z.new_zeros(n_rows).index_add_(0, row, torch.ones_like(row, dtype=z.dtype))
    mean = sums / counts.clamp_min(1.0).unsqueeze(1)  # a row without support examples stays at zero
    return 2.0 * mean, -(mean * mean).sum(1)


def meta_loss_with_stats(hidden_fn: Callable[[torch.Tensor], torch.Tensor], head: nn.Sequential,
                         episode: Episode, *, inner_steps: int, inner_lr: float, head_init: str = "persistent",
                         second_order: bool = False, feature_norm: str = "none",
                         feature_grad_clip: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, stats)``: the outer loss and detached 0-dim stats (support_acc_before/after, query_acc,
    query_loss, inner_grad_norm (mean over inner steps), support_cos (mean pairwise cosine of the head's support
    inputs), support_cos_raw (of the backbone's states before normalisation), n_support, n_query)."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init={head_init!r}: expected one of {', '.join(HEAD_INITS)}")
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm={feature_norm!r}: expected one of {', '.join(FEATURE_NORMS)}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps={inner_steps}: expected >= 0")
    linears, p_drop, norm = head_spec(head)
    training = head.training
    out = linears[-1]
    dtype = torch.promote_types(out.weight.dtype, torch.float32)
    si, qi = episode.support_index, episode.query_index
    y_s, y_q = episode.support_labels, episode.query_labels
    n_rows = episode.rows.shape[0]
    way_row = None if n_rows == episode.classes.shape[0] else episode.way_row

    with torch.no_grad():
        raw_s = hidden_fn(episode.support_ids)[si[:, 0], si[:, 1]].to(dtype)
        normalize = _normalizer(feature_norm, raw_s, norm, dtype)
        h_s = normalize(raw_s)

    body = [t.to(dtype) for lin in linears[:-1] for t in (lin.weight, lin.bias)]
    if head_init == "persistent":
        out0 = [t.to(dtype) for t in output_rows(head, episode.rows)]
    elif head_init == "zero":
        out0 = [h_s.new_zeros(n_rows, out.weight.shape[1]), h_s.new_zeros(n_rows)]
    else:
        with torch.no_grad():
            out0 = list(_prototype_rows([b.detach() for b in body], h_s, y_s, episode.way_row, n_rows))
    phi = body + out0

    with torch.enable_grad():  # also usable for evaluation under no_grad
        if second_order:
            fast = [p if p.requires_grad else p.detach().requires_grad_() for p in phi]
        else:
            fast = [p.detach().requires_grad_() for p in phi]
        norms = []
        acc_before = None
        for _ in range(inner_steps):
            logits = _class_logits(fast, h_s, p_drop, training, way_row)
            if acc_before is None:
                acc_before = (logits.detach().argmax(1) == y_s).float().mean()
            grads = torch.autograd.grad(F.cross_entropy(logits, y_s), fast, create_graph=second_order)
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])))
            if second_order:
                fast = [f - inner_lr * g for f, g in zip(fast, grads)]
            else:
                with torch.no_grad():
                    fast = [(f - inner_lr * g).requires_grad_() for f, g in zip(fast, grads)]

    with torch.no_grad():
        logits_after = _class_logits([f.detach() for f in fast], h_s, p_drop, training, way_row)
        acc_after = (logits_after.argmax(1) == y_s).float().mean()
    if acc_before is None:  # inner_steps == 0
        acc_before = acc_after

    if second_order:
        phi_T = fast
    else:  # value of phi_T, gradient path of phi (first-order MAML)
        phi_T = [f.detach() + (p - p.detach()) if p.requires_grad else f.detach() for p, f in zip(phi, fast)]

    h_q = hidden_fn(episode.query_ids)[qi[:, 0], qi[:, 1]].to(dtype)
    if feature_grad_clip > 0 and h_q.requires_grad:
        h_q = _ClipGradNorm.apply(h_q, feature_grad_clip)
    h_q = normalize(h_q)
    logits_q = _class_logits(phi_T, h_q, p_drop, training, way_row)
    loss = F.cross_entropy(logits_q, y_q)

    def scalar(v: float) -> torch.Tensor:
        return torch.full((), v, dtype=torch.float32, device=h_s.device)

    stats = {
        "support_acc_before": acc_before,
        "support_acc_after": acc_after,
        "query_acc": (logits_q.detach().argmax(1) == y_q).float().mean(),
        "query_loss": loss.detach().float(),
        "inner_grad_norm": torch.stack(norms).mean().float() if norms else scalar(0.0),
        "support_cos": mean_pairwise_cosine(h_s.detach()),
        "support_cos_raw": mean_pairwise_cosine(raw_s),
        "n_support": scalar(float(y_s.shape[0])),
        "n_query": scalar(float(y_q.shape[0])),
    }
    return loss, stats
