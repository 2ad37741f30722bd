"""Packing token streams into fixed-length samples and writing them as WebDataset shards.

A shard (format version 2) is a plain tar of ``NNNNNN.npy`` members, each a block of ``samples_per_member``
samples of ``seq_len + 1`` tokens (a 2-D array; the last block of a shard may be shorter), written atomically
through the storage layer (a temporary name and a rename locally; one complete object in a bucket). Its record
``shard-NNNNNN.json`` (samples, bytes, sha256, stream cursors) follows, so a shard without a record, or whose
bytes differ from it, is not finished and is rewritten.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from collections import deque

import numpy as np

from metalm.storage import Store


class Packer:
    """Concatenates document token arrays and cuts fixed-length samples, tracking the stream cursor."""

    def __init__(self, sample_len: int, dtype: str):
        self.sample_len, self.dtype = sample_len, dtype
        self.chunks: deque = deque()  # [stream position, offset into the doc, remaining tokens]
        self.available = 0
        self.last_pos = -1

    def add(self, pos: int, tokens: np.ndarray, offset: int) -> None:
        part = tokens[offset:]
        if len(part):
            self.chunks.append([pos, offset, part])
            self.available += len(part)
        self.last_pos = pos

    def cursor(self) -> list[int]:
        """Where the next sample starts: [stream position of the doc, token offset in it]."""
        if self.chunks:
            return [int(self.chunks[0][0]), int(self.chunks[0][1])]
        return [self.last_pos + 1, 0]

    def take(self) -> np.ndarray:
        out = np.empty(self.sample_len, dtype=self.dtype)
        filled = 0
        while filled < self.sample_len:
            chunk = self.chunks[0]
            part = chunk[2]
            k = min(self.sample_len - filled, len(part))
            out[filled:filled + k] = part[:k]
            filled += k
            if k == len(part):
                self.chunks.popleft()
            else:
                chunk[1] += k
                chunk[2] = part[k:]
        self.available -= self.sample_len
        return out


def npy_header(sample_len: int, dtype: str, rows: int | None = None) -> bytes:
    """The .npy header of a 1-D array of `sample_len` `dtype` values (identical for every sample), or with
    `rows`, of a (rows, sample_len) block."""
    shape = (sample_len,) if rows is None else (rows, sample_len)
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
    data = buf.getvalue()
    return data[: len(data) - int(np.prod(shape)) * np.dtype(dtype).itemsize]


def tar_member(out: list, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: same input and arguments give the same shard sha256
    info.mode = 0o444
    info.uname = info.gname = "metalm"
    out.append(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    out.append(data)
    out.append(b"\0" * (-len(data) % tarfile.BLOCKSIZE))


def shard_bytes(samples: list[np.ndarray], sample_len: int, dtype: str, per_member: int) -> bytes:
    """The tar of `samples` in blocks of `per_member` (format version 2).

    The layout is WebDataset's (members grouped by key, ``<key>.<ext>``), a plain USTAR archive: headers
    come from `tarfile.TarInfo` and are laid out here directly (tarfile's writer costs ~0.2 ms per member;
    webdataset's TarWriter would also import torch into the tokenizer processes).
    """
    parts: list = []
    for key, lo in enumerate(range(0, len(samples), per_member)):
        block = np.stack(samples[lo:lo + per_member]).astype(dtype, copy=False)
        tar_member(parts, f"{key:06d}.npy", npy_header(sample_len, dtype, rows=len(block)) + block.tobytes())
    size = sum(len(x) for x in parts) + 2 * tarfile.BLOCKSIZE  # end of archive: two zero blocks
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))  # padded like tarfile does
    return b"".join(parts)


class SplitWriter:
    def __init__(self, store: Store, split: str, sample_len: int, samples_per_shard: int, meta: dict,
                 finished: list[dict], samples_per_member: int):
        self.store = store
        store.makedirs(split)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.samples_per_member = samples_per_member
        self.meta = dict(meta, split=split)
        self.shards = list(finished)
        self.reused = len(finished)
        self.resume = finished[-1]["end"] if finished else [0, 0]
        self.packer = Packer(sample_len, meta["dtype"])
        self.pending: list[np.ndarray] = []
        self.pending_start: list[int] | None = None
        self.docs = 0

    def offset_for(self, pos: int) -> int | None:
        """Token offset at which doc `pos` still needs packing, or None when finished shards hold it all."""
        if pos < self.resume[0]:
            return None
        return self.resume[1] if pos == self.resume[0] else 0

    def add(self, pos: int, tokens: np.ndarray, offset: int) -> None:
        self.packer.add(pos, tokens, offset)
        while self.packer.available >= self.packer.sample_len:
            if not self.pending:
                self.pending_start = self.packer.cursor()
            self.pending.append(self.packer.take())
            if len(self.pending) == self.samples_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(self.shards)
        name = f"shard-{index:06d}.tar"
        n = len(self.pending)
        data = shard_bytes(self.pending, self.packer.sample_len, self.meta["dtype"], self.samples_per_member)
        self.store.write_bytes(f"{self.split}/{name}", data)
        record = {"path": f"{self.split}/{name}", "samples": n, "tokens": n * self.packer.sample_len,
                  "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "start": self.pending_start,
                  "end": self.packer.cursor()}
        self.store.write_bytes(f"{self.split}/shard-{index:06d}.json",
                               (json.dumps(record, indent=1) + "\n").encode())
        self.shards.append(record)
        self.pending = []
        self.pending_start = None


def finished_shards(store: Store, split: str) -> list[dict]:
    """The longest prefix of shards whose record exists and whose tar matches it: size and sha256 in a local
    directory; size in a bucket (each object there appeared complete, and its record was written after it)."""
    out: list[dict] = []
    for index in itertools.count():
        rec_rel, tar_rel = f"{split}/shard-{index:06d}.json", f"{split}/shard-{index:06d}.tar"
        try:
            rec = json.loads(store.read_bytes(rec_rel))
            ok = store.size(tar_rel) == rec["bytes"] and rec["path"] == tar_rel
            if ok and store.local:
                ok = hashlib.sha256(store.read_bytes(tar_rel)).hexdigest() == rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        out.append(rec)
    return out


def remove_stale(store: Store, split: str, keep: int) -> None:
    """Remove temporary files and the shards (and records) from index `keep` on: what an interrupted run left."""
    for name in store.list(split):
        if name.startswith(".shard-") and ".tmp" in name:
            store.remove(f"{split}/{name}")
        elif name.startswith("shard-") and name.endswith((".tar", ".json")):
            try:
                index = int(name[6:12])
            except ValueError:
                continue
            if index >= keep:
                store.remove(f"{split}/{name}")
