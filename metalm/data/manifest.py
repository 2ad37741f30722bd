"""The shard manifest (``manifest.json``): what `prepare` wrote and what the loader trusts.

Layout of a prepared directory::

    manifest.json          written last, atomically: the directory is complete iff it exists
    tokenizer.json         the tokenizer (incl. added special tokens); sha256 == manifest["tokenizer_hash"]
    prepare.json           the preparation config, written first (resume / refusal to mix)
    train/shard-000000.tar train/shard-000000.json (per-shard record: samples, bytes, sha256, stream cursor)
    val/shard-000000.tar   ...

Format version 2 (written now): each tar holds blocks of samples, one per key ``000000``, ``000001``, ...:
``<key>.npy``, a 2-D array of ``samples_per_member`` rows (fewer in a shard's last block) of ``seq_len + 1``
token ids (uint16 when the vocabulary fits, else int32). Nothing else: the per-shard metadata lives in the
manifest and the ``shard-NNNNNN.json`` records, so a plain WebDataset pipeline reads the shards
(``WebDataset(url).decode().to_tuple("npy")`` gives the blocks; ``.unbatched()`` after it, single samples), and a
block of 64 KiB keeps the tar's per-member overhead (a 512-byte header, padding to 512 bytes) near 1%.

Version 1 (read, no longer written): ``__meta__.json`` (split, shard index, seq_len, dtype, vocab size,
tokenizer hash) first, then one 1-D sample per member, about 4x the token bytes at seq_len 128.

The directory can be any storage location (`metalm.storage`): a local path, or a URL (s3://, gs://, https://,
pipe:...) from which the manifest and the tokenizer are read the same way.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import hashlib

from metalm.data.errors import DataError, UnsafePathError, parse_json
from metalm.storage import LocalStore, Store, describe, open_store

FORMAT = "metalm-shards"
VERSION = 2  # written by metalm-prepare
READ_VERSIONS = (1, 2)  # read by the loader
MEMBER_BYTES = 1 << 16  # version 2: samples per tar member chosen so that a member holds about this many bytes
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
PREPARE_STATE = "prepare.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "int32")
SPECIAL_ROLES = ("bos", "eos", "pad", "mask")
_SHA = re.compile(r"^[0-9a-f]{64}$")

_FIELDS: dict[str, type | tuple] = {
    "format": str,
    "version": int,
    "seq_len": int,
    "sample_len": int,
    "dtype": str,
    "vocab_size": int,
    "special_ids": dict,
    "tokenizer_hash": str,
    "tokenizer_file": str,
    "splits": dict,
}
_SHARD_FIELDS: dict[str, type] = {"path": str, "samples": int, "bytes": int, "sha256": str}


def sample_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65536), else int32."""
    return "uint16" if vocab_size <= 65536 else "int32"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_relative(value: str, field: str, where: str) -> None:
    """A path the manifest gives relative to the shard directory: no NUL, not absolute, no '..' component.

    (Symlinks inside the directory are the loader's check, on the resolved path.)"""
    if "\0" in value:
        raise DataError(f"{where}: {field} {value!r} contains a NUL character")
    p = Path(value)
    if p.is_absolute() or ".." in p.parts:
        raise UnsafePathError(f"{where}: {field} {value!r} must be relative, inside the shard directory",
                              where=where, path=value)


def validate_manifest(man: Any, where: str) -> dict:
    """Check the manifest's structure and internal consistency; DataError naming the field otherwise."""
    if not isinstance(man, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key, typ in _FIELDS.items():
        if key not in man:
            raise DataError(f"{where}: field {key!r} is missing (an incomplete or foreign manifest; re-run "
                            f"metalm-prepare)")
        ok = _is_int(man[key]) if typ is int else isinstance(man[key], typ)
        if not ok:
            raise DataError(f"{where}: field {key!r}={man[key]!r} should be {typ.__name__}")
    if man["format"] != FORMAT:
        raise DataError(f"{where}: format {man['format']!r} is not {FORMAT!r}")
    if man["version"] not in READ_VERSIONS:
        raise DataError(f"{where}: version {man['version']} is not supported (this metalm reads versions "
                        f"{', '.join(map(str, READ_VERSIONS))}; re-run metalm-prepare)")
    if man["version"] >= 2:
        spm = man.get("samples_per_member")
        if not _is_int(spm) or spm <= 0:
            raise DataError(f"{where}: samples_per_member={spm!r} should be a positive integer (version 2 shards "
                            f"hold blocks of samples)")
    if man["seq_len"] <= 0 or man["sample_len"] != man["seq_len"] + 1:
        raise DataError(f"{where}: sample_len={man['sample_len']} should be seq_len + 1 = {man['seq_len'] + 1}")
    if man["dtype"] not in DTYPES:
        raise DataError(f"{where}: dtype {man['dtype']!r} should be one of {', '.join(DTYPES)}")
    if man["dtype"] == "uint16" and man["vocab_size"] > 65536:
        raise DataError(f"{where}: vocab_size={man['vocab_size']} does not fit dtype uint16")
    _check_relative(man["tokenizer_file"], "tokenizer_file", where)
    if not _SHA.match(man["tokenizer_hash"]):
        raise DataError(f"{where}: tokenizer_hash {man['tokenizer_hash']!r} is not a sha256 hex digest")
    for role in SPECIAL_ROLES:
        v = man["special_ids"].get(role)
        if not _is_int(v) or not 0 <= v < man["vocab_size"]:
            raise DataError(f"{where}: special_ids.{role}={v!r} should be an id in [0, {man['vocab_size']})")
    for split in SPLITS:
        info = man["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or not _is_int(info.get("samples")):
            raise DataError(f"{where}: splits.{split} should be an object with 'shards' (list) and 'samples' (int)")
        total = 0
        for i, shard in enumerate(info["shards"]):
            if not isinstance(shard, dict):
                raise DataError(f"{where}: splits.{split}.shards[{i}] should be an object")
            for key, typ in _SHARD_FIELDS.items():
                if key not in shard:
                    raise DataError(f"{where}: splits.{split}.shards[{i}]: field {key!r} is missing")
                if not (_is_int(shard[key]) if typ is int else isinstance(shard[key], typ)):
                    raise DataError(f"{where}: splits.{split}.shards[{i}].{key}={shard[key]!r} should be "
                                    f"{typ.__name__}")
            _check_relative(shard["path"], f"splits.{split}.shards[{i}].path", where)
            if shard["samples"] <= 0 or shard["bytes"] <= 0 or not _SHA.match(shard["sha256"]):
                raise DataError(f"{where}: splits.{split}.shards[{i}] ({shard['path']}): bad samples/bytes/sha256")
            total += shard["samples"]
        if total != info["samples"]:
            raise DataError(f"{where}: splits.{split}.samples={info['samples']} but its shards hold {total}")
    return man


def samples_per_member(sample_len: int, dtype: str) -> int:
    """Version 2: the samples per tar member, so that a member holds about MEMBER_BYTES of tokens."""
    import numpy as np

    return max(1, MEMBER_BYTES // (sample_len * np.dtype(dtype).itemsize))


def load_manifest(shards_dir: str | os.PathLike | Store, *, expected_tokenizer_hash: str | None = None,
                  check_tokenizer_file: bool = True) -> dict:
    """Read and validate ``<shards_dir>/manifest.json`` (a local directory, a URL or a `Store`).

    Also checks that the saved tokenizer.json hashes to the manifest's tokenizer_hash, and (when given)
    that this hash is `expected_tokenizer_hash` (e.g. the tokenizer a model was trained with).
    """
    return read_manifest(shards_dir, expected_tokenizer_hash=expected_tokenizer_hash,
                         check_tokenizer_file=check_tokenizer_file)[0]


def read_manifest(shards_dir: str | os.PathLike | Store, *, expected_tokenizer_hash: str | None = None,
                  check_tokenizer_file: bool = True) -> tuple[dict, bytes | None]:
    """(the manifest, the tokenizer.json bytes it was checked against, or None without check_tokenizer_file)."""
    store = shards_dir if isinstance(shards_dir, Store) else _store(shards_dir)
    path = store.path(MANIFEST) if isinstance(store, LocalStore) else store.url(MANIFEST)
    try:
        text = store.read_bytes(MANIFEST).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (the directory was never prepared, or preparation did not "
                        f"finish); run metalm-prepare") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {describe(e) if store.local is False else e}") from None
    man = parse_json(text, str(path))
    validate_manifest(man, str(path))
    tok_bytes = None
    if check_tokenizer_file:
        tok_path = store.path(man["tokenizer_file"]) if isinstance(store, LocalStore) else \
            store.url(man["tokenizer_file"])
        try:
            tok_bytes = store.read_bytes(man["tokenizer_file"])
        except OSError as e:
            why = e if store.local else describe(e)
            raise DataError(f"{tok_path}: the tokenizer saved with the shards cannot be read: {why}") from None
        actual = hashlib.sha256(tok_bytes).hexdigest()
        if actual != man["tokenizer_hash"]:
            raise DataError(f"{tok_path}: tokenizer hash mismatch: the file hashes to {actual[:16]}..., the "
                            f"manifest says {man['tokenizer_hash'][:16]}...")
    if expected_tokenizer_hash is not None and expected_tokenizer_hash != man["tokenizer_hash"]:
        raise DataError(f"{path}: tokenizer hash mismatch: shards were made with {man['tokenizer_hash'][:16]}..., "
                        f"expected {expected_tokenizer_hash[:16]}... (a different tokenizer or added tokens)")
    return man, tok_bytes


def _store(location: str | os.PathLike) -> Store:
    """open_store, with its errors (a missing package, a bad URL) as DataError naming the location."""
    try:
        return open_store(location)
    except OSError as e:
        raise DataError(describe(e)) from None


def validation_problem(man: dict, where: str, world_size: int = 1) -> str | None:
    """Why the validation split of manifest `man` (of the shards at `where`) cannot give every one of
    `world_size` ranks a sample, with how to fix it; None when it can."""
    val = man["splits"].get("val", {})
    n = int(val.get("samples", 0))
    if n >= max(1, world_size):
        return None
    fraction = man.get("config", {}).get("val_fraction")
    sample_len = man["sample_len"]
    if fraction == 0:
        why = "prepared with val_fraction=0"
    else:
        docs = val.get("docs")
        held = f"{docs} held-out document{'s' if docs != 1 else ''}" if docs is not None else "the held-out documents"
        why = (f"{held} (val_fraction={fraction}) gave {n} sample{'s' if n != 1 else ''} of {sample_len} tokens"
               + (f", fewer than world_size={world_size}" if n else ""))
    return (f"{where}: the validation split is {'empty' if n == 0 else 'too small'} ({why}); prepare the shards "
            f"again into a new directory with a larger --val-fraction (data.val_fraction) or more documents, or set "
            f"train.val_every=0 to train without validation")


def check_validation_split(man: dict, where: str, val_every: int, world_size: int) -> None:
    """Before the first step: DataError when periodic validation is on (`val_every` > 0) and the validation split
    cannot serve it (see validation_problem), instead of a crash at the first validation."""
    problem = validation_problem(man, where, world_size) if val_every else None
    if problem:
        raise DataError(problem)
