"""A dead run must not be reported as done (issue 26, item 2).

An absurd learning rate makes every meta step non-finite (skipped by the guard) while the AR steps keep a finite
loss of exactly ln(vocab) and DeepSpeed drops their updates as overflows: the non-finite steps never come
"in a row", so only the window count and the dead-loss rule can stop such a run. Config validation refuses
such a learning rate, so the worker sets it on an already validated config (what a learning rate that is
merely too high for the model does in a longer run). Each run is a real Trainer on one CPU process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-tiny.yaml"
OVERRIDES = [
    "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4", "train.global_batch=8",
    "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2", "checkpoint.every=1000",
    "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false", "meta.n_way=4",
    "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=2", "meta.hybrid_ratio=0.5", "train.max_steps=60",
]


def worker(shards: str, run_dir: str, lr: str, *extra: str) -> None:
    from metalm.config import load_config
    from metalm.train.engine import init_distributed
    from metalm.train.errors import TrainingError
    from metalm.train.loop import Trainer

    cfg = load_config(CONFIG, [*OVERRIDES, f"data.shards={shards}", f"train.run_dir={run_dir}", *extra], world_size=1)
    cfg.optim.lr = float(lr)
    trainer = Trainer(cfg, init_distributed(cfg.train))
    try:
        outcome = {"status": trainer.run(), "step": trainer.step}
    except TrainingError as e:
        outcome = {"error": str(e), "step": trainer.step}
    Path(run_dir, "outcome.json").write_text(json.dumps(outcome))


def _run(tmp_path: Path, shards: Path, lr: str, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, __file__, "WORKER", str(shards), str(run_dir), lr, *extra], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads((run_dir / "outcome.json").read_text())


def test_dead_meta_steps_between_finite_ar_steps_stop_the_run(tmp_path, shards):
    out = _run(tmp_path, shards, "1e6")
    assert "error" in out, f"a dead run finished as done at step {out['step']}"
    assert out["step"] < 60 and "\n" not in out["error"]
    assert ("of the last 100 steps" in out["error"] or "ar steps in a row" in out["error"]), out["error"]


def test_dead_weights_with_every_ar_update_dropped_stop_the_run(tmp_path, shards):
    out = _run(tmp_path, shards, "1e6", "meta.enabled=false")
    assert "error" in out, f"a dead run finished as done at step {out['step']}"
    assert "the ar loss was exactly 10.825840" in out["error"], out["error"]  # ln(50304): a uniform prediction
    assert out["step"] < 20


def test_a_learning_rate_above_one_is_refused_in_one_line():
    from metalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^optim\.lr=1e\+30: expected at most 1 ") as e:
        load_config(CONFIG, ["optim.lr=1e30"])
    assert "\n" not in str(e.value)
    assert load_config(CONFIG, ["optim.lr=1.0"]).optim.lr == 1.0


if __name__ == "__main__" and sys.argv[1] == "WORKER":
    worker(*sys.argv[2:])
