"""The on-disk checkpoint format (metalm.checkpoint): marker, latest, integrity, pruning, the trainer state, the
per-rank state file and the consolidated weights, one function at a time (no training)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from metalm import checkpoint as ckpt


# ------------------------------------------------------------------------------------------------ helpers


def make_checkpoint(root: Path, step: int, payload: bytes = b"w" * 4096, keep_last_k: int = 10) -> Path:
    """A checkpoint written the way the trainer writes one: files in .tmp-, recorded, sealed, renamed."""
    tmp = root / f".tmp-{ckpt.step_dir_name(step)}"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "optim_states.pt").write_bytes(payload + bytes([step % 256]))
    (tmp / "model.safetensors").write_bytes(payload[::-1])
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = ckpt.record_files(tmp, ckpt.checkpoint_files(tmp), checksums=True)
    final = root / ckpt.step_dir_name(step)
    ckpt.finalize(tmp, final, root, keep_last_k, files, step)
    return final


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "checkpoints"
    r.mkdir()
    return r


# ------------------------------------------------------------------------------------------------ integrity


def test_marker_records_every_file_and_latest_names_the_sealed_directory(root):
    c = make_checkpoint(root, 3)
    marker = json.loads((c / ckpt.MARKER).read_text())
    assert sorted(marker["files"]) == ["ds/optim_states.pt", "model.safetensors", "trainer_state.json"]
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in marker["files"].values())
    assert (root / "latest").read_text().strip() == c.name
    assert ckpt.is_complete(c) and ckpt.checkpoint_problem(c, checksums=True) is None
    assert not list(root.glob(".tmp-*"))


def test_truncated_file_makes_a_checkpoint_incomplete_even_with_its_marker(root, caplog):
    old, new = make_checkpoint(root, 3), make_checkpoint(root, 6)
    with open(new / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert not ckpt.is_complete(new)
    assert "model.safetensors has 100 bytes" in ckpt.checkpoint_problem(new)
    with caplog.at_level(logging.WARNING, logger="metalm.checkpoint"):
        assert ckpt.find_latest(root) == old
        assert ckpt.list_checkpoints(root) == [old]
    assert str(new) in caplog.text and "model.safetensors has 100 bytes" in caplog.text


def test_bit_rot_is_caught_by_the_checksum_and_resume_falls_back(root, caplog):
    old, new = make_checkpoint(root, 3), make_checkpoint(root, 6)
    data = bytearray((new / "ds" / "optim_states.pt").read_bytes())
    data[7] ^= 0x01
    (new / "ds" / "optim_states.pt").write_bytes(bytes(data))
    assert ckpt.is_complete(new)  # sizes match: the cheap check cannot tell
    assert ckpt.find_latest(root) == new
    with caplog.at_level(logging.WARNING, logger="metalm.checkpoint"):
        assert ckpt.find_latest(root, verify=True) == old
    assert f"ignoring checkpoint {new}" in caplog.text and "sha256 differs" in caplog.text


def test_missing_marker_or_missing_directory_is_ignored_with_a_warning(root, caplog):
    old, new = make_checkpoint(root, 3), make_checkpoint(root, 6)
    (new / ckpt.MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="metalm.checkpoint"):
        assert ckpt.find_latest(root) == old
        assert ckpt.list_checkpoints(root) == [old]
    assert f"ignoring incomplete checkpoint {new}: no COMPLETE marker" in caplog.text
    shutil.rmtree(old)
    (root / "latest").write_text("step_00000003\n")
    assert ckpt.find_latest(root) is None  # the pointer names nothing usable and there is nothing else


def test_the_evaluator_skips_a_checkpoint_without_its_marker(root):
    from metalm.eval.sources import Source

    c = make_checkpoint(root, 3)
    src = Source(str(root))
    assert src.complete(str(c))
    (c / ckpt.MARKER).unlink()
    assert not src.complete(str(c))


def test_legacy_marker_without_records_still_counts(root):
    c = make_checkpoint(root, 3)
    (c / ckpt.MARKER).write_text("ok\n")
    assert ckpt.is_complete(c) and ckpt.find_latest(root, verify=True) == c


def test_a_failed_seal_leaves_latest_and_the_previous_checkpoint_alone(root, monkeypatch):
    old = make_checkpoint(root, 3)
    tmp = root / ".tmp-step_00000006"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt.layout, "write_atomic", full)
    with pytest.raises(OSError):
        ckpt.finalize(tmp, root / "step_00000006", root, 3, {}, 6)
    assert not (root / "step_00000006").exists() and (root / "latest").read_text().strip() == old.name
    assert ckpt.find_latest(root, verify=True) == old


def test_prune_keeps_the_newest_and_the_one_latest_names(root):
    made = [make_checkpoint(root, s, keep_last_k=2) for s in (1, 2, 3, 4)]
    assert ckpt.list_checkpoints(root) == made[2:]
    ckpt.prune(root, 1, keep=made[2])
    assert ckpt.list_checkpoints(root) == made[2:]  # the newest by name, and the kept one


# ------------------------------------------------------------------------------------------------ resume checks

STATE = {"world_size": 2, "global_batch": 16, "micro_batch": 4, "seq_len": 64, "tokenizer_hash": "a" * 64}
SAVED = ckpt.TrainerState(step=6, **STATE)


def test_resume_refuses_another_seq_len_and_accepts_another_split_of_the_batch():
    msg = ckpt.resume_mismatch(SAVED, {**STATE, "seq_len": 128})
    assert msg is not None and "train.seq_len=64, this run has 128" in msg
    for key, value in (("world_size", 4), ("global_batch", 32), ("micro_batch", 2)):
        assert ckpt.resume_mismatch(SAVED, {**STATE, key: value}) is None, key  # converted / continued, not refused


def test_resume_refuses_another_tokenizer_and_accepts_the_same_run():
    msg = ckpt.resume_mismatch(SAVED, {**STATE, "tokenizer_hash": "b" * 64})
    assert msg is not None and "tokenizer mismatch" in msg and "aaaaaaaaaaaaaaaa" in msg
    assert ckpt.resume_mismatch(SAVED, dict(STATE)) is None
    older = ckpt.TrainerState(step=6, **{k: v for k, v in STATE.items() if k != "tokenizer_hash"})
    assert ckpt.resume_mismatch(older, {**STATE, "tokenizer_hash": "b" * 64}) is None  # older checkpoints


# ------------------------------------------------------------------------------------------------ rank state

def test_files_written_by_save_rank_state_are_whole_and_load_back(tmp_path):
    ckpt.save_rank_state(tmp_path, 1, {"positions": [3]})
    assert not [p for p in tmp_path.iterdir() if p.name != "rank_00001.pt"]  # no temporary left over
    state = ckpt.load_rank_state(tmp_path, 1)
    assert state["data"] == {"positions": [3]} and "torch" in state["rng"]
    os.truncate(tmp_path / "rank_00001.pt", 10)
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00001\.pt is unreadable"):
        ckpt.load_rank_state(tmp_path, 1)



def test_a_pickle_in_a_rank_state_file_is_refused_naming_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"data": "{}", "rng": {"torch": torch.get_rng_state()}, "x": Evil()}, tmp_path / "rank_00000.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_rank_state(tmp_path, 0)
    assert f"{tmp_path / 'rank_00000.pt'}: refusing to unpickle it" in str(e.value)
    assert "weights_only" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ removal


def test_prune_renames_before_deleting_so_a_cut_deletion_never_looks_complete(root, monkeypatch):
    made = [make_checkpoint(root, s) for s in (1, 2, 3)]
    seen = []

    def cut(path, ignore_errors=False):  # the process dies after deleting part of the directory
        seen.append(Path(path).name)
        (Path(path) / "model.safetensors").unlink()

    monkeypatch.setattr(ckpt.layout.shutil, "rmtree", cut)
    ckpt.prune(root, 1)
    assert seen and all(n.startswith(".tmp-delete-step_0000000") for n in seen)
    assert ckpt.list_checkpoints(root) == [made[2]]  # what is left of the old ones is out of the namespace
    monkeypatch.undo()
    ckpt.clean_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]


def test_clean_stale_keeps_a_newer_incomplete_directory(root, caplog):
    make_checkpoint(root, 3)
    (root / "step_00000009").mkdir()  # not older than latest: reported by readers, not deleted
    ckpt.clean_stale(root)
    assert (root / "step_00000009").is_dir()


# ------------------------------------------------------------------------------------------------ trainer state


@pytest.mark.parametrize("content,expected", [
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"step": "6"}', "'step' must be a non-negative integer"),
    ('{"step": 6, "guards": []}', "'guards' must be an object"),
    ("{not json", "not valid JSON"),
])
def test_a_foreign_trainer_state_is_an_error_naming_the_file(tmp_path, content, expected):
    (tmp_path / "trainer_state.json").write_text(content)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.read_state(tmp_path)
    assert str(tmp_path / "trainer_state.json") in str(e.value) and expected in str(e.value)


def test_trainer_state_round_trips_and_older_files_take_defaults(tmp_path):
    s = ckpt.TrainerState(step=5, tokens=10, world_size=2, special_ids={"eos": 0}, data_shards="/data/shards")
    ckpt.write_state(tmp_path, s)
    assert ckpt.read_state(tmp_path) == s
    (tmp_path / "trainer_state.json").write_text('{"step": 5, "tokens": 10, "unknown_later_key": 1}')
    old = ckpt.read_state(tmp_path)
    assert old.step == 5 and old.special_ids == {} and old.world_size is None


# ------------------------------------------------------------------------------------------------ weights


def _model_checkpoint(root: Path) -> Path:
    from metalm.config import load_config, to_yaml
    from metalm.model import build_model

    cfg = load_config(None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.ffn_hidden=32", "model.vocab_size=64", "model.max_seq_len=16",
                             "train.seq_len=16"])
    tmp = root / ".tmp-step_00000001"
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    ckpt.save_weights(build_model(cfg.model), tmp / "model.safetensors")
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    ckpt.write_state(tmp, ckpt.TrainerState(step=1))
    files = ckpt.record_files(tmp, ckpt.checkpoint_files(tmp), checksums=True)
    ckpt.finalize(tmp, root / "step_00000001", root, 3, files, 1)
    return root / "step_00000001"


def test_load_model_refuses_weights_corrupted_in_place(root):
    c = _model_checkpoint(root)
    model, _ = ckpt.load_model(c)
    assert model.cfg.d_model == 16
    f = c / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:-4] = b"\xff\xff\xff\x7f"  # same size, a weight becomes NaN
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: sha256 differs from the COMPLETE marker"):
        ckpt.load_model(c)


def test_load_model_names_the_file_of_a_fake_weights_file(root):
    c = _model_checkpoint(root)
    (c / "model.safetensors").write_bytes(b"\xff" * 64)
    files = ckpt.record_files(c, ckpt.checkpoint_files(c), checksums=True)
    ckpt.finalize(c, root / "step_00000002", root, 3, files, 2)  # a marker that matches the fake file
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_model(root / "step_00000002")
    assert f"{root / 'step_00000002' / 'model.safetensors'}: not a readable safetensors file" in str(e.value)


def test_weights_files_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------ the store


def test_the_store_finds_the_same_checkpoints_locally_and_behind_a_url(root, tmp_path):
    """CheckpointStore over a local directory and over a copy behind a URL (memory://) agrees on what is complete
    and which is latest: a checkpoint without its marker, or with a file shorter than its marker records, is not;
    `latest` naming an incomplete one falls back to the newest complete one. Fetching is verified."""
    import fsspec

    for step in (1, 2, 3):
        make_checkpoint(root, step)
    (root / "step_00000004").mkdir()  # a save that never finished: no marker
    (root / "step_00000003" / "model.safetensors").write_bytes(b"short")  # truncated after its save
    fs = fsspec.filesystem("memory")
    for f in root.rglob("*"):
        if f.is_file():
            fs.pipe(f"/ckstore/{f.relative_to(root).as_posix()}", f.read_bytes())
    try:
        for where in (str(root), "memory://ckstore"):
            store = ckpt.CheckpointStore(where)
            assert store.names() == ["step_00000001", "step_00000002", "step_00000003"] + (
                ["step_00000004"] if where == str(root) else [])  # an object store has no empty directories
            assert store.completed() == ["step_00000001", "step_00000002"], where
            assert store.problem("step_00000003") == \
                "model.safetensors has 5 bytes, the COMPLETE marker records 4096 (truncated or modified)"
            assert store.latest() == "step_00000002", where  # `latest` names step 3, which is not complete
            got = store.download("step_00000002", tmp_path / f"fetched-{len(where)}", checksums=True)
            assert (got / "ds" / "optim_states.pt").read_bytes() == \
                (root / "step_00000002" / "ds" / "optim_states.pt").read_bytes()
            with pytest.raises(ckpt.CheckpointError, match="step_00000003 downloaded, but it is not a complete "
                                                           "checkpoint: model.safetensors has 5 bytes"):
                store.download("step_00000003", tmp_path / f"bad-{len(where)}", checksums=True)
    finally:
        fs.rm("/ckstore", recursive=True)


def test_locate_takes_a_run_its_checkpoints_latest_or_a_step(root, tmp_path):
    for step in (1, 2):
        make_checkpoint(root, step)
    run = root.parent
    for given in (run, root, root / "latest", f"{root}/"):
        store, name = ckpt.locate(str(given))
        assert (store.url, name) == (str(root), "step_00000002"), given
    assert ckpt.locate(str(root / "step_00000001"))[1] == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match=r"no such directory \(expected a checkpoint directory"):
        ckpt.locate(str(tmp_path / "nothing"))
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match=r"no complete checkpoint in .*fresh/checkpoints \(no step_"):
        ckpt.locate(str(tmp_path / "fresh"))
