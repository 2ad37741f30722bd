"""The training stream: prepared shards -> `torch.LongTensor` batches of shape (micro_batch, seq_len + 1).

Order. Each epoch lays the shards out in a seeded order (the shard order is a permutation of (seed, epoch)),
and the samples of each shard in a seeded in-shard order (a permutation of (seed, epoch, shard)); this gives a
virtual sequence of the N samples of a split. Documents were already shuffled across the corpus when the shards
were prepared.

Train: one global sample order, whatever the processes. Epoch 0's sequence, then epoch 1's, ... form one
infinite global sequence; optimizer step s (counted from the loader's start position P) reads its positions
``[P + s*G, P + (s+1)*G)``, G = the global batch. Micro-batch a (of `accum`) of rank r takes the `micro_batch`
positions that start at ``P + s*G + (a*world_size + r)*micro_batch``. So any split of G into processes x
accumulation x micro-batch draws the same samples for the same step, each epoch reads every sample exactly once,
and a batch may span two epochs. With workers, worker w of a rank builds that rank's micro-batches w, w + W, ...
(W = num_workers), handed out round-robin. Since every step's G positions interleave the micro-batches of all
ranks, every rank, and every worker of a rank, reads (for remote shards: downloads and checks) every shard of
the split each epoch, using only its own samples of it.

Val: one pass without shuffling, in slots: every (rank, worker) pair is a slot ``j = rank * W + worker`` and
reads a contiguous range of the sequence. Every rank gets the same number of samples, N // world_size (the last
N % world_size samples are left out), split among its workers the same way on every rank, so all ranks run the
same number of val batches (collectives inside the forward, e.g. ZeRO-3, cannot hang); the last batch of a worker
may be smaller.

Resume. The train state is the global position of the next step (`samples`, the same on every rank) and the
global batch it was read with. It is counted in the main process from the micro-batches actually handed out
(prefetched ones do not count), is JSON-serialisable, and a loader restored from it, with any world size,
micro-batch and workers but the same global batch, yields exactly the samples the uninterrupted run would have
read at every step. With another global batch it continues from the same position (no sample repeated or
skipped), with a warning. Only the shard under the cursor is read again on resume: whole shards before it are
skipped without being opened.

Storage. The shards directory is any location of `metalm.storage`: a local directory (read in place), or a URL
(s3://, gs://, https://, pipe:...). Remote shards are downloaded whole, checked (size, sha256), and parsed in
memory; each reader downloads the next `read_ahead` shards of its own stream in background threads while it
reads the current one (the stream's shard order is known in advance, so this changes nothing in what is read,
nor in the resume state), and with `cache_dir` keeps them on local disk for the next epoch or run. A download
that fails (a dropped connection, a short or corrupted transfer) is retried `retries` times with exponential
backoff, then raises DataError naming the shard.

Checks. A shard whose size or sha256 differs from the manifest (truncated, modified), that is not a valid
tar, or whose sample count differs, raises DataError naming the shard; so does, in format version 1, a
``__meta__.json`` that disagrees with the manifest (tokenizer hash, seq_len, dtype). A sample of the wrong
length or dtype or with a token id >= vocab_size raises DataError naming the shard and sample, or, with
on_bad_sample="skip", is skipped and counted (`ShardLoader.skipped`); in train, its micro-batch is then that
much smaller (the step's other samples stay where the global order puts them).

Record. With `record` (a file path), the train loader appends one JSON line per micro-batch it hands out:
``{"position": its first global position, "ids": [the global id of each sample]}``, a sample's id being its
index in the split in manifest order (shard by shard). data.record_samples turns it on for a training run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import tokenize
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metalm.config import ON_BAD_SAMPLE
from metalm.data.errors import DataError, UnsafePathError, parse_json
from metalm.data.manifest import SPLITS, read_manifest, validation_problem
from metalm.data.shards import npy_header
from metalm.fsutil import write_atomic
from metalm.storage import LocalStore, Store, StorageError, cache_path, describe, open_store, retry

log = logging.getLogger("metalm.data")
STATE_VERSION = 2  # 2: the global sample order (1: per-rank slots)
_SPLIT_CODE = {"train": 0, "val": 1}
READ_AHEAD = 2  # remote shards a reader downloads ahead of the one it reads
RETRIES = 4  # attempts after the first for a shard download
RETRY_BACKOFF_S = 1.0  # first wait before a retry; doubles each time (at most 30 s)


class _Plan:
    """Which samples a slot reads, in which order, for every epoch (pure function of the arguments)."""

    def __init__(self, manifest: dict, split: str, world_size: int, workers: int, seed: int, shuffle: bool,
                 equal_ranks: bool = False):
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.first_id = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # a shard's first sample id
        self.world_size, self.workers = world_size, workers
        self.slots = world_size * workers
        self.equal_ranks = equal_ranks
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self._layout_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def slot_range(self, slot: int) -> tuple[int, int]:
        if self.equal_ranks:
            rank, worker = divmod(slot, self.workers)
            per_rank = self.num_samples // self.world_size
            base = rank * per_rank
            return base + worker * per_rank // self.workers, base + (worker + 1) * per_rank // self.workers
        return slot * self.num_samples // self.slots, (slot + 1) * self.num_samples // self.slots

    def slot_size(self, slot: int) -> int:
        lo, hi = self.slot_range(slot)
        return hi - lo

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start offset of each ordered shard in the virtual sequence) for `epoch`."""
        cache = self._layout_cache  # one read: a reader's prefetch may ask for another epoch's layout meanwhile
        if cache is None or cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, _SPLIT_CODE[self.split]]).permutation(len(self.counts))
            else:
                order = np.arange(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
            cache = self._layout_cache = (epoch, order, starts)
        return cache[1], cache[2]

    def in_shard_order(self, epoch: int, shard: int) -> np.ndarray:
        n = int(self.counts[shard])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, shard, 1 + _SPLIT_CODE[self.split]]).permutation(n)

    def stream(self, slot: int, start: int, infinite: bool) -> Iterator[tuple[int, int, int]]:
        """(position after this sample, shard index, sample index in the shard) from stream position `start`."""
        lo, hi = self.slot_range(slot)
        size = hi - lo
        if size == 0:
            return
        pos = start
        while True:
            epoch, offset = divmod(pos, size)
            if not infinite and epoch >= 1:
                return
            order, starts = self.layout(epoch)
            v = lo + offset
            k = int(np.searchsorted(starts, v, side="right")) - 1
            while v < hi:
                shard = int(order[k])
                s0 = int(starts[k])
                end = min(hi, s0 + int(self.counts[shard]))
                perm = self.in_shard_order(epoch, shard)
                for u in range(v, end):
                    pos += 1
                    yield pos, shard, int(perm[u - s0])
                v = end
                k += 1

    def shard_sequence(self, slot: int, start: int, infinite: bool) -> Iterator[int]:
        """The shards `stream(slot, start, infinite)` reads, in order, each run of the same shard once: what a
        reader downloads ahead."""
        lo, hi = self.slot_range(slot)
        size = hi - lo
        if size == 0:
            return
        pos, last, quiet = start, None, 0
        while True:
            epoch, offset = divmod(pos, size)
            if not infinite and epoch >= 1:
                return
            if quiet > 64:  # a slot inside one shard epoch after epoch (e.g. a single shard): the cache serves it
                return
            quiet += 1
            order, starts = self.layout(epoch)
            v = lo + offset
            k = int(np.searchsorted(starts, v, side="right")) - 1
            while v < hi:
                shard = int(order[k])
                end = min(hi, int(starts[k]) + int(self.counts[shard]))
                if shard != last:
                    yield shard
                    last, quiet = shard, 0
                pos += end - v
                v = end
                k += 1


class _Shard:
    """A parsed shard: per sample, its raw .npy bytes (format 1), its row (format 2), or why it is unreadable."""

    __slots__ = ("data", "index", "names", "path")

    def __init__(self, index: int, path: str, names: list[str], data: list):
        self.index, self.path, self.names, self.data = index, path, names, data


class _Retry(Exception):
    """A download that came back incomplete or corrupted: tried again."""


class _Prefetcher:
    """Downloads the shards a reader will read next (`sequence`, in order), `depth` ahead, each in a daemon
    thread (an abandoned download never holds up the process's exit); `get(index)` hands one over (downloading
    it now if it was not foreseen)."""

    def __init__(self, fetch: Callable[[int], bytes], sequence: Iterator[int], depth: int):
        self.fetch, self.sequence, self.depth = fetch, sequence, depth
        self.pending: deque = deque()  # (shard index, Future)
        self.exhausted = False

    def _start(self, index: int) -> Future:
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(self.fetch(index))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
                fut.set_exception(e)

        threading.Thread(target=run, name=f"metalm-shard-{index}", daemon=True).start()
        return fut

    def _fill(self) -> None:
        while len(self.pending) < self.depth and not self.exhausted:
            try:
                index = next(self.sequence)
            except StopIteration:
                self.exhausted = True
                return
            self.pending.append((index, self._start(index)))

    def get(self, index: int) -> bytes:
        self._fill()
        if not any(i == index for i, _ in self.pending):
            return self.fetch(index)
        while self.pending[0][0] != index:
            self.pending.popleft()
        fut = self.pending.popleft()[1]
        self._fill()  # the next ones download while the caller reads this one
        return fut.result()

    def close(self) -> None:
        self.pending.clear()  # running downloads finish on their own; nothing waits for them


class _ShardReader:
    """Reads (downloads) and checks shards (one cached), decodes and validates samples."""

    def __init__(self, store: Store, manifest: dict, split: str, *, verify: bool, on_bad_sample: str,
                 cache_dir: str | None = None, read_ahead: int = READ_AHEAD, retries: int = RETRIES,
                 backoff: float = RETRY_BACKOFF_S):
        self.store = store
        self.local = isinstance(store, LocalStore)
        if self.local:
            self.dir = store.root
            self.real_dir = Path(os.path.realpath(store.root))
        self.manifest = manifest
        self.version = manifest["version"]
        self.per_member = manifest.get("samples_per_member", 1)
        self.split = split
        self.records = manifest["splits"][split]["shards"]
        self.verify = verify
        self.skip_bad = on_bad_sample == "skip"
        self.sample_len = manifest["sample_len"]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["vocab_size"]
        self.header = npy_header(self.sample_len, manifest["dtype"])
        self.expected_bytes = len(self.header) + self.sample_len * self.dtype.itemsize
        self.cache_dir = cache_dir or None
        self.read_ahead, self.retries, self.backoff = read_ahead, retries, backoff
        self._prefetch: _Prefetcher | None = None
        self._cached: _Shard | None = None
        self._headers: dict[int, bytes] = {}

    # -- where the bytes come from
    def follow(self, sequence: Iterator[int]) -> None:
        """The shards this reader will load, in order: remote ones are downloaded `read_ahead` ahead."""
        self.close()
        if not self.local and self.read_ahead > 0:
            self._prefetch = _Prefetcher(self._fetch, sequence, self.read_ahead)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def _where(self, index: int) -> str:
        rel = self.records[index]["path"]
        return str(self.dir / rel) if self.local else self.store.url(rel)

    def _read_local(self, index: int) -> bytes:
        rec = self.records[index]
        path = self.dir / rec["path"]
        real = self._inside(path)
        try:
            data = real.read_bytes()
        except OSError as e:
            raise DataError(f"shard {path}: cannot read: {e.strerror or e}") from None
        self._check_bytes(index, data, DataError)
        return data

    def _check_bytes(self, index: int, data: bytes, error: type) -> None:
        rec, where = self.records[index], self._where(index)
        if len(data) != rec["bytes"]:
            raise error(f"shard {where}: {len(data)} bytes, the manifest says {rec['bytes']} (truncated or "
                        f"modified; re-run metalm-prepare)")
        if self.verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise error(f"shard {where}: sha256 differs from the manifest (corrupted or modified; re-run "
                        f"metalm-prepare)")

    def _fetch(self, index: int) -> bytes:
        """A remote shard's bytes, checked: from the cache directory, else downloaded (with retries)."""
        if self.local:
            return self._read_local(index)
        rel, where = self.records[index]["path"], self._where(index)
        cached = cache_path(self.cache_dir, self.store.location, rel) if self.cache_dir else None
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
            try:
                self._check_bytes(index, data, _Retry)
                return data
            except _Retry as e:
                log.warning("cached copy %s of %s is unusable (%s); downloading it again", cached, where,
                            str(e).split(": ", 1)[-1])
                cached.unlink(missing_ok=True)

        def attempt() -> bytes:
            data = self.store.read_bytes(rel)
            self._check_bytes(index, data, _Retry)
            return data

        def on_retry(n: int, e: BaseException, wait: float) -> None:
            log.warning("shard %s: download failed (%s); retry %d of %d in %.1f s", where,
                        str(e).split(": ", 1)[-1] if isinstance(e, _Retry) else describe(e), n, self.retries, wait)

        try:
            data = retry(attempt, attempts=self.retries + 1, what=where, backoff=self.backoff,
                         give_up_on=(FileNotFoundError, PermissionError, StorageError), on_retry=on_retry)
        except FileNotFoundError:
            raise DataError(f"shard {where}: not found, although the manifest lists it (deleted, or the manifest "
                            f"belongs to another preparation)") from None
        except _Retry as e:
            raise DataError(f"{e} (after {self.retries + 1} downloads)") from None
        except Exception as e:  # noqa: BLE001 - any client error: the shard and the reason, one line
            raise DataError(f"shard {where}: download failed after {self.retries + 1} attempts: "
                            f"{describe(e)}") from None
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, data)
        return data

    # -- parsing
    def load(self, index: int) -> _Shard:
        if self._cached is not None and self._cached.index == index:
            return self._cached
        data = self._prefetch.get(index) if self._prefetch is not None else self._fetch(index)
        self._cached = self._parse(index, data)
        return self._cached

    def _parse(self, index: int, data: bytes) -> _Shard:
        import webdataset as wds

        rec, path = self.records[index], self._where(index)
        keys: list[str] = []
        blobs: list[bytes] = []
        meta = None
        try:
            for entry in wds.tariterators.tar_file_iterator(io.BytesIO(data), skip_meta=None):
                name = entry["fname"]
                _check_member_name(path, name)
                if name == "__meta__.json" and self.version == 1:
                    meta = parse_json(entry["data"], f"shard {path}: member __meta__.json")
                    if not isinstance(meta, dict):
                        raise DataError(f"shard {path}: member __meta__.json is not a JSON object")
                    continue
                key, _, ext = name.partition(".")
                if ext != "npy":
                    raise DataError(f"shard {path}: unexpected member {name!r} (expected <key>.npy)")
                keys.append(key)
                blobs.append(entry["data"])
        except DataError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"shard {path}: not a valid tar ({type(e).__name__}: {e})") from None
        if self.version == 1:
            if meta is None:
                raise DataError(f"shard {path}: no __meta__.json (not written by metalm-prepare)")
            for field in ("tokenizer_hash", "seq_len", "dtype", "vocab_size"):
                if meta.get(field) != self.manifest[field]:
                    what = "tokenizer hash mismatch" if field == "tokenizer_hash" else f"{field} mismatch"
                    raise DataError(f"shard {path}: {what}: the shard says {str(meta.get(field))[:16]!r}, the "
                                    f"manifest {str(self.manifest[field])[:16]!r} (shards from another preparation?)")
            names, samples = keys, blobs
        else:
            names, samples = self._blocks(path, rec["samples"], keys, blobs)
        if len(samples) != rec["samples"]:
            raise DataError(f"shard {path}: {len(samples)} samples, the manifest says {rec['samples']}")
        return _Shard(index, path, names, samples)

    def _blocks(self, path: str, total: int, keys: list[str], blobs: list[bytes]) -> tuple[list, list]:
        """Format 2: the rows of each block member (a view each), or, for a block that does not decode as a
        (rows, sample_len) array of the manifest's dtype, the reason, once per row it should hold."""
        names: list[str] = []
        rows: list = []
        for b, (key, raw) in enumerate(zip(keys, blobs)):
            expect = max(0, min(self.per_member, total - b * self.per_member))
            header = self._block_header(expect)
            block, why = None, None
            if expect and len(raw) == len(header) + expect * self.sample_len * self.dtype.itemsize \
                    and raw.startswith(header):
                block = np.frombuffer(raw, dtype=self.dtype, offset=len(header)).reshape(expect, self.sample_len)
            else:
                arr, why = _load_npy(raw)
                if arr is not None:
                    if arr.dtype != self.dtype:
                        why = f"dtype {arr.dtype}, expected {self.dtype}"
                    elif arr.ndim != 2 or arr.shape[1] != self.sample_len:
                        why = f"shape {arr.shape}, expected (rows, {self.sample_len}) = (rows, seq_len + 1)"
                    else:
                        block = arr
            count = len(block) if block is not None else expect
            for r in range(count):
                names.append(f"{len(rows)} (member {key}.npy row {r})")
                rows.append(block[r] if block is not None else f"member {key}.npy: {why}")
        return names, rows

    def _block_header(self, rows: int) -> bytes:
        if rows not in self._headers:
            self._headers[rows] = npy_header(self.sample_len, self.dtype.str, rows=rows) if rows else b""
        return self._headers[rows]

    def _inside(self, path: Path) -> Path:
        """The real path of shard `path`, which must lie inside the (real) shard directory; symlinks inside it are
        followed, a symlink (of the shard, or of a directory on the way) that leads out of it is refused."""
        real = Path(os.path.realpath(path))  # never raises: a loop or a dangling link fails at the read
        if real.is_relative_to(self.real_dir):
            return real
        how = (f"a symlink to {real}" if path.is_symlink() else f"resolves to {real} through a symlinked directory")
        raise UnsafePathError(f"shard {path}: {how}, outside the shard directory {self.real_dir}; refusing to read it",
                              where=str(path), path=str(real))

    def sample(self, shard: _Shard, r: int) -> np.ndarray | None:
        """The r-th sample of `shard`, validated; None if it is bad and bad samples are skipped."""
        raw = shard.data[r]
        if isinstance(raw, str):
            return self._bad(shard, r, raw)
        if isinstance(raw, np.ndarray):
            arr = raw
        elif len(raw) == self.expected_bytes and raw.startswith(self.header):
            arr = np.frombuffer(raw, dtype=self.dtype, offset=len(self.header))
        else:
            arr, why = _load_npy(raw)
            if arr is None:
                return self._bad(shard, r, why)
            if arr.dtype != self.dtype:
                return self._bad(shard, r, f"dtype {arr.dtype}, expected {self.dtype}")
            if arr.shape != (self.sample_len,):
                return self._bad(shard, r, f"shape {arr.shape}, expected ({self.sample_len},) = seq_len + 1")
        if int(arr.max()) >= self.vocab_size or (self.dtype.kind == "i" and int(arr.min()) < 0):
            bad = arr[(arr >= self.vocab_size) | (arr < 0)][0]
            return self._bad(shard, r, f"token id {int(bad)} outside the vocabulary [0, {self.vocab_size})")
        return arr

    def _bad(self, shard: _Shard, r: int, why: str) -> None:
        name = shard.names[r]
        msg = f"shard {shard.path} sample {name if self.version >= 2 else repr(name)}: {why}"
        if not self.skip_bad:
            raise DataError(msg)
        log.warning("skipping bad sample: %s", msg)
        return None


# What np.load raises for malformed .npy bytes: a bad magic, version or length (ValueError), a header that does
# not parse as a literal (SyntaxError, TokenError) or compares badly (TypeError), truncated data (EOFError, OSError).
_NPY_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError, EOFError, OSError)


def _load_npy(raw: bytes) -> tuple[np.ndarray | None, str | None]:
    """The array in .npy bytes, or None and why they are not one."""
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False), None
    except _NPY_ERRORS as e:
        return None, f"not a valid .npy array ({type(e).__name__}: {e})"


def _check_member_name(shard: Path, name: str) -> None:
    """Refuse a tar member whose name would leave the shard if extracted (absolute, or with a '..' component)."""
    if name.startswith("/"):
        why = "an absolute path"
    elif ".." in name.split("/"):
        why = "a path with a '..' component"
    else:
        return
    raise UnsafePathError(f"shard {shard}: member {name!r} is {why}, expected <key>.npy or __meta__.json inside the "
                          f"shard; refusing the shard", where=str(shard), path=name)


def _batches(plan: _Plan, reader: _ShardReader, slot: int, start: int, skipped: int, infinite: bool,
             micro_batch: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """(int64 batch, stream position after it, skipped count so far) for one slot.

    A finite stream that ends with skipped samples and no batch left yields (None, pos, skipped) last.
    """
    buf: list[np.ndarray] = []
    pos = start
    reported = skipped
    reader.follow(plan.shard_sequence(slot, start, infinite))
    try:
        for pos, shard_index, r in plan.stream(slot, start, infinite):
            arr = reader.sample(reader.load(shard_index), r)
            if arr is None:
                skipped += 1
                continue
            buf.append(arr)
            if len(buf) == micro_batch:
                yield np.stack(buf).astype(np.int64), pos, skipped
                reported = skipped
                buf = []
        if buf:
            yield np.stack(buf).astype(np.int64), pos, skipped
        elif skipped != reported:
            yield None, pos, skipped
    finally:
        reader.close()


def _micro_positions(geometry: tuple[int, int, int, int, int], first: int, stride: int) -> Iterator[int]:
    """The first global position of micro-batches first, first + stride, ... of a rank, whose geometry is
    (start position, global batch, accum, world size x micro_batch, rank x micro_batch)."""
    start, global_batch, accum, row, offset = geometry
    k = first
    while True:
        step, a = divmod(k, accum)
        yield start + step * global_batch + a * row + offset
        k += stride


def _shards_at(plan: _Plan, q: int, micro_batch: int) -> Iterator[int]:
    """The shards that global positions [q, q + micro_batch) of `plan` (one slot spanning the split) read, in
    order (each run once); what `plan.stream(0, q, True)` reads, without shuffling inside the shards."""
    n, end = plan.num_samples, q + micro_batch
    while q < end:
        epoch, offset = divmod(q, n)
        order, starts = plan.layout(epoch)
        k = int(np.searchsorted(starts, offset, side="right")) - 1
        shard = int(order[k])
        yield shard
        q = min(end, epoch * n + int(starts[k]) + int(plan.counts[shard]))


def _shards_of(plan: _Plan, positions: Iterator[int], micro_batch: int) -> Iterator[int]:
    """The shards the micro-batches at `positions` read, in order, each run of the same shard once: what a reader
    downloads ahead. Ends once a whole epoch of positions goes by without another shard (a single-shard split,
    or a rank that keeps missing the other shards): the reader's cache serves that shard, and a shard it did not
    foresee is downloaded when it is read."""
    last, since = None, None
    for q in positions:
        for shard in _shards_at(plan, q, micro_batch):
            if shard != last:
                yield shard
                last, since = shard, q
        if q - since > plan.num_samples:
            return


def _global_batches(plan: _Plan, reader: _ShardReader, positions: Callable[[], Iterator[int]],
                    micro_batch: int) -> Iterator[tuple[np.ndarray | None, int, list[int], int]]:
    """(int64 batch or None when every sample was bad, first global position, sample ids, bad samples skipped)
    of each micro-batch at `positions()` in the global order of `plan` (one slot spanning the whole split)."""
    reader.follow(_shards_of(plan, positions(), micro_batch))
    try:
        for q in positions():
            rows, ids, bad = [], [], 0
            for _, shard, r in islice(plan.stream(0, q, True), micro_batch):
                arr = reader.sample(reader.load(shard), r)
                if arr is None:
                    bad += 1
                    continue
                rows.append(arr)
                ids.append(int(plan.first_id[shard]) + r)
            yield (np.stack(rows).astype(np.int64) if rows else None), q, ids, bad
    finally:
        reader.close()


class _WorkerStreams(IterableDataset):
    """DataLoader dataset. Val: worker i serves slot (rank, i) of the plan. Train: worker i builds the rank's
    micro-batches first + i, first + i + W, ... of the global order."""

    def __init__(self, loader: ShardLoader, first: int):
        self.args = (loader.store, loader.manifest, loader.split, loader.world_size, loader.workers,
                     loader.seed, loader.shuffle, loader.verify, loader.on_bad_sample)
        self.fetch = loader._fetch_settings
        self.rank, self.micro_batch, self.infinite = loader.rank, loader.micro_batch, loader.infinite
        self.geometry, self.first = loader._geometry(), first

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        store, manifest, split, world_size, workers, seed, shuffle, verify, on_bad = self.args
        reader = _ShardReader(store, manifest, split, verify=verify, on_bad_sample=on_bad, **self.fetch)
        if self.infinite:
            plan = _Plan(manifest, split, 1, 1, seed, shuffle)
            positions = lambda: _micro_positions(self.geometry, self.first + wid, workers)
            for batch, q, ids, bad in _global_batches(plan, reader, positions, self.micro_batch):
                yield {"tokens": None if batch is None else torch.from_numpy(batch), "position": q, "ids": ids,
                       "bad": bad, "worker": wid}
            return
        plan = _Plan(manifest, split, world_size, workers, seed, shuffle, equal_ranks=True)
        for batch, _, skipped in _batches(plan, reader, self.rank * workers + wid, 0, 0, False, self.micro_batch):
            yield {"tokens": None if batch is None else torch.from_numpy(batch), "skipped": skipped, "worker": wid}


class ShardLoader:
    """Iterate batches of a prepared split for one rank; see the module doc for the guarantees.

    Train (``split="train"``): an infinite iterator of this rank's micro-batches of the global order (steps of
    `global_batch` samples, accumulation global_batch / (micro_batch x world_size)); calling `iter()` again
    continues where the last batch handed out left off. Val: one finite pass in a fixed order, restarted by
    every `iter()`.
    """

    def __init__(self, shards_dir: str | Path, *, split: str = "train", seq_len: int, micro_batch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 on_bad_sample: str = "error", verify: bool = True, expected_tokenizer_hash: str | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, mp_context: str | None = None,
                 cache_dir: str | None = None, read_ahead: int = READ_AHEAD, retries: int = RETRIES,
                 retry_backoff_s: float = RETRY_BACKOFF_S, global_batch: int | None = None,
                 record: str | Path | None = None):
        if split not in SPLITS:
            raise DataError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
        if micro_batch <= 0:
            raise DataError(f"micro_batch={micro_batch}: expected a positive integer")
        global_batch = micro_batch * world_size if global_batch is None else int(global_batch)
        if global_batch <= 0 or global_batch % (micro_batch * world_size):
            raise DataError(f"global_batch={global_batch}: expected a positive multiple of micro_batch x world_size "
                            f"= {micro_batch} x {world_size}")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers}: expected >= 0")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise DataError(f"on_bad_sample={on_bad_sample!r}: expected {' or '.join(ON_BAD_SAMPLE)}")
        if read_ahead < 0 or retries < 0:
            raise DataError(f"read_ahead={read_ahead}, retries={retries}: expected integers >= 0")
        try:
            self.store = open_store(shards_dir)
        except OSError as e:
            raise DataError(describe(e)) from None
        self._manifest_dir = self.store.root if isinstance(self.store, LocalStore) else self.store.location
        self.manifest, self._tokenizer_bytes = read_manifest(self.store,
                                                             expected_tokenizer_hash=expected_tokenizer_hash)
        self.cache_dir = str(cache_dir) if cache_dir else None
        self._fetch_settings = {"cache_dir": self.cache_dir, "read_ahead": int(read_ahead), "retries": int(retries),
                                "backoff": float(retry_backoff_s)}
        if self.manifest["seq_len"] != seq_len:
            raise DataError(f"{self._manifest_dir}: shards hold seq_len={self.manifest['seq_len']} (+1) samples, "
                            f"the loader was asked for seq_len={seq_len}")
        self.split, self.seq_len, self.micro_batch, self.seed = split, seq_len, micro_batch, int(seed)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.global_batch, self.accum = global_batch, global_batch // (micro_batch * world_size)
        self.workers = max(1, num_workers)
        self.infinite = split == "train"
        self.shuffle = bool(shuffle) and self.infinite
        self.on_bad_sample, self.verify = on_bad_sample, verify
        self.pin_memory, self.prefetch_factor, self.mp_context = pin_memory, prefetch_factor, mp_context
        self.plan = (_Plan(self.manifest, split, 1, 1, self.seed, self.shuffle) if self.infinite else
                     _Plan(self.manifest, split, world_size, self.workers, self.seed, self.shuffle, equal_ranks=True))
        n = self.plan.num_samples
        if n == 0:
            raise DataError(validation_problem(self.manifest, str(self._manifest_dir)) if split == "val"
                            else f"{self._manifest_dir}: split {split!r} has no samples")
        if not self.infinite and sum(self.plan.slot_size(rank * self.workers + w) for w in range(self.workers)) == 0:
            raise DataError(f"{self._manifest_dir}: split {split!r} has {n} samples, fewer than world_size="
                            f"{world_size}: no rank would get one")
        self.record = Path(record) if record and self.infinite else None
        self._start = 0  # global position of step 0 of this loader (the resume position)
        self._handed = 0  # micro-batches of this rank handed out since _start
        self._skipped = 0

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Path:
        """A local file holding the shards' tokenizer.json: the file itself for local shards; for remote ones a
        copy (in cache_dir, else in the temporary directory), named by its sha256."""
        if isinstance(self.store, LocalStore):
            return self.store.path(self.manifest["tokenizer_file"])
        base = (Path(self.cache_dir) if self.cache_dir
                else Path(os.environ.get("TMPDIR", "/tmp")) / f"metalm-{os.getuid()}")
        path = base / "tokenizers" / f"{self.manifest['tokenizer_hash']}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, self._tokenizer_bytes)
        return path

    @property
    def special_ids(self) -> dict:
        return dict(self.manifest["special_ids"])

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer_hash"]

    @property
    def data_hash(self) -> str:
        """sha256 of the split's shard list as the manifest records it (path, samples, bytes, sha256 of each
        shard): two preparations with the same sample count but other content differ here."""
        shards = self.manifest["splits"][self.split]["shards"]
        records = [[s.get(k) for k in ("path", "samples", "bytes", "sha256")] for s in shards]
        return hashlib.sha256(json.dumps(records, separators=(",", ":")).encode()).hexdigest()

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self.plan.num_samples

    @property
    def position(self) -> int:
        """Train: the global position of the next step (samples read by all ranks in the steps handed out so
        far, counted from the start of epoch 0)."""
        return self._start + self._handed // self.accum * self.global_batch

    @property
    def epoch(self) -> int:
        """Train: the epoch of the next step's first sample."""
        return self.position // self.num_samples

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (on_bad_sample="skip")."""
        return self._skipped

    def __len__(self) -> int:
        """Val: batches of one pass for this rank. Train: micro-batches of this rank per epoch (approximate; it
        never ends)."""
        if self.infinite:
            return -(-self.num_samples // (self.micro_batch * self.world_size))
        sizes = [self.plan.slot_size(self.rank * self.workers + w) for w in range(self.workers)]
        return sum(-(-s // self.micro_batch) for s in sizes)

    def _geometry(self) -> tuple[int, int, int, int, int]:
        return (self._start, self.global_batch, self.accum, self.world_size * self.micro_batch,
                self.rank * self.micro_batch)

    # -- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.infinite:
            self._skipped = 0  # val: counts of the current pass
        if self.num_workers == 0:
            return self._in_process()
        return self._from_workers()

    def _reader(self) -> _ShardReader:
        return _ShardReader(self.store, self.manifest, self.split, verify=self.verify,
                            on_bad_sample=self.on_bad_sample, **self._fetch_settings)

    def _in_process(self) -> Iterator[torch.Tensor]:
        reader = self._reader()
        if self.infinite:
            first = self._handed
            positions = lambda: _micro_positions(self._geometry(), first, 1)
            for batch, q, ids, bad in _global_batches(self.plan, reader, positions, self.micro_batch):
                tokens = self._hand_out(None if batch is None else torch.from_numpy(batch), q, ids, bad)
                yield self._pinned(tokens)
            return
        for batch, _, skip in _batches(self.plan, reader, self.rank * self.workers, 0, 0, False, self.micro_batch):
            self._skipped = skip
            if batch is not None:
                yield self._pinned(torch.from_numpy(batch))

    def _from_workers(self) -> Iterator[torch.Tensor]:
        dataset = _WorkerStreams(self, self._handed)
        dl = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor, multiprocessing_context=self.mp_context)
        if not self.infinite:
            done = [0] * self.workers
            for item in dl:
                done[item["worker"]] = item["skipped"]
                self._skipped = sum(done)
                if item["tokens"] is not None:
                    yield item["tokens"]
            return
        expected = 0
        for item in dl:
            if item["worker"] != expected:
                raise DataError(f"loader: batch from worker {item['worker']} where worker {expected} was due "
                                f"(DataLoader order changed?); the resume state would be wrong")
            expected = (expected + 1) % self.workers
            yield self._hand_out(item["tokens"], item["position"], item["ids"], item["bad"])  # pinned by the DataLoader

    def _hand_out(self, tokens: torch.Tensor | None, q: int, ids: list[int], bad: int) -> torch.Tensor:
        """Train: count (and record) one micro-batch as handed out."""
        self._skipped += bad
        if tokens is None:
            raise DataError(f"{self._manifest_dir}: every sample of the micro-batch at global position {q} "
                            f"(samples {q}..{q + self.micro_batch - 1} of the order) is bad; nothing to train on")
        self._handed += 1
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a") as f:
                f.write(json.dumps({"position": q, "ids": ids}) + "\n")
        return tokens

    def _pinned(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.pin_memory() if self.pin_memory else tokens

    # -- resumable state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable position of the train stream (the same on every rank), at a step boundary."""
        if self._handed % self.accum:
            raise DataError(f"loader state asked for inside a step ({self._handed % self.accum} of {self.accum} "
                            f"micro-batches of it handed out): the state is kept per step")
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "tokenizer_hash": self.tokenizer_hash,
            "data_hash": self.data_hash,
            "samples": self.position,
            "global_batch": self.global_batch,
            "epoch": self.epoch,
            "skipped": self._skipped,
            # how this rank read them: informative, a resume may change any of these
            "world_size": self.world_size,
            "rank": self.rank,
            "micro_batch": self.micro_batch,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> str | None:
        """Continue from `state` (from `state_dict()` of a loader on the same data and seed, with any world size,
        micro-batch and workers). Returns a warning when the global batch differs: the run then continues from
        the same global position with steps of this loader's global batch."""
        if not isinstance(state, dict):
            raise DataError(f"loader state: expected a dict, got {type(state).__name__}")
        state = _from_version_1(state, self.global_batch)
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state: version {state.get('version')!r} is not {STATE_VERSION}")
        missing = [k for k in ("samples", "global_batch", "skipped") if k not in state]
        if missing:
            raise DataError(f"loader state: missing {', '.join(missing)}")
        for key in ("split", "seed", "shuffle", "num_samples", "tokenizer_hash"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"loader state: {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                                f"an exact resume needs the same data and seed")
        for key in ("samples", "global_batch", "skipped"):
            v = state[key]
            least = 1 if key == "global_batch" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise DataError(f"loader state: {key}={v!r}, expected an integer >= {least}")
        self._start, self._handed, self._skipped = state["samples"], 0, state["skipped"]
        if state["global_batch"] != self.global_batch:
            return (f"the global batch changed from {state['global_batch']} to {self.global_batch}: continuing from "
                    f"global sample position {self._start:,} (no sample repeated or skipped), steps now read "
                    f"{self.global_batch} samples")
        return None


def _from_version_1(state: dict, global_batch: int) -> dict:
    """A loader state of version 1 (per-rank slots, before the global order) as version 2, when it has one: a
    run of one process without workers read its one slot in the global order. Others are refused."""
    if state.get("version") != 1:
        return state
    positions = state.get("positions")
    if state.get("world_size") != 1 or not isinstance(positions, list) or len(positions) != 1:
        raise DataError(f"loader state: version 1, written by world_size={state.get('world_size')!r} with "
                        f"{len(positions) if isinstance(positions, list) else '?'} data worker slot(s): a checkpoint "
                        f"from before the global sample order continues exactly only from 1 process without data "
                        f"workers; resume it with the metalm that wrote it, or start a new train.run_dir")
    return {**state, "version": STATE_VERSION, "samples": positions[0], "global_batch": global_batch,
            "skipped": sum(state.get("skipped") or [0])}


def build_loader(d, *, split: str, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 **overrides: Any) -> ShardLoader:
    """The loader for `split` of ``d.shards`` (``d``: the data config section); `overrides` replace the
    section's loader settings (num_workers, shuffle, on_bad_sample, verify, cache_dir, read_ahead, retries) or
    add the train stream's global_batch and record."""
    settings = {"num_workers": int(d.num_workers), "shuffle": bool(d.shuffle), "on_bad_sample": str(d.on_bad_sample),
                "verify": bool(d.verify_shards), "cache_dir": str(d.cache_dir) or None,
                "read_ahead": int(d.read_ahead), "retries": int(d.retries), **overrides}
    return ShardLoader(d.shards, split=split, seq_len=int(seq_len), micro_batch=int(micro_batch), seed=int(seed),
                       rank=rank, world_size=world_size, **settings)
