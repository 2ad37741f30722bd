"""The checkpointer (metalm.train.checkpointer) on one process, with a stand-in engine and loader: what a save
writes, the failure policy (retry, then stop), resume choosing and refusing checkpoints."""
from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metalm import checkpoint as ckpt
from metalm.config import load_config
from metalm.train.checkpointer import Checkpointer
from metalm.train.dist import Collectives, Dist
from metalm.train.errors import TrainingError


class StandInEngine:
    """Writes a small `ds/` state like DeepSpeed's; `fail` makes the next saves report a full disk."""

    def __init__(self):
        self.fail = False
        self.loaded: list = []
        self.lm = torch.nn.Linear(3, 2)

    def save(self, directory: str, errors: list) -> None:
        if self.fail:
            errors.append(OSError(errno.ENOSPC, "No space left on device", f"{directory}/ds/model_states.pt"))
            return
        (Path(directory) / "ds").mkdir()
        (Path(directory) / "ds" / "model_states.pt").write_bytes(b"s" * 512)

    def load(self, directory: str) -> None:
        self.loaded.append(directory)

    @contextmanager
    def gather_for_export(self):
        yield SimpleNamespace(lm=self.lm, head=None)


class StandInLoader:
    def __init__(self):
        self.position = 7
        self.data_hash = "d" * 64  # the fingerprint of the data it reads (ShardLoader.data_hash)
        self.restored = None

    def state_dict(self) -> dict:
        return {"position": self.position, "data_hash": self.data_hash}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state


def make(tmp_path: Path, *overrides: str):
    cfg = load_config(None, ["checkpoint.keep_last_k=2", *overrides]).checkpoint
    logged: list = []
    engine, loader = StandInEngine(), StandInLoader()
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {}}')
    c = Checkpointer(cfg, tmp_path / "checkpoints", Collectives(Dist(0, 1, 0, torch.device("cpu"))), engine,
                     dataloader=loader, config_yaml="train:\n  seed: 0\n", tokenizer_json=tok,
                     estimate_bytes=1 << 10, log=logged.append)
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return c, engine, loader, logged


def state(step: int) -> ckpt.TrainerState:
    return ckpt.TrainerState(step=step, tokens=step * 100, world_size=1, global_batch=8, micro_batch=4, seq_len=64,
                             tokenizer_hash="a" * 64, special_ids={"eos": 0, "mask": 5})


def test_a_save_writes_every_part_records_it_and_prunes(tmp_path):
    c, _, loader, _ = make(tmp_path)
    for step in (2, 4, 6):
        assert c.save(state(step), final=False)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    latest = ckpt.find_latest(root, verify=True)
    assert latest.name == "step_00000006"
    marker = json.loads((latest / ckpt.MARKER).read_text())["files"]
    assert sorted(marker) == ["config.yaml", "ds/model_states.pt", "latest", "model.safetensors", "rank_00000.pt",
                              "tokenizer.json", "trainer_state.json"]
    assert (latest / "latest").read_text() == "ds\n"  # DeepSpeed's pointer to its tag, for its zero_to_fp32.py
    assert ckpt.read_state(latest) == state(6)
    assert ckpt.load_rank_state(latest, 0)["data"] == {"position": loader.position, "data_hash": loader.data_hash}


def test_a_failed_save_is_retried_then_stops_the_run(tmp_path, console):
    c, engine, _, logged = make(tmp_path, "checkpoint.max_failed_saves=1")
    assert c.save(state(3), final=False)
    engine.fail = True
    assert c.save(state(6), final=False) is False
    assert "training goes on and retries at the next checkpoint" in console.readouterr().err
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial directory is gone
    with pytest.raises(TrainingError) as e:
        c.save(state(9), final=False)
    msg = str(e.value)
    assert "ENOSPC [Errno 28]" in msg and "2 failed saves in a row" in msg and "step_00000003" in msg
    assert [r["step"] for r in logged] == [6, 9] and all("checkpoint_failed" in r for r in logged)
    assert c.latest().name == "step_00000003"


def test_a_failed_final_save_stops_at_once_and_a_good_save_resets_the_count(tmp_path):
    c, engine, _, _ = make(tmp_path, "checkpoint.max_failed_saves=5")
    engine.fail = True
    assert c.save(state(2), final=False) is False and c.failed_saves == 1
    engine.fail = False
    assert c.save(state(4), final=False) and c.failed_saves == 0
    engine.fail = True
    with pytest.raises(TrainingError, match="stopping after the final save"):
        c.save(state(6), final=True)


def test_resume_loads_the_latest_and_refuses_another_geometry(tmp_path):
    c, engine, loader, _ = make(tmp_path)
    c.save(state(4), final=False)
    now = {"world_size": 1, "global_batch": 8, "micro_batch": 4, "seq_len": 64, "tokenizer_hash": "a" * 64}
    got = c.resume(now)
    assert got == state(4) and engine.loaded == [str(tmp_path / "checkpoints" / "step_00000004")]
    assert loader.restored == {"position": 7, "data_hash": "d" * 64}
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from .*train.seq_len=64, this run has 128"):
        c.resume({**now, "seq_len": 128})
    # another number of processes goes through DeepSpeed's converter, which the stand-in's ds/ does not satisfy
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004/ds: DeepSpeed's ds_to_universal could not"):
        c.resume({**now, "world_size": 2, "zero_stage": 2})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the conversion's scratch directory is gone
    never, _, _, _ = make(tmp_path, "checkpoint.resume=never")
    assert never.resume(now) is None


def test_prepare_sweeps_what_interrupted_saves_and_prunes_left(tmp_path):
    c, _, _, _ = make(tmp_path)
    c.save(state(2), final=False)
    c.save(state(4), final=False)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000006" / "ds").mkdir(parents=True)
    (root / ".tmp-delete-step_00000001-99").mkdir()
    (root / "step_00000002" / ckpt.MARKER).unlink()  # an old checkpoint whose deletion was cut short
    c.prepare()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]


def test_a_failed_save_before_any_checkpoint_says_so_instead_of_none(tmp_path, console):
    """Issue 26 item 7: with no complete checkpoint yet the messages said "the last complete checkpoint is None"."""
    c, engine, _, _ = make(tmp_path, "checkpoint.max_failed_saves=1")
    engine.fail = True
    assert c.save(state(2), final=False) is False
    warned = console.readouterr().err
    assert "no complete checkpoint exists yet" in warned and "None" not in warned
    with pytest.raises(TrainingError) as e:
        c.save(state(4), final=True)
    assert "no complete checkpoint exists yet, a rerun starts from step 0" in str(e.value)
    assert "None" not in str(e.value)
