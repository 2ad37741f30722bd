import math

import pytest
import torch
import torch.nn.functional as F

from metalm.config import ModelConfig
from metalm.model import build_model, flops_per_token, num_params
from metalm.model.llama import apply_rope

TINY = dict(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=211, max_seq_len=32)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_allocation(tie):
    cfg = ModelConfig(**TINY, tie_embeddings=tie)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_shapes_and_hidden():
    cfg = ModelConfig(**TINY)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    logits, h = model(ids, return_hidden=True)
    assert logits.shape == (3, 11, cfg.vocab_size) and h.shape == (3, 11, cfg.d_model)
    h2, layers = model.hidden_states(ids, all_layers=True)
    assert torch.allclose(h, h2) and len(layers) == cfg.n_layers


def _slow_forward(model, ids):
    """Independent reference: explicit attention with a causal mask and per-head loops."""
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_heads
    T = ids.shape[1]
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()

    def norm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.model.embed_tokens.weight[ids]
    for blk in model.model.layers:
        a = blk.self_attn
        xn = norm(x, blk.input_layernorm.weight)
        out = torch.zeros_like(x)
        heads = []
        for h in range(cfg.n_heads):
            kvh = h // (cfg.n_heads // cfg.n_kv_heads)
            q = xn @ a.q_proj.weight[h * hd:(h + 1) * hd].T
            k = xn @ a.k_proj.weight[kvh * hd:(kvh + 1) * hd].T
            v = xn @ a.v_proj.weight[kvh * hd:(kvh + 1) * hd].T
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            s = q @ k.transpose(-1, -2) / math.sqrt(hd)
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(s.softmax(-1) @ v)
        out = torch.cat(heads, -1) @ a.o_proj.weight.T
        x = x + out
        xn = norm(x, blk.post_attention_layernorm.weight)
        m = blk.mlp
        x = x + (F.silu(xn @ m.gate_proj.weight.T) * (xn @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return norm(x, model.model.norm.weight) @ model.lm_head.weight.T


def test_matches_slow_reference_and_is_causal():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        fast = model(ids)
        slow = _slow_forward(model, ids)
        assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-4)
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % cfg.vocab_size
        other = model(changed)
    assert torch.allclose(fast[:, :5], other[:, :5], atol=1e-6)
    assert not torch.allclose(fast[:, 5:], other[:, 5:])


def test_attention_probs_agree_with_sdpa_path():
    torch.manual_seed(1)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    probs = model.attention_probs(ids)
    assert len(probs) == cfg.n_layers and probs[0].shape == (2, cfg.n_heads, 7, 7)
    assert torch.allclose(probs[0].sum(-1), torch.ones(2, cfg.n_heads, 7))
    assert torch.all(probs[0].triu(1) == 0)


def test_activation_checkpointing_same_grads():
    torch.manual_seed(2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    grads = []
    for ac in (False, True):
        torch.manual_seed(3)
        model = build_model(ModelConfig(**TINY, activation_checkpointing=ac)).train()
        model(ids).float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sequence_longer_than_max_is_an_error():
    model = build_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_flops_accounting_hand_computed():
    cfg = ModelConfig(**TINY)
    d, L, f, V, T = 48, 2, 96, 211, 16
    matmul = L * (d * d * 2 + 2 * d * 24 + 3 * d * f) + V * d
    assert flops_per_token(cfg, T) == 3 * (2 * matmul + 4 * L * d * T)
    assert flops_per_token(cfg, T, lm_head=False, backward=False) == 2 * (matmul - V * d) + 4 * L * d * T
