"""Tokenize a document source into packed WebDataset shards (`metalm-prepare`).

Pipeline: documents (see `sources`) -> the first `max_docs` (optional) -> a deterministic shuffle inside
windows of `shuffle_window` documents (so shards mix languages and topics; 0 keeps the source order) ->
split by document into train / val (a seeded hash of the document's source index, so the val set does not
depend on the window) -> tokenized in `num_proc` processes (ordered results) -> EOS appended to every
document -> concatenated and cut into samples of exactly ``seq_len + 1`` tokens (the tail of each split
shorter than one sample is dropped and counted) -> shards of `samples_per_shard` samples.

The output is a local directory or a writable URL (s3://, gs://, ...; `metalm.storage`). Each shard is written
atomically (a temporary name and a rename locally; one complete object in a bucket), then its record
``shard-NNNNNN.json`` (samples, bytes, sha256, and the stream cursor where it starts and ends). Re-running with the
same arguments reuses every shard whose record and bytes check out and only tokenizes documents past the last
finished shard of each split; a directory prepared with another tokenizer, seq_len, source or split setting is refused.
``manifest.json`` is written last, atomically: the directory is complete iff it exists.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

import numpy as np

from metalm.clock import hms
from metalm.console import console_handler
from metalm.data.errors import DataError, UnsafePathError
from metalm.data.manifest import (FORMAT, MANIFEST, PREPARE_STATE, SPLITS, TOKENIZER_FILE, VERSION, load_manifest,
                                  samples_per_member as default_samples_per_member,
                                  sample_dtype, validation_problem)
from metalm.data.sources import TokenRules, describe_source, iter_documents
from metalm.data.shards import SplitWriter, finished_shards, remove_stale
from metalm.data.tokenizer import PIECE_CHARS, Tokenizer, load_tokenizer
from metalm.locks import HeldLock
from metalm.storage import LocalStore, Store, check_location, describe, open_store

log = logging.getLogger("metalm.data.prepare")

BATCH_DOCS = 128  # documents per tokenizer task


# ---------------------------------------------------------------------------------------------------------
# document stream
# ---------------------------------------------------------------------------------------------------------
def is_val_doc(seed: int, index: int, val_fraction: float) -> bool:
    """Whether source document `index` belongs to the validation split (seeded hash, stable)."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def window_shuffle(docs: Iterable[Any], window: int, seed: int) -> Iterator[tuple[int, Any]]:
    """(source index, doc) in a seeded order permuted within consecutive windows of `window` documents."""
    if window <= 1:
        yield from enumerate(docs)
        return
    buf: list[tuple[int, Any]] = []
    w = 0

    def flush():
        perm = np.random.default_rng([seed, w, 0x5AFE]).permutation(len(buf))
        return [buf[j] for j in perm]

    for item in enumerate(docs):
        buf.append(item)
        if len(buf) == window:
            yield from flush()
            buf = []
            w += 1
    if buf:
        yield from flush()


# ---------------------------------------------------------------------------------------------------------
# tokenization (in worker processes)
# ---------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tok_json: str, spec: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    _WORKER["tok"] = Tokenizer.from_json(tok_json, spec)
    _WORKER["dtype"] = dtype


def encode_documents(tok: Tokenizer, dtype: str, items: list[tuple[int, Any]]) -> list[np.ndarray]:
    """Token arrays (EOS appended) for [(stream position, doc)]; docs are text or token-id lists."""
    eos = tok.special_ids["eos"]
    texts = [doc for _, doc in items if isinstance(doc, str) and len(doc) <= PIECE_CHARS]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    out = []
    for pos, doc in items:
        if isinstance(doc, str) and len(doc) > PIECE_CHARS:
            arr = tok.encode_long(doc, dtype, suffix=(eos,))  # in bounded pieces (Tokenizer.encode_long)
        elif isinstance(doc, str):
            ids = next(encoded)
            ids.append(eos)
            arr = np.asarray(ids, dtype=np.int64)
        else:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.ndim != 1:
                raise DataError(f"document at stream position {pos}: token ids should be a flat list")
            if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
                bad = int(arr[(arr < 0) | (arr >= tok.vocab_size)][0])
                raise DataError(f"document at stream position {pos}: token id {bad} is outside the tokenizer's "
                                f"vocabulary [0, {tok.vocab_size})")
            if not arr.size or arr[-1] != eos:
                arr = np.append(arr, eos)
        out.append(arr.astype(dtype, copy=False))
    return out


def _encode_in_worker(items: list[tuple[int, Any]]) -> list[np.ndarray]:
    return encode_documents(_WORKER["tok"], _WORKER["dtype"], items)


class _Encoder:
    """Ordered tokenization of document batches: in-process, or a Pool with a bounded number in flight."""

    def __init__(self, tok: Tokenizer, dtype: str, num_proc: int):
        self.tok, self.dtype, self.num_proc = tok, dtype, num_proc
        self.pool = None
        if num_proc > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(num_proc, initializer=_init_worker,
                                                    initargs=(tok.to_json(), tok.spec, dtype))

    def map(self, batches: Iterable[tuple[Any, list[tuple[int, Any]]]]) -> Iterator[tuple[Any, list[np.ndarray]]]:
        """(tag, items) -> (tag, arrays), in input order."""
        if self.pool is None:
            for tag, items in batches:
                yield tag, encode_documents(self.tok, self.dtype, items)
            return
        pending: deque = deque()
        limit = 4 * self.num_proc
        for tag, items in batches:
            pending.append((tag, self.pool.apply_async(_encode_in_worker, (items,))))
            if len(pending) >= limit:
                t, res = pending.popleft()
                yield t, res.get()
        while pending:
            t, res = pending.popleft()
            yield t, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


@contextmanager
def _dir_lock(out: Store):
    """An exclusive lock on a local output directory (concurrent preparers run one after the other; the one that
    waits says for whom). A bucket has no locks: run one preparer per URL at a time."""
    if not isinstance(out, LocalStore):
        yield
        return
    lock = HeldLock(out.path(".prepare.lock"), lambda holder: f"{out.location} is being prepared ({holder})")
    lock.acquire(wait=True, waiting=lambda holder: print(
        f"metalm-prepare: waiting for the preparer writing {out.location} ({holder})", file=sys.stderr, flush=True))
    try:
        yield
    finally:
        lock.release()


def _config_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for k in keys:
        if old.get(k) != new.get(k):
            a, b = old.get(k), new.get(k)
            if k == "tokenizer_hash":
                a, b = str(a)[:12], str(b)[:12]
            if k == "source":
                a, b = (a or {}).get("spec"), (b or {}).get("spec")
                if a == b:
                    a, b = "(files changed)", "(now)"
            parts.append(f"{k}: {a!r} -> {b!r}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------
def source_documents(source: str, *, text_split: str = "file") -> int | None:
    """How many documents `source` yields, where that is cheap to know; None where it is not.

    builtin: its articles (three small JSON files); parquet and saved HF datasets: the row counts in their
    metadata; plain text with text_split=file: one per file; uncompressed JSON lines: a newline count (C speed;
    blank lines are counted too, so it can be slightly high), estimated from the first 64 MiB of a file larger
    than 1 GiB. Compressed JSON lines and blank-line separated text would need a full read: None. Only ever used
    for the progress total and ETA (the last line gives the real count).
    """
    from metalm.data.sources import describe_source, iter_documents

    try:
        if source == "builtin" or source.startswith("builtin:"):
            return sum(1 for _ in iter_documents(source))
        total = 0
        for f in describe_source(source, text_split=text_split)["files"]:
            path, kind = Path(f["path"]), f["kind"]
            if kind == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            elif kind == "hf_dataset":
                total += _hf_dataset_rows(path)
            elif kind == "text" and text_split == "file":
                total += 1
            elif kind == "jsonl" and not path.name.lower().endswith(".gz"):
                total += _count_lines(path)
            else:
                return None
        return total
    except Exception:  # noqa: BLE001 - only a progress total: the real read reports any problem properly
        return None


def _count_lines(path: Path, exact_up_to: int = 1 << 30, sample: int = 1 << 26) -> int:
    """Lines of a file: counted up to `exact_up_to` bytes, estimated beyond from the first `sample` bytes (a
    second read of a 100 GB corpus before tokenizing would cost minutes; an ETA needs no exact total)."""
    size = path.stat().st_size
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        if size > exact_up_to:
            block = f.read(sample)
            return max(1, round(size * block.count(b"\n") / max(1, len(block))))
        while block := f.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _hf_dataset_rows(path: Path) -> int:
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        path = path / "train"
    state = json.loads((path / "state.json").read_text())
    rows = 0
    for entry in state["_data_files"]:
        with pa.memory_map(str(path / entry["filename"]), "r") as source:
            try:
                reader = pa.ipc.open_stream(source)
                rows += sum(batch.num_rows for batch in reader)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                rows += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return rows


class Progress:
    """Documents read from the source (of `total`, when known), tokens, rate and ETA, labelled `label`.

    On a terminal, one line redrawn in place (tqdm). Anywhere else (a log file, a pipe, a batch job's output)
    plain lines, never a carriage return: one at the start, then one whenever `every_s` seconds have passed or
    another tenth of the total is done, and one at the end.
    """

    def __init__(self, label: str, total: int | None, *, enabled: bool = True, stream=None, every_s: float = 10.0,
                 clock=time.monotonic):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.docs = self.tokens = 0
        self.t0 = self.last = clock()
        self.tenths = 0
        self.bar = None
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", desc=f"prepare {label}", file=self.stream, mininterval=1.0,
                            smoothing=0.1, dynamic_ncols=True)
        else:
            of = f"{total:,} documents" if total is not None else "documents (total not known in advance)"
            self._line(f"tokenizing {of}")

    def _line(self, text: str) -> None:
        self.stream.write(f"metalm-prepare {self.label}: {text}\n")
        self.stream.flush()

    def status(self, now: float, eta: bool = True) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.docs / elapsed
        done = f"{self.docs:,}"
        left = ""
        if self.total:
            done += f"/{self.total:,} docs ({min(100.0, 100.0 * self.docs / self.total):.0f}%)"
            if eta and rate > 0:
                left = f", eta {hms(max(0, self.total - self.docs) / rate)}"
        else:
            done += " docs"
        return (f"{done}, {self.tokens:,} tokens, {rate:,.0f} docs/s, {self.tokens / elapsed:,.0f} tok/s, "
                f"elapsed {hms(elapsed)}{left}")

    def update(self, docs: int, tokens: int) -> None:
        """The counts so far (documents read from the source, tokens written)."""
        new = docs - self.docs
        self.docs, self.tokens = docs, tokens
        if not self.enabled:
            return
        now = self.clock()
        if self.bar is not None:
            self.bar.update(new)
            self.bar.set_postfix_str(f"{tokens / max(now - self.t0, 1e-9):,.0f} tok/s", refresh=False)
            return
        if self.total and docs >= self.total:
            return  # all read: the closing line follows
        tenths = int(10 * docs / self.total) if self.total else 0
        if now - self.last >= self.every_s or tenths > self.tenths:
            self.last, self.tenths = now, max(self.tenths, tenths)
            self._line(self.status(now))

    def close(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if ok and self.bar.total is not None and self.bar.n != self.bar.total:
                self.bar.total = self.bar.n  # the estimate was high (blank lines): end at 100%
                self.bar.refresh()
            self.bar.close()
            return
        if ok:
            self.total = self.docs
            self._line(f"done: {self.status(self.clock(), eta=False)}")


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------
def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def prepare(source: str, tokenizer_spec: str | Tokenizer, out_dir: str | os.PathLike, seq_len: int, *,
            val_fraction: float = 0.01, samples_per_shard: int = 2048, num_proc: int = 0,
            text_field: str = "text", seed: int = 0, text_split: str = "file", shuffle_window: int = 65536,
            max_docs: int | None = None, progress: bool = True, samples_per_member: int | None = None) -> dict:
    """Tokenize `source` into packed shards under `out_dir` (a local directory or a writable URL); return the
    manifest (see the module doc). `samples_per_member`: samples per tar member (default: about 64 KiB)."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len}: expected a positive integer")
    if samples_per_shard <= 0:
        raise DataError(f"samples_per_shard={samples_per_shard}: expected a positive integer")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    if max_docs is not None and max_docs <= 0:
        raise DataError(f"max_docs={max_docs}: expected a positive integer or None")
    if samples_per_member is not None and samples_per_member <= 0:
        raise DataError(f"samples_per_member={samples_per_member}: expected a positive integer")
    out = _out_store(out_dir)
    tok = tokenizer_spec if isinstance(tokenizer_spec, Tokenizer) else load_tokenizer(tokenizer_spec)
    dtype = sample_dtype(tok.vocab_size)
    sample_len = seq_len + 1
    out.makedirs()
    config = {
        "seq_len": seq_len, "sample_len": sample_len, "dtype": dtype, "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size, "source": describe_source(source, text_field=text_field, text_split=text_split),
        "text_field": text_field, "text_split": text_split, "val_fraction": float(val_fraction),
        "samples_per_shard": samples_per_shard, "seed": seed, "shuffle_window": shuffle_window, "max_docs": max_docs,
        "samples_per_member": samples_per_member or default_samples_per_member(sample_len, dtype),
    }
    with _dir_lock(out):
        state_path = out.url(PREPARE_STATE)
        if out.exists(PREPARE_STATE):
            try:
                state = json.loads(out.read_bytes(PREPARE_STATE))
                old, old_version = state["config"], state.get("version", 1)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{state_path}: unreadable preparation record ({e}); delete {out} to start "
                                f"over") from None
            if samples_per_member is None and isinstance(old, dict) and "samples_per_member" in old:
                config["samples_per_member"] = old["samples_per_member"]  # not asked for: as prepared before
            man = _complete_manifest(out)
            if old_version != VERSION:
                if man is not None:
                    return man  # finished shards of the older format: readable as they are
                raise DataError(f"{out}: an unfinished preparation in shard format version {old_version}; this "
                                f"metalm writes version {VERSION} and does not mix the two: delete {out} or use "
                                f"another directory (finished version {old_version} shards stay readable)")
            if old != config:
                raise DataError(f"{out}: refusing to mix shards: the directory was prepared with different "
                                f"settings ({_config_diff(old, config)}); use another directory or delete it")
            if man is not None:
                return man
        elif any(n.startswith("shard-") and n.endswith(".tar") for split in SPLITS for n in out.list(split)) \
                or out.exists(MANIFEST):
            raise DataError(f"{out}: holds shards or a manifest but no {PREPARE_STATE}: refusing to mix with "
                            f"shards of unknown origin; use another directory")
        out.write_bytes(PREPARE_STATE, _json_bytes({"format": FORMAT, "version": VERSION, "config": config}))
        tok_bytes = tok.to_json().encode("utf-8")
        try:
            same = hashlib.sha256(out.read_bytes(TOKENIZER_FILE)).hexdigest() == tok.hash
        except OSError:
            same = False
        if not same:
            out.write_bytes(TOKENIZER_FILE, tok_bytes)
        out.remove(MANIFEST)
        return _run(source, tok, out, config, num_proc=num_proc or default_num_proc(), progress=progress)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def _out_store(out_dir: str | os.PathLike) -> Store:
    """The output location as a Store: a local directory or a writable URL (never a local directory named
    after a URL); a read-only scheme or a missing fsspec package is a DataError naming it."""
    try:
        check_location(str(out_dir), "--out", writable=True)
        return open_store(out_dir)
    except OSError as e:
        raise DataError(describe(e)) from None


def _complete_manifest(out: Store) -> dict | None:
    """The manifest, when it is there, valid, and every shard it lists is there with its size; else None."""
    if not out.exists(MANIFEST):
        return None
    try:
        man = load_manifest(out)
        for split in SPLITS:
            for rec in man["splits"][split]["shards"]:
                if out.size(rec["path"]) != rec["bytes"]:
                    return None
        return man
    except UnsafePathError as e:
        log.warning("%s; rebuilding it from the shard records (%s)", e,
                    ", ".join(f"{split}/shard-*.json" for split in SPLITS))
    except (DataError, OSError):
        pass
    return None


def _run(source: str, tok: Tokenizer, out: Store, config: dict, *, num_proc: int, progress: bool) -> dict:
    t0 = time.time()
    meta = {"format": FORMAT, "version": VERSION, "seq_len": config["seq_len"], "sample_len": config["sample_len"],
            "dtype": config["dtype"], "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash,
            "samples_per_member": config["samples_per_member"]}
    writers = {}
    for split in SPLITS:
        finished = finished_shards(out, split)
        remove_stale(out, split, len(finished))
        writers[split] = SplitWriter(out, split, config["sample_len"], config["samples_per_shard"], meta, finished,
                                     config["samples_per_member"])
    seed, val_fraction = config["seed"], config["val_fraction"]
    mask = tok.special_ids["mask"]
    rules = TokenRules(tok.vocab_size, {mask: tok.backend.id_to_token(mask)})
    docs = iter_documents(source, text_field=config["text_field"], text_split=config["text_split"], rules=rules)
    if config["max_docs"] is not None:
        docs = itertools.islice(docs, config["max_docs"])
    counts = {"docs": 0, "empty_docs": 0, "tokenized_docs": 0, "tokens": 0}
    total = source_documents(source, text_split=config["text_split"]) if progress else None
    if config["max_docs"] is not None:
        total = min(total, config["max_docs"]) if total is not None else config["max_docs"]
    bar = Progress(str(out), total, enabled=progress)

    def batches() -> Iterator[tuple[list, list]]:
        tags, items = [], []
        for pos, (index, doc) in enumerate(window_shuffle(docs, config["shuffle_window"], seed)):
            counts["docs"] += 1
            if counts["docs"] % 4096 == 0:  # also while skipping documents already in finished shards
                bar.update(counts["docs"], counts["tokens"])
            if (isinstance(doc, str) and not doc.strip()) or (not isinstance(doc, str) and len(doc) == 0):
                counts["empty_docs"] += 1
                continue
            split = "val" if is_val_doc(seed, index, val_fraction) else "train"
            writers[split].docs += 1
            offset = writers[split].offset_for(pos)
            if offset is None:  # already in a finished shard
                continue
            tags.append((split, pos, offset))
            items.append((pos, doc))
            if len(items) == BATCH_DOCS:
                yield tags, items
                tags, items = [], []
        if items:
            yield tags, items

    encoder = _Encoder(tok, config["dtype"], num_proc)
    completed = False
    try:
        for tags, arrays in encoder.map(batches()):
            for (split, pos, offset), arr in zip(tags, arrays):
                writers[split].add(pos, arr, offset)
                counts["tokens"] += len(arr)
            counts["tokenized_docs"] += len(tags)
            bar.update(counts["docs"], counts["tokens"])
        bar.update(counts["docs"], counts["tokens"])  # documents read after the last batch (empty, or skipped)
        completed = True
    finally:
        encoder.close()
        bar.close(ok=completed)
    for w in writers.values():
        w.flush()
    elapsed = time.time() - t0
    splits = {}
    for split, w in writers.items():
        samples = sum(s["samples"] for s in w.shards)
        splits[split] = {"shards": w.shards, "samples": samples, "tokens": samples * config["sample_len"],
                         "docs": w.docs, "dropped_tokens": int(w.packer.available)}
    manifest = {
        **meta,
        "special_ids": dict(tok.special_ids),
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_spec": tok.spec,
        "source": config["source"],
        "config": {k: config[k] for k in ("text_field", "text_split", "val_fraction", "samples_per_shard", "seed",
                                          "shuffle_window", "max_docs")},
        "splits": splits,
        "totals": {"docs": counts["docs"], "empty_docs": counts["empty_docs"],
                   "samples": sum(s["samples"] for s in splits.values()),
                   "tokens": sum(s["tokens"] for s in splits.values()),
                   "dropped_tokens": sum(s["dropped_tokens"] for s in splits.values())},
        "last_run": {"reused_shards": sum(w.reused for w in writers.values()),
                     "written_shards": sum(len(w.shards) - w.reused for w in writers.values()),
                     "tokenized_docs": counts["tokenized_docs"], "tokenized_tokens": counts["tokens"],
                     "seconds": round(elapsed, 3), "num_proc": num_proc,
                     "docs_per_s": round(counts["tokenized_docs"] / max(elapsed, 1e-9), 1),
                     "tokens_per_s": round(counts["tokens"] / max(elapsed, 1e-9), 1)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if splits["train"]["samples"] == 0:
        raise DataError(f"{out}: the source gave no training sample of {config['sample_len']} tokens "
                        f"({counts['docs']} documents, {counts['tokens']} tokens tokenized); use a larger source "
                        f"or a smaller seq_len")
    out.write_bytes(MANIFEST, _json_bytes(manifest))  # last: the directory is complete iff it exists
    problem = validation_problem(manifest, str(out)) if val_fraction > 0 else None
    if problem:
        log.warning(problem)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# launcher entry point
# ---------------------------------------------------------------------------------------------------------
def ensure_prepared(d, *, seq_len: int, vocab_size: int, seed: int, progress: bool = True) -> dict:
    """The manifest of ``d.shards`` (``d``: the data config section), preparing the shards first when allowed.

    A valid manifest is used when its seq_len equals `seq_len` (train.seq_len) and its vocabulary (incl. the
    added mask token) fits `vocab_size` (model.vocab_size); if ``d.tokenizer`` names another tokenizer than
    the one recorded, its hash must match the shards'. Otherwise, with ``d.prepare_if_missing``, the shards
    are prepared (or a partial preparation resumed) from ``d.source``/``d.tokenizer`` with `seed`.
    """
    try:
        out = open_store(d.shards)
        has_manifest = out.exists(MANIFEST)
    except OSError as e:
        raise DataError(f"data.shards={d.shards}: {describe(e)}") from None
    man = None
    if has_manifest:
        try:
            man = load_manifest(out)
        except DataError:
            if not d.prepare_if_missing:
                raise
            man = None  # incomplete or damaged: prepare() resumes it (or refuses a foreign directory)
    if man is not None:
        if man["seq_len"] != seq_len:
            raise DataError(f"data.shards={d.shards}: prepared with seq_len={man['seq_len']} but "
                            f"train.seq_len={seq_len}; prepare another directory (metalm-prepare --seq-len "
                            f"{seq_len} --out ...) and point data.shards at it")
        if man.get("tokenizer_spec") != d.tokenizer:
            expected = load_tokenizer(d.tokenizer).hash
            if expected != man["tokenizer_hash"]:
                raise DataError(f"data.shards={d.shards}: tokenizer hash mismatch: the shards were made with "
                                f"{man.get('tokenizer_spec')!r} ({man['tokenizer_hash'][:12]}), data.tokenizer="
                                f"{d.tokenizer!r} hashes to {expected[:12]}")
    elif not d.prepare_if_missing:
        q = shlex.quote  # a glob source is for metalm-prepare to expand, not the shell
        raise DataError(f"data.shards={d.shards}: no {MANIFEST}; run metalm-prepare --source {q(d.source)} "
                        f"--tokenizer {q(d.tokenizer)} --seq-len {seq_len} --out {q(str(d.shards))}, or set "
                        f"data.prepare_if_missing=true")
    else:
        man = prepare(d.source, d.tokenizer, d.shards, seq_len, val_fraction=float(d.val_fraction),
                      samples_per_shard=int(d.samples_per_shard), num_proc=int(d.prepare_num_proc),
                      text_field=d.text_field, seed=int(seed), text_split=d.text_split, progress=progress)
    if man["vocab_size"] > vocab_size:
        raise DataError(f"model.vocab_size={vocab_size} is smaller than the shards' vocabulary "
                        f"({man['vocab_size']} ids incl. the mask token); raise model.vocab_size (e.g. to "
                        f"{-(-man['vocab_size'] // 128) * 128})")
    return man


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from metalm.config import TEXT_SPLITS, DataConfig, TrainConfig

    d, t = DataConfig(), TrainConfig()
    p = argparse.ArgumentParser(prog="metalm-prepare", description="Tokenize documents into packed WebDataset "
                                "shards with a manifest (resumable).")
    p.add_argument("--config", help="a metalm YAML config: take data.* and train.seq_len/seed from it "
                   "(flags below override)")
    p.add_argument("--source", help=f"builtin, or a file/dir/glob of jsonl, txt, parquet or a saved HF dataset, "
                   f"local or a URL (s3://bucket/docs/*.jsonl, gs://..., https://.../file.jsonl, "
                   f"hf://datasets/...) (default {d.source})")
    p.add_argument("--tokenizer", help=f"builtin:olmo, tokenizers JSON, HF folder or hub name (default {d.tokenizer})")
    p.add_argument("--out", help=f"output directory or writable URL, e.g. s3://bucket/shards (default {d.shards})")
    p.add_argument("--samples-per-member", type=int, help="samples per tar member (default: about 64 KiB of "
                   "tokens per member)")
    p.add_argument("--seq-len", type=int, help=f"tokens per sample, +1 stored for the shifted target (default "
                   f"{t.seq_len})")
    p.add_argument("--val-fraction", type=float, help=f"documents held out for validation (default {d.val_fraction})")
    p.add_argument("--samples-per-shard", type=int, help=f"default {d.samples_per_shard}")
    p.add_argument("--num-proc", type=int, help="tokenizer processes (default: one per available core)")
    p.add_argument("--text-field", help=f"jsonl key / parquet column (default {d.text_field})")
    p.add_argument("--text-split", choices=TEXT_SPLITS, help="plain text: one doc per file, or "
                   "blank-line separated (default file)")
    p.add_argument("--seed", type=int, help=f"val split and shuffle seed (default {t.seed})")
    p.add_argument("--shuffle-window", type=int, default=65536, help="shuffle documents within windows of this "
                   "many (0: keep source order)")
    p.add_argument("--max-docs", type=int, help="only the first N documents of the source")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the shell expanded an unquoted --source glob into many words
        glob = f"{args.source[:args.source.rfind('/') + 1]}*{Path(args.source).suffix}" if args.source else ""
        hint = (f"; to give a glob, quote it (--source '{glob}'), so that metalm-prepare expands it, not the "
                f"shell" if args.source and not extra[0].startswith("-") else "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    logging.basicConfig(level=logging.WARNING, handlers=[console_handler("metalm-prepare")])
    if args.config:
        from metalm.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"metalm-prepare: error: {e}", file=sys.stderr)
            return 2
        d, t = cfg.data, cfg.train
    else:
        from metalm.config import DataConfig, TrainConfig

        d, t = DataConfig(), TrainConfig()

    def pick(flag, default):
        return default if flag is None else flag

    try:
        man = prepare(
            pick(args.source, d.source), pick(args.tokenizer, d.tokenizer), pick(args.out, d.shards),
            pick(args.seq_len, t.seq_len), val_fraction=pick(args.val_fraction, d.val_fraction),
            samples_per_shard=pick(args.samples_per_shard, d.samples_per_shard),
            num_proc=pick(args.num_proc, getattr(d, "prepare_num_proc", 0)),
            text_field=pick(args.text_field, d.text_field), seed=pick(args.seed, t.seed),
            text_split=pick(args.text_split, getattr(d, "text_split", "file")), shuffle_window=args.shuffle_window,
            max_docs=args.max_docs, progress=not args.no_progress, samples_per_member=args.samples_per_member)
    except DataError as e:
        print(f"metalm-prepare: error: {e}", file=sys.stderr)
        return 2
    run = man.get("last_run", {})
    print(f"{pick(args.out, d.shards)}: train {man['splits']['train']['samples']} samples in "
          f"{len(man['splits']['train']['shards'])} shards, val {man['splits']['val']['samples']} samples in "
          f"{len(man['splits']['val']['shards'])} shards, seq_len {man['seq_len']}, vocab {man['vocab_size']} "
          f"({man['dtype']}); {run.get('docs_per_s', 0):,.0f} docs/s, {run.get('tokens_per_s', 0):,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
