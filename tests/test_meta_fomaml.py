"""The FOMAML meta step against a slow, obviously-correct plain-PyTorch FOMAML written here.

The reference does what the paper's code does, minus its bugs: it re-runs the whole backbone on the support
batch at every inner step, projects onto the full vocabulary and slices the class columns, adapts a deep copy
of the head with torch.optim.SGD, then takes the query loss with the adapted head and uses the adapted
head's gradients as the head gradient. The engine must give the same backbone and head gradients.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metalm.config import MetaConfig, MetaHeadConfig, ModelConfig
from metalm.meta.fomaml import meta_loss, meta_loss_with_stats
from metalm.meta.head import build_head
from metalm.meta.tasks import sample_episode
from metalm.model.llama import Transformer

V, D, MASK = 97, 32, 96
STEPS, LR = 5, 0.5


def tiny_backbone(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=V, max_seq_len=64,
                      kernels="torch", init_std=0.2)
    return Transformer(cfg).to(dtype)


def tiny_head(dtype=torch.float64, layers=3, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    return build_head(MetaConfig(head=MetaHeadConfig(layers=layers, hidden=16, dropout=dropout)), D, V).to(dtype)


def episode(sampler, seed=0, n_way=4, vocab_size=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (4, 24), generator=g)  # 10 frequent token types: plenty of ways
    return sample_episode(ids, n_way=n_way, k_shot=2, q_queries=2, mask_id=MASK, sampler=sampler, generator=g,
                          vocab_size=vocab_size)


class Engine(nn.Module):
    """What the trainer's DeepSpeed module does: the meta loss inside forward, over a backbone and a head."""

    def __init__(self, backbone, head, **kw):
        super().__init__()
        self.backbone, self.head, self.kw = backbone, head, kw

    def forward(self, ep):
        return meta_loss_with_stats(self.backbone.hidden_states, self.head, ep, **self.kw)


def slow_fomaml(backbone, head, ep, steps, lr, head_init="persistent"):
    """Plain FOMAML. Returns (query loss, backbone grads, adapted-head grads)."""
    fast = copy.deepcopy(head)
    cls = ep.classes
    with torch.no_grad():
        if head_init == "zero":
            fast[-1].weight[cls] = 0.0
            fast[-1].bias[cls] = 0.0
        elif head_init == "prototype":
            h = backbone.hidden_states(ep.support_ids)[ep.support_index[:, 0], ep.support_index[:, 1]]
            z = fast[:-1].eval()(h)
            for way in range(len(cls)):
                m = z[ep.support_labels == way].mean(0)
                fast[-1].weight[cls[way]] = 2 * m
                fast[-1].bias[cls[way]] = -(m @ m)
    fast.train()
    opt = torch.optim.SGD(fast.parameters(), lr=lr)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        opt.zero_grad()
        h = backbone.hidden_states(ep.support_ids)[ep.support_index[:, 0], ep.support_index[:, 1]]
        F.cross_entropy(fast(h)[:, cls], ep.support_labels).backward()
        opt.step()
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt.zero_grad()
    backbone.zero_grad(set_to_none=True)
    h = backbone.hidden_states(ep.query_ids)[ep.query_index[:, 0], ep.query_index[:, 1]]
    loss = F.cross_entropy(fast(h)[:, cls], ep.query_labels)
    loss.backward()
    return (loss.detach(), {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None},
            {n: p.grad.clone() for n, p in fast.named_parameters()})


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = [
    ("smlmt", "persistent", None),
    ("reference", "persistent", None),
    ("reference", "persistent", 12),  # random padding ids below 12 repeat support classes: shared rows
    ("smlmt", "zero", None),
    ("smlmt", "prototype", None),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampler,head_init,pad_vocab", CASES)
def test_gradients_match_slow_fomaml(sampler, head_init, pad_vocab, dtype, tol):
    backbone, head = tiny_backbone(dtype), tiny_head(dtype)
    ep = episode(sampler, seed=3, n_way=8 if pad_vocab else 4, vocab_size=pad_vocab)
    if pad_vocab:
        assert ep.rows.numel() < ep.classes.numel(), "the case must exercise repeated classes"
    before = {n: p.detach().clone() for n, p in head.named_parameters()}

    ref_loss, ref_bb, ref_head = slow_fomaml(backbone, head, ep, STEPS, LR, head_init)
    backbone.zero_grad(set_to_none=True)

    engine = Engine(backbone, head, inner_steps=STEPS, inner_lr=LR, head_init=head_init)
    loss, stats = engine(ep)
    for n, p in head.named_parameters():  # the head was read, never written, and no .grad was touched
        assert torch.equal(p, before[n]) and p.grad is None
    assert all(p.grad is None for p in backbone.parameters())
    loss.backward()

    assert rel(loss.detach(), ref_loss) < tol
    assert {n for n, p in backbone.named_parameters() if p.grad is not None} == set(ref_bb)  # all but lm_head
    for n in ref_bb:
        assert rel(backbone.get_parameter(n).grad, ref_bb[n]) < tol, n
    for n, p in head.named_parameters():
        if head_init != "persistent" and n.startswith(f"{len(head) - 1}."):
            assert p.grad is None, "per-episode output rows must not send gradient to the persistent layer"
            continue
        assert rel(p.grad, ref_head[n]) < tol, n
    if head_init == "persistent":  # rows of other token ids get exactly zero
        others = torch.ones(V, dtype=torch.bool)
        others[ep.classes] = False
        assert (head[-1].weight.grad[others] == 0).all() and head[-1].weight.grad[~others].abs().sum() > 0
    assert float(stats["query_loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_second_order_matches_finite_differences():
    backbone, head = tiny_backbone(), tiny_head(layers=2)
    ep = episode("smlmt", seed=4)
    params = list(head.parameters())

    def loss_at(eps, direction):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        try:
            with torch.no_grad():
                return float(meta_loss(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=2.0))
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(eps * d)

    so = torch.autograd.grad(meta_loss(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=2.0,
                                       second_order=True), params)
    fo = torch.autograd.grad(meta_loss(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=2.0), params)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        fd = (loss_at(1e-5, direction) - loss_at(-1e-5, direction)) / 2e-5
        d_so = sum(float((a * d).sum()) for a, d in zip(so, direction))
        d_fo = sum(float((a * d).sum()) for a, d in zip(fo, direction))
        assert d_so == pytest.approx(fd, rel=1e-6, abs=1e-9)
        assert abs(d_fo - fd) > 1e-3 * abs(fd), "first-order should differ here: the check must discriminate"


def test_second_order_backbone_gradient_is_query_path():
    backbone, head = tiny_backbone(), tiny_head()
    ep = episode("smlmt", seed=5)
    meta_loss(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=0.5, second_order=True).backward()
    so = [None if p.grad is None else p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad(set_to_none=True)
    meta_loss(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=0.5).backward()
    for a, p in zip(so, backbone.parameters()):  # same phi_T value, same query path
        assert (a is None and p.grad is None) or rel(a, p.grad) < 1e-9


def test_dropout_is_applied_in_train_mode_only():
    backbone, head = tiny_backbone(), tiny_head(dropout=0.5)
    ep = episode("smlmt", seed=6)
    kw = dict(inner_steps=3, inner_lr=0.5)
    torch.manual_seed(0)
    a = meta_loss(backbone.hidden_states, head, ep, **kw)
    torch.manual_seed(1)
    b = meta_loss(backbone.hidden_states, head, ep, **kw)
    assert float(a.detach()) != float(b.detach())
    head.eval()
    c = meta_loss(backbone.hidden_states, head, ep, **kw)
    plain = tiny_head(dropout=0.0)
    plain.load_state_dict(head.state_dict())
    d = meta_loss(backbone.hidden_states, plain, ep, **kw)
    assert float(c.detach()) == float(d.detach())


def test_stats_detached_and_sensible():
    backbone, head = tiny_backbone(), tiny_head()
    ep = episode("smlmt", seed=7)
    _, stats = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=100, inner_lr=0.3)
    assert set(stats) == {"support_acc_before", "support_acc_after", "query_acc", "query_loss",
                          "inner_grad_norm", "support_cos", "support_cos_raw", "n_support", "n_query"}
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad
    assert int(stats["n_support"]) == ep.support_labels.numel() == 8
    assert int(stats["n_query"]) == ep.query_labels.numel() == 8
    assert float(stats["support_acc_after"]) == 1.0 > float(stats["support_acc_before"])
    assert 0.0 <= float(stats["query_acc"]) <= 1.0 and float(stats["inner_grad_norm"]) > 0
    # a prototype-initialised output layer is a nearest-class-mean classifier before any inner step
    _, proto = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=1, inner_lr=0.3,
                                    head_init="prototype")
    assert float(proto["support_acc_before"]) >= 0.75 > float(stats["support_acc_before"])


def test_inner_grad_norm_is_mean_over_steps():
    backbone, head = tiny_backbone(), tiny_head()
    ep = episode("smlmt", seed=8)
    _, stats = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=4, inner_lr=0.3)
    # recompute by hand: functional SGD on the class rows, features once
    with torch.no_grad():
        h = backbone.hidden_states(ep.support_ids)[ep.support_index[:, 0], ep.support_index[:, 1]]
    fast = copy.deepcopy(head)
    opt = torch.optim.SGD(fast.parameters(), lr=0.3)
    norms = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(fast(h)[:, ep.classes], ep.support_labels).backward()
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in fast.parameters()])))
        opt.step()
    assert float(stats["inner_grad_norm"]) == pytest.approx(float(torch.stack(norms).mean()), rel=1e-6)


def test_works_under_no_grad_for_evaluation():
    backbone, head = tiny_backbone(), tiny_head()
    ep = episode("reference", seed=9)
    kw = dict(inner_steps=3, inner_lr=0.5)
    with torch.no_grad():
        a, _ = meta_loss_with_stats(backbone.hidden_states, head, ep, **kw)
    assert not a.requires_grad
    assert float(a) == pytest.approx(float(meta_loss(backbone.hidden_states, head, ep, **kw).detach()), rel=1e-12)


def test_low_precision_parameters():
    backbone, head = tiny_backbone(torch.bfloat16), tiny_head(torch.bfloat16)
    ep = episode("smlmt", seed=10)
    loss, _ = meta_loss_with_stats(backbone.hidden_states, head, ep, inner_steps=3, inner_lr=0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for p in list(head.parameters()) + list(backbone.model.parameters()):
        assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()


def test_head_layout():
    cfg = MetaConfig(head=MetaHeadConfig(layers=3, hidden=8, dropout=0.25, init="xavier"))
    head = build_head(cfg, 5, 11)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head[-1].out_features == 11 and head[0].in_features == 5 and head[2].p == 0.25
    assert all((m.bias == 0).all() for m in head if isinstance(m, nn.Linear))
    one = build_head(MetaConfig(head=MetaHeadConfig(layers=1, init="normal")), 5, 11)
    assert len(one) == 1 and one[0].weight.shape == (11, 5)
    with pytest.raises(ValueError, match="head_init"):
        meta_loss(lambda x: x, head, episode("smlmt"), inner_steps=1, inner_lr=0.1, head_init="random")
