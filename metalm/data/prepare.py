"""Tokenize a document source into packed WebDataset shards (`metalm-prepare`).

Pipeline: documents (see `sources`) -> the first `max_docs` (optional) -> a deterministic shuffle inside
windows of `shuffle_window` documents (so shards mix languages and topics; 0 keeps the source order) ->
split by document into train / val (a seeded hash of the document's source index, so the val set does not
depend on the window) -> tokenized in `num_proc` processes (ordered results) -> EOS appended to every
document -> concatenated and cut into samples of exactly ``seq_len + 1`` tokens (the tail of each split
shorter than one sample is dropped and counted) -> shards of `samples_per_shard` samples.

Each shard is written to a temporary name and renamed, then its record ``shard-NNNNNN.json`` (samples,
bytes, sha256, and the stream cursor where it starts and ends). Re-running with the same arguments reuses
every shard whose record and bytes check out and only tokenizes documents past the last finished shard of
each split; a directory prepared with another tokenizer, seq_len, source or split setting is refused.
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
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from metalm.data.errors import DataError, UnsafePathError
from metalm.data.manifest import (FORMAT, MANIFEST, PREPARE_STATE, SPLITS, TOKENIZER_FILE, VERSION, load_manifest,
                                  sample_dtype)
from metalm.data.sources import describe_source, iter_documents
from metalm.data.shards import SplitWriter, finished_shards, remove_stale
from metalm.data.tokenizer import Tokenizer, load_tokenizer
from metalm.fsutil import file_sha256, write_json_atomic

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
    texts = [doc for _, doc in items if isinstance(doc, str)]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    out = []
    for pos, doc in items:
        if isinstance(doc, str):
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
        out.append(arr.astype(dtype))
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
def _dir_lock(out_dir: Path):
    """An exclusive lock on the output directory (concurrent preparers run one after the other)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out_dir / ".prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
            max_docs: int | None = None, progress: bool = True) -> dict:
    """Tokenize `source` into packed shards under `out_dir`; return the manifest (see the module doc)."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len}: expected a positive integer")
    if samples_per_shard <= 0:
        raise DataError(f"samples_per_shard={samples_per_shard}: expected a positive integer")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    if max_docs is not None and max_docs <= 0:
        raise DataError(f"max_docs={max_docs}: expected a positive integer or None")
    tok = tokenizer_spec if isinstance(tokenizer_spec, Tokenizer) else load_tokenizer(tokenizer_spec)
    dtype = sample_dtype(tok.vocab_size)
    sample_len = seq_len + 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "seq_len": seq_len, "sample_len": sample_len, "dtype": dtype, "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size, "source": describe_source(source, text_field=text_field, text_split=text_split),
        "text_field": text_field, "text_split": text_split, "val_fraction": float(val_fraction),
        "samples_per_shard": samples_per_shard, "seed": seed, "shuffle_window": shuffle_window, "max_docs": max_docs,
    }
    with _dir_lock(out):
        state_path = out / PREPARE_STATE
        if state_path.exists():
            try:
                old = json.loads(state_path.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{state_path}: unreadable preparation record ({e}); delete {out} to start "
                                f"over") from None
            if old != config:
                raise DataError(f"{out}: refusing to mix shards: the directory was prepared with different "
                                f"settings ({_config_diff(old, config)}); use another directory or delete it")
            if (out / MANIFEST).exists():
                try:
                    man = load_manifest(out)
                    complete = all((out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"]
                                   for split in SPLITS for s in man["splits"][split]["shards"])
                except UnsafePathError as e:
                    log.warning("%s; rebuilding it from the shard records (%s)", e,
                                ", ".join(f"{split}/shard-*.json" for split in SPLITS))
                    complete = False
                except DataError:
                    complete = False
                if complete:
                    return man
        elif any(any((out / split).glob("shard-*.tar")) for split in SPLITS) or (out / MANIFEST).exists():
            raise DataError(f"{out}: holds shards or a manifest but no {PREPARE_STATE}: refusing to mix with "
                            f"shards of unknown origin; use another directory")
        write_json_atomic(state_path, {"format": FORMAT, "version": VERSION, "config": config})
        tok_path = out / TOKENIZER_FILE
        if not tok_path.is_file() or file_sha256(tok_path) != tok.hash:
            tmp = out / f".{TOKENIZER_FILE}.tmp{os.getpid()}"
            tok.save(tmp)
            os.replace(tmp, tok_path)
        (out / MANIFEST).unlink(missing_ok=True)
        return _run(source, tok, out, config, num_proc=num_proc or default_num_proc(), progress=progress)


def _run(source: str, tok: Tokenizer, out: Path, config: dict, *, num_proc: int, progress: bool) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    meta = {"format": FORMAT, "version": VERSION, "seq_len": config["seq_len"], "sample_len": config["sample_len"],
            "dtype": config["dtype"], "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash}
    writers = {}
    for split in SPLITS:
        finished = finished_shards(out / split)
        remove_stale(out / split, len(finished))
        writers[split] = SplitWriter(out, split, config["sample_len"], config["samples_per_shard"], meta, finished)
    seed, val_fraction = config["seed"], config["val_fraction"]
    docs = iter_documents(source, text_field=config["text_field"], text_split=config["text_split"])
    if config["max_docs"] is not None:
        docs = itertools.islice(docs, config["max_docs"])
    counts = {"docs": 0, "empty_docs": 0, "tokenized_docs": 0, "tokens": 0}
    bar = tqdm(unit="doc", desc=f"prepare {out.name}", disable=not progress, mininterval=1.0, smoothing=0.1)

    def batches() -> Iterator[tuple[list, list]]:
        tags, items = [], []
        for pos, (index, doc) in enumerate(window_shuffle(docs, config["shuffle_window"], seed)):
            counts["docs"] += 1
            if isinstance(doc, str) and not doc.strip() or (not isinstance(doc, str) and len(doc) == 0):
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
    try:
        for tags, arrays in encoder.map(batches()):
            for (split, pos, offset), arr in zip(tags, arrays):
                writers[split].add(pos, arr, offset)
                counts["tokens"] += len(arr)
            counts["tokenized_docs"] += len(tags)
            bar.update(len(tags))
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{counts['tokens'] / elapsed:,.0f} tok/s", refresh=False)
    finally:
        encoder.close()
        bar.close()
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
    write_json_atomic(out / MANIFEST, manifest)
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
    out = Path(d.shards)
    man = None
    if (out / MANIFEST).exists():
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
        raise DataError(f"data.shards={d.shards}: no {MANIFEST}; run metalm-prepare --source {d.source} "
                        f"--tokenizer {d.tokenizer} --seq-len {seq_len} --out {d.shards}, or set "
                        f"data.prepare_if_missing=true")
    else:
        man = prepare(d.source, d.tokenizer, out, seq_len, val_fraction=float(d.val_fraction),
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
    p.add_argument("--source", help=f"builtin, or a file/dir/glob of jsonl, txt, parquet or a saved HF dataset "
                   f"(default {d.source})")
    p.add_argument("--tokenizer", help=f"builtin:olmo, tokenizers JSON, HF folder or hub name (default {d.tokenizer})")
    p.add_argument("--out", help=f"output directory (default {d.shards})")
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
    args = _parser().parse_args(argv)
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
            max_docs=args.max_docs, progress=not args.no_progress)
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
