"""The meta-learning classifier head: an MLP from the backbone's hidden size onto vocabulary rows.

``head[-1]`` is ``nn.Linear(hidden, vocab_size)``: one output row per token id, so a persistent head can
meta-learn an initialisation for any class. An episode never projects onto the whole vocabulary: it gathers
the N rows of its classes (`output_rows`) and runs the MLP functionally (`mlp_forward`) on explicit tensors,
which lets the inner loop adapt copies of the weights without touching the module.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from metalm.config import HEAD_WEIGHT_INITS


def build_head(meta_cfg, d_model: int, vocab_size: int) -> nn.Sequential:
    """``Linear(d, h), ReLU, Dropout, ..., Linear(h, vocab_size)`` with ``meta_cfg.head.layers`` Linear layers,
    preceded by a learnable ``LayerNorm(d)`` of the head's inputs when ``meta_cfg.feature_norm == "layernorm"``.

    init ``xavier``: Xavier-uniform weights; ``normal``: N(0, 1/fan_in) weights (LeCun); biases zero in both.
    """
    hc = meta_cfg.head
    if hc.layers < 1 or hc.hidden < 1:
        raise ValueError(f"meta.head.layers={hc.layers}, meta.head.hidden={hc.hidden}: expected positive integers")
    if hc.init not in HEAD_WEIGHT_INITS:
        raise ValueError(f"meta.head.init={hc.init!r}: expected {' or '.join(HEAD_WEIGHT_INITS)}")
    widths = [d_model] + [hc.hidden] * (hc.layers - 1) + [vocab_size]
    modules: list[nn.Module] = [nn.LayerNorm(d_model)] if meta_cfg.feature_norm == "layernorm" else []
    for i in range(hc.layers):
        lin = nn.Linear(widths[i], widths[i + 1])
        if hc.init == "xavier":
            nn.init.xavier_uniform_(lin.weight)
        else:
            nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(widths[i]))
        nn.init.zeros_(lin.bias)
        modules.append(lin)
        if i < hc.layers - 1:
            modules += [nn.ReLU(), nn.Dropout(hc.dropout)]
    return nn.Sequential(*modules)


def head_spec(head: nn.Sequential) -> tuple[list[nn.Linear], float, nn.LayerNorm | None]:
    """The head's Linear layers, its dropout probability and its input LayerNorm (or None); checks the
    `build_head` layout."""
    mods = list(head)
    norm = mods.pop(0) if mods and isinstance(mods[0], nn.LayerNorm) else None
    linears = mods[0::3]
    ok = len(mods) % 3 == 1 and all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)
    ok = ok and all(isinstance(m, nn.ReLU) for m in mods[1::3]) and all(isinstance(m, nn.Dropout) for m in mods[2::3])
    ps = {m.p for m in mods[2::3]}
    if not ok or len(ps) > 1:
        raise TypeError("meta head: expected the build_head layout Linear(, ReLU, Dropout(p), Linear)* with biases")
    for lin in linears:
        if lin.weight.numel() == 0:
            raise RuntimeError(
                "meta head parameters are empty (ZeRO-3 partitioned?): the meta step reads them directly, so "
                "register them with deepspeed.zero.register_external_parameter on the module whose forward "
                "calls meta_loss"
            )
    return linears, (ps.pop() if ps else 0.0), norm


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    """Apply Linear layers given as ``[w0, b0, w1, b1, ...]`` with ReLU + dropout between them."""
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            x = F.dropout(F.relu(x), dropout, training)
    return x


def output_rows(head: nn.Sequential, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer restricted to token ids ``rows``: (len(rows), hidden) weight and (len(rows),) bias."""
    out = head[-1]
    return out.weight.index_select(0, rows), out.bias.index_select(0, rows)
