import pytest
import torch

from metalm.config import ModelConfig
from metalm.model import build_model
from metalm.export.hf import export_model


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_as_plain_llama_with_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=211,
                      max_seq_len=32, tie_embeddings=tie)
    model = build_model(cfg).eval()
    export_model(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf) is LlamaForCausalLM
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
