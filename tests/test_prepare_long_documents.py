"""Long documents are tokenized in bounded pieces (issue 26 item 4): the ids equal whole-document tokenization
(the reference: one `tokenizers` call on the whole text) wherever a cut can fall before a space or newline, and
`metalm-prepare`'s peak memory grows by a few times a long document's size, not ~150 times."""
from __future__ import annotations

import importlib
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metalm.data import load_tokenizer
from metalm.data.tokenizer import text_pieces

prepare_module = importlib.import_module("metalm.data.prepare")  # the module (metalm.data.prepare is the function)
tokenizer_module = importlib.import_module("metalm.data.tokenizer")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_path(shared_data) -> Path:
    return shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"


@pytest.fixture(scope="module")
def corpus_text(shared_data) -> str:
    """About 300 KB of real en/fr/es text: documents joined by newlines, as one long document."""
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl") as f:
        return "\n".join(json.loads(line)["text"] for _, line in zip(range(60), f))


def _whitespace_soup(n: int, seed: int) -> str:
    """`n` words, numbers, punctuation, CJK, accents and special tokens, each followed by whitespace of every
    kind (runs of spaces, which GPT-NeoX has as added tokens, tabs, CRLF, no-break and ideographic spaces...)."""
    rng = random.Random(seed)
    words = ["word", "Été", "naïve", "12345", "3.14", "...", "!?", "数据集", "l'été", "don't", "<|endoftext|>", "x"]
    spaces = [" "] * 4 + ["\n"] * 2 + ["", "  ", "   ", "\n\n", "\r\n", "\t", " \t ", "\u00a0", "\u3000", "\u2028",
                                      "\x1c", " " * 30]
    return "".join(rng.choice(words) + rng.choice(spaces) for _ in range(n))


def _cut_well(pieces: list[str]) -> bool:
    """Every cut before a lone space or newline (no hard cut)."""
    return all(p[0] in " \n" and not p[1].isspace() and not before[-1].isspace()
               for before, p in itertools.pairwise(pieces))


def test_pieces_join_back_and_are_cut_before_a_lone_space_or_newline():
    text = _whitespace_soup(4000, seed=1)
    pieces = list(text_pieces(text, size=1000))
    assert "".join(pieces) == text and len(pieces) > 20
    assert all(0 < len(p) <= 1000 for p in pieces) and _cut_well(pieces)
    assert all(len(p) >= 500 for p in pieces[:-1])  # cut in the second half of each piece
    unbroken = "数" * 1000  # no place to cut: exactly `size` characters each
    assert [len(p) for p in text_pieces(unbroken, size=300)] == [300, 300, 300, 100]
    assert list(text_pieces("", size=10)) == [""] and list(text_pieces("short", size=10)) == ["short"]


@pytest.mark.parametrize("size", [300, 1000, 1 << 14])
def test_pieces_tokenize_exactly_like_the_whole_document(tok_path, corpus_text, monkeypatch, size):
    tok = load_tokenizer(str(tok_path))
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", size)
    for text in (corpus_text, _whitespace_soup(20000, seed=size)):
        assert _cut_well(list(text_pieces(text, size)))
        whole = np.asarray(tok.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        got = tok.encode_long(text, "int64", suffix=(7,))
        assert got[-1] == 7 and np.array_equal(got[:-1], whole)


def test_prepare_with_pieces_writes_the_same_shards(tok_path, corpus_text, tmp_path, monkeypatch):
    src = tmp_path / "docs.jsonl"
    short = [corpus_text[i:i + 3000] for i in range(0, 30000, 3000)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in [corpus_text, *short, corpus_text[::-1]]))

    def shards(out: str) -> list:
        man = prepare_module.prepare(str(src), str(tok_path), str(tmp_path / out), 64, val_fraction=0.2,
                                     samples_per_shard=64, num_proc=1, progress=False)
        return [(s["samples"], s["sha256"]) for split in ("train", "val") for s in man["splits"][split]["shards"]]

    reference = shards("whole")  # PIECE_CHARS (64 Ki) is above every document here: no piece
    for module in (prepare_module, tokenizer_module):
        monkeypatch.setattr(module, "PIECE_CHARS", 2000)
    assert shards("pieces") == reference


PEAK = """
import resource, sys
from metalm.data.prepare import prepare
prepare(sys.argv[1], sys.argv[2], sys.argv[3], 64, val_fraction=0.0, samples_per_shard=4096, num_proc=1,
        progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(src: Path, tok_path: Path, out: Path) -> int:
    res = subprocess.run([sys.executable, "-c", PEAK, str(src), str(tok_path), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_grows_by_a_few_times_the_document_not_150(tok_path, corpus_text, tmp_path):
    """One 8 MB single-line document: the peak resident memory of prepare, less that of the same run on a small
    document, stays under 10x the document (docs/troubleshooting.md documents about 5x; whole-document
    tokenization took about 140x)."""
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    text = (corpus_text.replace("\n", " ") + " ") * (8_000_000 // len(corpus_text) + 1)
    big.write_text(json.dumps({"text": text[:8_000_000]}) + "\n")
    small.write_text(json.dumps({"text": text[:50_000]}) + "\n")
    size = big.stat().st_size
    extra = _peak_rss(big, tok_path, tmp_path / "big") - _peak_rss(small, tok_path, tmp_path / "small")
    assert extra < 10 * size, f"peak memory grew by {extra / 1e6:.0f} MB for a {size / 1e6:.0f} MB document"
