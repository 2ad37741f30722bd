"""The meta-step variants (readout, feature normalisation, class sets, objective) against independent
references: a slow plain-PyTorch FOMAML that normalises by hand, hand-built windows, a planted task whose labels
a linear head can separate, and the module's AR + meta objective."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metalm.config import MetaConfig, MetaHeadConfig, load_config
from metalm.meta.fomaml import mean_pairwise_cosine, meta_loss_with_stats
from metalm.meta.head import build_head
from metalm.meta.step import inert_warnings
from metalm.meta.tasks import sample_episode
from test_meta_fomaml import D, MASK, V, rel, tiny_backbone

STEPS, LR = 4, 0.5


def tiny_head(dtype=torch.float64, feature_norm="none", seed=1):
    torch.manual_seed(seed)
    cfg = MetaConfig(feature_norm=feature_norm, head=MetaHeadConfig(layers=3, hidden=16, dropout=0.0))
    head = build_head(cfg, D, V).to(dtype)
    if feature_norm == "layernorm":  # not the identity at init, so that its gradient path is exercised
        with torch.no_grad():
            head[0].weight.uniform_(0.5, 1.5)
            head[0].bias.uniform_(-0.2, 0.2)
    return head


def episode(readout="mask", seed=3, n_way=4, window=10, offset=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (4, 24), generator=g)
    return sample_episode(ids, n_way=n_way, k_shot=2, q_queries=2, mask_id=MASK, sampler="smlmt", generator=g,
                          readout=readout, readout_offset=offset, window=window)


def slow_normalized_fomaml(backbone, head, ep, feature_norm):
    """Plain FOMAML with the head's inputs normalised by hand: the support statistics are taken from the raw
    support states (constants), the LayerNorm is the head's first module and is not adapted in the inner loop."""
    fast = copy.deepcopy(head)
    has_ln = feature_norm == "layernorm"
    mlp = fast[1:] if has_ln else fast
    cls = ep.classes

    def states(ids, index):
        return backbone.hidden_states(ids)[index[:, 0], index[:, 1]]

    with torch.no_grad():
        raw = states(ep.support_ids, ep.support_index)
        mu, sd = raw.mean(0), raw.std(0, unbiased=False)
        sd = torch.maximum(sd, 1e-4 * raw.norm(dim=1).mean() * torch.ones_like(sd))

    def norm(h):
        if feature_norm == "center":
            return h - mu
        if feature_norm == "standardize":
            return (h - mu) / sd
        if has_ln:
            return fast[0](h)
        return h

    opt = torch.optim.SGD(mlp.parameters(), lr=LR)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(mlp(norm(states(ep.support_ids, ep.support_index)))[:, cls], ep.support_labels).backward()
        opt.step()
    for p in backbone.parameters():
        p.requires_grad_(True)
    fast.zero_grad()
    backbone.zero_grad(set_to_none=True)
    h = states(ep.query_ids, ep.query_index)
    h.retain_grad()
    loss = F.cross_entropy(mlp(norm(h))[:, cls], ep.query_labels)
    loss.backward()
    return (loss.detach(), {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None},
            {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}, h.grad.norm())


@pytest.mark.parametrize("readout", ["mask", "after", "prev"])
@pytest.mark.parametrize("feature_norm", ["none", "center", "standardize", "layernorm"])
def test_every_variant_matches_the_slow_reference(readout, feature_norm):
    backbone, head = tiny_backbone(), tiny_head(feature_norm=feature_norm)
    ep = episode(readout)
    ref_loss, ref_bb, ref_head, _ = slow_normalized_fomaml(backbone, head, ep, feature_norm)
    backbone.zero_grad(set_to_none=True)
    loss, _ = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=STEPS, inner_lr=LR,
                                   feature_norm=feature_norm)
    loss.backward()
    assert rel(loss.detach(), ref_loss) < 1e-9
    for n in ref_bb:
        assert rel(backbone.get_parameter(n).grad, ref_bb[n]) < 1e-8, n
    for n, p in head.named_parameters():
        assert rel(p.grad, ref_head[n]) < 1e-8, n


def test_feature_grad_clip_scales_only_what_reaches_the_backbone():
    backbone, head = tiny_backbone(), tiny_head(feature_norm="standardize")
    ep = episode("after")
    _, ref_bb, ref_head, g_norm = slow_normalized_fomaml(backbone, head, ep, "standardize")
    clip = float(g_norm) / 4
    backbone.zero_grad(set_to_none=True)
    loss, _ = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=STEPS, inner_lr=LR,
                                   feature_norm="standardize", feature_grad_clip=clip)
    loss.backward()
    for n in ref_bb:
        assert rel(backbone.get_parameter(n).grad, ref_bb[n] / 4) < 1e-8, n
    for n, p in head.named_parameters():
        assert rel(p.grad, ref_head[n]) < 1e-8, n


@pytest.mark.parametrize("readout,offset", [("after", 3), ("prev", 0), ("mask", 0)])
def test_windows_hold_one_mask_and_read_where_the_readout_says(readout, offset):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (4, 24), generator=g)
    ep = sample_episode(ids, n_way=4, k_shot=2, q_queries=2, mask_id=MASK, sampler="smlmt",
                        generator=torch.Generator().manual_seed(5), readout=readout, readout_offset=max(offset, 1),
                        window=10)
    same = sample_episode(ids, n_way=4, k_shot=2, q_queries=2, mask_id=MASK, sampler="smlmt",
                          generator=torch.Generator().manual_seed(5))  # the paper's layout, same generator draws
    if readout == "mask":
        assert torch.equal(ep.support_ids, same.support_ids) and ep.support_ids.shape == ids.shape
        return
    assert ep.support_ids.shape == (8, 10) and ep.query_ids.shape == (8, 10)
    for w_ids, index, labels in ((ep.support_ids, ep.support_index, ep.support_labels),
                                 (ep.query_ids, ep.query_index, ep.query_labels)):
        for i in range(w_ids.shape[0]):
            row = w_ids[i]
            masks = (row == MASK).nonzero().flatten().tolist()
            assert index[i, 0] == i and len(masks) <= 1
            r = int(index[i, 1])
            if readout == "after":
                assert masks == [r - offset]  # the mask, then `offset` tokens of right context, read at the end
            else:
                assert all(m > r for m in masks)  # prev: the state read has not seen the mask
                masked_at = r + 1
                # the window is a slice of some row of the batch: find it and check the hidden token's class
                found = [(b, s) for b in range(4) for s in range(0, 24 - 10 + 1)
                         if torch.equal(torch.where(row == MASK, ids[b, s:s + 10], row), ids[b, s:s + 10])
                         and masked_at < 24]
                assert found
                b, s = found[0]
                assert int(ids[b, s + masked_at]) == int(ep.classes[labels[i]])


def test_allowed_restricts_the_classes():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (4, 40), generator=g)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[10:20] = True
    ep = sample_episode(ids, n_way=4, k_shot=1, q_queries=1, mask_id=MASK, sampler="smlmt", generator=g,
                        allowed=allowed)
    assert all(10 <= int(c) < 20 for c in ep.classes)


def test_word_start_classes_are_the_tokens_that_begin_a_word(shared_data):
    from metalm.data import load_tokenizer
    from metalm.meta.step import word_start_ids

    tok = load_tokenizer(str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"))
    ok = word_start_ids(tok, 50304)
    assert ok.shape == (50304,) and ok[tok.encode(" the")[0]] and ok[tok.encode(" Paris")[0]]
    assert not ok[tok.encode("the")[0]] and not ok[tok.encode(",")[0]] and not ok[tok.encode(" 1")[0]]
    assert not ok[len(tok):].any()  # padding rows past the tokenizer are never classes
    assert 0.2 < float(ok.float().mean()) < 0.8


def planted_batch(seed=0, rows=8, length=64):
    """Class tokens 0..19 are always followed by their own successor (token + 20); the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 20, (rows, length // 2), generator=g)
    ids = torch.stack([first, first + 20], 2).reshape(rows, length)
    return ids


class Oracle(nn.Module):
    """A planted backbone: the state at each position is its right neighbour's embedding on top of a large
    direction common to all states (collapsed, cosine > 0.99, yet linearly separable by class)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.1
        self.common = torch.randn(D, generator=g, dtype=torch.float64) * 10 / (D ** 0.5) * 3

    def hidden_states(self, ids):
        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
        return self.common + self.emb[nxt]


def test_a_planted_separable_task_is_learned_at_the_default_settings():
    m = load_config(None, []).meta  # the shipped defaults
    oracle, ids = Oracle(), planted_batch()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[:20] = True
    g = torch.Generator().manual_seed(2)
    ep = sample_episode(ids, n_way=8, k_shot=2, q_queries=2, mask_id=MASK, sampler="smlmt", generator=g,
                        allowed=allowed, readout="mask")
    h = oracle.hidden_states(ep.support_ids)[ep.support_index[:, 0], ep.support_index[:, 1]]
    assert float(mean_pairwise_cosine(h)) > 0.999  # collapsed, as measured on the real backbone (0.9997)
    torch.manual_seed(0)
    cfg = MetaConfig(feature_norm=m.feature_norm, head=MetaHeadConfig(layers=m.head.layers, hidden=m.head.hidden,
                                                                        dropout=0.0))
    head = build_head(cfg, D, V).to(torch.float64)
    _, stats = meta_loss_with_stats(oracle.hidden_states, head, ep, inner_steps=m.inner_steps, inner_lr=m.inner_lr,
                                    head_init=m.head_init, feature_norm=m.feature_norm)
    assert float(stats["support_acc_after"]) >= 0.9
    assert float(stats["query_acc"]) >= 0.9
    # the paper's settings on the same features: the collapse defeats the inner loop
    torch.manual_seed(0)
    paper = build_head(MetaConfig(head=MetaHeadConfig(layers=4, hidden=128, dropout=0.0)), D, V).to(torch.float64)
    _, base = meta_loss_with_stats(oracle.hidden_states, paper, ep, inner_steps=10, inner_lr=0.01)
    assert float(base["support_acc_after"]) < 0.5


def test_objective_add_is_the_ar_loss_plus_the_weighted_query_loss(shards):
    """The module returns both losses of a meta micro-batch by name; the hybrid step back-propagates AR + w x query
    (meta.grad_ratio=0: the weighted objective)."""
    from metalm.data.loader import build_loader
    from metalm.train.module import PretrainModule
    from metalm.train.dist import Collectives, Dist
    from metalm.train.step import EagerEngine, HybridStep

    cfg = load_config(None, ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.ffn_hidden=32", "model.max_seq_len=64", "train.seq_len=64", "meta.n_way=4",
                             "meta.k_shot=2", "meta.q_queries=2", "meta.objective=add", "meta.loss_weight=0.3",
                             "meta.grad_ratio=0", "meta.head.dropout=0.0", "train.micro_batch=4",
                             "model.kernels=torch", f"data.shards={shards}"])
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    batch = next(iter(build_loader(cfg.data, split="train", seq_len=64, micro_batch=4, seed=0)))
    ep = sample_episode(batch[:, :-1], n_way=4, k_shot=2, q_queries=2, mask_id=50280, sampler="smlmt",
                        generator=torch.Generator().manual_seed(0))
    losses, _ = module(batch, episode=ep)
    ar = module.ar_loss(batch)
    q, _ = meta_loss_with_stats(module.lm.hidden_states, module.head, ep, inner_steps=cfg.meta.inner_steps,
                                inner_lr=cfg.meta.inner_lr, head_init=cfg.meta.head_init,
                                feature_norm=cfg.meta.feature_norm)
    assert sorted(losses) == ["ar", "meta"]
    assert float(losses["ar"]) == pytest.approx(float(ar), rel=1e-6)
    assert float(losses["meta"]) == pytest.approx(float(q), rel=1e-6)

    step = HybridStep(cfg, EagerEngine(module), Collectives(Dist(0, 1, 0, torch.device("cpu"))), None, 1)
    loss, stats = step._loss(batch, ep, 0)
    assert float(loss.detach()) == pytest.approx(float(ar.detach()) + 0.3 * float(q.detach()), rel=1e-6)
    assert float(stats["ar_loss"]) == pytest.approx(float(ar), rel=1e-6)
    assert float(stats["query_loss"]) == pytest.approx(float(q), rel=1e-6)


def test_inert_warnings_name_the_collapse_and_the_missing_gain():
    rec = {"step": 40, "meta/support_cos": 0.9997, "meta/support_acc_before": 0.0625,
           "meta/support_acc_after": 0.0625}
    (k1, collapse), (k2, gain) = inert_warnings(rec, n_way=16)
    assert (k1, k2) == ("collapse", "no_gain")
    assert "collapsed (mean pairwise cosine 0.9997 > 0.99)" in collapse and "step 40" in collapse
    assert "does not adapt (support accuracy 0.062 -> 0.062, chance 0.062)" in gain
    assert inert_warnings({"step": 1, "meta/support_cos": 0.5, "meta/support_acc_before": 0.1,
                           "meta/support_acc_after": 0.4}, n_way=16) == []
