"""Episode samplers: the smlmt N-way K-shot construction and the faithful reproduction of the paper's."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metalm.meta.tasks import Episode, EpisodeError, sample_episode

MASK = 99


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zipf_batch(B: int, T: int, n_types: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    p = 1.0 / torch.arange(1, n_types + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), B * T, replacement=True, generator=g).view(B, T)


def smlmt(ids, seed=0, **kw):
    args = dict(n_way=4, k_shot=2, q_queries=3, mask_id=MASK, sampler="smlmt", generator=gen(seed))
    args.update(kw)
    return sample_episode(ids, **args)


def pairs(index: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in index.tolist()]


def check_masking(ids, masked, index):
    """Chosen positions hold the mask id; every other position is untouched."""
    expect = ids.clone()
    expect[index[:, 0], index[:, 1]] = MASK
    assert torch.equal(masked, expect)


def check_smlmt(ids, ep, n, k, q):
    s, qq = pairs(ep.support_index), pairs(ep.query_index)
    assert len(set(s)) == len(s) == n * k and len(set(qq)) == len(qq) == n * q
    assert not set(s) & set(qq), "support and query share a position"
    assert (ep.support_index[:, 1] >= 1).all() and (ep.query_index[:, 1] >= 1).all()
    assert ep.classes.unique().numel() == n
    assert torch.equal(torch.bincount(ep.support_labels, minlength=n), torch.full((n,), k))
    assert torch.equal(torch.bincount(ep.query_labels, minlength=n), torch.full((n,), q))
    # labels name the original token: ids[index] == classes[label]
    assert torch.equal(ids[ep.support_index[:, 0], ep.support_index[:, 1]], ep.classes[ep.support_labels])
    assert torch.equal(ids[ep.query_index[:, 0], ep.query_index[:, 1]], ep.classes[ep.query_labels])
    check_masking(ids, ep.support_ids, ep.support_index)
    check_masking(ids, ep.query_ids, ep.query_index)
    assert torch.equal(ep.classes[ep.way_row], ep.classes) and torch.equal(ep.rows, ep.classes)


def test_smlmt_invariants_and_spread():
    ids = zipf_batch(6, 40, 30, seed=1)
    ep = smlmt(ids, n_way=5, k_shot=3, q_queries=2)
    check_smlmt(ids, ep, 5, 3, 2)
    for c in range(5):
        tok = int(ep.classes[c])
        rows_with = {int(r) for r in (ids[:, 1:] == tok).any(1).nonzero().flatten()}
        sup_rows = [int(r) for r in ep.support_index[ep.support_labels == c, 0]]
        # round-robin over sequences: the support occurrences come from distinct rows when possible
        assert len(set(sup_rows)) == min(3, len(rows_with))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(2, 6), T=st.integers(8, 40), types=st.integers(4, 20), n=st.integers(2, 5),
       k=st.integers(1, 3), q=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_smlmt_property(B, T, types, n, k, q, seed):
    ids = zipf_batch(B, T, types, seed)
    try:
        ep = smlmt(ids, seed=seed, n_way=n, k_shot=k, q_queries=q)
    except EpisodeError:
        eligible = [t for t in range(types) if (ids[:, 1:] == t).sum() >= k + q]
        assert len(eligible) < n
        return
    check_smlmt(ids, ep, n, k, q)


def test_smlmt_labels_permuted_and_deterministic():
    ids = zipf_batch(4, 64, 12, seed=2)
    first = [smlmt(ids, seed=s).classes.tolist() for s in range(12)]
    assert len({tuple(c) for c in first}) > 1
    assert any(c != sorted(c) for c in first), "way order never permuted"
    # the same token gets different way indices in different episodes
    tok_labels = {}
    for c in first:
        for way, tok in enumerate(c):
            tok_labels.setdefault(tok, set()).add(way)
    assert any(len(v) > 1 for v in tok_labels.values())
    a, b = smlmt(ids, seed=5), smlmt(ids, seed=5)
    for name in ("support_ids", "support_index", "support_labels", "query_ids", "query_index", "query_labels",
                 "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = smlmt(ids, seed=6)
    assert not (torch.equal(a.support_index, c.support_index) and torch.equal(a.classes, c.classes))


def test_smlmt_error_names_found_and_needed():
    ids = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]])
    ep = smlmt(ids, n_way=3, k_shot=2, q_queries=1)  # 1, 2, 3 each occur 3 times
    assert set(ep.classes.tolist()) == {1, 2, 3}
    with pytest.raises(EpisodeError, match=r"found 3 eligible .* need n_way=4"):
        smlmt(ids, n_way=4, k_shot=2, q_queries=1)
    with pytest.raises(EpisodeError, match=r"found 2 eligible"):
        smlmt(ids, n_way=3, k_shot=2, q_queries=1, exclude_ids=(2,))


def test_smlmt_frequency_band_and_exclusions():
    # token t occurs 2 + t times (t = 0..9), then the mask id and a "special" id 50 are frequent too
    rows = []
    for t in range(10):
        rows += [t] * (2 + t)
    rows += [MASK] * 12 + [50] * 13
    g = gen(3)
    ids = torch.tensor(rows)[torch.randperm(len(rows), generator=g)].view(2, -1)
    ids = torch.cat([torch.full((2, 1), 7), ids], 1)  # position 0 is never used
    freq = torch.bincount(ids.flatten())
    for s in range(10):
        ep = smlmt(ids, seed=s, n_way=3, k_shot=1, q_queries=1, min_freq=5, max_freq=8, exclude_ids=(50,))
        for tok in ep.classes.tolist():
            assert 5 <= freq[tok] <= 8 and tok not in (50, MASK)
    with pytest.raises(EpisodeError):
        smlmt(ids, n_way=3, k_shot=1, q_queries=1, min_freq=30)


def reference(ids, seed=0, **kw):
    args = dict(n_way=4, k_shot=2, q_queries=3, mask_id=MASK, sampler="reference", generator=gen(seed))
    args.update(kw)
    return sample_episode(ids, **args)


def test_reference_positions_and_masks():
    ids = zipf_batch(5, 24, 50, seed=4)
    ep = reference(ids, n_way=6, k_shot=3, vocab_size=60)
    B, K = 5, 3
    cols = ep.support_index[:, 1].view(B, K)
    assert (cols == cols[0]).all(), "support columns differ between rows"
    assert torch.equal(ep.support_index[:, 0], torch.arange(B).repeat_interleave(K))
    assert torch.equal(ep.query_index[:, 0], torch.arange(B))
    assert (ep.query_index[:, 1] == ep.query_index[0, 1]).all()
    assert int(ep.query_index[0, 1]) not in cols[0].tolist() and (cols >= 1).all()
    check_masking(ids, ep.support_ids, ep.support_index)
    check_masking(ids, ep.query_ids, ep.query_index)
    # classes: sorted distinct support tokens, then random ids below vocab_size
    uniq = ids[ep.support_index[:, 0], ep.support_index[:, 1]].unique()
    n_real = min(uniq.numel(), 6)
    assert ep.classes.numel() == 6 and (ep.classes < 60).all()
    if uniq.numel() <= 6:
        assert torch.equal(ep.classes[:n_real], uniq)
    # labels: in-class tokens map to a way holding that token; everything else to class 0
    for index, labels in ((ep.support_index, ep.support_labels), (ep.query_index, ep.query_labels)):
        toks = ids[index[:, 0], index[:, 1]]
        for tok, lab in zip(toks.tolist(), labels.tolist()):
            if tok in ep.classes.tolist():
                assert int(ep.classes[lab]) == tok
            else:
                assert lab == 0
    assert torch.equal(ep.rows[ep.way_row], ep.classes)


def test_reference_hand_computed():
    # Every row is constant after position 0, so whatever positions are drawn the tokens are known:
    # support tokens {3, 5, 7} (row 2, row 0, row 1), query token of row r is the same as its support token.
    ids = torch.tensor([[9, 5, 5, 5, 5, 5], [9, 7, 7, 7, 7, 7], [9, 3, 3, 3, 3, 3]])
    # N=2 keeps a random 2-subset of [3, 5, 7] in random order; the left-out token maps to class 0.
    expected = {
        (3, 5): ([1, 1, 0, 0, 0, 0], [1, 0, 0]),
        (5, 3): ([0, 0, 0, 0, 1, 1], [0, 0, 1]),
        (3, 7): ([0, 0, 1, 1, 0, 0], [0, 1, 0]),
        (7, 3): ([0, 0, 0, 0, 1, 1], [0, 0, 1]),
        (5, 7): ([0, 0, 1, 1, 0, 0], [0, 1, 0]),
        (7, 5): ([1, 1, 0, 0, 0, 0], [1, 0, 0]),
    }
    seen = set()
    for s in range(40):
        ep = reference(ids, seed=s, n_way=2, k_shot=2)
        key = tuple(ep.classes.tolist())
        sup, qry = expected[key]
        assert ep.support_labels.tolist() == sup and ep.query_labels.tolist() == qry
        seen.add(key)
    assert seen == set(expected)
    # N=3 = the number of distinct support tokens: neither cut nor padded, sorted order every time
    for s in range(10):
        ep = reference(ids, seed=s, n_way=3, k_shot=2)
        assert ep.classes.tolist() == [3, 5, 7] and ep.query_labels.tolist() == [1, 2, 0]
    # N=5 pads [3, 5, 7] with two random ids below vocab_size; labels are the sorted-order way indices.
    ep = reference(ids, seed=1, n_way=5, k_shot=2, vocab_size=1000)
    assert ep.classes[:3].tolist() == [3, 5, 7] and (ep.classes[3:] < 1000).all()
    assert ep.support_labels.tolist() == [1, 1, 2, 2, 0, 0] and ep.query_labels.tolist() == [1, 2, 0]


def test_reference_repeated_padding_shares_rows():
    ids = torch.tensor([[9, 5, 5, 5, 5, 5], [9, 7, 7, 7, 7, 7]])
    found = False
    for s in range(50):  # vocab 8 and 6 padding ids: repeats are certain
        ep = reference(ids, seed=s, n_way=8, k_shot=2, vocab_size=8)
        assert torch.equal(ep.rows[ep.way_row], ep.classes)
        assert torch.equal(ep.rows, ep.rows.unique())
        # a repeated id maps to its last way
        for tok, lab in zip([5, 5, 7, 7], ep.support_labels.tolist()):
            assert lab == max(i for i, c in enumerate(ep.classes.tolist()) if c == tok)
        found |= ep.rows.numel() < ep.classes.numel()
    assert found


def test_bad_arguments():
    ids = zipf_batch(2, 8, 4, seed=0)
    with pytest.raises(ValueError, match="sampler"):
        sample_episode(ids, n_way=2, k_shot=1, q_queries=1, mask_id=MASK, sampler="bansal", generator=gen(0))
    with pytest.raises(ValueError, match="int64"):
        smlmt(ids.int())
    with pytest.raises(EpisodeError, match="positions"):
        reference(ids[:, :3], k_shot=2)


def test_episode_derives_rows_and_moves():
    z = torch.zeros(1, 2, dtype=torch.long)
    base = dict(support_ids=z, support_index=z, support_labels=z[0], query_ids=z, query_index=z, query_labels=z[0])
    ep = Episode(**base, classes=torch.tensor([4, 2, 4]))
    assert ep.rows.tolist() == [2, 4] and ep.way_row.tolist() == [1, 0, 1] and ep.n_way == 3
    ep = Episode(**base, classes=torch.tensor([4, 2, 7]))
    assert ep.rows.tolist() == [4, 2, 7] and ep.way_row.tolist() == [0, 1, 2]
    moved = ep.to("cpu")
    assert moved is not ep and torch.equal(moved.rows, ep.rows)
