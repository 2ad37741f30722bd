"""The model and its AR loss through the Triton kernels (interpreter on CPU), and through the CPU path
(kernels.cpu, what model.kernels=auto runs on CPU), track the torch references."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from metalm.config import load_config
from metalm.train.module import PretrainModule

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
        "model.vocab_size=123", "model.max_seq_len=16", "train.seq_len=16", "meta.enabled=false"]


def _train(kernels: str, fused: bool, steps: int = 6) -> list[float]:
    cfg = load_config(None, TINY + [f"model.kernels={kernels}", f"model.fused_linear_ce={str(fused).lower()}"])
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, 123, (3, 17), generator=gen)
        loss = module(batch)[0]["ar"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fused", [False, True])
def test_training_losses_match_between_triton_and_torch(fused):
    ref = _train("torch", fused=False)
    tri = _train("triton", fused=fused)
    assert ref[-1] < ref[0]  # it learns
    assert tri == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_training_losses_match_between_cpu_path_and_torch(fused):
    ref = _train("torch", fused=False)
    fast = _train("auto", fused=fused)
    assert ref[-1] < ref[0]
    assert fast == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_cpu_path_gradients_match_reference_in_the_model():
    """One AR step of the tied-embedding model: every parameter's gradient, fused and unfused CPU path
    against the reference loss."""
    grads = {}
    batch = torch.randint(0, 123, (3, 17), generator=torch.Generator().manual_seed(2))
    for kernels, fused in (("torch", False), ("auto", False), ("auto", True)):
        cfg = load_config(None, TINY + ["model.tie_embeddings=true", f"model.kernels={kernels}",
                                        f"model.fused_linear_ce={str(fused).lower()}"])
        torch.manual_seed(0)
        module = PretrainModule.from_config(cfg)
        assert module.lm.lm_head.weight is module.lm.model.embed_tokens.weight
        module(batch)[0]["ar"].backward()
        grads[kernels, fused] = {n: p.grad.clone() for n, p in module.named_parameters()}
    want = grads["torch", False]
    for key in (("auto", False), ("auto", True)):
        for name, g in grads[key].items():
            torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=f"{key} {name}")
