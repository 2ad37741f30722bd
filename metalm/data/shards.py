"""Packing token streams into fixed-length samples and writing them as WebDataset shards.

A shard is a plain tar: ``__meta__.json``, then one ``NNNNNN.npy`` member per ``seq_len + 1`` sample, written
to a temporary name and renamed; its record ``shard-NNNNNN.json`` (samples, bytes, sha256, stream cursors) follows,
so a shard without a record, or whose bytes differ from it, is not finished and is rewritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import itertools
import tarfile
from collections import deque
from pathlib import Path

import numpy as np

from metalm.fsutil import file_sha256, write_atomic, write_json_atomic


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


def npy_header(sample_len: int, dtype: str) -> bytes:
    """The .npy header of a 1-D array of `sample_len` `dtype` values (identical for every sample)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(sample_len, dtype=dtype), allow_pickle=False)
    data = buf.getvalue()
    return data[: len(data) - sample_len * np.dtype(dtype).itemsize]


def tar_member(out: list, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: same input and arguments give the same shard sha256
    info.mode = 0o444
    info.uname = info.gname = "metalm"
    out.append(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    out.append(data)
    out.append(b"\0" * (-len(data) % tarfile.BLOCKSIZE))


def write_shard(path: Path, samples: list[np.ndarray], meta: dict) -> tuple[int, str]:
    """Write a shard tar (``__meta__.json`` then ``NNNNNN.npy`` samples) atomically; return (bytes, sha256).

    The layout is WebDataset's (members grouped by key, ``<key>.<ext>``), a plain USTAR archive: headers
    come from `tarfile.TarInfo` and are laid out here directly (tarfile's writer costs ~0.2 ms per member;
    webdataset's TarWriter would also import torch into the tokenizer processes).
    """
    header = npy_header(meta["sample_len"], meta["dtype"])
    parts: list = []
    tar_member(parts, "__meta__.json", json.dumps(meta, sort_keys=True).encode())
    for i, sample in enumerate(samples):
        tar_member(parts, f"{i:06d}.npy", header + sample.tobytes())
    size = sum(len(x) for x in parts) + 2 * tarfile.BLOCKSIZE  # end of archive: two zero blocks
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))  # padded like tarfile does
    data = b"".join(parts)
    write_atomic(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


class SplitWriter:
    def __init__(self, out_dir: Path, split: str, sample_len: int, samples_per_shard: int, meta: dict,
                 finished: list[dict]):
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.samples_per_shard = samples_per_shard
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
        nbytes, sha = write_shard(self.dir / name, self.pending, dict(self.meta, shard=index, samples=n))
        record = {"path": f"{self.split}/{name}", "samples": n, "tokens": n * self.packer.sample_len,
                  "bytes": nbytes, "sha256": sha, "start": self.pending_start, "end": self.packer.cursor()}
        write_json_atomic(self.dir / f"shard-{index:06d}.json", record)
        self.shards.append(record)
        self.pending = []
        self.pending_start = None


def finished_shards(split_dir: Path) -> list[dict]:
    """The longest prefix of shards whose record exists and whose tar matches it (size and sha256)."""
    out: list[dict] = []
    for index in itertools.count():
        rec_path = split_dir / f"shard-{index:06d}.json"
        tar_path = split_dir / f"shard-{index:06d}.tar"
        try:
            rec = json.loads(rec_path.read_text())
            ok = (tar_path.stat().st_size == rec["bytes"] and file_sha256(tar_path) == rec["sha256"]
                  and rec["path"] == f"{split_dir.name}/{tar_path.name}")
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        out.append(rec)
    return out


def remove_stale(split_dir: Path, keep: int) -> None:
    if not split_dir.is_dir():
        return
    for p in split_dir.iterdir():
        name = p.name
        if name.startswith(".shard-") and ".tmp" in name:
            p.unlink()
        elif name.startswith("shard-") and name.endswith((".tar", ".json")):
            try:
                index = int(name[6:12])
            except ValueError:
                continue
            if index >= keep:
                p.unlink()
