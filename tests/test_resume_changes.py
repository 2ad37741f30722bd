"""What may change between a checkpoint and the run that resumes it (metalm.checkpoint.compat; issue 26 item 3):
a model-shape change is refused in one line naming the key, both values and the ways out; a change that loads
(rope_theta, the learning rate, the schedule's length) is one warning; shards other than the checkpoint's, even
with the same sample count, are refused unless checkpoint.allow_data_change=true. Real one-process CPU runs."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from procs import cpu_run_env

from metalm.checkpoint import compat

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--config", str(REPO / "configs" / "cpu-tiny.yaml"), "train.seq_len=64", "model.max_seq_len=64",
    "train.micro_batch=4", "train.global_batch=8", "model.n_layers=2", "train.log_every=1", "train.val_every=0",
    "optim.warmup_steps=2", "checkpoint.every=2", "logging.wandb=false", "logging.progress=false",
    "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=2",
]


def train(run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metalm.cli.train", *COMMON, f"data.shards={shards}",
                           f"train.run_dir={run_dir}", *extra], cwd=REPO, env=cpu_run_env(), capture_output=True,
                          text=True, timeout=300)


def _lines(text: str, needle: str) -> list[str]:
    return [ln for ln in text.splitlines() if needle in ln]


@pytest.fixture(scope="module")
def checkpointed(shards, tmp_path_factory) -> Path:
    """A run directory holding one checkpoint, at step 2."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    out = train(run_dir, shards, "train.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / "samples").exists()  # data.record_samples is off by default (tests/test_rescale.py: on)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _same_count_other_content(shards: Path, dest: Path) -> Path:
    """A copy of `shards` whose first train shard holds its samples in reverse order: the same sample count and
    sizes, a consistent manifest (sha256 and bytes updated), other data at every loader position."""
    shutil.copytree(shards, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    rec = manifest["splits"]["train"]["shards"][0]
    path = dest / rec["path"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, raw in members:
            arr = np.load(io.BytesIO(raw))
            out = io.BytesIO()
            np.save(out, arr[::-1].copy())
            data = out.getvalue()
            assert len(data) == len(raw) and data != raw
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    rec["bytes"], rec["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dest


# ------------------------------------------------------------------------------------------------ unit


def test_changes_are_classified_refused_warned_or_silent():
    saved = {"model": {"d_model": 48, "n_layers": 2, "rope_theta": 10000.0, "kernels": "auto"},
             "optim": {"lr": 3e-3}, "train": {"max_steps": 10, "run_dir": "a", "log_every": 1},
             "meta": {"feature_norm": "standardize", "head": {"hidden": 64, "dropout": 0.1}}}
    now = {"model": {"d_model": 64, "n_layers": 2, "rope_theta": 5e5, "kernels": "torch"},
           "optim": {"lr": 1e-3}, "train": {"max_steps": 20, "run_dir": "b", "log_every": 5},
           "meta": {"feature_norm": "layernorm", "head": {"hidden": 64, "dropout": 0.2}}}
    refused, warned = compat.config_changes(saved, now)
    assert refused == [("meta.feature_norm", "standardize", "layernorm"), ("model.d_model", 48, 64)]
    assert warned == [("meta.head.dropout", 0.1, 0.2), ("model.rope_theta", 10000.0, 5e5), ("optim.lr", 3e-3, 1e-3),
                      ("train.max_steps", 10, 20)]
    now["meta"]["feature_norm"] = "center"  # no LayerNorm on either side: the head's parameters are the same
    assert ("meta.feature_norm", "standardize", "center") in compat.config_changes(saved, now)[1]
    assert compat.config_changes(saved, saved) == ([], [])
    stages = [compat.config_changes({"train": {"zero_stage": a}}, {"train": {"zero_stage": b}})[0] != []
              for a, b in ((1, 2), (2, 1), (2, 0), (0, 3), (2, 3), (3, 1))]
    assert stages == [False, False, True, True, False, False]  # 1-3 convert (universal checkpoint); 0 has no ZeRO
    assert compat.config_changes({"train": {"precision": "fp32"}}, {"train": {"precision": "bf16"}})[0]
    message = compat.refusal("ck/step_00000002", [("model.d_model", 48, 64)])
    assert "model.d_model=48 in the checkpoint, 64 now" in message and "checkpoint.resume=never" in message


# ------------------------------------------------------------------------------------------------ runs


def test_a_changed_model_shape_is_refused_in_one_line(checkpointed, shards, tmp_path):
    out = train(_copy(checkpointed, tmp_path), shards, "train.max_steps=4", "model.d_model=64", "model.n_layers=3")
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _lines(out.stderr, "metalm: error")
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "model.d_model=48 in the checkpoint, 64 now, model.n_layers=2 in the checkpoint, 3 now" in errors[0]
    assert "checkpoint.resume=never" in errors[0] and "train.run_dir" in errors[0]


def test_a_change_that_loads_is_one_warning_and_the_run_continues(checkpointed, shards, tmp_path):
    out = train(_copy(checkpointed, tmp_path), shards, "train.max_steps=4", "model.rope_theta=500000",
                "optim.lr=1e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    warned = _lines(out.stderr, "with a changed config")
    assert len(warned) == 1, out.stderr[-3000:]
    for part in ("model.rope_theta=10000.0 in the checkpoint, 500000.0 now", "optim.lr=0.003 in the checkpoint, "
                 "0.001 now", "train.max_steps=2 in the checkpoint, 4 now"):
        assert part in warned[0]
    assert "resumed from" in out.stdout and "at step 2" in out.stdout


def test_other_shards_with_the_same_sample_count_are_refused_unless_allowed(checkpointed, shards, tmp_path):
    other = _same_count_other_content(shards, tmp_path / "other-shards")
    run_dir = _copy(checkpointed, tmp_path)
    out = train(run_dir, other, "train.max_steps=4")
    assert out.returncode == 1, out.stderr[-3000:]
    errors = _lines(out.stderr, "metalm: error")
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"data.shards={other} is not the data the checkpoint was trained on" in errors[0]
    assert "checkpoint.allow_data_change=true" in errors[0]
    out = train(run_dir, other, "train.max_steps=4", "checkpoint.allow_data_change=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_lines(out.stderr, "continuing on them at the same position")) == 1
    out = train(_copy(checkpointed, tmp_path / "again"), shards, "train.max_steps=4")  # the same data: no word
    assert out.returncode == 0 and not _lines(out.stderr, "data.shards="), out.stderr[-3000:]
