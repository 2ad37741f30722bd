"""Golden-loss regression test (torchtitan's `tests/assets/losses` idea).

Deterministic cpu-tiny hybrid runs (one CPU process, fp32, ZeRO-2, gradient accumulation 2, AR and meta steps
mixed by the seeded schedule) must log exactly the losses stored in tests/golden/: one with the paper's meta step
pinned (hybrid_cpu_tiny.json: readout at the mask, raw features, persistent head, recorded before the training
core was recomposed), one with the weighted objective and its absolute feature clip (hybrid_cpu_tiny_clip.json:
the shipped defaults until the meta-gradient budget; recorded before the hybrid step became one object), and one
with the shipped meta defaults (hybrid_cpu_tiny_defaults.json: the budget, meta.grad_ratio). Any change to the
model, the kernels' CPU references, the data order, the episode sampler, the FOMAML step, the optimizer or the
schedule moves these numbers by far more than the tolerance; a refactoring must not.

The tolerance (1e-6 relative) only absorbs the last-bit differences between CPUs of one kind (SIMD paths of
the BLAS); on one machine the run is bit-identical. To record the file anew after an intended change of
numbers: METALM_RECORD_GOLDEN=1 pytest tests/test_golden_losses.py, and say why in the commit message.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from procs import cpu_run_env

REPO = Path(__file__).resolve().parents[1]
PAPER_META = ["meta.readout=mask", "meta.feature_norm=none", "meta.head_init=persistent", "meta.inner_lr=0.01",
              "meta.objective=replace", "meta.classes=any", "meta.feature_grad_clip=0", "meta.head.dropout=0.1",
              "meta.grad_ratio=0"]
# the weighted meta objective with an absolute feature clip: the shipped defaults before the meta-gradient budget
CLIP_META = ["meta.grad_ratio=0", "meta.feature_grad_clip=0.1"]
CASES = {"hybrid_cpu_tiny.json": PAPER_META, "hybrid_cpu_tiny_clip.json": CLIP_META,
         "hybrid_cpu_tiny_defaults.json": []}
KEYS = ("ar_loss", "meta_loss", "meta/query_acc", "meta/support_acc_after", "lr")
OVERRIDES = [
    "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4", "train.global_batch=8",
    "train.precision=fp32", "train.zero_stage=2", "train.max_steps=12", "train.log_every=1", "train.val_every=0",
    "optim.warmup_steps=3", "checkpoint.every=100", "logging.wandb=false", "logging.progress=false",
    "data.prepare_if_missing=false", "meta.n_way=4", "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=3",
    "meta.hybrid_ratio=0.5", "train.seed=3",
]


def _run(run_dir: Path, shards: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
           *overrides, f"data.shards={shards}", f"train.run_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: r.get(k) for k in KEYS}} for r in rows if "lr" in r]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hybrid_run_logs_the_golden_losses(tmp_path, shards, name):
    golden, overrides = REPO / "tests" / "golden" / name, OVERRIDES + CASES[name]
    got = _run(tmp_path / "run", shards, overrides)
    if os.environ.get("METALM_RECORD_GOLDEN") == "1":
        golden.write_text(json.dumps({"overrides": overrides, "records": got}, indent=1) + "\n")
    want = json.loads(golden.read_text())
    assert want["overrides"] == overrides, "the golden file was recorded with other settings: record it anew"
    assert [r["step"] for r in got] == [r["step"] for r in want["records"]] == list(range(1, 13))
    assert any(r["meta_loss"] is None for r in got) and any(r["meta_loss"] is not None for r in got), \
        "the golden run must contain both AR and meta steps"
    for g, w in zip(got, want["records"]):
        for k in KEYS:
            if w[k] is None:
                assert g[k] is None, f"step {g['step']} {k}: {g[k]} (golden: none)"
            else:
                assert g[k] is not None and math.isclose(g[k], w[k], rel_tol=1e-6, abs_tol=1e-9), \
                    f"step {g['step']} {k}: {g[k]!r} != golden {w[k]!r}"
