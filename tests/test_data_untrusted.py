"""Shard directories we are handed: tar members, symlinks and manifest paths that lead out of the shard directory.

Every refusal is a one-line DataError naming the shard (or manifest) and the offending path; a symlink that stays
inside the directory, or a shard directory that is itself a symlink, is still read.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from metalm.data import DataError, ShardLoader, load_manifest, prepare
from metalm.data.errors import UnsafePathError
from metalm.data.shards import tar_member
from data_cases import ensure, rewrite_manifest
from legacy_shards import to_format_1

SEQ = 32


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory) -> Path:
    """A small real preparation: 60 documents, seq_len 32, 20 samples per shard (a few train shards, one val), 4
    samples per tar member (5 members a shard)."""
    root = tmp_path_factory.mktemp("untrusted")
    src = root / "docs.jsonl"
    with open(shared_data / "corpus" / "wiki-vital-en-fr-es.jsonl", encoding="utf-8") as f:
        src.write_text("".join(islice(f, 60)), encoding="utf-8")
    out = root / "shards"
    prepare(str(src), str(shared_data / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"), out, SEQ, val_fraction=0.1,
            samples_per_shard=20, num_proc=1, seed=0, progress=False, samples_per_member=4)
    return out


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(tiny, dst)
    return dst


def _loader(shards_dir: Path, **kw) -> ShardLoader:
    return ShardLoader(shards_dir, split=kw.pop("split", "train"), seq_len=SEQ, micro_batch=2, shuffle=False, **kw)


def _first(ld: ShardLoader) -> list:
    it = iter(ld)
    try:
        return next(it).tolist()
    finally:
        it.close()


def _first_train_shard(shards_dir: Path) -> Path:
    return shards_dir / load_manifest(shards_dir)["splits"]["train"]["shards"][0]["path"]


def _rename_member(shards_dir: Path, old: str, new: str, content: bytes | None = None) -> Path:
    """Rewrite the first train shard with member `old` renamed `new` (and its bytes replaced by `content`, if
    given), written as metalm writes shards; the manifest's bytes and sha256 follow."""
    path = _first_train_shard(shards_dir)
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert old in [name for name, _ in members]
    parts: list = []
    for name, data in members:
        if name == old:
            name, data = new, data if content is None else content
        tar_member(parts, name, data)
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))
    data = b"".join(parts)
    path.write_bytes(data)

    def sync(man):
        rec = man["splits"]["train"]["shards"][0]
        rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    rewrite_manifest(shards_dir, sync)
    return path


# ----------------------------------------------------------------------------------------------- tar members
def test_the_rewritten_shard_is_still_read(copy):
    """The helper itself: a rename to a harmless name keeps the shard readable (so refusals below are the names')."""
    ref = _first(_loader(copy))
    _rename_member(copy, "000000.npy", "000000.npy")
    assert _first(_loader(copy)) == ref


@pytest.mark.parametrize("name,why", [
    ("/etc/x.npy", "an absolute path"),
    ("/000000.npy", "an absolute path"),
    ("../000000.npy", "a path with a '..' component"),
    ("a/../../000000.npy", "a path with a '..' component"),
    ("sub/../000000.npy", "a path with a '..' component"),
    ("/__meta__.json", "an absolute path"),
])
def test_member_names_leaving_the_shard_are_refused(copy, name, why):
    old = "000000.npy"
    if name.endswith(".json"):  # the metadata member of format 1 shards
        to_format_1(copy)
        old = "__meta__.json"
    path = _rename_member(copy, old, name)
    with pytest.raises(DataError) as e:
        _first(_loader(copy))
    msg = str(e.value)
    assert msg == (f"shard {path}: member {name!r} is {why}, expected <key>.npy or __meta__.json inside the shard; "
                   f"refusing the shard")
    assert isinstance(e.value, UnsafePathError) and e.value.path == name and e.value.where == str(path)


def test_member_name_refusal_reaches_the_trainer_through_a_worker(copy):
    path = _rename_member(copy, "000001.npy", "/etc/x.npy")
    with pytest.raises(DataError, match=re.escape(f"shard {path}: member '/etc/x.npy' is an absolute path")):
        _first(_loader(copy, num_workers=1))


@pytest.mark.parametrize("content,why", [
    (b"[1, 2]", "member __meta__.json is not a JSON object"),
    (b'{"seq_len": ', "member __meta__.json: invalid JSON (Expecting value at column 13)"),
    (b'{"seq_len": 32, "x": "\xff"}', "member __meta__.json: invalid JSON ("),
])
def test_a_broken_meta_member_is_a_data_error(copy, content, why):
    to_format_1(copy)  # format 2 shards have no metadata member
    path = _rename_member(copy, "__meta__.json", "__meta__.json", content)
    with pytest.raises(DataError, match=re.escape(f"shard {path}: {why}")):
        _first(_loader(copy))


# ----------------------------------------------------------------------------------------------- symlinks
def test_shard_symlinked_outside_the_directory_is_refused(copy, tmp_path):
    path = _first_train_shard(copy)
    outside = tmp_path / "elsewhere" / "stolen.tar"
    outside.parent.mkdir()
    shutil.move(path, outside)
    path.symlink_to(outside)  # same bytes, same sha256: only the location is wrong
    with pytest.raises(DataError) as e:
        _first(_loader(copy))
    assert str(e.value) == (f"shard {path}: a symlink to {outside.resolve()}, outside the shard directory "
                            f"{copy.resolve()}; refusing to read it")
    assert isinstance(e.value, UnsafePathError) and e.value.path == str(outside.resolve())


def test_shard_symlink_out_and_back_through_dotdot_is_refused(copy, tmp_path):
    """A relative link `../../elsewhere/x.tar` leaves the directory: refused whatever the spelling."""
    path = _first_train_shard(copy)
    outside = copy.parent / "elsewhere.tar"
    shutil.move(path, outside)
    path.symlink_to(Path("..") / ".." / outside.name)
    with pytest.raises(DataError, match=re.escape(f"shard {path}: a symlink to {outside.resolve()}, outside the "
                                                  f"shard directory {copy.resolve()}; refusing to read it")):
        _first(_loader(copy))


def test_split_directory_symlinked_outside_is_refused(copy, tmp_path):
    path = _first_train_shard(copy)
    moved = tmp_path / "train-elsewhere"
    shutil.move(copy / "train", moved)
    (copy / "train").symlink_to(moved)
    with pytest.raises(DataError, match=re.escape(f"shard {path}: resolves to {moved.resolve() / path.name} "
                                                  f"through a symlinked directory, outside the shard directory "
                                                  f"{copy.resolve()}; refusing to read it")):
        _first(_loader(copy))


def test_symlinks_inside_the_directory_are_still_read(copy, tmp_path):
    ref = _first(_loader(copy))
    path = _first_train_shard(copy)
    store = copy / "store"
    store.mkdir()
    shutil.move(path, store / "kept.tar")
    path.symlink_to(Path("..") / "store" / "kept.tar")
    assert _first(_loader(copy)) == ref
    # the shard directory itself reached through a symlink: its shards are inside its real path
    link = tmp_path / "link-to-shards"
    link.symlink_to(copy)
    assert _first(_loader(link)) == ref


def test_dangling_or_looping_shard_symlink_is_a_data_error(copy):
    path = _first_train_shard(copy)
    path.unlink()
    path.symlink_to(path.name)  # a loop
    with pytest.raises(DataError, match=re.escape(f"shard {path}: cannot read: ")):
        _first(_loader(copy))
    path.unlink()
    path.symlink_to("missing.tar")  # dangling, inside
    with pytest.raises(DataError, match=re.escape(f"shard {path}: cannot read: ")):
        _first(_loader(copy))


# ----------------------------------------------------------------------------------------------- manifest paths
@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside/shard-000000.tar", "train/../../x.tar"])
def test_manifest_shard_path_outside_is_a_data_error_when_not_rebuilding(copy, tok_path, bad):
    rewrite_manifest(copy, lambda m: m["splits"]["train"]["shards"][0].update(path=bad))
    manifest = copy / "manifest.json"
    expected = (f"{manifest}: splits.train.shards[0].path {bad!r} must be relative, inside the shard directory")
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    assert str(e.value) == expected
    assert isinstance(e.value, UnsafePathError) and e.value.where == str(manifest) and e.value.path == bad
    with pytest.raises(DataError, match="must be relative, inside the shard directory"):
        _loader(copy)
    with pytest.raises(DataError, match="must be relative, inside the shard directory"):
        ensure(_cfg(copy, tok_path, "data.prepare_if_missing=false"))


@pytest.mark.parametrize("field,bad,why", [
    ("tokenizer_file", "/etc/passwd", "must be relative, inside the shard directory"),
    ("tokenizer_file", "../tokenizer.json", "must be relative, inside the shard directory"),
    ("path", "train/shard-000000.tar\x00", "contains a NUL character"),
])
def test_other_manifest_paths_are_checked_too(copy, field, bad, why):
    def edit(m):
        if field == "path":
            m["splits"]["train"]["shards"][0]["path"] = bad
        else:
            m[field] = bad

    rewrite_manifest(copy, edit)
    where = "splits.train.shards[0].path" if field == "path" else field
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    assert str(e.value) == f"{copy / 'manifest.json'}: {where} {bad!r} {why}"
    with pytest.raises(DataError):
        _loader(copy)


def _cfg(shards_dir: Path, tok_path: str, *extra: str, source: Path | None = None):
    """A config for `shards_dir`; with `source`, the settings `tiny` was prepared with (so that a rebuild reuses
    its shards instead of refusing to mix them)."""
    from metalm.config import load_config

    same = [] if source is None else [f"data.source={source}", "data.val_fraction=0.1", "data.samples_per_shard=20",
                                      "data.text_field=text", "train.seed=0"]
    return load_config(overrides=[f"data.shards={shards_dir}", f"train.seq_len={SEQ}", "train.micro_batch=2",
                                  f"data.tokenizer={tok_path}", "data.prepare_num_proc=1", *same, *extra])


def test_manifest_shard_path_outside_warns_when_rebuilding(tiny, copy, tok_path, caplog):
    good = load_manifest(copy)
    bad = "../outside/shard-000000.tar"
    rewrite_manifest(copy, lambda m: m["splits"]["train"]["shards"][0].update(path=bad))
    cfg = _cfg(copy, tok_path, "data.prepare_if_missing=true", source=tiny.parent / "docs.jsonl")
    with caplog.at_level(logging.WARNING, logger="metalm"):
        man = ensure(cfg, progress=False)
    assert man["splits"] == good["splits"]  # rebuilt from the shard records, the shards reused
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("metalm")]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "\n" not in text and str(copy / "manifest.json") in text and repr(bad) in text and "rebuilding" in text


def test_unsafe_path_error_survives_pickling():
    """Errors cross process boundaries (DataLoader workers, spawn): the attributes come along."""
    e = pickle.loads(pickle.dumps(UnsafePathError("m.json: bad", where="m.json", path="../x")))
    assert isinstance(e, DataError) and str(e) == "m.json: bad" and (e.where, e.path) == ("m.json", "../x")


def test_member_bytes_are_untouched_by_the_checks(copy):
    """Refusing names must not change what is read: the first batch equals the tar's own first two samples."""
    path = _first_train_shard(copy)
    with tarfile.open(path) as tar:
        rows = [row for m in tar.getmembers() if m.name.endswith(".npy")
                for row in np.load(io.BytesIO(tar.extractfile(m).read())).tolist()][:2]
    assert _first(_loader(copy)) == rows
