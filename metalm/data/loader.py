"""The training stream: prepared shards -> `torch.LongTensor` batches of shape (micro_batch, seq_len + 1).

Partition. For a split of N samples, every (rank, worker) pair is a *slot* ``j = rank * W + worker`` out of
``S = world_size * W`` (W = max(1, num_workers)). Each epoch lays the shards out in a seeded order (the
shard order is a permutation of (seed, epoch)), and the samples of each shard in a seeded in-shard order
(a permutation of (seed, epoch, shard)); this gives a virtual sequence of the N samples, and slot j reads
the contiguous range ``[j*N//S, (j+1)*N//S)`` of it. So, in every epoch, every sample is read by exactly
one slot, slot sizes differ by at most one, and each slot opens only the few shards its range covers (a
shard is shared by neighbouring slots when there are fewer shards than slots: they read disjoint parts of
it). Documents were already shuffled across the corpus when the shards were prepared.

Stream. A slot's stream is its range of epoch 0, then of epoch 1, ... (train: infinite, a batch may span
two epochs) or one pass without shuffling (val: finite, the last batch of a worker may be smaller). For val,
every rank gets the same number of samples, N // world_size (the last N % world_size samples are left out),
split among its workers the same way on every rank, so all ranks run the same number of val batches
(collectives inside the forward, e.g. ZeRO-3, cannot hang). Batches are consecutive samples of one slot;
with workers, the torch DataLoader returns worker batches round-robin.

Resume. The state is, per worker, the number of stream positions consumed (so the epoch and the position
inside it are implied), plus which worker the next batch comes from. It is counted in the main process
from the batches actually handed out (prefetched batches do not count), is JSON-serialisable, and a loader
restored from it yields exactly the batches the uninterrupted loader would have. Only the shard under the
cursor is read again on resume: whole shards before it are skipped without being opened.

Checks. A shard whose size or sha256 differs from the manifest (truncated, modified), that is not a valid
tar, whose ``__meta__.json`` disagrees with the manifest (tokenizer hash, seq_len, dtype), or whose sample
count differs, raises DataError naming the shard. A sample of the wrong length or dtype or with a token id
>= vocab_size raises DataError naming the shard and key, or, with on_bad_sample="skip", is skipped and
counted (`ShardLoader.skipped`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from metalm.config import ON_BAD_SAMPLE
from metalm.data.errors import DataError, UnsafePathError, parse_json
from metalm.data.manifest import SPLITS, load_manifest
from metalm.data.shards import npy_header

log = logging.getLogger("metalm.data")
STATE_VERSION = 1
_SPLIT_CODE = {"train": 0, "val": 1}


class _Plan:
    """Which samples a slot reads, in which order, for every epoch (pure function of the arguments)."""

    def __init__(self, manifest: dict, split: str, world_size: int, workers: int, seed: int, shuffle: bool,
                 equal_ranks: bool = False):
        self.shards = manifest["splits"][split]["shards"]
        self.counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
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
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, _SPLIT_CODE[self.split]]).permutation(len(self.counts))
            else:
                order = np.arange(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
            self._layout_cache = (epoch, order, starts)
        return self._layout_cache[1], self._layout_cache[2]

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


class _Shard:
    __slots__ = ("index", "path", "keys", "data")

    def __init__(self, index: int, path: Path, keys: list[str], data: list[bytes]):
        self.index, self.path, self.keys, self.data = index, path, keys, data


class _ShardReader:
    """Reads and checks shards (one cached), decodes and validates samples."""

    def __init__(self, shards_dir: Path, manifest: dict, split: str, *, verify: bool, on_bad_sample: str):
        self.dir = shards_dir
        self.real_dir = Path(os.path.realpath(shards_dir))
        self.manifest = manifest
        self.split = split
        self.records = manifest["splits"][split]["shards"]
        self.verify = verify
        self.skip_bad = on_bad_sample == "skip"
        self.sample_len = manifest["sample_len"]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["vocab_size"]
        self.header = npy_header(self.sample_len, manifest["dtype"])
        self.expected_bytes = len(self.header) + self.sample_len * self.dtype.itemsize
        self._cached: _Shard | None = None

    def load(self, index: int) -> _Shard:
        if self._cached is not None and self._cached.index == index:
            return self._cached
        import webdataset as wds

        rec = self.records[index]
        path = self.dir / rec["path"]
        real = self._inside(path)
        try:
            data = real.read_bytes()
        except OSError as e:
            raise DataError(f"shard {path}: cannot read: {e.strerror or e}") from None
        if len(data) != rec["bytes"]:
            raise DataError(f"shard {path}: {len(data)} bytes, the manifest says {rec['bytes']} (truncated or "
                            f"modified; re-run metalm-prepare)")
        if self.verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise DataError(f"shard {path}: sha256 differs from the manifest (corrupted or modified; re-run "
                            f"metalm-prepare)")
        keys: list[str] = []
        blobs: list[bytes] = []
        meta = None
        try:
            for entry in wds.tariterators.tar_file_iterator(io.BytesIO(data), skip_meta=None):
                name = entry["fname"]
                _check_member_name(path, name)
                if name == "__meta__.json":
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
        if meta is None:
            raise DataError(f"shard {path}: no __meta__.json (not written by metalm-prepare)")
        for field in ("tokenizer_hash", "seq_len", "dtype", "vocab_size"):
            if meta.get(field) != self.manifest[field]:
                what = "tokenizer hash mismatch" if field == "tokenizer_hash" else f"{field} mismatch"
                raise DataError(f"shard {path}: {what}: the shard says {str(meta.get(field))[:16]!r}, the manifest "
                                f"{str(self.manifest[field])[:16]!r} (shards from another preparation?)")
        if len(keys) != rec["samples"]:
            raise DataError(f"shard {path}: {len(keys)} samples, the manifest says {rec['samples']}")
        self._cached = _Shard(index, path, keys, blobs)
        return self._cached

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
        if len(raw) == self.expected_bytes and raw.startswith(self.header):
            arr = np.frombuffer(raw, dtype=self.dtype, offset=len(self.header))
        else:
            try:
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
            except Exception as e:  # numpy raises ValueError/EOFError/OSError for malformed .npy bytes
                return self._bad(shard, r, f"not a valid .npy array ({type(e).__name__}: {e})")
            if arr.dtype != self.dtype:
                return self._bad(shard, r, f"dtype {arr.dtype}, expected {self.dtype}")
            if arr.shape != (self.sample_len,):
                return self._bad(shard, r, f"shape {arr.shape}, expected ({self.sample_len},) = seq_len + 1")
        if int(arr.max()) >= self.vocab_size or (self.dtype.kind == "i" and int(arr.min()) < 0):
            bad = arr[(arr >= self.vocab_size) | (arr < 0)][0]
            return self._bad(shard, r, f"token id {int(bad)} outside the vocabulary [0, {self.vocab_size})")
        return arr

    def _bad(self, shard: _Shard, r: int, why: str) -> None:
        msg = f"shard {shard.path} sample {shard.keys[r]!r}: {why}"
        if not self.skip_bad:
            raise DataError(msg)
        log.warning("skipping bad sample: %s", msg)
        return None


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


class _WorkerStreams(IterableDataset):
    """DataLoader dataset: worker i serves logical worker (i + first) % W from its saved position."""

    def __init__(self, loader: "ShardLoader", first: int, positions: list[int], skipped: list[int], infinite: bool):
        self.args = (loader._manifest_dir, loader.manifest, loader.split, loader.world_size, loader.workers,
                     loader.seed, loader.shuffle, loader.verify, loader.on_bad_sample)
        self.rank, self.micro_batch = loader.rank, loader.micro_batch
        self.first, self.positions, self.skipped, self.infinite = first, positions, skipped, infinite

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        shards_dir, manifest, split, world_size, workers, seed, shuffle, verify, on_bad = self.args
        lw = (wid + self.first) % workers
        plan = _Plan(manifest, split, world_size, workers, seed, shuffle, equal_ranks=not self.infinite)
        reader = _ShardReader(shards_dir, manifest, split, verify=verify, on_bad_sample=on_bad)
        slot = self.rank * workers + lw
        for batch, pos, skipped in _batches(plan, reader, slot, self.positions[lw], self.skipped[lw], self.infinite,
                                            self.micro_batch):
            tokens = None if batch is None else torch.from_numpy(batch)
            yield {"tokens": tokens, "worker": lw, "pos": pos, "skipped": skipped}


class ShardLoader:
    """Iterate batches of a prepared split for one rank; see the module doc for the guarantees.

    Train (``split="train"``): an infinite iterator; calling `iter()` again continues where the last batch
    handed out left off. Val: one finite pass in a fixed order, restarted by every `iter()`.
    """

    def __init__(self, shards_dir: str | Path, *, split: str = "train", seq_len: int, micro_batch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 on_bad_sample: str = "error", verify: bool = True, expected_tokenizer_hash: str | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, mp_context: str | None = None):
        if split not in SPLITS:
            raise DataError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
        if micro_batch <= 0:
            raise DataError(f"micro_batch={micro_batch}: expected a positive integer")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers}: expected >= 0")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise DataError(f"on_bad_sample={on_bad_sample!r}: expected {' or '.join(ON_BAD_SAMPLE)}")
        self._manifest_dir = Path(shards_dir)
        self.manifest = load_manifest(self._manifest_dir, expected_tokenizer_hash=expected_tokenizer_hash)
        if self.manifest["seq_len"] != seq_len:
            raise DataError(f"{self._manifest_dir}: shards hold seq_len={self.manifest['seq_len']} (+1) samples, "
                            f"the loader was asked for seq_len={seq_len}")
        self.split, self.seq_len, self.micro_batch, self.seed = split, seq_len, micro_batch, int(seed)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.infinite = split == "train"
        self.shuffle = bool(shuffle) and self.infinite
        self.on_bad_sample, self.verify = on_bad_sample, verify
        self.pin_memory, self.prefetch_factor, self.mp_context = pin_memory, prefetch_factor, mp_context
        self.plan = _Plan(self.manifest, split, world_size, self.workers, self.seed, self.shuffle,
                          equal_ranks=not self.infinite)
        n = self.plan.num_samples
        if n == 0:
            raise DataError(f"{self._manifest_dir}: split {split!r} has no samples"
                            + (" (prepared with val_fraction=0?)" if split == "val" else ""))
        sizes = [self.plan.slot_size(self._slot(w)) for w in range(self.workers)]
        if self.infinite and n < self.plan.slots:  # checked on every rank alike: none starts, none waits
            raise DataError(f"{self._manifest_dir}: split {split!r} has {n} samples, fewer than world_size x "
                            f"workers = {self.plan.slots}; use fewer data.num_workers or more data")
        if not self.infinite and sum(sizes) == 0:
            raise DataError(f"{self._manifest_dir}: split {split!r} has {n} samples, fewer than world_size="
                            f"{world_size}: no rank would get one")
        self._sizes = sizes
        self._positions = [0] * self.workers
        self._skipped = [0] * self.workers
        self._next_worker = 0
        self._batches = 0

    # -- properties ---------------------------------------------------------------------------------------
    def _slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

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
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self.plan.num_samples

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (all its workers)."""
        return sum(self._sizes)

    @property
    def worker_sizes(self) -> list[int]:
        """Samples per epoch of each (logical) worker of this rank; index = worker id in `state_dict()`."""
        return list(self._sizes)

    @property
    def epoch(self) -> int:
        """The epoch of the least advanced worker of this rank (train)."""
        return min(p // s for p, s in zip(self._positions, self._sizes) if s) if any(self._sizes) else 0

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (on_bad_sample="skip")."""
        return sum(self._skipped)

    def __len__(self) -> int:
        """Val: batches of one pass for this rank. Train: batches per epoch (approximate; it never ends)."""
        return sum(-(-s // self.micro_batch) for s in self._sizes)

    # -- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.infinite:
            self._skipped = [0] * self.workers  # val: counts of the current pass
            return self._iterate(first=0, positions=[0] * self.workers, skipped=[0] * self.workers, track=False)
        return self._iterate(first=self._next_worker, positions=list(self._positions), skipped=list(self._skipped),
                             track=True)

    def _iterate(self, first: int, positions: list[int], skipped: list[int], track: bool) -> Iterator[torch.Tensor]:
        if self.num_workers == 0:
            plan = self.plan
            reader = _ShardReader(self._manifest_dir, self.manifest, self.split, verify=self.verify,
                                  on_bad_sample=self.on_bad_sample)
            for batch, pos, skip in _batches(plan, reader, self._slot(0), positions[0], skipped[0], self.infinite,
                                             self.micro_batch):
                self._skipped[0] = skip
                if batch is None:
                    continue
                if track:
                    self._positions[0] = pos
                    self._batches += 1
                tokens = torch.from_numpy(batch)
                yield tokens.pin_memory() if self.pin_memory else tokens
            return
        dataset = _WorkerStreams(self, first, positions, skipped, self.infinite)
        dl = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor, multiprocessing_context=self.mp_context)
        expected = first
        for item in dl:
            lw = item["worker"]
            self._skipped[lw] = item["skipped"]
            if item["tokens"] is None:
                continue
            if track:
                if lw != expected:
                    raise DataError(f"loader: batch from worker {lw} where worker {expected} was due (DataLoader "
                                    f"order changed?); the resume state would be wrong")
                self._positions[lw] = item["pos"]
                self._batches += 1
                self._next_worker = expected = (lw + 1) % self.workers
            yield item["tokens"]

    # -- resumable state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's stream (train)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_samples": self.num_samples,
            "tokenizer_hash": self.tokenizer_hash,
            "rank": self.rank,
            "micro_batch": self.micro_batch,
            "epoch": self.epoch,
            "batches": self._batches,
            "next_worker": self._next_worker,
            "positions": list(self._positions),
            "worker_epochs": [p // s if s else 0 for p, s in zip(self._positions, self._sizes)],
            "skipped": list(self._skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of a loader with the same data, seed and layout)."""
        if not isinstance(state, dict):
            raise DataError(f"loader state: expected a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "positions", "skipped", "next_worker", "batches") if k not in state]
        if missing:
            raise DataError(f"loader state: missing {', '.join(missing)}")
        if state["version"] != STATE_VERSION:
            raise DataError(f"loader state: version {state['version']} is not {STATE_VERSION}")
        for key in ("split", "seed", "shuffle", "world_size", "num_workers", "num_samples", "tokenizer_hash"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"loader state: {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                                f"an exact resume needs the same data, seed, world size and data.num_workers")
        positions, skipped = state["positions"], state["skipped"]
        for name, values in (("positions", positions), ("skipped", skipped)):
            if (not isinstance(values, list) or len(values) != self.workers
                    or not all(isinstance(v, int) and v >= 0 for v in values)):
                raise DataError(f"loader state: {name} should be {self.workers} non-negative integers, got {values!r}")
        if not isinstance(state["next_worker"], int) or not 0 <= state["next_worker"] < self.workers:
            raise DataError(f"loader state: next_worker={state['next_worker']!r} out of range")
        self._positions = list(positions)
        self._skipped = list(skipped)
        self._next_worker = state["next_worker"]
        self._batches = int(state["batches"])


def build_loader(d, *, split: str, seq_len: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 **overrides: Any) -> ShardLoader:
    """The loader for `split` of ``d.shards`` (``d``: the data config section); `overrides` replace the
    section's loader settings (num_workers, shuffle, on_bad_sample, verify)."""
    settings = {"num_workers": int(d.num_workers), "shuffle": bool(d.shuffle), "on_bad_sample": str(d.on_bad_sample),
                "verify": bool(d.verify_shards), **overrides}
    return ShardLoader(d.shards, split=split, seq_len=int(seq_len), micro_batch=int(micro_batch), seed=int(seed),
                       rank=rank, world_size=world_size, **settings)
