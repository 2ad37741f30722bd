"""Fuzzing the readers of files we are handed: IOB2 NER files, jsonl/text sources (plain and gzip), shard
manifests. Random, structured-random, truncated and bit-flipped inputs either parse or raise the reader's own
error (IOB2FormatError, DataError) naming the file; nothing else escapes, nothing hangs (a per-example
deadline). The explicit @example inputs are the crashes fuzzing found (fixed in the readers).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metalm.data.errors import DataError, UnsafePathError
from metalm.data.manifest import load_manifest, validate_manifest
from metalm.data.shards import tar_member
from metalm.data.sources import iter_jsonl, iter_text
from metalm.eval.iob2 import IOB2FormatError, Sentence, parse_iob2, read_iob2

FUZZ = settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
NER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ner" / "ja_hironsan-dev.iob2"
BIG_INT = "1" * 5000  # Python refuses int() of more than 4300 digits with a bare ValueError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------------ IOB2

ODD = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\ufeff"]  # str.splitlines breaks (and a BOM)
CELL = st.one_of(st.sampled_from(["1", "2", "3", "10", "²", "٣", "O", "B-PER", "I-LOC", "B-", "B_X", "#", "",
                                  " ", "\u3000", "x y", *ODD]), st.text(max_size=4))
LINE = st.lists(CELL, max_size=5).map("\t".join)
DOC = st.lists(st.one_of(LINE, st.sampled_from(["", "# sent_id = s1", "#", "\r"])), max_size=25).map("\n".join)


def _parses_or_refuses(fn) -> None:
    try:
        out = fn()
    except IOB2FormatError:
        return
    assert isinstance(out, list) and all(isinstance(s, Sentence) and len(s.tokens) == len(s.tags) for s in out)


@FUZZ
@given(text=st.one_of(st.text(), DOC), token_col=st.integers(0, 3), tag_col=st.integers(0, 3),
       index_col=st.one_of(st.none(), st.integers(0, 3)))
@example(text="²\tx\tO\n", token_col=1, tag_col=2, index_col=0)  # isdigit() yet int() fails
def test_iob2_text_parses_or_raises_its_own_error(text, token_col, tag_col, index_col):
    _parses_or_refuses(lambda: parse_iob2(text, "fuzz.iob2", token_col, tag_col, index_col))


@FUZZ
@given(doc=DOC, token_col=st.integers(0, 3), tag_col=st.integers(0, 3),
       index_col=st.one_of(st.none(), st.integers(0, 3)), newline=st.sampled_from(["\n", "\r\n", "\r"]),
       bom=st.booleans())
@example(doc="1\tx\u2028y\tO\n2\tz\tB_X", token_col=1, tag_col=2, index_col=0, newline="\n", bom=False)
@example(doc="1\tx\tO", token_col=1, tag_col=2, index_col=0, newline="\n", bom=True)
def test_iob2_line_numbers_are_an_editors(doc, token_col, tag_col, index_col, newline, bom):
    """Sentence and error line numbers count \\n, \\r\\n, \\r breaks only: line N of the file as an editor shows it
    (split here independently) is the sentence's first token line, or the line an error names."""
    text = doc.replace("\r", "").replace("\n", newline)
    lines = text.split(newline)
    if bom:
        text = "\ufeff" + text
    try:
        sents = parse_iob2(text, "fuzz.iob2", token_col, tag_col, index_col)
    except IOB2FormatError as e:
        m = re.match(r"fuzz\.iob2:(\d+): ", str(e))
        assert m and 1 <= int(m.group(1)) <= len(lines)
        assert "\n" not in str(e)  # one line
        line = lines[int(m.group(1)) - 1]
        assert line.strip() and not line.startswith("#")  # an error is never on a blank or comment line
        return
    for s in sents:
        assert lines[s.line - 1].split("\t")[token_col] == s.tokens[0]
        assert not any(c in t for t in s.tokens for c in "\r\n")


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"1\tx\xff\tO\n")
def test_iob2_file_of_random_bytes(scratch, data):
    path = scratch / "random.iob2"
    path.write_bytes(data)
    _parses_or_refuses(lambda: read_iob2(path))


@FUZZ
@given(cut=st.floats(0, 1), flip=st.integers(0, 10**9))
def test_iob2_truncated_and_bit_flipped_real_file(scratch, cut, flip):
    if not NER.is_file():
        pytest.skip("shared NER data not found")
    data = bytearray(NER.read_bytes()[:4000])
    data = data[: int(len(data) * cut)]
    if data:
        data[flip % len(data)] ^= 1 << (flip % 8)
    path = scratch / "cut.iob2"
    path.write_bytes(bytes(data))
    _parses_or_refuses(lambda: read_iob2(path))


# ------------------------------------------------------------------------------------------------ sources


def _documents_or_data_error(fn) -> None:
    try:
        docs = list(fn())
    except DataError as e:
        assert "fuzz" in str(e)  # names the file
        return
    assert all(isinstance(d, str) for d in docs)


JSON_LINE = st.one_of(
    st.binary(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["text", "x"]), c, max_size=2),
                 max_leaves=6).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(lines=st.lists(JSON_LINE, max_size=8), gz=st.booleans(), cut=st.floats(0, 1))
@example(lines=[b'{"text": ' + BIG_INT.encode() + b"}"], gz=False, cut=1.0)  # ValueError, not JSONDecodeError
def test_jsonl_source_of_random_lines(scratch, lines, gz, cut):
    raw = b"\n".join(lines)
    if gz:
        raw = gzip.compress(raw)
    raw = raw[: int(len(raw) * cut) if cut < 1 else len(raw)]
    path = scratch / ("fuzz.jsonl.gz" if gz else "fuzz.jsonl")
    path.write_bytes(raw)
    _documents_or_data_error(lambda: iter_jsonl(path))


@FUZZ
@given(data=st.binary(max_size=200), start=st.integers(0, 60), width=st.integers(1, 40), split=st.booleans(),
       jsonl=st.booleans())
@example(data=b'{"text": "hello"}\n' * 40, start=20, width=40, split=False, jsonl=True)  # zlib.error escaped
def test_gzip_sources_corrupted_inside_the_stream(scratch, data, start, width, split, jsonl):
    raw = bytearray(gzip.compress(data))
    for i in range(min(start, len(raw)), min(start + width, len(raw))):
        raw[i] ^= 0x55
    path = scratch / ("fuzz.jsonl.gz" if jsonl else "fuzz.txt.gz")
    path.write_bytes(bytes(raw))
    if jsonl:
        _documents_or_data_error(lambda: iter_jsonl(path))
    else:
        _documents_or_data_error(lambda: iter_text(path, text_split="blank_line" if split else "file"))


@FUZZ
@given(data=st.binary(max_size=300), split=st.booleans())
def test_text_source_of_random_bytes(scratch, data, split):
    path = scratch / "fuzz.txt"
    path.write_bytes(data)
    _documents_or_data_error(lambda: iter_text(path, text_split="blank_line" if split else "file"))


# ------------------------------------------------------------------------------------------------ shard members

MEMBER_PART = st.one_of(st.sampled_from(["", ".", "..", "...", "000000", "000000.npy", "__meta__.json", "etc",
                                         "x.npy"]),
                        st.text(alphabet="./ab0_", max_size=6))
MEMBER_NAME = st.lists(MEMBER_PART, min_size=1, max_size=4).map("/".join).filter(lambda n: 0 < len(n.encode()) < 99)


@pytest.fixture(scope="module")
def shard_copy(shards, scratch) -> tuple[Path, dict, list]:
    """A copy of the shared shards and the members of its first train shard."""
    d = scratch / "member-shards"
    if not d.exists():
        shutil.copytree(shards, d)
    man = json.loads((d / "manifest.json").read_text())
    with tarfile.open(d / man["splits"]["train"]["shards"][0]["path"]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return d, man, members


@settings(FUZZ, max_examples=40)
@given(name=MEMBER_NAME, which=st.integers(0, 10**6))
@example(name="/etc/x.npy", which=1)
@example(name="../000000.npy", which=1)
@example(name="a/../000000.npy", which=0)
def test_shard_member_names_are_read_or_refused(shard_copy, name, which):
    """Any member name: the loader reads the shard or raises DataError naming it; a name that would leave the shard
    (absolute, or with a '..' component) is always refused as such."""
    from metalm.data.loader import ShardLoader

    d, man, members = shard_copy
    k = which % len(members)
    parts: list = []
    for i, (old, data) in enumerate(members):
        tar_member(parts, name if i == k else old, data)
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))
    data = b"".join(parts)
    rec = man["splits"]["train"]["shards"][0]
    (d / rec["path"]).write_bytes(data)
    edited = json.loads(json.dumps(man))
    edited["splits"]["train"]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / "manifest.json").write_text(json.dumps(edited))
    leaves = name.startswith("/") or ".." in name.split("/")
    try:
        it = iter(ShardLoader(d, split="train", seq_len=man["seq_len"], micro_batch=2, shuffle=False))
        next(it)
        it.close()
    except DataError as e:
        assert str(d / rec["path"]) in str(e) and "\n" not in str(e)
        assert isinstance(e, UnsafePathError) == leaves, str(e)
        return
    assert not leaves


# ------------------------------------------------------------------------------------------------ manifests

JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False) |
                          st.text(max_size=8), lambda c: st.lists(c, max_size=3) |
                          st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


def _valid_or_data_error(fn) -> None:
    try:
        out = fn()
    except DataError:
        return
    assert isinstance(out, dict)


def _paths(obj, prefix=()):
    """Every (path of keys/indices) inside a JSON object, for targeted mutations."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(value=JSON_VALUE)
def test_manifest_validation_of_arbitrary_json(value):
    _valid_or_data_error(lambda: validate_manifest(value, "fuzz/manifest.json"))


@FUZZ
@given(which=st.integers(0, 10**6), value=JSON_VALUE, delete=st.booleans())
def test_manifest_with_one_field_replaced_or_deleted(shards, which, value, delete):
    man = json.loads((shards / "manifest.json").read_text())
    paths = [p for p in _paths(man) if p]
    path = paths[which % len(paths)]
    node = man
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    _valid_or_data_error(lambda: validate_manifest(man, "fuzz/manifest.json"))


@FUZZ
@given(cut=st.floats(0, 1), flip=st.integers(0, 10**9), big=st.booleans())
@example(cut=1.0, flip=0, big=True)  # an integer of 5000 digits: ValueError, not JSONDecodeError
def test_manifest_file_truncated_or_bit_flipped(shards, scratch, cut, flip, big):
    data = bytearray((shards / "manifest.json").read_bytes())
    if big:
        data = bytearray(data.replace(b'"version": 1', b'"version": ' + BIG_INT.encode(), 1))
    data = data[: int(len(data) * cut) if cut < 1 else len(data)]
    if data and not big:
        data[flip % len(data)] ^= 1 << (flip % 8)
    d = scratch / "manifest-dir"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_bytes(bytes(data))
    (d / "tokenizer.json").write_bytes((shards / "tokenizer.json").read_bytes())
    _valid_or_data_error(lambda: load_manifest(d))
