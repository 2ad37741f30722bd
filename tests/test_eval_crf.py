"""Linear-chain CRF against brute-force enumeration of every tag sequence."""
import itertools
import math

import pytest
import torch

from metalm.eval.crf import LinearChainCRF


@torch.no_grad()
def brute(crf, em, n):
    """All C^n paths of one sequence: (log Z, best path, {path: score})."""
    C = em.shape[-1]
    scores = {}
    for path in itertools.product(range(C), repeat=n):
        s = float(crf.start[path[0]]) + float(crf.end[path[-1]])
        s += sum(float(em[t, path[t]]) for t in range(n))
        s += sum(float(crf.trans[path[t - 1], path[t]]) for t in range(1, n))
        scores[path] = s
    m = max(scores.values())
    logz = m + math.log(sum(math.exp(v - m) for v in scores.values()))
    return logz, list(max(scores, key=scores.get)), scores


@pytest.fixture
def crf():
    torch.manual_seed(0)
    c = LinearChainCRF(3)
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 1.0)
    return c


def test_partition_score_and_viterbi_match_brute_force(crf):
    torch.manual_seed(1)
    lengths = [4, 1, 3, 2]
    em = torch.randn(4, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[i < n for i in range(4)] for n in lengths])
    crf = crf.double()
    logz = crf.log_partition(em, mask).detach()
    paths = crf.decode(em, mask)
    tags = torch.randint(0, 3, (4, 4))
    tags[~mask] = -100  # padding labels must be ignored
    score = crf.score(em, tags, mask).detach()
    nll = crf.nll(em, tags, mask).detach()
    ref_nll = 0.0
    for b, n in enumerate(lengths):
        z, best, scores = brute(crf, em[b, :n], n)
        assert float(logz[b]) == pytest.approx(z, abs=1e-9)
        assert paths[b] == best
        assert float(score[b]) == pytest.approx(scores[tuple(tags[b, :n].tolist())], abs=1e-9)
        ref_nll += z - scores[tuple(tags[b, :n].tolist())]
    assert float(nll) == pytest.approx(ref_nll / 4, abs=1e-9)


def test_probabilities_sum_to_one_and_gradient_flows(crf):
    em = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    crf = crf.double()
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        total = sum(math.exp(float(crf.score(em, torch.tensor([list(p)]), mask) - crf.log_partition(em, mask)))
                    for p in itertools.product(range(3), repeat=3))
    assert total == pytest.approx(1.0, abs=1e-9)
    crf.nll(em, torch.tensor([[0, 1, 2]]), mask).backward()
    assert em.grad is not None and crf.trans.grad is not None and float(crf.trans.grad.abs().sum()) > 0


def test_zero_init_decodes_per_position_argmax():
    crf = LinearChainCRF(4)
    em = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = crf.decode(em, mask)
    assert out[0] == em[0].argmax(-1).tolist() and out[1] == em[1, :3].argmax(-1).tolist()


def test_rejects_empty_sequences():
    crf = LinearChainCRF(2)
    with pytest.raises(ValueError):
        crf.log_partition(torch.zeros(1, 2, 2), torch.tensor([[False, False]]))
