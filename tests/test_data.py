"""Prepare (packing, manifest, resume, refusal) and the shard loader (partition, shuffle, resume, checks).

Shards come from the first 300 documents of the real wiki corpus, seq_len 64, 40 samples per shard.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from metalm.data import DataError, ShardLoader, build_loader, load_manifest, load_tokenizer, prepare
from metalm.data.prepare import is_val_doc, main as prepare_main, window_shuffle
from data_cases import ensure, rewrite_manifest
from deadline import deadline
from legacy_shards import to_format_1

def _build(cfg, **kw):
    return build_loader(cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch, seed=cfg.train.seed,
                        **kw)


SEQ = 64
MAX_DOCS = 300
PER_SHARD = 40


# ----------------------------------------------------------------------------------------------- fixtures
def _prepare(corpus, tok_path, out, **kw):
    args = dict(val_fraction=0.1, samples_per_shard=PER_SHARD, num_proc=2, seed=0, max_docs=MAX_DOCS,
                progress=False)
    args.update(kw)
    seq = args.pop("seq_len", SEQ)
    return prepare(str(corpus), tok_path, out, seq, **args)


@pytest.fixture(scope="session")
def shards(corpus, tok_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shards"
    _prepare(corpus, tok_path, out)
    return out


@pytest.fixture(scope="session")
def one_shard(corpus, tok_path, tmp_path_factory) -> Path:
    """A split with a single train shard (fewer shards than ranks x workers)."""
    out = tmp_path_factory.mktemp("data") / "one"
    _prepare(corpus, tok_path, out, max_docs=80, samples_per_shard=1000, val_fraction=0.0)
    return out


@pytest.fixture
def shards_copy(shards, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(shards, dst)
    return dst


def read_split(shards_dir: Path, split: str) -> list[tuple]:
    """Every sample of a split, read with tarfile + numpy (independently of the loader): the rows of each block
    member (format 2), or one sample per member (format 1)."""
    man = json.loads((shards_dir / "manifest.json").read_text())
    out = []
    for rec in man["splits"][split]["shards"]:
        with tarfile.open(shards_dir / rec["path"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    arr = np.load(io.BytesIO(tar.extractfile(m).read()))
                    out.extend(tuple(row) for row in (arr.tolist() if arr.ndim == 2 else [arr.tolist()]))
    return out


def loader(shards_dir, split="train", **kw) -> ShardLoader:
    args = dict(seq_len=SEQ, micro_batch=4, seed=0)
    args.update(kw)
    return ShardLoader(shards_dir, split=split, **args)


def take(ld, n) -> list[list]:
    it = iter(ld)
    try:
        return [b.tolist() for b in islice(it, n)]
    finally:
        it.close()


def per_step_samples(shards_dir, steps: int, global_batch: int, world_size: int, micro_batch: int, workers: int,
                     **kw) -> list[list[tuple]]:
    """The samples each of the first `steps` optimizer steps reads, sorted, gathered from every rank's loader of
    one split of `global_batch` (ranks x accumulation x micro-batch), each with `workers` workers."""
    accum = global_batch // (world_size * micro_batch)
    out: list[list[tuple]] = [[] for _ in range(steps)]
    for rank in range(world_size):
        ld = loader(shards_dir, rank=rank, world_size=world_size, micro_batch=micro_batch, num_workers=workers,
                    global_batch=global_batch, **kw)
        for k, batch in enumerate(take(ld, steps * accum)):
            out[k // accum].extend(tuple(r) for r in batch)
    return [sorted(s) for s in out]


# ----------------------------------------------------------------------------------------------- prepare
def test_manifest_contents(shards, tok_path):
    man = load_manifest(shards)
    tok = load_tokenizer(tok_path)
    assert man["seq_len"] == SEQ and man["sample_len"] == SEQ + 1 and man["dtype"] == "uint16"
    assert man["vocab_size"] == tok.vocab_size == 50281
    assert man["special_ids"] == tok.special_ids and man["special_ids"]["mask"] == 50280
    assert man["tokenizer_hash"] == tok.hash
    train, val = man["splits"]["train"], man["splits"]["val"]
    assert len(train["shards"]) >= 8 and len(val["shards"]) >= 2  # several shards per split
    assert all(s["samples"] == PER_SHARD for s in train["shards"][:-1])
    for rec in train["shards"] + val["shards"]:
        path = shards / rec["path"]
        assert path.stat().st_size == rec["bytes"]
        assert __import__("hashlib").sha256(path.read_bytes()).hexdigest() == rec["sha256"]
        assert rec["tokens"] == rec["samples"] * (SEQ + 1)
    assert man["totals"]["docs"] == MAX_DOCS and train["docs"] + val["docs"] == MAX_DOCS
    assert man["totals"]["tokens"] == (train["samples"] + val["samples"]) * (SEQ + 1)
    assert 0 < val["docs"] < 0.2 * MAX_DOCS


def test_packing_is_lossless_and_in_order(shards, corpus, tok_path):
    """Re-derive the token stream of each split (shuffle window, val hash, EOS per doc) and compare."""
    tok = load_tokenizer(tok_path)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in islice(f, MAX_DOCS)]
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for index, doc in window_shuffle(docs, 65536, 0):
        split = "val" if is_val_doc(0, index, 0.1) else "train"
        streams[split].extend(tok.encode(doc) + [tok.special_ids["eos"]])
    man = load_manifest(shards)
    for split, stream in streams.items():
        flat = [t for sample in read_split(shards, split) for t in sample]
        assert flat == stream[: len(flat)]
        assert len(stream) - len(flat) == man["splits"][split]["dropped_tokens"] < SEQ + 1


def test_window_shuffle_and_val_hash():
    items = list(window_shuffle(range(50), 8, seed=3))
    assert sorted(i for i, _ in items) == list(range(50)) and [i for i, _ in items] != list(range(50))
    assert all(i == d for i, d in items)
    assert {i for i, _ in items[:8]} == set(range(8))  # shuffled inside windows only
    assert list(window_shuffle(range(5), 0, 3)) == list(enumerate(range(5)))
    frac = sum(is_val_doc(1, i, 0.2) for i in range(5000)) / 5000
    assert 0.17 < frac < 0.23 and not any(is_val_doc(1, i, 0.0) for i in range(100))


def test_prepare_resume_skips_finished_shards(shards, shards_copy, corpus, tok_path):
    man = load_manifest(shards)
    train = man["splits"]["train"]["shards"]
    n_total = len(train) + len(man["splits"]["val"]["shards"])
    (shards_copy / "manifest.json").unlink()  # an interrupted run: no manifest, the last shards missing
    for rec in train[-2:] + man["splits"]["val"]["shards"][-1:]:
        (shards_copy / rec["path"]).unlink()
        (shards_copy / rec["path"]).with_suffix(".json").unlink()
    (shards_copy / "train" / ".shard-000009.tar.tmp123").write_bytes(b"partial")
    first = shards_copy / train[0]["path"]
    mtime = first.stat().st_mtime_ns
    again = _prepare(corpus, tok_path, shards_copy)
    assert again["last_run"]["reused_shards"] == n_total - 3
    assert again["last_run"]["written_shards"] == 3
    assert again["last_run"]["tokenized_docs"] < MAX_DOCS  # documents of finished shards were not re-tokenized
    assert first.stat().st_mtime_ns == mtime
    assert again["splits"] == man["splits"]  # identical bytes (sha256) to the uninterrupted run
    assert not list((shards_copy / "train").glob(".shard-*"))
    # a complete directory: nothing to do
    assert _prepare(corpus, tok_path, shards_copy)["last_run"] == again["last_run"]


def test_prepare_resume_redoes_a_corrupted_shard(shards, shards_copy, corpus, tok_path):
    man = load_manifest(shards)
    rec = man["splits"]["train"]["shards"][3]
    (shards_copy / "manifest.json").unlink()
    data = bytearray((shards_copy / rec["path"]).read_bytes())
    data[5000] ^= 0xFF
    (shards_copy / rec["path"]).write_bytes(bytes(data))
    again = _prepare(corpus, tok_path, shards_copy)
    assert again["last_run"]["reused_shards"] == 3 + len(man["splits"]["val"]["shards"])
    assert again["splits"] == man["splits"]


def test_prepare_refuses_to_mix(shards_copy, corpus, tok_path):
    with pytest.raises(DataError, match=r"refusing to mix.*seq_len: 64 -> 32"):
        _prepare(corpus, tok_path, shards_copy, seq_len=32)
    from metalm.data import train_bpe

    other = train_bpe(["un petit texte pour un autre tokenizer"] * 20, 300)
    with pytest.raises(DataError, match=r"refusing to mix.*tokenizer_hash"):
        prepare(str(corpus), other, shards_copy, SEQ, val_fraction=0.1, samples_per_shard=PER_SHARD, max_docs=MAX_DOCS,
                progress=False)
    (shards_copy / "prepare.json").unlink()
    with pytest.raises(DataError, match="unknown origin"):
        _prepare(corpus, tok_path, shards_copy)


def test_prepare_is_deterministic_across_num_proc(corpus, tok_path, tmp_path):
    a = _prepare(corpus, tok_path, tmp_path / "a", max_docs=60, seq_len=32, num_proc=1)
    b = _prepare(corpus, tok_path, tmp_path / "b", max_docs=60, seq_len=32, num_proc=2)
    assert a["splits"] == b["splits"] and a["splits"]["train"]["samples"] > 0


def test_prepare_cli(corpus, tok_path, tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    with open(corpus, encoding="utf-8") as f:
        src.write_text("".join(islice(f, 30)))
    rc = prepare_main(["--source", str(src), "--tokenizer", tok_path, "--out", str(tmp_path / "o"), "--seq-len", "32",
                       "--samples-per-shard", "50", "--num-proc", "1", "--no-progress"])
    assert rc == 0 and "train" in capsys.readouterr().out
    assert load_manifest(tmp_path / "o")["seq_len"] == 32
    rc = prepare_main(["--source", str(tmp_path / "missing.jsonl"), "--tokenizer", tok_path, "--out",
                       str(tmp_path / "p"), "--seq-len", "32", "--no-progress"])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err


def test_an_unquoted_glob_is_an_error_saying_to_quote_it(tmp_path, capsys):
    """`--source my_corpus/*.jsonl` unquoted: the shell passes every file, argparse sees extra arguments."""
    files = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    with pytest.raises(SystemExit) as e:
        prepare_main(["--source", *map(str, files), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"metalm-prepare: error: unrecognized arguments: {files[1]} {files[2]}; to give a glob, quote "
                    f"it (--source '{tmp_path}/*.jsonl'), so that metalm-prepare expands it, not the shell")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        prepare_main(["--bogus"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "metalm-prepare: error: unrecognized arguments: --bogus"


def test_prepare_progress_off_a_terminal_is_plain_lines_with_total_and_eta(corpus, tok_path, tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    with open(corpus, encoding="utf-8") as f:
        src.write_text("".join(islice(f, 300)))
    out = tmp_path / "nested" / "o"
    prepare(str(src), tok_path, out, 32, samples_per_shard=50, num_proc=1, progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, like a log file or a pipe
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert all(ln.startswith(f"metalm-prepare {out}: ") for ln in lines), lines  # the output path, not "o"
    assert lines[0].endswith("tokenizing 300 documents")
    assert any("/300 docs (" in ln and ", eta " in ln for ln in lines[1:-1]), lines  # 128 docs a batch: 42%, 85%
    assert "done: 300/300 docs (100%)" in lines[-1] and ", eta " not in lines[-1]


def test_progress_prints_every_interval_without_a_total():
    from metalm.data.prepare import Progress

    now = [0.0]
    stream = io.StringIO()
    bar = Progress("data/x/shards", None, stream=stream, every_s=10.0, clock=lambda: now[0])
    for t, docs in ((1, 100), (5, 500), (11, 1100), (15, 1500), (22, 2200)):
        now[0] = t
        bar.update(docs, docs * 10)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "metalm-prepare data/x/shards: tokenizing documents (total not known in advance)"
    counts = [ln.split(": ", 1)[1].split(", ")[0] for ln in lines[1:]]
    assert counts == ["1,100 docs", "2,200 docs", "done: 2,200/2,200 docs (100%)"]  # at 11 s and 22 s, then done
    assert "100 docs/s" in lines[1] and "elapsed 0:11" in lines[1] and ", eta " not in lines[1]


def test_progress_on_a_terminal_redraws_one_line():
    from metalm.data.prepare import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress("data/x/shards", 300, stream=stream)
    bar.update(150, 1500)
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "prepare data/x/shards" in text and "/300" in text and "metalm-prepare" not in text


def test_source_documents_counts_what_is_cheap_to_count(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from metalm.data.prepare import source_documents

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n{"text": "z"}')  # no final newline
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "b.parquet")
    assert source_documents(str(tmp_path / "*.jsonl")) == 3
    assert source_documents(str(tmp_path)) == 5
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "t" / f"{i}.txt").write_text("one document\n\nper file")
    assert source_documents(str(tmp_path / "t")) == 3
    assert source_documents(str(tmp_path / "t"), text_split="blank_line") is None  # would need a full read
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"text": "g"}\n')
    assert source_documents(str(tmp_path / "c.jsonl.gz")) is None
    assert source_documents(str(tmp_path / "missing.jsonl")) is None
    from metalm.data.prepare import _count_lines

    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "same length"}\n' * 1000)  # 24 bytes a line
    assert _count_lines(big) == 1000
    assert _count_lines(big, exact_up_to=100, sample=240) == 1000  # estimated from the first 10 lines


def test_prepare_bad_document_names_file_and_line(tok_path, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' is missing"):
        prepare(str(src), tok_path, tmp_path / "o", 16, num_proc=1, progress=False)


# ----------------------------------------------------------------------------------------------- ensure_prepared
def _cfg(shards_dir, *extra):
    from metalm.config import load_config

    return load_config(overrides=[f"data.shards={shards_dir}", f"train.seq_len={SEQ}", "train.micro_batch=4",
                                  *extra])


def test_ensure_prepared(shards, tok_path, corpus, tmp_path):
    man = ensure(_cfg(shards, f"data.tokenizer={tok_path}", "data.prepare_if_missing=false"))
    assert man["tokenizer_hash"] == load_manifest(shards)["tokenizer_hash"]
    with pytest.raises(DataError, match="seq_len=64 but train.seq_len=32"):
        ensure(_cfg(shards, f"data.tokenizer={tok_path}", "train.seq_len=32"))
    with pytest.raises(DataError, match="model.vocab_size=50000 is smaller"):
        ensure(_cfg(shards, f"data.tokenizer={tok_path}", "model.vocab_size=50000"))
    with pytest.raises(DataError, match="prepare_if_missing"):
        ensure(_cfg(tmp_path / "none", "data.prepare_if_missing=false"))
    src = tmp_path / "s.jsonl"
    with open(corpus, encoding="utf-8") as f:
        src.write_text("".join(islice(f, 40)))
    made = ensure(_cfg(tmp_path / "new", f"data.source={src}", f"data.tokenizer={tok_path}",
                                "data.prepare_num_proc=1"), progress=False)
    assert made["seq_len"] == SEQ and (tmp_path / "new" / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------- loader
def test_batches_shape_dtype_and_content(shards):
    ld = loader(shards, micro_batch=8)
    batch = next(iter(ld))
    assert batch.shape == (8, SEQ + 1) and batch.dtype.is_floating_point is False and str(batch.dtype) == "torch.int64"
    train = Counter(read_split(shards, "train"))
    assert all(tuple(r) in train for r in batch.tolist())
    assert ld.manifest["special_ids"]["mask"] == 50280 and ld.vocab_size == 50281


def test_any_split_of_the_global_batch_reads_the_same_samples_at_each_step(shards):
    """Issue 25: a step's samples are defined on the global order: 1 x 16, 2 ranks x accum 2 x 4 (2 workers each),
    4 ranks x accum 2 x 2 and 1 x accum 4 x 4 (2 workers) read the same 16 samples at each of 60 steps (two epochs
    and more), and each epoch of the order holds every sample of the split exactly once."""
    expected = Counter(read_split(shards, "train"))
    n = sum(expected.values())
    steps = 2 * n // 16 + 3
    reference = per_step_samples(shards, steps, 16, world_size=1, micro_batch=16, workers=0)
    for split in ((2, 4, 2), (4, 2, 0), (1, 4, 2)):
        assert per_step_samples(shards, steps, 16, *split) == reference, split
    flat = [tuple(r) for b in take(loader(shards, micro_batch=16), steps) for r in b]
    assert [sorted(flat[i * 16:(i + 1) * 16]) for i in range(steps)] == reference
    assert Counter(flat[:n]) == expected and Counter(flat[n:2 * n]) == expected
    assert flat[:n] != flat[n:2 * n]  # the order changes between epochs


def test_same_seed_same_order_new_seed_or_epoch_new_order(shards):
    n = 150  # more than one epoch (450 samples / 4)
    a = take(loader(shards), n)
    assert take(loader(shards), n) == a
    assert take(loader(shards, seed=1), n) != a
    per_epoch = loader(shards).num_samples
    flat = [tuple(r) for b in a for r in b]
    assert flat[:per_epoch] != flat[per_epoch: 2 * per_epoch][: per_epoch]
    assert Counter(flat[:per_epoch]) == Counter(read_split(shards, "train"))
    assert Counter(flat[per_epoch:]) <= Counter(read_split(shards, "train"))
    unshuffled = [tuple(r) for b in take(loader(shards, shuffle=False), 10) for r in b]
    assert unshuffled == read_split(shards, "train")[:40]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(shards, workers):
    total, cut = 70, 33  # 33: the next batch is due from worker 1; 70 batches cross an epoch boundary
    ref_loader = loader(shards, micro_batch=8, num_workers=workers)
    ref = take(ref_loader, total)
    assert ref_loader.state_dict()["epoch"] == 1
    first = loader(shards, micro_batch=8, num_workers=workers)
    head = take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples"] == cut * 8 and state["epoch"] == 0
    resumed = loader(shards, micro_batch=8, num_workers=workers)
    assert resumed.load_state_dict(state) is None  # the same global batch: nothing to warn about
    tail = take(resumed, total - cut)
    assert head + tail == ref
    assert resumed.position == ref_loader.position == total * 8
    # iterating the same loader again continues (train streams do not restart)
    cont = loader(shards, micro_batch=8, num_workers=workers)
    assert take(cont, cut) + take(cont, total - cut) == ref


def test_resume_on_another_split_or_global_batch_continues_the_global_order(shards):
    """Issue 25: 5 steps of 16 on 2 ranks x micro 4 x accum 2, resumed on 1 rank x micro 8 x accum 2 (1 worker),
    read what the uninterrupted 1 x 16 loader reads at steps 6-9; resumed with a global batch of 24 instead, the
    run continues at sample 80 of the order (nothing repeated or skipped) and says so."""
    flat = [tuple(r) for b in take(loader(shards, micro_batch=16), 15) for r in b]  # the global order
    states = []
    for rank in (0, 1):
        ld = loader(shards, rank=rank, world_size=2, micro_batch=4, global_batch=16)
        take(ld, 5 * 2)
        states.append(json.loads(json.dumps(ld.state_dict())))
    assert states[0]["samples"] == states[1]["samples"] == 80 and states[0]["global_batch"] == 16
    one = loader(shards, micro_batch=8, global_batch=16, num_workers=1)
    assert one.load_state_dict(states[1]) is None
    got = take(one, 4 * 2)
    assert [sorted(tuple(r) for b in got[2 * i:2 * i + 2] for r in b) for i in range(4)] == \
        [sorted(flat[80 + 16 * i:96 + 16 * i]) for i in range(4)]
    wider = loader(shards, micro_batch=8, global_batch=24)
    warning = wider.load_state_dict(states[0])
    assert "global batch changed from 16 to 24" in warning and "position 80 " in warning
    assert [tuple(r) for b in take(wider, 6) for r in b] == flat[80:128]
    assert wider.state_dict()["samples"] == 80 + 2 * 24


def test_a_version_1_state_of_one_process_without_workers_continues_at_its_position(shards):
    """Checkpoints from before the global order: one process without workers read its single slot, which is the
    global order, so its position carries over; the samples after it are the global order's."""
    flat = [tuple(r) for b in take(loader(shards, micro_batch=8), 6) for r in b]
    old = {"version": 1, "split": "train", "seed": 0, "shuffle": True, "world_size": 1, "num_workers": 0,
           "positions": [24], "skipped": [0], "next_worker": 0, "batches": 3}
    ld = loader(shards, micro_batch=8)
    assert ld.load_state_dict(old) is None
    assert [tuple(r) for b in take(ld, 3) for r in b] == flat[24:48]


def test_load_state_dict_rejects_other_data_and_old_states(shards):
    state = loader(shards, world_size=2, num_workers=2).state_dict()
    with pytest.raises(DataError, match="seed=0 but this loader has 1"):
        loader(shards, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="samples=-1, expected an integer >= 0"):
        loader(shards).load_state_dict(dict(state, samples=-1))
    with pytest.raises(DataError, match="version 1, written by world_size=2 with 2 data worker slot.*before the "
                                        "global sample order continues exactly only from 1 process"):
        loader(shards).load_state_dict({"version": 1, "world_size": 2, "positions": [0, 0], "skipped": [0, 0]})
    with pytest.raises(DataError, match="version 3 is not 2"):
        loader(shards).load_state_dict(dict(state, version=3))
    with pytest.raises(DataError, match="missing samples, global_batch"):
        loader(shards).load_state_dict({"version": 2, "skipped": 0})
    with pytest.raises(DataError, match="global_batch=12: expected a positive multiple of micro_batch x world_size"):
        loader(shards, world_size=2, global_batch=12)


def test_val_is_one_finite_pass_equal_per_rank(shards):
    val = read_split(shards, "val")
    got = Counter()
    counts = []
    for rank in (0, 1):
        ld = loader(shards, "val", rank=rank, world_size=2, num_workers=2, micro_batch=8)
        batches = list(ld)
        assert [b.tolist() for b in ld] == [b.tolist() for b in batches]  # every pass is the same
        assert len(batches) == len(ld)
        counts.append(len(batches))
        got.update(tuple(r) for b in batches for r in b.tolist())
    assert counts[0] == counts[1]
    assert sum(got.values()) == len(val) - len(val) % 2 and got <= Counter(val)
    single = [tuple(r) for b in loader(shards, "val", micro_batch=16) for r in b.tolist()]
    assert single == val


def test_fewer_shards_than_ranks_times_workers(one_shard, tmp_path):
    """One shard, 2 ranks x 2 workers: the first epoch's positions hold every sample once, and the record (the
    ids of each micro-batch, data.record_samples) names the rows handed out, checked against a plain tar read."""
    rows = read_split(one_shard, "train")
    n = len(rows)
    seen = Counter()
    with deadline(60):
        for rank in (0, 1):
            record = tmp_path / f"rank{rank}.jsonl"
            ld = loader(one_shard, rank=rank, world_size=2, num_workers=2, global_batch=16, record=record)
            batches = take(ld, 2 * (n // 16 + 1))
            lines = [json.loads(ln) for ln in record.read_text().splitlines()]
            assert len(lines) == len(batches)
            for line, batch in zip(lines, batches):
                assert [tuple(r) for r in batch] == [rows[i] for i in line["ids"]]
                seen.update(i for off, i in enumerate(line["ids"]) if line["position"] + off < n)
    assert seen == Counter(range(n))
    with pytest.raises(DataError, match=r"the validation split is empty \(prepared with val_fraction=0\)"):
        loader(one_shard, "val")


def test_build_loader_from_config(shards, tok_path):
    cfg = _cfg(shards, "data.num_workers=0", "train.seed=5")
    ld = _build(cfg, split="train", rank=1, world_size=2)
    assert ld.micro_batch == 4 and ld.seed == 5 and ld.rank == 1
    assert take(ld, 2) == take(loader(shards, seed=5, rank=1, world_size=2), 2)
    with pytest.raises(DataError, match="seq_len=32"):
        _build(_cfg(shards, "train.seq_len=32"), split="train")


# ----------------------------------------------------------------------------------------------- checks
def _sync_record(shards_dir: Path, split: str, index: int, samples: int | None = None) -> None:
    rec_path = shards_dir / load_manifest(shards_dir)["splits"][split]["shards"][index]["path"]

    def fix(man):
        rec = man["splits"][split]["shards"][index]
        rec["bytes"] = rec_path.stat().st_size
        rec["sha256"] = __import__("hashlib").sha256(rec_path.read_bytes()).hexdigest()

    rewrite_manifest(shards_dir, fix)


def _mutate_sample(shards_dir: Path, split: str, index: int, key: int, array: np.ndarray) -> str:
    """Replace one sample of a shard with `array` (a valid .npy), keep the manifest's size/sha in sync."""
    path = shards_dir / load_manifest(shards_dir)["splits"][split]["shards"][index]["path"]
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name == f"{key:06d}.npy":
                b = io.BytesIO()
                np.save(b, array)
                data = b.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    _sync_record(shards_dir, split, index)
    return str(path)


def test_truncated_shard_names_the_shard(shards_copy):
    rec = load_manifest(shards_copy)["splits"]["train"]["shards"][0]
    path = shards_copy / rec["path"]
    path.write_bytes(path.read_bytes()[: rec["bytes"] // 2])
    with pytest.raises(DataError, match=rf"shard {path}: .* bytes, the manifest says {rec['bytes']}"):
        take(loader(shards_copy, shuffle=False), 1)
    # through a DataLoader worker process, the message (and the shard name) reaches the trainer
    with pytest.raises(DataError, match=str(path)):
        take(loader(shards_copy, shuffle=False, num_workers=1), 1)
    # a truncated tar that the manifest agrees with: the tar itself is invalid
    _sync_record(shards_copy, "train", 0)
    with pytest.raises(DataError, match=rf"shard {path}: (not a valid tar|\d+ samples, the manifest says)"):
        take(loader(shards_copy, shuffle=False), 1)


def test_modified_shard_fails_the_checksum(shards_copy):
    rec = load_manifest(shards_copy)["splits"]["val"]["shards"][1]
    path = shards_copy / rec["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {path}: sha256 differs"):
        list(loader(shards_copy, "val"))


@pytest.mark.parametrize("kind,match", [
    ("short", r"shape \(64,\), expected \(65,\)"),
    ("dtype", "dtype int32, expected uint16"),
    ("oov", r"token id 60000 outside the vocabulary \[0, 50281\)"),
])
def test_bad_sample_errors_or_is_skipped(shards_copy, kind, match):
    """Format 1 (one sample per member): a bad sample is named by its key."""
    to_format_1(shards_copy)
    good = np.array(read_split(shards_copy, "val")[0], dtype=np.uint16)
    bad = {"short": good[:-1], "dtype": good.astype(np.int32),
           "oov": np.concatenate([good[:-1], np.array([60000], dtype=np.uint16)])}[kind]
    path = _mutate_sample(shards_copy, "val", 1, 3, bad)
    with pytest.raises(DataError, match=rf"shard {path} sample '000003': {match}"):
        list(loader(shards_copy, "val"))
    ld = loader(shards_copy, "val", on_bad_sample="skip", micro_batch=8)
    rows = sum(len(b) for b in ld)
    assert rows == len(read_split(shards_copy, "val")) - 1 and ld.skipped == 1
    tr = loader(shards_copy, "train", on_bad_sample="skip")
    assert take(tr, 3) and tr.skipped == 0


def test_a_bad_train_sample_skipped_leaves_its_micro_batch_one_smaller(shards_copy):
    """In the global order a skipped sample is not replaced: the other samples of its step stay where they are
    (its micro-batch is one smaller); a micro-batch with no good sample at all stops the loader naming it."""
    to_format_1(shards_copy)
    rows = read_split(shards_copy, "train")
    _mutate_sample(shards_copy, "train", 0, 5, np.array(rows[5][:-1], dtype=np.uint16))  # too short
    ld = loader(shards_copy, shuffle=False, on_bad_sample="skip")
    got = take(ld, 3)
    assert [[tuple(r) for r in b] for b in got] == [rows[0:4], [rows[4], *rows[6:8]], rows[8:12]]
    assert ld.skipped == 1 and ld.position == 12
    single = loader(shards_copy, shuffle=False, on_bad_sample="skip", micro_batch=1)
    with pytest.raises(DataError, match="every sample of the micro-batch at global position 5 .* is bad"):
        take(single, 6)


def test_format_1_shards_read_the_same_samples(shards, shards_copy):
    to_format_1(shards_copy)
    assert load_manifest(shards_copy)["version"] == 1
    assert [x.tolist() for x in loader(shards, "val")] == [x.tolist() for x in loader(shards_copy, "val")]
    epoch = len(loader(shards))  # train is an infinite stream: one epoch and a bit, shuffled
    assert take(loader(shards), epoch + 3) == take(loader(shards_copy), epoch + 3)


@pytest.mark.parametrize("kind,match,rows", [
    ("oov", r"sample 3 \(member 000000\.npy row 3\): token id 60000 outside the vocabulary \[0, 50281\)", 1),
    ("dtype", r"sample 0 \(member 000000\.npy row 0\): member 000000\.npy: dtype int32, expected uint16", None),
    ("short", r"sample 0 \(member 000000\.npy row 0\): member 000000\.npy: shape \(\d+, 64\), expected "
              r"\(rows, 65\)", None),
])
def test_bad_rows_and_blocks_of_format_2(shards_copy, kind, match, rows):
    """Format 2: a bad row is that sample; a block that does not decode makes each of its rows a bad sample."""
    block = np.array(read_split(shards_copy, "val")[:PER_SHARD], dtype=np.uint16)
    assert load_manifest(shards_copy)["samples_per_member"] >= PER_SHARD  # one block per shard here
    bad = {"oov": np.where(np.arange(len(block))[:, None] == 3, np.uint16(60000), block),
           "dtype": block.astype(np.int32), "short": block[:, :-1]}[kind]
    _mutate_sample(shards_copy, "val", 0, 0, bad)
    with pytest.raises(DataError, match=match):
        list(loader(shards_copy, "val"))
    ld = loader(shards_copy, "val", on_bad_sample="skip", micro_batch=8)
    total = sum(len(b) for b in ld)
    assert ld.skipped == (rows or len(block)) and total == len(read_split(shards_copy, "val")) - ld.skipped


def test_manifest_validation(shards_copy, tok_path):
    rewrite_manifest(shards_copy, lambda m: m.pop("dtype"))
    with pytest.raises(DataError, match="field 'dtype' is missing"):
        load_manifest(shards_copy)
    rewrite_manifest(shards_copy, lambda m: m.update(dtype="uint16"))
    rewrite_manifest(shards_copy, lambda m: m["splits"]["train"].update(samples=1))
    with pytest.raises(DataError, match="splits.train.samples=1 but its shards hold"):
        loader(shards_copy)
    rewrite_manifest(shards_copy, lambda m: m["splits"]["train"].update(
        samples=sum(s["samples"] for s in m["splits"]["train"]["shards"])))
    with pytest.raises(DataError, match="tokenizer hash mismatch"):
        loader(shards_copy, expected_tokenizer_hash="0" * 64)
    (shards_copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        loader(shards_copy)


def test_tokenizer_hash_mismatch_between_shards_and_manifest(shards_copy):
    from metalm.data import train_bpe

    other = train_bpe(["another tokenizer entirely, another vocabulary"] * 20, 300)
    (shards_copy / "tokenizer.json").write_text(other.to_json())
    with pytest.raises(DataError, match="tokenizer.json: tokenizer hash mismatch"):
        loader(shards_copy)
    # format 1 shards carry the hash in their __meta__.json member too: a shard from another preparation shows
    to_format_1(shards_copy)
    rewrite_manifest(shards_copy, lambda m: m.update(tokenizer_hash=other.hash))
    with pytest.raises(DataError, match=r"shard .*shard-\d+\.tar: tokenizer hash mismatch"):
        take(loader(shards_copy), 1)


def test_shards_are_plain_webdataset(shards):
    """Other tools read the shards too: a plain webdataset pipeline gives every sample of every shard, as blocks
    (`to_tuple("npy")`) or one by one (`.unbatched()`), and nothing else (no metadata member)."""
    import webdataset as wds

    man = load_manifest(shards)
    for split in ("train", "val"):
        urls = [str(shards / rec["path"]) for rec in man["splits"][split]["shards"]]
        blocks = [b for (b,) in wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy")]
        assert all(b.ndim == 2 and b.shape[1] == SEQ + 1 and b.dtype == np.uint16 for b in blocks)
        rows = [tuple(r) for b in blocks for r in b.tolist()]
        assert rows == read_split(shards, split) and len(rows) == man["splits"][split]["samples"]
        single = [tuple(x.tolist()) for (x,) in wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy")
                  .unbatched()]
        assert single == rows
        assert sorted(loader(shards, split, shuffle=False, micro_batch=1).__iter__().__next__().tolist()[0]) \
            == sorted(rows[0])


def test_format_2_cuts_the_tar_overhead(corpus, tok_path, tmp_path):
    """At seq_len 128 one sample per member made shards about 4x their token bytes; blocks make it about 1x."""
    man = _prepare(corpus, tok_path, tmp_path / "s128", seq_len=128, samples_per_shard=2048, val_fraction=0.0,
                   max_docs=2500)
    rec = man["splits"]["train"]["shards"][0]
    assert rec["samples"] > 2000 and man["samples_per_member"] == 254  # 64 KiB blocks of 129 uint16 tokens
    token_bytes = rec["samples"] * 129 * 2
    assert rec["bytes"] / token_bytes < 1.05, (rec["bytes"], token_bytes)  # was 3.97 in format 1


def test_pretokenized_parquet_gives_the_same_shards(corpus, tok_path, tmp_path):
    """A pretokenized export (parquet `input_ids`, e.g. Dolma's) packs exactly like the text it came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(tok_path)
    with open(corpus, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, 50)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [tok.encode(r["text"]) for r in rows]
    pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))}), tmp_path / "ids.parquet")
    kw = dict(val_fraction=0.1, samples_per_shard=30, num_proc=1, progress=False)
    a = prepare(str(tmp_path / "t.jsonl"), tok_path, tmp_path / "a", 32, **kw)
    b = prepare(str(tmp_path / "ids.parquet"), tok_path, tmp_path / "b", 32, **kw)
    assert a["splits"] == b["splits"] and a["splits"]["train"]["samples"] > 30
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2], [3, 60000]], type=pa.list_(pa.int32()))}),
                   tmp_path / "oov.parquet")
    with pytest.raises(DataError, match="token id 60000 is outside"):
        prepare(str(tmp_path / "oov.parquet"), tok_path, tmp_path / "c", 32, **kw)


def test_a_corpus_too_small_for_a_validation_split_is_flagged(corpus, tok_path, tmp_path, caplog):
    """50 documents at val_fraction 0.01 hold out none (by the split's own hash), so the validation split is
    empty: prepare warns naming the fix, and a run with periodic validation is refused before its first step
    (it used to crash at its first validation, with a hint blaming val_fraction=0)."""
    from metalm.data.manifest import check_validation_split

    held_out = sum(is_val_doc(0, i, 0.01) for i in range(50))
    assert held_out == 0
    caplog.set_level("WARNING")
    man = _prepare(corpus, tok_path, tmp_path / "small", max_docs=50, val_fraction=0.01, num_proc=1)
    assert man["splits"]["val"]["samples"] == 0 and man["splits"]["train"]["samples"] > 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "the validation split is empty (0 held-out documents (val_fraction=0.01) gave 0 samples" in warning
    assert "larger --val-fraction" in warning and "train.val_every=0" in warning
    check_validation_split(man, "small", val_every=0, world_size=2)  # no periodic validation: nothing to check
    with pytest.raises(DataError, match=r"^small: the validation split is empty .*train\.val_every=0"):
        check_validation_split(man, "small", val_every=100, world_size=1)
    with pytest.raises(DataError, match="val_fraction=0.01") as e:
        loader(tmp_path / "small", "val")
    assert "val_fraction=0?" not in str(e.value)
    caplog.clear()  # enough for one rank, not for four: each rank needs a sample
    man = _prepare(corpus, tok_path, tmp_path / "some", max_docs=400, val_fraction=0.01, num_proc=1, seq_len=128)
    n = man["splits"]["val"]["samples"]
    assert 0 < n < 4 and not caplog.records
    check_validation_split(man, "some", val_every=100, world_size=n)
    with pytest.raises(DataError, match="too small .*fewer than world_size=4"):
        check_validation_split(man, "some", val_every=100, world_size=4)
