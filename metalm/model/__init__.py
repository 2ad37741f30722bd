"""The LLaMA-style decoder and its parameter accounting."""
from __future__ import annotations

from metalm.config import ModelConfig
from metalm.model.llama import Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)


def num_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count of the model `cfg` describes, computed from the architecture (no allocation)."""
    d, f, v, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    head_dim = d // cfg.n_heads
    attn = d * d * 2 + 2 * d * cfg.n_kv_heads * head_dim  # q, o + k, v
    block = attn + 3 * d * f + 2 * d
    body = L * block + d
    emb = v * d * (1 if cfg.tie_embeddings else 2)
    return body + (emb if embeddings else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int, lm_head: bool = True, backward: bool = True) -> float:
    """Model FLOPs per token, PaLM-style: 2 x matmul params + 4 x L x d x T (attention scores and values)
    for a forward; a training step (backward=True) is 3x that, i.e. 6N + 12 L d T. Norm weights and the
    embedding lookup are not matmuls; the LM head is (unless lm_head=False). Causal masking is not discounted.
    """
    d, L = cfg.d_model, cfg.n_layers
    matmul = num_params(cfg, embeddings=False) - (L * 2 * d + d) + (cfg.vocab_size * d if lm_head else 0)
    forward = 2.0 * matmul + 4.0 * L * d * seq_len
    return 3.0 * forward if backward else forward


__all__ = ["Transformer", "build_model", "flops_per_token", "num_params"]
