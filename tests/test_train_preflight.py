"""Before any work (metalm.train.preflight): writable directories, room for checkpoints, a step that fits in
memory, and the run directory's lock."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from metalm.train import preflight
from metalm.train.errors import TrainingError



def test_run_dir_through_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    with pytest.raises(TrainingError) as e:
        preflight.probe_dirs(run_dir, run_dir / "checkpoints", "rank0")
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
            preflight.probe_dirs(mnt, mnt / "checkpoints", "rank0")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_free_space_check_errors_below_one_checkpoint_and_warns_below_k_plus_one(tmp_path, monkeypatch):
    usage = SimpleNamespace(total=10 << 30, used=0, free=0)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage)
    need = preflight.checkpoint_bytes(100_000_000, "bf16", 2)
    usage.free = need // 2
    with pytest.raises(TrainingError, match="not enough free space for a checkpoint"):
        preflight.check_free_space(tmp_path, need, keep_last_k=3)
    usage.free = need * 2
    (warning,) = preflight.check_free_space(tmp_path, need, keep_last_k=3)
    assert "fewer than checkpoint.keep_last_k + 1 = 4" in warning
    usage.free = need * 5
    assert preflight.check_free_space(tmp_path / "not" / "yet", need, keep_last_k=3) == []


def test_checkpoint_size_estimate_by_precision_and_stage():
    assert preflight.checkpoint_bytes(1000, "fp32", 0) == 1000 * 16 + (1 << 20)
    assert preflight.checkpoint_bytes(1000, "fp32", 2) == 1000 * 20 + (1 << 20)
    assert preflight.checkpoint_bytes(1000, "bf16", 3) == 1000 * 18 + (1 << 20)



# ------------------------------------------------------------------------------------------------ memory


def test_a_step_that_cannot_fit_is_refused_with_the_numbers_and_the_key(monkeypatch):
    monkeypatch.setattr(preflight, "_available_host_bytes", lambda: 8 << 30)
    common = dict(d_model=48, n_layers=4, ffn_hidden=192, vocab_size=50304, seq_len=128, precision="fp32",
                  zero_stage=2, world_size=2, fused_linear_ce=False)
    small = preflight.step_memory_bytes(5_000_000, micro_batch=8, **common)
    # hand-computed: 8 x 128 tokens x 50,304 x 4 bytes x 3 copies of the logits
    assert small["logits"] == 8 * 128 * 50304 * 4 * 3
    assert small["optimizer"] == 5_000_000 * 8 // 2 and small["parameters"] == 5_000_000 * 4
    assert preflight.check_step_memory(small, "cpu", accum=1) == []
    huge = preflight.step_memory_bytes(5_000_000, micro_batch=4096, **common)
    with pytest.raises(TrainingError) as e:
        preflight.check_step_memory(huge, "cpu", accum=1)
    msg = str(e.value)
    assert "more than the 8.00 GiB of available host memory" in msg and "train.micro_batch" in msg
    assert "logits 294.75 GiB" in msg  # 4096 x 128 x 50,304 x 4 bytes x 3


def test_an_absurd_accumulation_count_is_a_warning():
    (warning,) = preflight.check_step_memory({"parameters": 1}, "cpu", accum=1_048_576)
    assert "1,048,576 gradient-accumulation micro-batches" in warning


# ------------------------------------------------------------------------------------------------ run lock


def test_a_second_holder_of_the_run_lock_is_refused_naming_the_first(tmp_path):
    import os
    import socket

    first = preflight.RunLock(tmp_path)
    first.acquire()
    holder = subprocess.run([sys.executable, "-c", "import sys; from metalm.train.preflight import RunLock; "
                             f"RunLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True, timeout=60)
    assert holder.returncode != 0
    assert f"train.run_dir {tmp_path} is in use by another trainer (host {socket.gethostname()}, pid {os.getpid()}" \
        in holder.stderr
    first.release()
    again = preflight.RunLock(tmp_path)
    again.acquire()  # released: a new trainer takes it
    again.release()


def test_the_run_lock_dies_with_its_holder(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from metalm.train.preflight import RunLock; "
                          f"lock = RunLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); "
                          "time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(TrainingError, match="in use by another trainer"):
        preflight.RunLock(tmp_path).acquire()
    p.kill()
    p.wait()
    lock = preflight.RunLock(tmp_path)
    lock.acquire()  # kill -9 released it: no stale lock
    lock.release()
