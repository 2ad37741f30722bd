"""Span F1: seqeval's default (conlleval) mode on crafted edge cases with hand-computed scores, and parity of
metalm's span_metrics with a plain conlleval-style chunker on random tag sequences."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metalm.eval.ner import span_metrics


def ref_chunks(sentences):
    """Plain conlleval chunking for IOB2 tags: a chunk starts at B-X, at I-X after O, or at I-X after a tag of
    another type; it ends before O, before any B-, or before a type change. Chunks never cross sentences."""
    chunks = set()
    for si, tags in enumerate(sentences):
        start, typ = None, None
        for i, t in enumerate(list(tags) + ["O"]):
            prefix, ttype = (t, None) if t == "O" else (t[0], t[2:])
            ends = start is not None and (prefix in ("O", "B") or ttype != typ)
            if ends:
                chunks.add((si, start, i - 1, typ))
                start, typ = None, None
            if prefix in ("B", "I") and start is None:
                start, typ = i, ttype
    return chunks


def ref_prf(gold, pred):
    g, p = ref_chunks(gold), ref_chunks(pred)
    tp = len(g & p)
    prec = tp / len(p) if p else 0.0
    rec = tp / len(g) if g else 0.0
    return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)


@pytest.mark.parametrize("gold,pred,prf", [
    # one of two spans has the wrong type: P = R = F = 1/2
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]], (0.5, 0.5, 0.5)),
    # I- without B- opens a span (non-strict mode): identical spans -> 1
    ([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]], (1.0, 1.0, 1.0)),
    # type change mid-span: gold has PER(0-1) + LOC(2); pred has PER(0-2): no match
    ([["B-PER", "I-PER", "I-LOC", "O"]], [["B-PER", "I-PER", "I-PER", "O"]], (0.0, 0.0, 0.0)),
    # spans end at the sentence end and do not continue into the next sentence: 2 gold spans, both found
    ([["O", "B-ORG"], ["I-ORG", "O"]], [["O", "B-ORG"], ["B-ORG", "O"]], (1.0, 1.0, 1.0)),
    # a span cut short at the end: gold LOC(1-2), pred LOC(1) -> 0 / 1 / 0
    ([["O", "B-LOC", "I-LOC"]], [["O", "B-LOC", "O"]], (0.0, 0.0, 0.0)),
    # B- right after I- of the same type starts a new span: gold 2 spans; pred 1 span covering both
    ([["B-PER", "I-PER", "B-PER"]], [["B-PER", "I-PER", "I-PER"]], (0.0, 0.0, 0.0)),
    # 3 gold, 2 predicted, 2 correct: P = 1, R = 2/3, F = 0.8
    ([["B-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]], [["B-PER", "O", "B-LOC", "O", "O", "O"]], (1.0, 2 / 3, 0.8)),
    # nothing predicted (the all-O majority baseline): F1 = 0
    ([["B-PER", "O"], ["B-LOC"]], [["O", "O"], ["O"]], (0.0, 0.0, 0.0)),
])
def test_seqeval_default_mode_hand_computed(gold, pred, prf):
    m = span_metrics(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(prf, abs=1e-12)
    assert ref_prf(gold, pred) == pytest.approx(prf, abs=1e-12)


def test_per_type_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER"]]
    m = span_metrics(gold, pred)
    # PER: gold 1, pred 2, tp 1 -> P 1/2, R 1, F 2/3;  LOC: gold 2, pred 1, tp 1 -> P 1, R 1/2, F 2/3
    assert m["per_type"]["PER"] == pytest.approx({"f1": 2 / 3, "precision": 0.5, "recall": 1.0, "support": 1})
    assert m["per_type"]["LOC"] == pytest.approx({"f1": 2 / 3, "precision": 1.0, "recall": 0.5, "support": 2})
    assert m["f1"] == pytest.approx(2 / 3)  # micro: tp 2, pred 3, gold 3


TAG = st.sampled_from(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.tuples(TAG, TAG), min_size=1, max_size=8), min_size=1, max_size=4))
def test_parity_with_plain_conlleval_chunker(pairs):
    gold = [[g for g, _ in s] for s in pairs]
    pred = [[p for _, p in s] for s in pairs]
    m = span_metrics(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(ref_prf(gold, pred), abs=1e-12)
