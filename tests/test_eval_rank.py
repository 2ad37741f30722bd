"""Effective rank against hand-computed spectra and a plain numpy implementation."""

import pytest
import torch
import torch.nn.functional as F

from metalm.config import load_config
from metalm.eval.layers import ATTN_KINDS, KINDS
from metalm.eval.rank import activation_ranks, effective_rank, er_and_per, gradient_ranks, weight_ranks
from metalm.model import build_model
from eval_cases import np_er

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
        "model.vocab_size=97", "model.max_seq_len=32", "train.seq_len=16"]


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_identity_has_full_rank():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert er_and_per(torch.eye(7))["per"] == pytest.approx(1.0, rel=1e-12)


def test_rank_one_is_one():
    u, v = torch.randn(6, 1), torch.randn(1, 9)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert er_and_per(u @ v)["per"] == pytest.approx(1.0 / 6, abs=1e-6)


def test_known_spectrum_3_1():
    # σ = [3, 1] -> p = [.75, .25]; H = -(.75 ln .75 + .25 ln .25) = 0.562335; ER = e^H = 1.754765
    m = random_orthogonal(2, 0) @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ random_orthogonal(2, 1)
    assert effective_rank(m) == pytest.approx(1.754765, abs=1e-6)
    assert er_and_per(m)["per"] == pytest.approx(1.754765 / 2, abs=1e-6)


def test_rectangular_equal_singular_values_and_zero_matrix():
    u = random_orthogonal(5, 2)[:, :3]  # 5x3 orthonormal columns
    m = u @ torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)) @ random_orthogonal(3, 3)
    assert effective_rank(m.T) == pytest.approx(3.0, rel=1e-10)  # 3x5
    assert er_and_per(m.T)["per"] == pytest.approx(1.0, rel=1e-10)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(2, 2, 2))


def test_matches_numpy_on_random_matrices():
    g = torch.Generator().manual_seed(5)
    for shape in [(3, 8), (16, 16), (40, 12)]:
        m = torch.randn(*shape, generator=g)
        assert effective_rank(m) == pytest.approx(np_er(m.numpy()), rel=1e-9)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, TINY).model)


def test_weight_ranks_per_matrix_and_paper_aggregate(model):
    r = weight_ranks(model)
    assert len(r["layers"]) == 2
    per_attn = []
    for i, block in enumerate(model.model.layers):
        mods = {"q_proj": block.self_attn.q_proj, "k_proj": block.self_attn.k_proj,
                "v_proj": block.self_attn.v_proj, "o_proj": block.self_attn.o_proj,
                "gate_proj": block.mlp.gate_proj, "up_proj": block.mlp.up_proj, "down_proj": block.mlp.down_proj}
        for k in KINDS:
            w = mods[k].weight.detach().numpy()
            assert r["layers"][i][k]["er"] == pytest.approx(np_er(w), rel=1e-9)
            assert r["layers"][i][k]["per"] == pytest.approx(np_er(w) / min(w.shape), rel=1e-9)
            if k in ATTN_KINDS:
                per_attn.append(np_er(w))
    assert r["attn_mean_er"] == pytest.approx(sum(per_attn) / 8, rel=1e-9)


def test_activation_ranks_match_hooked_block_outputs(model):
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o.detach())) for b in model.model.layers]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    r = activation_ranks(model, ids)
    for i, h in enumerate(captured):
        assert r["layers"][i]["er"] == pytest.approx(np_er(h.reshape(30, 32).numpy()), rel=1e-6)
        assert r["layers"][i]["per"] == pytest.approx(np_er(h.reshape(30, 32).numpy()) / 30, rel=1e-6)


def test_gradient_ranks_use_the_real_lm_loss(model):
    batch = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    # reference: the next-token loss written out with log_softmax + gather, ordinary backward
    ref = build_model(model.cfg)
    ref.load_state_dict(model.state_dict())
    logp = F.log_softmax(ref(batch[:, :-1]).double(), -1)
    loss = -logp.gather(-1, batch[:, 1:].unsqueeze(-1)).mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    r = gradient_ranks(model, batch)
    assert all(p.grad is None for p in model.parameters()), "gradient_ranks must not touch .grad"
    assert r["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for i, block in enumerate(ref.model.layers):
        for k, mod in (("q_proj", block.self_attn.q_proj), ("v_proj", block.self_attn.v_proj),
                       ("down_proj", block.mlp.down_proj)):
            assert r["layers"][i][k]["er"] == pytest.approx(np_er(mod.weight.grad.numpy()), rel=1e-4)
