"""Attention entropy: uniform attention, hand-computed rows, and an independent (HF eager Llama) reference."""
import math

import pytest
import torch

from metalm.config import load_config
from metalm.eval.entropy import attention_entropy, entropy_per_position, head_entropies
from metalm.model import build_model

TINY = ["model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
        "model.vocab_size=101", "model.max_seq_len=32", "train.seq_len=16"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(None, TINY).model)


def test_uniform_attention_has_entropy_log_of_visible_keys():
    m = tiny()
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.q_proj.weight.zero_()  # all scores 0 -> uniform over the causal keys
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    for probs in m.attention_probs(ids):
        ent = entropy_per_position(probs)  # (B,H,T)
        for i in range(12):
            assert torch.allclose(ent[..., i], torch.full_like(ent[..., i], math.log(i + 1)), atol=1e-6)
    r = attention_entropy(m, ids)
    expected_raw = sum(math.log(i + 1) for i in range(1, 12)) / 11  # position 0 excluded
    for layer in r["layers"]:
        assert layer["raw"] == pytest.approx([expected_raw] * 4, abs=1e-6)
        assert layer["norm"] == pytest.approx([1.0] * 4, abs=1e-6)
        assert layer["norm_std"] == pytest.approx(0.0, abs=1e-6)
    assert r["norm_mean"] == pytest.approx(1.0, abs=1e-6)
    assert r["uniform_raw"] == pytest.approx(expected_raw, abs=1e-12)


def test_hand_computed_rows():
    # position 0: [1]          H = 0 (excluded from the means)
    # position 1: [.5, .5]     H = ln 2,        normalised ln2/ln2 = 1
    # position 2: [.5,.25,.25] H = 1.5 ln 2,    normalised 1.5 ln2 / ln3 = 0.946395
    probs = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.25, 0.25]]]])
    ent = entropy_per_position(probs)[0, 0]
    assert ent.tolist() == pytest.approx([0.0, math.log(2), 1.5 * math.log(2)], abs=1e-12)
    raw, norm = head_entropies(probs)
    assert float(raw[0]) == pytest.approx((0.693147 + 1.039721) / 2, abs=1e-6)
    assert float(norm[0]) == pytest.approx((1.0 + 0.946395) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        head_entropies(probs[..., :1, :1])


def test_matches_hf_llama_eager_attentions():
    transformers = pytest.importorskip("transformers")
    m = tiny(3)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so the entropies differ per head
        for block in m.model.layers:
            block.self_attn.q_proj.weight.mul_(40)
            block.self_attn.k_proj.weight.mul_(40)
    c = m.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(m.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        atts = hf(ids, output_attentions=True).attentions
    r = attention_entropy(m, ids)
    for layer, a in zip(r["layers"], atts):
        a = a.double()
        for h in range(c.n_heads):
            rows = [-(a[:, h, i, : i + 1] * a[:, h, i, : i + 1].clamp_min(1e-300).log()).sum(-1) for i in range(1, 9)]
            raw = torch.stack(rows).mean()
            norm = torch.stack([row / math.log(i + 1) for i, row in zip(range(1, 9), rows)]).mean()
            assert layer["raw"][h] == pytest.approx(float(raw), abs=2e-5)
            assert layer["norm"][h] == pytest.approx(float(norm), abs=2e-5)
    spread = [v for layer in r["layers"] for v in layer["norm"]]
    assert max(spread) - min(spread) > 0.05  # the check above is not trivially "all uniform"
