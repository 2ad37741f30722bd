"""Checkpoint integrity, resume checks, guards and failure policies, one function at a time (no training)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metalm.train import checkpoint as ckpt
from metalm.train import guards
from metalm.train.guards import NonFiniteGuard, SpikeDetector, TrainingError


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
    from metalm.eval.sources import LocalSource

    c = make_checkpoint(root, 3)
    src = LocalSource(str(root))
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

    monkeypatch.setattr(ckpt, "write_atomic", full)
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


@pytest.mark.parametrize("key,value", [("world_size", 4), ("global_batch", 32), ("micro_batch", 2), ("seq_len", 128)])
def test_resume_refuses_another_geometry(key, value):
    msg = ckpt.resume_mismatch(STATE, {**STATE, key: value})
    assert msg is not None and "world_size, global_batch, micro_batch, seq_len = (2, 16, 4, 64)" in msg


def test_resume_refuses_another_tokenizer_and_accepts_the_same_run():
    msg = ckpt.resume_mismatch(STATE, {**STATE, "tokenizer_hash": "b" * 64})
    assert msg is not None and "tokenizer mismatch" in msg and "aaaaaaaaaaaaaaaa" in msg
    assert ckpt.resume_mismatch(STATE, dict(STATE)) is None
    assert ckpt.resume_mismatch({k: v for k, v in STATE.items() if k != "tokenizer_hash"},
                                {**STATE, "tokenizer_hash": "b" * 64}) is None  # older checkpoints


# ------------------------------------------------------------------------------------------------ guards


def test_nonfinite_guard_skips_resets_and_stops():
    g = NonFiniteGuard("skip", max_in_row=3)
    assert [g.check(s, b, 2) for s, b in ((1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 1))] == \
        [False, True, True, False, True, True]
    with pytest.raises(TrainingError, match=r"3 steps in a row \(steps 5\.\.7"):
        g.check(7, 1, 2)
    with pytest.raises(TrainingError, match="non-finite loss at step 9 on 1 of 2 rank"):
        NonFiniteGuard("stop", 3).check(9, 1, 2)
    h = NonFiniteGuard("skip", 3)
    h.load_state_dict(json.loads(json.dumps(NonFiniteGuard("skip", 3).state_dict() | {"in_row": 2})))
    with pytest.raises(TrainingError):
        h.check(10, 1, 1)  # the count in a row survives a resume


def test_spike_detector_flags_a_jump_only_with_enough_history():
    d = SpikeDetector(window=20, sigma=4.0, min_history=5)
    assert d.update("ar", 50.0) is None  # no history yet
    base = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.02]
    d2 = SpikeDetector(window=20, sigma=4.0, min_history=5)
    assert [d2.update("ar", v) for v in base] == [None] * len(base)
    spike = d2.update("ar", 4.0)
    assert spike["loss_spike"] == "ar" and spike["sigma"] > 4
    assert d2.update("meta", 4.0) is None  # kinds keep separate windows
    assert d2.update("ar", float("nan")) is None
    restored = SpikeDetector(window=20, sigma=4.0, min_history=5)
    restored.load_state_dict(json.loads(json.dumps(d2.state_dict())))
    assert restored.update("ar", 9.0) == d2.update("ar", 9.0)  # a resumed run decides the same
    assert SpikeDetector(window=0, sigma=1.0).update("ar", 1e9) is None


def test_update_suppressed_restores_the_schedulers_step_wrapper():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    wrapped = vars(opt).get("step")
    p.grad = torch.ones(3)
    with guards.update_suppressed(opt):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state
    assert vars(opt).get("step") is wrapped
    opt.step()
    sched.step()
    assert not torch.equal(p, torch.ones(3)) and opt.state[p]["step"] == 1


# ------------------------------------------------------------------------------------------------ preflight


def test_run_dir_through_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    with pytest.raises(TrainingError) as e:
        guards.probe_dirs(run_dir, run_dir / "checkpoints", "rank0")
    assert f"train.run_dir {run_dir}: cannot write there" in str(e.value)
    assert "ENOTDIR" in str(e.value) or "EEXIST" in str(e.value)


def test_read_only_filesystem_is_a_clear_error(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here: {res.stderr.decode().strip()}")
    try:
        with pytest.raises(TrainingError, match=r"EROFS \[Errno 30\] Read-only file system"):
            guards.probe_dirs(mnt, mnt / "checkpoints", "rank0")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_free_space_check_errors_below_one_checkpoint_and_warns_below_k_plus_one(tmp_path, monkeypatch):
    usage = SimpleNamespace(total=10 << 30, used=0, free=0)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage)
    need = guards.checkpoint_bytes(100_000_000, "bf16", 2)
    usage.free = need // 2
    with pytest.raises(TrainingError, match="not enough free space for a checkpoint"):
        guards.check_free_space(tmp_path, need, keep_last_k=3)
    usage.free = need * 2
    (warning,) = guards.check_free_space(tmp_path, need, keep_last_k=3)
    assert "fewer than checkpoint.keep_last_k + 1 = 4" in warning
    usage.free = need * 5
    assert guards.check_free_space(tmp_path / "not" / "yet", need, keep_last_k=3) == []


def test_checkpoint_size_estimate_by_precision_and_stage():
    assert guards.checkpoint_bytes(1000, "fp32", 0) == 1000 * 16 + (1 << 20)
    assert guards.checkpoint_bytes(1000, "fp32", 2) == 1000 * 20 + (1 << 20)
    assert guards.checkpoint_bytes(1000, "bf16", 3) == 1000 * 18 + (1 << 20)


# ------------------------------------------------------------------------------------------------ signals


def test_duplicate_delivery_is_one_request_a_later_signal_exits_at_once(monkeypatch):
    from metalm.train import guards

    clock = {"t": 100.0}
    exits = []
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(guards.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(guards.StopRequest, "_say", staticmethod(lambda text: None))
    stop = guards.StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested and stop.signame == "SIGINT" and not exits
    clock["t"] += 0.01
    stop._handle(signal.SIGTERM, None)  # the launcher forwarding the same Ctrl-C
    assert not exits
    clock["t"] += 1.0
    stop._handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


# ------------------------------------------------------------------------------------------------ save failures


class FakeCheckpointEngine:
    def __init__(self):
        self.calls = []

    def save(self, state, path):
        self.calls.append(path)
        if path == "a":
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    def makedirs(self, path, exist_ok=False):
        self.calls.append(f"mkdir {path}")


class FakeEngine:
    def __init__(self):
        self.checkpoint_engine = FakeCheckpointEngine()
        self.barriers = 0

    def _copy_recovery_script(self, path):
        self.checkpoint_engine.calls.append(f"copy {path}")

    def save_checkpoint(self):
        self.checkpoint_engine.makedirs("d")
        self.barriers += 1  # DeepSpeed's collectives, which every rank must reach
        self.checkpoint_engine.save({}, "a")
        self.checkpoint_engine.save({}, "b")
        self._copy_recovery_script("d")
        self.barriers += 1


def test_deepspeed_write_errors_are_recorded_and_every_collective_still_runs():
    engine = FakeEngine()
    errors: list = []
    with ckpt.deferred_io_errors(engine, errors):
        engine.save_checkpoint()
    assert engine.barriers == 2 and len(errors) == 1 and "unexpected pos" in str(errors[0])
    assert engine.checkpoint_engine.calls == ["mkdir d", "a"]  # later writes of the failed save are skipped
    assert "save" not in vars(engine.checkpoint_engine) and "_copy_recovery_script" not in vars(engine)
    with pytest.raises(RuntimeError):
        engine.checkpoint_engine.save({}, "a")  # outside the block errors raise again


def _policy_trainer(tmp_path, max_failed_saves: int):
    from metalm.train.loop import Trainer
    from metalm.train.saving import SaveFailed

    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(checkpoint=SimpleNamespace(max_failed_saves=max_failed_saves))
    t.dist = SimpleNamespace(rank=0, world_size=1)
    t.ckpt_root = tmp_path
    t.failed_saves, t.step = 0, 6
    logged = []
    t.metrics = SimpleNamespace(log=logged.append)

    def save():
        raise SaveFailed(f"checkpoint of step {t.step} in {tmp_path}/.tmp-step_00000006 failed: rank 0: ENOSPC "
                         f"[Errno 28] No space left on device: '{tmp_path}/x'")

    t.save_checkpoint = save
    return t, logged


def test_failed_save_is_retried_then_stops_the_run(tmp_path, capsys):
    make_checkpoint(tmp_path, 3)
    t, logged = _policy_trainer(tmp_path, max_failed_saves=1)
    assert t._save(final=False) is False
    assert "training goes on and retries at the next checkpoint" in capsys.readouterr().err
    t.step = 9
    with pytest.raises(TrainingError) as e:
        t._save(final=False)
    msg = str(e.value)
    assert "ENOSPC [Errno 28]" in msg and "2 failed saves in a row" in msg and "step_00000003" in msg
    assert [r["step"] for r in logged] == [6, 9] and all("checkpoint_failed" in r for r in logged)


def test_failed_final_save_stops_at_once(tmp_path):
    t, _ = _policy_trainer(tmp_path, max_failed_saves=5)
    with pytest.raises(TrainingError, match="stopping after the final save"):
        t._save(final=True)


def test_a_successful_save_resets_the_failure_count(tmp_path):
    t, _ = _policy_trainer(tmp_path, max_failed_saves=1)
    assert t._save(final=False) is False
    t.save_checkpoint = lambda: tmp_path
    assert t._save(final=False) is True and t.failed_saves == 0


def test_files_written_by_save_rank_state_are_whole_and_load_back(tmp_path):
    ckpt.save_rank_state(tmp_path, 1, {"positions": [3]})
    assert not [p for p in tmp_path.iterdir() if p.name != "rank_00001.pt"]  # no temporary left over
    state = ckpt.load_rank_state(tmp_path, 1)
    assert state["data"] == {"positions": [3]} and "torch" in state["rng"]
    os.truncate(tmp_path / "rank_00001.pt", 10)
    with pytest.raises(Exception):
        ckpt.load_rank_state(tmp_path, 1)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override,key", [
    ("train.nonfinite_policy=ignore", "train.nonfinite_policy"),
    ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
    ("train.spike_window=-1", "train.spike_window"),
    ("train.spike_sigma=0", "train.spike_sigma"),
    ("checkpoint.max_failed_saves=-1", "checkpoint.max_failed_saves"),
    ("checkpoint.checksums=maybe", "checkpoint.checksums"),
])
def test_bad_reliability_settings_are_refused_naming_the_key(override, key):
    from metalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
